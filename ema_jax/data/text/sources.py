"""The documents of a split, from whichever source `config.data.source` names.

`load_documents` gives a split whole or as one of n disjoint parts; `stream_layout` gives the parts
that the training streams own (stream r of G = global_batch owns part r of G). Each source lives in
its own module: builtin.py (standard-library docstrings), files.py (JSON lines or plain text),
tfds_source.py (prepared tensorflow-datasets).
"""

from __future__ import annotations

from typing import Any, Sequence

from ema_jax.data.text import builtin
from ema_jax.data.text import config as config_lib
from ema_jax.data.text import documents as documents_lib
from ema_jax.data.text import files
from ema_jax.data.text import tfds_source


def load_documents(data_cfg: Any, split: str, part: int = 0, num_parts: int = 1) -> documents_lib.Documents:
  """The documents of `split`, or part `part` of `num_parts` disjoint parts of it (assign_part)."""
  spec = config_lib.parse_data_config(data_cfg)
  if not (isinstance(num_parts, int) and num_parts >= 1 and isinstance(part, int) and 0 <= part < num_parts):
    raise ValueError(f"part={part!r} of num_parts={num_parts!r}: expected 0 <= part < num_parts.")
  if spec.source == "builtin":
    docs = builtin.load(split)
  elif spec.source == "files":
    return files.load(spec, split, part, num_parts)
  else:
    docs = tfds_source.load(spec, split)
  if num_parts == 1:
    return docs
  ranges = documents_lib.assign_part(docs.units, part, num_parts)
  return documents_lib.SubsetDocuments(docs, ranges, f"{docs.description} (part {part} of {num_parts})")


def stream_layout(spec: config_lib.DataSpec, split: str, num_streams: int, streams: Sequence[int]):
  """(documents, {stream: index ranges into them}, num_units) for the given streams.

  The ranges of stream r depend only on the split and num_streams (never on which process asks),
  so every process layout sees the same streams. num_units counts the split's files or shards.
  """
  if spec.source == "files":
    # With at least num_streams files only the asking process's streams' files are read.
    docs, ranges, num_files = files.stream_documents(spec, split, num_streams, streams)
    if ranges is not None:
      return docs, ranges, num_files
  elif spec.source == "builtin":
    docs = builtin.load(split)
  else:
    docs = tfds_source.load(spec, split)
  if len(docs) < num_streams:
    raise ValueError(
        f"{docs.description} has {len(docs)} documents, fewer than global_batch={num_streams}: "
        "every row of the batch reads its own documents. Use a batch size of at most "
        f"{len(docs)}, or more data."
    )
  ranges = {r: documents_lib.assign_part(docs.units, r, num_streams) for r in streams}
  return docs, ranges, len(docs.units)
