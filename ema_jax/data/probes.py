"""Synthetic probes of what a fixed-size context keeps: copy, associative recall, selective copy, filtering.

Each generator returns a batch of token sequences for next-token training, deterministic in (seed, step):

    inputs [B, T] int32, targets [B, T] int32 (inputs shifted by one), answer_mask [B, T] float32

where answer_mask marks the positions whose targets are answer tokens: a model is scored by the exact-match
accuracy of those (per token, and per sequence: every answer token right). Sequences of one batch share one
length (shorter content is left-padded with PAD, which is never an answer), so a batch is a plain array.

Vocabulary layout (`Vocab`): content symbols 0..S-1, then special tokens PAD, SEP (delimiter), QUERY,
NOISE, and for filtering the two class symbols. The probes, from the copy-vs-filter dial:
  - copy: a random string of L symbols, SEP, the same string; answers are the copied symbols (exact recall
    of every past token: attention can, a fixed-size state cannot beyond its capacity).
  - recall (multi-query associative recall): N key-value pairs (distinct keys), SEP, then Q queries
    "QUERY key" each answered by its value.
  - selective copy: L content symbols scattered among NOISE tokens in a sequence of length M, SEP, then
    the content symbols in order (needs selection: which tokens to keep).
  - filtering ("which of two tokens has been more frequent so far, under noise"): a stream of M tokens,
    each class symbol A or B with probability p_a / 1 - p_a, or NOISE; at every position the target is the
    class that has been more frequent so far (ties: the most recent class). A decayed count (what fixed
    EMA traces compute) is enough; exact recall of any single token is not needed.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np

PROBES = ("copy", "recall", "selective_copy", "filtering")


@dataclasses.dataclass(frozen=True)
class Vocab:
  symbols: int  # content symbols 0..S-1

  @property
  def pad(self) -> int:
    return self.symbols

  @property
  def sep(self) -> int:
    return self.symbols + 1

  @property
  def query(self) -> int:
    return self.symbols + 2

  @property
  def noise(self) -> int:
    return self.symbols + 3

  @property
  def class_a(self) -> int:
    return self.symbols + 4

  @property
  def class_b(self) -> int:
    return self.symbols + 5

  @property
  def size(self) -> int:
    return self.symbols + 6


def _rng(seed: int, step: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))


def _finish(seq: np.ndarray, answer: np.ndarray) -> Dict[str, np.ndarray]:
  """Next-token pairs: inputs = seq[:, :-1], targets = seq[:, 1:]; a target is an answer if answer[:, 1:]."""
  return dict(
      inputs=seq[:, :-1].astype(np.int32),
      targets=seq[:, 1:].astype(np.int32),
      answer_mask=answer[:, 1:].astype(np.float32),
  )


def copy_batch(seed: int, step: int, batch: int, length: int, vocab: Vocab) -> Dict[str, np.ndarray]:
  """L random symbols, SEP, the same L symbols (sequence length 2 L + 1)."""
  _check(length >= 1, "length", length, "an integer >= 1")
  rng = _rng(seed, step)
  s = rng.integers(0, vocab.symbols, size=(batch, length))
  seq = np.concatenate([s, np.full((batch, 1), vocab.sep), s], axis=1)
  answer = np.zeros_like(seq, bool)
  answer[:, length + 1 :] = True
  return _finish(seq, answer)


def recall_batch(seed: int, step: int, batch: int, pairs: int, queries: int, vocab: Vocab) -> Dict[str, np.ndarray]:
  """N pairs 'key value' (distinct keys), SEP, then Q times 'QUERY key value' (sequence length 2N + 1 + 3Q)."""
  _check(1 <= pairs <= vocab.symbols, "pairs", pairs, f"an integer in [1, symbols={vocab.symbols}] (keys distinct)")
  _check(queries >= 1, "queries", queries, "an integer >= 1")
  rng = _rng(seed, step)
  keys = np.argsort(rng.random((batch, vocab.symbols)), axis=1)[:, :pairs]
  values = rng.integers(0, vocab.symbols, size=(batch, pairs))
  ctx = np.stack([keys, values], axis=2).reshape(batch, 2 * pairs)
  which = rng.integers(0, pairs, size=(batch, queries))
  qk = np.take_along_axis(keys, which, axis=1)
  qv = np.take_along_axis(values, which, axis=1)
  q = np.stack([np.full_like(qk, vocab.query), qk, qv], axis=2).reshape(batch, 3 * queries)
  seq = np.concatenate([ctx, np.full((batch, 1), vocab.sep), q], axis=1)
  answer = np.zeros_like(seq, bool)
  answer[:, 2 * pairs + 1 + 2 :: 3] = True  # the value after each 'QUERY key'
  return _finish(seq, answer)


def selective_copy_batch(
    seed: int, step: int, batch: int, length: int, span: int, vocab: Vocab
) -> Dict[str, np.ndarray]:
  """L symbols at random positions of a span of M >= L tokens (the rest NOISE), SEP, the L symbols in order."""
  _check(length >= 1, "length", length, "an integer >= 1")
  _check(span >= length, "span", span, f"an integer >= length={length}")
  rng = _rng(seed, step)
  s = rng.integers(0, vocab.symbols, size=(batch, length))
  pos = np.sort(np.argsort(rng.random((batch, span)), axis=1)[:, :length], axis=1)
  region = np.full((batch, span), vocab.noise)
  np.put_along_axis(region, pos, s, axis=1)
  seq = np.concatenate([region, np.full((batch, 1), vocab.sep), s], axis=1)
  answer = np.zeros_like(seq, bool)
  answer[:, span + 1 :] = True
  return _finish(seq, answer)


def filtering_batch(
    seed: int, step: int, batch: int, span: int, vocab: Vocab, noise: float = 0.5
) -> Dict[str, np.ndarray]:
  """A stream of M tokens (A, B or NOISE); the target after each prefix is the class more frequent so far.

  Each sequence draws its own bias p_a ~ U(0, 1); a token is NOISE with probability `noise`, else A with
  probability p_a. The sequence is BOS-less: position t's target is the majority class of tokens 0..t
  (ties: the most recent class; before any class token: A). Every position is an answer.
  """
  _check(span >= 1, "span", span, "an integer >= 1")
  _check(0.0 <= noise < 1.0, "noise", noise, "a probability in [0, 1)")
  rng = _rng(seed, step)
  p_a = rng.random((batch, 1))
  is_noise = rng.random((batch, span)) < noise
  is_a = rng.random((batch, span)) < p_a
  stream = np.where(is_noise, vocab.noise, np.where(is_a, vocab.class_a, vocab.class_b))
  a = np.cumsum(stream == vocab.class_a, axis=1)
  b = np.cumsum(stream == vocab.class_b, axis=1)
  # The most recent class token so far (A before any).
  last = np.full((batch,), vocab.class_a)
  recent = np.empty_like(stream)
  for t in range(span):
    last = np.where(stream[:, t] == vocab.noise, last, stream[:, t])
    recent[:, t] = last
  target = np.where(a > b, vocab.class_a, np.where(b > a, vocab.class_b, recent))
  return dict(
      inputs=stream.astype(np.int32),
      targets=target.astype(np.int32),
      answer_mask=np.ones((batch, span), np.float32),
  )


def accuracy(pred_BT: np.ndarray, batch: Dict[str, np.ndarray]) -> Dict[str, float]:
  """Exact match of the answer tokens: per token, and per sequence (all its answers right)."""
  m = batch["answer_mask"] > 0
  hit = (np.asarray(pred_BT) == batch["targets"]) & m
  per_seq = (hit.sum(1) == m.sum(1)).mean()
  return dict(token_accuracy=float(hit.sum() / max(m.sum(), 1)), sequence_accuracy=float(per_seq))


def _check(ok: bool, name: str, value, expected: str) -> None:
  if not ok:
    raise ValueError(f"probes: `{name}`={value!r}; expected {expected}.")
