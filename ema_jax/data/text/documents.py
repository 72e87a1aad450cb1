"""Documents: the texts of one split of a source (or a part of it) in a fixed order.

Every source (builtin.py, files.py, tfds_source.py) returns a `Documents`. Its `units` are the
split's natural pieces (a file, a tfds shard, or part of one), and `assign_part` deals them out to
the parts of a split: the training streams are the parts of n = global_batch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class Documents:
  """Documents of one split (or a part of it), in a fixed order.

  `units` are contiguous index ranges (a file, a tfds shard, or part of one); a source that is
  not `random_access` (tf.data) is read with `iter_range` in order, one unit at a time. Others
  also support `docs[i]`.
  """

  random_access = True

  def __init__(self, description: str, units: Sequence[tuple[int, int]]):
    self.description = description
    self.units = [(int(lo), int(hi)) for lo, hi in units]

  def __len__(self) -> int:
    return sum(hi - lo for lo, hi in self.units)

  def __getitem__(self, index: int) -> str:
    raise NotImplementedError

  def iter_range(self, start: int, stop: int) -> Iterator[str]:
    for i in range(start, stop):
      yield self[i]

  def __iter__(self) -> Iterator[str]:
    return self.iter_range(0, len(self))

  def __repr__(self):
    return f"{type(self).__name__}({self.description}, {len(self)} documents)"


class ListDocuments(Documents):
  """Documents held in memory."""

  def __init__(self, texts: Sequence[str], description: str, units=None):
    super().__init__(description, units if units is not None else [(0, len(texts))])
    self._texts = list(texts)

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index: int) -> str:
    return self._texts[index]


class SubsetDocuments(Documents):
  """The documents of `parent` in the given index ranges, renumbered from 0."""

  def __init__(self, parent: Documents, ranges: Sequence[tuple[int, int]], description: str):
    starts = np.cumsum([0] + [hi - lo for lo, hi in ranges])
    super().__init__(description, list(zip(starts[:-1], starts[1:])))
    self.random_access = parent.random_access
    self._parent = parent
    self._ranges = list(ranges)
    self._starts = starts

  def _locate(self, index: int) -> int:
    if not 0 <= index < self._starts[-1]:
      raise IndexError(index)
    k = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._ranges[k][0] + index - int(self._starts[k])

  def __getitem__(self, index: int) -> str:
    return self._parent[self._locate(index)]

  def iter_range(self, start: int, stop: int) -> Iterator[str]:
    # Ranges from `units` never cross a parent range, so one parent read suffices.
    for k, (lo, hi) in enumerate(zip(self._starts[:-1], self._starts[1:])):
      a, b = max(start, lo), min(stop, hi)
      if a < b:
        base = self._ranges[k][0] - int(lo)
        yield from self._parent.iter_range(a + base, b + base)


def assign_part(units: Sequence[tuple[int, int]], part: int, num_parts: int) -> list[tuple[int, int]]:
  """The index ranges of part k of n: whole units k, k + n, ... when there are at least n units,
  else a contiguous 1/n of the records."""
  if num_parts == 1:
    return list(units)
  if len(units) >= num_parts:
    return list(units[part::num_parts])
  offsets = np.cumsum([0] + [hi - lo for lo, hi in units])
  total = int(offsets[-1])
  lo_rec = total * part // num_parts
  hi_rec = total * (part + 1) // num_parts
  ranges = []
  for (lo, hi), start in zip(units, offsets[:-1]):
    a, b = max(lo, lo + lo_rec - int(start)), min(hi, lo + hi_rec - int(start))
    if a < b:
      ranges.append((a, b))
  return ranges
