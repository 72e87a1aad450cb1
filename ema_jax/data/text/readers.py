"""Readers: the documents of one training stream, in a new order each epoch.

Stream r of G owns a fixed part of the split's documents (sources.stream_layout) and reads them
each epoch in an order drawn from (seed, r, epoch), forever. A reader's position (epoch, doc) is
the doc-th document of that epoch's order. Random-access sources (builtin, files, tfds
array_record) are read document by document, the next ones read and tokenized ahead on a thread
pool shared by all streams (`read_threads`; tiktoken and tfds reads release the GIL). Sources
readable only in order (tfrecord via tf.data) visit a stream's units in a new order each epoch,
records in their stored order.
"""

from __future__ import annotations

import collections

import grain
import numpy as np

from ema_jax.data.text import documents as documents_lib


def make_reader(docs: documents_lib.Documents, ranges, seed: int, stream: int, encode, pool):
  """The reader of stream `stream` over the index ranges `ranges` of `docs`.

  `encode` turns a text into the tokens the stream packs; `pool` (random-access sources only, may
  be None) reads and encodes the next documents ahead.
  """
  if docs.random_access:
    return _RandomAccessReader(docs, ranges, seed, stream, encode, pool, ahead=2)
  return _SequentialReader(docs, ranges, seed, stream, encode)


def _derived_seed(*values: int) -> int:
  # Folding instead of adding keeps the epoch-e order of seed s unrelated to seed s + e.
  # Below 2**31: grain's index_shuffle takes a 32-bit seed.
  return int(np.random.SeedSequence(list(values)).generate_state(1)[0] >> 1)


# Hand-written, not grain's MapDataset.shuffle + ThreadPrefetchIterDataset: grain seeds epoch e
# with seed + e (the correlation _derived_seed avoids) and shuffles small domains with
# index_shuffle, not these NumPy permutations, so every order and every saved state would change;
# and G streams with a grain prefetch iterator each would hold G threads and buffers where one
# shared pool serves them all.
class _RandomAccessReader:
  """The documents of one stream of a random-access source, in a new order each epoch.

  Position (epoch, doc): the doc-th document of that epoch's order, a permutation drawn from
  (seed, stream, epoch). With a thread pool, the next `ahead` documents are read and tokenized in
  the background; which document comes next never depends on the threads.
  """

  # Up to this many documents the epoch's permutation is a NumPy array (64 KiB as int32); above
  # it, grain's index_shuffle (a keyed bijection, O(1) memory, so G streams of a C4-sized split
  # cost nothing), which costs ~5 us a call there but up to ~15 ms on domains of a few elements.
  _MAX_ARRAY_PERMUTATION = 1 << 14

  def __init__(self, docs: documents_lib.Documents, ranges, seed: int, stream: int, encode, pool, ahead: int):
    self._docs, self._ranges, self._encode = docs, list(ranges), encode
    self._starts = np.cumsum([0] + [hi - lo for lo, hi in self._ranges])
    self.num_documents = int(self._starts[-1])
    self._seed, self._stream = seed, stream
    self._epoch_order = (-1, 0, None)  # (epoch, seed, permutation array or None)
    self._pool, self._ahead = pool, ahead
    self._queue: collections.deque = collections.deque()  # (position, future) read ahead
    self.position = (0, 0)  # of the next document `read` returns
    self._submitted = self.position  # of the next document to read ahead

  def document_index(self, epoch: int, doc: int) -> int:
    n = self.num_documents
    if self._epoch_order[0] != epoch:
      seed = _derived_seed(self._seed, self._stream, epoch)
      order = None
      if n <= self._MAX_ARRAY_PERMUTATION:
        order = np.random.default_rng(seed).permutation(n).astype(np.int32)
      self._epoch_order = (epoch, seed, order)
    _, seed, order = self._epoch_order
    if order is not None:
      k = int(order[doc])
    else:
      k = grain.experimental.index_shuffle(doc, max_index=n - 1, seed=seed, rounds=4)
    unit = int(np.searchsorted(self._starts, k, side="right")) - 1
    return self._ranges[unit][0] + k - int(self._starts[unit])

  def advance(self, position):
    epoch, doc = position
    return (epoch, doc + 1) if doc + 1 < self.num_documents else (epoch + 1, 0)

  def load(self, epoch: int, doc: int) -> np.ndarray:
    """The tokens of document (epoch, doc), without moving the reader."""
    return self._load(self.document_index(epoch, doc))

  def _load(self, index: int) -> np.ndarray:
    return self._encode(self._docs[index])

  def seek(self, epoch: int, doc: int) -> None:
    for _, future in self._queue:
      future.cancel()
    self._queue.clear()
    self.position = self._submitted = (epoch, doc)

  def prefetch(self) -> None:
    while self._pool is not None and len(self._queue) < self._ahead:
      index = self.document_index(*self._submitted)
      self._queue.append((self._submitted, self._pool.submit(self._load, index)))
      self._submitted = self.advance(self._submitted)

  def read(self) -> tuple[tuple[int, int], np.ndarray]:
    position = self.position
    self.position = self.advance(position)
    if self._pool is None:
      return position, self._load(self.document_index(*position))
    self.prefetch()
    queued, future = self._queue.popleft()
    assert queued == position, (queued, position)
    self.prefetch()
    return position, future.result()

  def close(self) -> None:
    self.seek(*self.position)


class _SequentialReader:
  """The documents of one stream of a source read only in order (tf.data).

  Each epoch visits the stream's units (shard pieces) in a new order derived from (seed, stream,
  epoch); records inside a unit keep their stored order (tfds shuffles examples when it prepares
  a dataset). Position (epoch, doc) counts documents in that epoch's order; seeking opens the
  unit holding it at the right record.
  """

  def __init__(self, docs: documents_lib.Documents, ranges, seed: int, stream: int, encode):
    self._docs, self._encode = docs, encode
    self._units = [(lo, hi) for lo, hi in ranges if hi > lo]
    self.num_documents = sum(hi - lo for lo, hi in self._units)
    self._seed, self._stream = seed, stream
    self._order = (-1, None, None)  # (epoch, unit order, first doc of each unit in that order)
    self._reader = None
    self._unit_end = 0
    self.position = (0, 0)

  def _epoch_order(self, epoch: int):
    if self._order[0] != epoch:
      rng = np.random.default_rng([self._seed, self._stream, epoch])
      order = rng.permutation(len(self._units))
      starts = np.cumsum([0] + [self._units[k][1] - self._units[k][0] for k in order])
      self._order = (epoch, order, starts)
    return self._order[1], self._order[2]

  def document_index(self, epoch: int, doc: int) -> int:
    order, starts = self._epoch_order(epoch)
    k = int(np.searchsorted(starts, doc, side="right")) - 1
    return self._units[order[k]][0] + doc - int(starts[k])

  def advance(self, position):
    epoch, doc = position
    return (epoch, doc + 1) if doc + 1 < self.num_documents else (epoch + 1, 0)

  def load(self, epoch: int, doc: int) -> np.ndarray:
    """The tokens of document (epoch, doc), without moving the reader."""
    index = self.document_index(epoch, doc)
    return self._encode(next(iter(self._docs.iter_range(index, index + 1))))

  def seek(self, epoch: int, doc: int) -> None:
    self.position = (epoch, doc)
    self._reader = None

  def prefetch(self) -> None:
    pass

  def read(self) -> tuple[tuple[int, int], np.ndarray]:
    epoch, doc = position = self.position
    if self._reader is None:
      order, starts = self._epoch_order(epoch)
      k = int(np.searchsorted(starts, doc, side="right")) - 1
      self._unit_end = int(starts[k + 1])
      self._reader = self._docs.iter_range(self.document_index(epoch, doc), self._units[order[k]][1])
    try:
      text = next(self._reader)
    except StopIteration:
      raise ValueError(
          f"{self._docs.description}: stream {self._stream} ran out of records before "
          f"document {doc} of epoch {epoch}; the prepared dataset does not match its metadata."
      ) from None
    if doc + 1 == self._unit_end:
      self._reader = None
    self.position = self.advance(position)
    return position, self._encode(text)

  def close(self) -> None:
    self._reader = None
