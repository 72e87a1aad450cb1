"""The fields of `config.data`, their validation, and checks of the iterators' other arguments.

Every field, with its default and meaning, is in `_DEFAULTS`; `parse_data_config` accepts a dict, a
ConfigDict or a DataSpec, fills in defaults, and fails naming the field, the value and what would
work. A field that was removed fails with the reason it went (`_REMOVED`). `check_seq_len`,
`process_and_local_batch` and `as_tokenizer` check what make_train_iterator and make_eval_batches
take besides the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


from ema_jax.data import tokenizer as tokenizer_lib
from ema_jax.errors import config_error, is_int

SOURCES = ("builtin", "files", "tfds")
FILE_FORMATS = ("auto", "jsonl", "text")
DEFAULT_TFDS_NAME = "c4/en:3.1.0"


_DEFAULTS: dict[str, Any] = dict(
    source="builtin",  # builtin | files | tfds
    tokenizer="gpt2",  # gpt2 | byte
    path="",  # files: glob, may contain {split}
    eval_path="",  # files: glob of the eval split (default: path)
    field="text",  # files (jsonl) and tfds: the feature holding the document text
    format="auto",  # files: auto (by suffix) | jsonl | text
    tfds_name=DEFAULT_TFDS_NAME,
    data_dir="",  # tfds: '' = tfds default (TFDS_DATA_DIR or ~/tensorflow_datasets)
    train_split="train",
    eval_split="validation",
    # Threads that read and tokenize the streams' next documents ahead (random-access sources).
    # tiktoken and tfds reads release the GIL, so they help when cores are free; results never
    # depend on them. -1 = 0 for in-memory sources (builtin, files), 8 for tfds.
    read_threads=-1,
    seed=0,  # used when make_train_iterator gets seed=None
    eval_max_documents=0,  # 0 = no limit
    eval_max_tokens=0,  # in-loop evaluations: the first n target tokens of a split; 0 = no limit
    # The final evaluation of a run and eval.py: 0 = every token of the split (the default: final numbers
    # are exact); n > 0 caps it like eval_max_tokens.
    eval_max_tokens_final=0,
)


_REMOVED = {
    "shuffle_buffer": "every row of the batch has its own document stream, so each step's rows "
    "already come from different documents and no window shuffle is done.",
}


def default_data_config():
  """An ml_collections ConfigDict with every accepted field at its default (see _DEFAULTS)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  return ml_collections.ConfigDict(dict(_DEFAULTS))


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A validated `config.data`."""

  source: str
  tokenizer: str
  path: str
  eval_path: str
  field: str
  format: str
  tfds_name: str
  data_dir: str
  train_split: str
  eval_split: str
  read_threads: int
  seed: int
  eval_max_documents: int
  eval_max_tokens: int
  eval_max_tokens_final: int


def parse_data_config(data_cfg: Any) -> DataSpec:
  """Validates a dict / ConfigDict / DataSpec of data fields; missing fields take defaults."""
  if isinstance(data_cfg, DataSpec):
    return data_cfg
  if data_cfg is None:
    data_cfg = {}
  if hasattr(data_cfg, "to_dict"):
    data_cfg = data_cfg.to_dict()
  if not isinstance(data_cfg, Mapping):
    raise TypeError(f"config.data must be a dict or ConfigDict, got {type(data_cfg).__name__}.")
  removed = sorted(set(data_cfg) & set(_REMOVED))
  if removed:
    raise ValueError(
        f"config.data.{removed[0]} is no longer accepted: {_REMOVED[removed[0]]} Remove it " "from the config."
    )
  unknown = sorted(set(data_cfg) - set(_DEFAULTS))
  if unknown:
    raise ValueError(f"config.data has unknown field(s) {unknown}; accepted: {', '.join(_DEFAULTS)}.")
  values = {**_DEFAULTS, **dict(data_cfg)}

  def check(name, ok, accepted):
    if not ok:
      config_error(f"data.{name}", values[name], accepted)

  check("source", values["source"] in SOURCES, f"one of {SOURCES}")
  check(
      "tokenizer",
      values["tokenizer"] in tokenizer_lib.TOKENIZER_NAMES,
      f"one of {tokenizer_lib.TOKENIZER_NAMES}",
  )
  check("format", values["format"] in FILE_FORMATS, f"one of {FILE_FORMATS}")
  for name in ("path", "eval_path", "data_dir"):
    check(name, isinstance(values[name], str), "a string ('' for unset)")
  for name in ("field", "tfds_name", "train_split", "eval_split"):
    check(name, isinstance(values[name], str) and values[name], "a non-empty string")
  for name in ("eval_max_documents", "eval_max_tokens", "eval_max_tokens_final"):
    check(name, is_int(values[name]) and values[name] >= 0, "an integer >= 0")
  check(
      "read_threads",
      is_int(values["read_threads"]) and values["read_threads"] >= -1,
      "an integer >= 0, or -1 for automatic",
  )
  check("seed", is_int(values["seed"]) and values["seed"] >= 0, "an integer >= 0")
  if values["source"] == "files" and not values["path"]:
    raise ValueError(
        "config.data.source='files' needs config.data.path, a glob such as "
        "'data/*.jsonl' or 'data/{split}-*.jsonl' ({split} becomes the split name)."
    )
  return DataSpec(**{k: (int(v) if is_int(v) else v) for k, v in values.items()})


# --- arguments of make_train_iterator / make_eval_batches ------------------------------------


def _check_process(process_index: int, process_count: int) -> None:
  if not (isinstance(process_count, int) and process_count >= 1):
    raise ValueError(f"process_count={process_count!r} must be an integer >= 1.")
  if not (isinstance(process_index, int) and 0 <= process_index < process_count):
    raise ValueError(f"process_index={process_index!r} must be an integer in [0, {process_count}).")


def process_and_local_batch(global_batch, process_index, process_count, name="global_batch"):
  """(process_index, process_count, rows per process); None asks JAX for this process's place."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  _check_process(process_index, process_count)
  if not (isinstance(global_batch, int) and global_batch >= 1):
    raise ValueError(f"{name}={global_batch!r} must be an integer >= 1.")
  if global_batch % process_count:
    raise ValueError(
        f"{name}={global_batch} is not divisible by process_count={process_count}; every "
        f"process feeds an equal slice. Use a multiple of {process_count}, e.g. "
        f"{process_count * max(1, round(global_batch / process_count))}."
    )
  return process_index, process_count, global_batch // process_count


def check_seq_len(seq_len) -> None:
  """Raises ValueError unless seq_len is an integer >= 1."""
  if not (isinstance(seq_len, int) and seq_len >= 1):
    raise ValueError(f"seq_len={seq_len!r} must be an integer >= 1.")


def as_tokenizer(tokenizer, spec: DataSpec):
  """A tokenizer object from an object, a name, or None (the config's `tokenizer`)."""
  if tokenizer is None:
    return tokenizer_lib.get_tokenizer(spec.tokenizer)
  if isinstance(tokenizer, str):
    return tokenizer_lib.get_tokenizer(tokenizer)
  return tokenizer
