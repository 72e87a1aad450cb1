"""The files source: JSON lines or plain text, optionally gzipped.

JSON-lines files (`.jsonl`, `.json`, `.ndjson`) hold one object per line, the text under
`config.data.field`, blank lines skipped; plain-text files (`.txt`, `.text`, `.md`, `.rst`) are
one document each, never split; either may be gzipped (`.gz`). `config.data.format` overrides
the choice by suffix. `path` is a glob and may contain `{split}` (e.g.
`data/wikipedia/{split}*.jsonl`); `eval_path` overrides the glob of the eval split. Files are read
whole into memory when the iterator is built, so every malformed line is reported (file and line)
before training starts. Each file is one unit of the split (documents.py).
"""

from __future__ import annotations

import glob as glob_lib
import gzip
import json
import os
from typing import Any, Sequence

from ema_jax.data.text import config as config_lib
from ema_jax.data.text import documents as documents_lib

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


def _split_glob(spec: config_lib.DataSpec, split: str) -> str:
  if split == spec.eval_split and spec.eval_path:
    return spec.eval_path
  return spec.path.replace("{split}", split)


def _file_format(spec: config_lib.DataSpec, filename: str) -> str:
  if spec.format != "auto":
    return spec.format
  name = filename[:-3] if filename.endswith(".gz") else filename
  if name.endswith(_JSONL_SUFFIXES):
    return "jsonl"
  if name.endswith(_TEXT_SUFFIXES):
    return "text"
  raise ValueError(
      f"{filename}: cannot tell the format from the file name; name files {_JSONL_SUFFIXES} "
      f"(JSON lines) or {_TEXT_SUFFIXES} (plain text), or set config.data.format to 'jsonl' or "
      "'text'."
  )


def _read_bytes(filename: str) -> bytes:
  with open(filename, "rb") as f:
    data = f.read()
  if filename.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise ValueError(f"{filename}: not a valid gzip file ({e}).") from None
  return data


def _utf8_error(filename: str, data: bytes, error: UnicodeDecodeError, line_offset: int = 0):
  line = line_offset + data[: error.start].count(b"\n") + 1
  return ValueError(
      f"{filename}:{line}: bytes are not valid UTF-8 ({error.reason} at byte "
      f"{error.start} of the line); convert the file to UTF-8, e.g. "
      "`iconv -f latin1 -t utf-8 in > out`."
  )


def read_text_file(filename: str, field: str = "text", file_format: str = "jsonl") -> list[str]:
  """The documents in one file; malformed input raises ValueError naming the file and line."""
  data = _read_bytes(filename)
  if not data.strip():
    raise ValueError(
        f"{filename}: the file is empty; remove it or narrow config.data.path so the glob "
        "matches only files with documents."
    )
  if file_format == "text":
    try:
      return [data.decode("utf-8")]
    except UnicodeDecodeError as e:
      raise _utf8_error(filename, data, e) from None
  documents = []
  for line_number, line in enumerate(data.split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      text_line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _utf8_error(filename, line, e, line_number - 1) from None
    try:
      record = json.loads(text_line)
    except json.JSONDecodeError as e:
      raise ValueError(
          f"{filename}:{line_number}: not valid JSON ({e.msg} at column {e.colno}); each "
          f'line must be one JSON object such as {{"{field}": "document text"}}.'
      ) from None
    if not isinstance(record, dict):
      raise ValueError(
          f"{filename}:{line_number}: expected a JSON object, got {type(record).__name__}; "
          f'each line must look like {{"{field}": "document text"}}.'
      )
    if field not in record:
      raise ValueError(
          f"{filename}:{line_number}: the object has no field {field!r} (fields: "
          f"{sorted(record)}); set config.data.field to the field holding the text."
      )
    text = record[field]
    if not isinstance(text, str):
      raise ValueError(
          f"{filename}:{line_number}: field {field!r} holds a {type(text).__name__}, not a "
          "string; set config.data.field to the field holding the document text."
      )
    documents.append(text)
  return documents


def resolve_files(data_cfg: Any, split: str) -> list[str]:
  """The sorted files of `split` for source='files'; raises FileNotFoundError if none match."""
  spec = config_lib.parse_data_config(data_cfg)
  pattern = _split_glob(spec, split)
  files = sorted(f for f in glob_lib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
  if not files:
    where = "config.data.eval_path" if pattern == spec.eval_path else "config.data.path"
    raise FileNotFoundError(
        f"{where}={pattern!r} (split {split!r}) matches no file (working directory "
        f"{os.getcwd()}); give an existing file or a glob such as 'data/*.jsonl'."
    )
  return files


def _read_files(spec: config_lib.DataSpec, split: str, files: Sequence[str]) -> documents_lib.ListDocuments:
  """The documents of `files` in order, one unit per file."""
  texts, units = [], []
  for filename in files:
    docs = read_text_file(filename, spec.field, _file_format(spec, filename))
    units.append((len(texts), len(texts) + len(docs)))
    texts.extend(docs)
  description = f"files {_split_glob(spec, split)!r} split {split!r}"
  return documents_lib.ListDocuments(texts, description, units)


def load(spec: config_lib.DataSpec, split: str, part: int, num_parts: int) -> documents_lib.Documents:
  """The documents of `split`, or part `part` of `num_parts` (whole files when there are enough)."""
  files = resolve_files(spec, split)
  if num_parts == 1:
    return _read_files(spec, split, files)
  if len(files) >= num_parts:  # whole files: read only this part's
    docs = _read_files(spec, split, files[part::num_parts])
    docs.description += f" (part {part} of {num_parts})"
    return docs
  docs = _read_files(spec, split, files)
  ranges = documents_lib.assign_part(docs.units, part, num_parts)
  return documents_lib.SubsetDocuments(docs, ranges, f"{docs.description} (part {part} of {num_parts})")


def stream_documents(spec: config_lib.DataSpec, split: str, num_streams: int, streams: Sequence[int]):
  """(documents, {stream: index ranges} or None, number of files) for training streams.

  With at least num_streams files, stream r owns files r, r + G, ... and only the given streams'
  files are read. With fewer, every process reads every file and ranges is None: the caller
  divides the records.
  """
  files = resolve_files(spec, split)
  if len(files) >= num_streams:
    mine = set(streams)
    wanted = [j for j in range(len(files)) if j % num_streams in mine]
    docs = _read_files(spec, split, [files[j] for j in wanted])
    ranges = {r: [] for r in streams}
    for j, unit in zip(wanted, docs.units):
      ranges[j % num_streams].append(unit)
    return docs, ranges, len(files)
  return _read_files(spec, split, files), None, len(files)
