"""Packing tokens into windows, and windows into batches.

Token stream (each training stream, and the eval stream): every document is tokenized and preceded
by the tokenizer's end-of-document id, so that id closes the previous document and opens the next:
stream = eod d1 eod d2 eod d3 ... Windows of seq_len + 1 tokens are cut from the stream with stride
seq_len (consecutive windows share one token), so every token of the stream after the first is a
target exactly once.

Batches are dicts of NumPy arrays holding this process's rows of the global batch (b = global
batch // process count, T = seq_len):
  inputs       int32 [b, T]   window[:-1]
  targets      int32 [b, T]   window[1:]
  resets       bool  [b, T]   inputs == eod: a document starts at t, so recurrent state from before
                              t must be dropped. Every window also starts from zero state, so
                              position 0 is a start whatever resets[:, 0] says.
  segment_ids  int32 [b, T]   number of resets in inputs[1..t]: 0 at t = 0, +1 at each later
                              reset; attention may connect positions with equal ids only.
  mask         float32 [b, T] 1 where targets is a real token, 0 on padding (eval only).
"""

from __future__ import annotations

import collections
from typing import Any, Mapping

import numpy as np

from ema_jax.errors import DataStateError


def encode_array(tok, text: str) -> np.ndarray:
  """int32 token ids of `text`, using the tokenizer's array fast path when it has one."""
  if hasattr(tok, "encode_array"):
    return tok.encode_array(text)
  return np.asarray(tok.encode(text), np.int32)


class EncodeDocument:
  """text -> int32 [eod, tokens...]."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self._eod = np.array([tokenizer.eod_id], np.int32)

  def __call__(self, text: str) -> np.ndarray:
    return np.concatenate([self._eod, encode_array(self._tokenizer, text)])


def batch_from_windows(windows_BW: np.ndarray, eod_id: int, num_targets_B=None) -> dict:
  """The batch dict (module docstring) of windows [B, T + 1]; row b's targets past
  num_targets_B[b] are masked (None: none are)."""
  windows_BW = np.asarray(windows_BW, np.int32)
  inputs_BT, targets_BT = windows_BW[:, :-1], windows_BW[:, 1:]
  resets_BT = inputs_BT == eod_id
  segment_ids_BT = np.zeros(inputs_BT.shape, np.int32)
  np.cumsum(resets_BT[:, 1:], axis=1, dtype=np.int32, out=segment_ids_BT[:, 1:])
  if num_targets_B is None:
    mask_BT = np.ones(inputs_BT.shape, np.float32)
  else:
    positions = np.arange(inputs_BT.shape[1])
    mask_BT = (positions[None, :] < np.asarray(num_targets_B)[:, None]).astype(np.float32)
  return {
      "inputs": np.ascontiguousarray(inputs_BT),
      "targets": np.ascontiguousarray(targets_BT),
      "resets": resets_BT,
      "segment_ids": segment_ids_BT,
      "mask": mask_BT,
  }


# Hand-written, not grain's packers: grain.experimental.ConcatThenSplitIterDataset cuts disjoint
# chunks (these windows share a token, so no target is lost at a window edge), numbers segments
# from 1 in every chunk, and keeps a grain state (parent state + remainder) that it restores by
# replaying; FirstFit/BestFitPackIterDataset pack whole documents into padded rows, not one
# continuous stream. Neither has the (epoch, doc, offset) position that restores one row exactly.
class Stream:
  """Packs one stream's documents into windows of `window` tokens taken every `stride` tokens.

  Position (epoch, doc, offset): the next window starts at token `offset` of document (epoch,
  doc), whose tokens are [eod, tokens...]. Restoring re-reads that one document, so no token
  array is ever stored in a state.
  """

  def __init__(self, index: int, reader, window: int, stride: int):
    self.index, self.reader = index, reader
    self._window, self._stride = window, stride
    self._docs: collections.deque = collections.deque()  # (position, tokens) still needed
    self._offset = 0  # into the first of _docs
    self._available = 0  # tokens of _docs from _offset on

  def next_window(self, out_W: np.ndarray) -> None:
    while self._available < self._window:
      position, tokens = self.reader.read()
      self._docs.append((position, tokens))
      self._available += len(tokens)
    written, start = 0, self._offset
    for _, tokens in self._docs:
      part = tokens[start : start + self._window - written]
      out_W[written : written + len(part)] = part
      written += len(part)
      start = 0
      if written == self._window:
        break
    skip = self._stride
    while skip:
      left = len(self._docs[0][1]) - self._offset
      if skip >= left:
        skip -= left
        self._docs.popleft()
        self._offset = 0
      else:
        self._offset += skip
        skip = 0
    self._available -= self._stride

  def get_state(self) -> dict[str, int]:
    epoch, doc = self._docs[0][0] if self._docs else self.reader.position
    return {
        "epoch": int(epoch),
        "doc": int(doc),
        "offset": int(self._offset),
        "num_documents": self.reader.num_documents,
    }

  def restored(self, state: Mapping[str, Any]):
    """The (position, tokens, offset) `state` puts this stream at; DataStateError if it cannot."""
    epoch, doc, offset = (state[k] for k in ("epoch", "doc", "offset"))
    n = self.reader.num_documents
    where = f"stream {self.index} (row {self.index} of the global batch)"
    if state["num_documents"] != n:
      raise DataStateError(
          f"The data iterator state says {where} had {state['num_documents']} documents; "
          f"now it has {n}: the data changed since the state was saved. Resume with the same "
          "data, or use a new workdir."
      )
    if doc >= n:
      raise DataStateError(
          f"The data iterator state puts {where} at document {doc}, but the stream has "
          f"{n} documents (0..{n - 1}): the state was edited or the data changed. Resume "
          "with the same data, or use a new workdir."
      )
    tokens = self.reader.load(epoch, doc)
    if offset >= len(tokens):
      raise DataStateError(
          f"The data iterator state puts {where} at token {offset} of document {doc} "
          f"(epoch {epoch}), which now has {len(tokens)} tokens (with its leading eod): "
          "the data or the tokenizer changed since the state was saved. Resume with the same "
          "data and tokenizer, or use a new workdir."
      )
    return (epoch, doc), tokens, offset

  def restore(self, position, tokens: np.ndarray, offset: int) -> None:
    self.reader.seek(*self.reader.advance(position))
    self._docs = collections.deque([(position, tokens)])
    self._offset = offset
    self._available = len(tokens) - offset
    self.reader.prefetch()
