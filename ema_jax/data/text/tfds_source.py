"""The tfds source: a prepared tensorflow-datasets dataset (default `c4/en:3.1.0`).

The dataset lies under `config.data.data_dir` (a local folder or gs://). Prepared as array_record it
is read with `tfds.data_source` (random access, no TensorFlow); prepared as tfrecord (e.g. the
public C4 copies) it is read with tf.data, in order only, which needs TensorFlow (`pip install -e
.[tf]`). The choice follows the file format recorded in the prepared dataset's dataset_info.json.
Each shard (or the part of one that a split spec such as `train[:10%]` takes) is one unit of the
split (documents.py).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import numpy as np

from ema_jax.data.text import config as config_lib
from ema_jax.data.text import documents as documents_lib


def _tfds_builder(spec: config_lib.DataSpec):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = spec.data_dir or None
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  how = (
      f"Prepare it once on a machine with internet: `tfds build {spec.tfds_name.split(':')[0]} "
      f"--data_dir=DIR --file_format=array_record` (or tfds.builder({spec.tfds_name!r}, "
      "data_dir=DIR).download_and_prepare()), then set config.data.data_dir=DIR (a local folder "
      "or gs://bucket/path)."
  )
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise FileNotFoundError(
        f"tfds dataset config.data.tfds_name={spec.tfds_name!r} is not prepared under " f"data_dir={where!r}. {how}"
    ) from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {spec.tfds_name!r} is not prepared under {builder.data_dir!r}. {how}")
  return builder


def _split_units(builder, split: str) -> list[tuple[str, int, int, int]]:
  """(split name, first, end, global offset) per shard-aligned piece of a split spec."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  splits = builder.info.splits
  for name in split.split("+"):
    base = name.split("[")[0].strip()
    if base not in splits:
      raise ValueError(
          f"tfds dataset {builder.info.full_name!r} has no split {base!r}; it has "
          f"{sorted(splits)}. Set config.data.train_split / eval_split."
      )
  pieces = []
  offset = 0
  for instruction in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits):
    shard_ends = np.cumsum([0] + list(splits[instruction.splitname].shard_lengths))
    first = instruction.from_ or 0  # None means the split's start / end
    end = int(shard_ends[-1]) if instruction.to is None else instruction.to
    for s_lo, s_hi in zip(shard_ends[:-1], shard_ends[1:]):
      lo, hi = max(int(s_lo), first), min(int(s_hi), end)
      if lo < hi:
        pieces.append((instruction.splitname, lo, hi, offset))
        offset += hi - lo
  return pieces


class _TfdsArrayRecordDocuments(documents_lib.Documents):

  def __init__(self, builder, split: str, field: str):
    pieces = _split_units(builder, split)
    super().__init__(
        f"tfds {builder.info.full_name} split {split!r} (array_record)",
        [(off, off + hi - lo) for _, lo, hi, off in pieces],
    )
    self._source = builder.as_data_source(split=split)
    self._field = field
    if len(self._source) != len(self):
      raise ValueError(f"{self.description}: {len(self._source)} records, expected {len(self)}.")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    return _record_text(self._source[index], self._field, self.description, index)


class _TfdsTFRecordDocuments(documents_lib.Documents):
  """A tfrecord-prepared split read sequentially with tf.data, one shard piece at a time."""

  random_access = False

  def __init__(self, builder, split: str, field: str):
    self._pieces = _split_units(builder, split)
    super().__init__(
        f"tfds {builder.info.full_name} split {split!r} (tfrecord)",
        [(off, off + hi - lo) for _, lo, hi, off in self._pieces],
    )
    self._builder = builder
    self._field = field

  def __getitem__(self, index: int) -> str:
    return next(self.iter_range(index, index + 1))

  def iter_range(self, start: int, stop: int) -> Iterator[str]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    # tf.data only reads files here: keep TensorFlow off the accelerators JAX uses.
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
      pass
    parts = []
    for name, lo, hi, off in self._pieces:
      a, b = max(start, off), min(stop, off + hi - lo)
      if a < b:
        parts.append(f"{name}[{lo + a - off}:{lo + b - off}]")
    if not parts:
      return
    dataset = self._builder.as_dataset(
        split="+".join(parts),
        shuffle_files=False,
        read_config=tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1),
    )
    for i, record in enumerate(tfds.as_numpy(dataset)):
      yield _record_text(record, self._field, self.description, start + i)


def _record_text(record: Mapping[str, Any], field: str, description: str, index: int) -> str:
  if field not in record:
    raise ValueError(
        f"{description} record {index}: no feature {field!r} (features: {sorted(record)}); " "set config.data.field."
    )
  value = record[field]
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(
          f"{description} record {index}: feature {field!r} is not valid UTF-8 ({e.reason} " f"at byte {e.start})."
      ) from None
  if isinstance(value, str):
    return value
  raise ValueError(f"{description} record {index}: feature {field!r} holds {type(value).__name__}, not text.")


def _tensorflow_importable() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top

  return importlib.util.find_spec("tensorflow") is not None


def load(spec: config_lib.DataSpec, split: str) -> documents_lib.Documents:
  """The documents of `split` (a tfds split spec), read the way the dataset was prepared."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _tfds_builder(spec)
  features = builder.info.features
  if hasattr(features, "keys") and spec.field not in features.keys():
    raise ValueError(
        f"tfds dataset {spec.tfds_name!r} has no feature {spec.field!r} (features: "
        f"{sorted(features.keys())}); set config.data.field."
    )
  file_format = builder.info.file_format
  if file_format == tfds.core.FileFormat.ARRAY_RECORD:
    return _TfdsArrayRecordDocuments(builder, split, spec.field)
  if file_format == tfds.core.FileFormat.TFRECORD:
    if not _tensorflow_importable():
      raise ImportError(
          f"tfds dataset {spec.tfds_name!r} under {builder.data_dir!r} is prepared as "
          "tfrecord, which only tf.data reads: install TensorFlow (`pip install -e .[tf]`, "
          "tensorflow-cpu is enough), or prepare it as array_record (`tfds build ... "
          "--file_format=array_record`) to read it without TensorFlow."
      )
    return _TfdsTFRecordDocuments(builder, split, spec.field)
  raise ValueError(
      f"tfds dataset {spec.tfds_name!r} is stored as {file_format}; readable formats are "
      "array_record (tfds.data_source) and tfrecord (tf.data)."
  )
