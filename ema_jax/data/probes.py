"""Synthetic probes of what a model's context keeps: copy, associative recall, selective copy, filtering.

Each generator returns a batch for training and scoring, deterministic in (seed, step):

    inputs [B, T] int32, targets [B, T] int32, answer_mask [B, T] float32

answer_mask marks the positions whose targets are answers; the loss and the exact-match accuracy (per
token, and per sequence: every answer right) use only those. Rows of one batch share one size, so a batch
is a plain array. The probes:

  - recall (the default associative recall): multi-query associative recall (MQAR) as in Zoology (Arora et
    al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models", sec. 3 and the
    generator `multiquery_ar` of github.com/HazyResearch/zoology, zoology/data/multiquery_ar.py). Token 0
    is filler; keys come from [1, V/2) and values from [V/2, V), distinct within an example. A prefix of
    N key-value pairs, then filler in which each key appears once, bare, at slot s of the (T - 2N) / 2
    even positions after the prefix, the slots drawn without replacement with P(s) ~ (s + 1)^(a - 1)
    (Zoology's power law, a = 0.01: short gaps most likely). The answer is the value paired with the key,
    predicted at the query key's own position (the next input is filler: no value is ever shown after
    a query). `mqar_batch`.
  - recall_toy (this project's earlier variant, kept for comparison): N pairs over one shared set of
    symbols (values may repeat), SEP, then Q queries "QUERY key value".
  - selective copy as in Mamba (Gu and Dao 2023, sec. 3.1 and 4.1.1, app. E.1; the generator is the S4
    repository's src/dataloaders/datasets/copying.py, `torch_copying_data(variable=True)`): M data tokens
    at random positions among noise, then M markers at which the model outputs the data tokens in order.
    `selective_copy_batch`.
  - copy: L random symbols, SEP, the same L symbols (teacher forced: each answer follows the true ones).
  - filtering (this project's own task, from its copy-vs-filter dial; not from a paper): at every
    position, which of two class symbols has been more frequent so far, under noise. A decayed count is
    enough; exact recall of any single token is not needed.

copy, recall_toy and filtering share `Vocab`: content symbols 0..S-1, then PAD, SEP, QUERY, NOISE and the
two class symbols. MQAR and selective copy have their papers' own vocabulary layouts (above).
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np

PROBES = ("copy", "recall", "recall_toy", "selective_copy", "filtering")
MQAR_FILLER = 0  # Zoology's zeros (random_non_queries=False, as in its Figure 2 configs)
SELECTIVE_NOISE = 0  # S4 / Mamba: 0 is noise, 1..V-2 data, V-1 the marker


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The shared layout of copy, recall_toy and filtering."""

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


SPECIALS = Vocab(0).size  # tokens of `Vocab` beyond its content symbols


def _rng(seed: int, step: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))


def _finish(seq: np.ndarray, answer: np.ndarray) -> Dict[str, np.ndarray]:
  """Next-token pairs: inputs = seq[:, :-1], targets = seq[:, 1:]; a target is an answer if answer[:, 1:]."""
  return dict(
      inputs=seq[:, :-1].astype(np.int32),
      targets=seq[:, 1:].astype(np.int32),
      answer_mask=answer[:, 1:].astype(np.float32),
  )


def _permutation_prefix(rng: np.random.Generator, batch: int, n: int, k: int) -> np.ndarray:
  """[batch, k]: the first k of an independent uniform permutation of 0..n-1 per row (distinct)."""
  return np.argsort(rng.random((batch, n)), axis=1)[:, :k]


def mqar_power_law(space: int, power_a: float) -> np.ndarray:
  """P(slot s), s = 0..space-1, proportional to (s + 1)^(a - 1): Zoology's `p` (a = 1 is uniform)."""
  g = np.arange(1, space + 1, dtype=np.float64)
  p = g ** (float(power_a) - 1.0)
  return p / p.sum()


def mqar_batch(
    seed: int, step: int, batch: int, pairs: int, seq_len: int, vocab_size: int, power_a: float = 0.01
) -> Dict[str, np.ndarray]:
  """MQAR (Zoology): N key-value pairs, then each key once, bare, among filler; answers at the keys.

  Row layout: k_1 v_1 ... k_N v_N, then T - 2N positions of filler (0) in which key i sits at position
  2N + 2 s_i. The slots s_i are distinct, drawn in key order by successive sampling without replacement
  from `mqar_power_law` over the (T - 2N) // 2 slots, which is what Zoology's np.random.choice(replace=False,
  p=p) does; here through Gumbel top-k (Vieira 2014; Kool et al. 2019), the same distribution, vectorised.
  """
  half = int(vocab_size) // 2
  _check(
      vocab_size >= 4 and 1 <= pairs <= min(half - 1, vocab_size - half),
      "pairs",
      pairs,
      f"an integer in [1, {min(half - 1, vocab_size - half)}] (distinct keys from [1, {half}) and values "
      f"from [{half}, {vocab_size}) of vocab_size={vocab_size})",
  )
  _check(seq_len >= 4 * pairs, "seq_len", seq_len, f"an integer >= 4 x pairs = {4 * pairs} (a slot per query)")
  _check(power_a > 0, "power_a", power_a, "a number > 0 (Zoology's 0.01; 1 = uniform gaps)")
  rng = _rng(seed, step)
  keys = 1 + _permutation_prefix(rng, batch, half - 1, pairs)
  values = half + _permutation_prefix(rng, batch, vocab_size - half, pairs)
  space = (seq_len - 2 * pairs) // 2
  noisy = np.log(mqar_power_law(space, power_a)) + rng.gumbel(size=(batch, space))
  slots = np.argsort(-noisy, axis=1)[:, :pairs]  # slots[:, i]: key i's slot, drawn i-th
  inputs = np.full((batch, seq_len), MQAR_FILLER, np.int64)
  inputs[:, 0 : 2 * pairs : 2] = keys
  inputs[:, 1 : 2 * pairs : 2] = values
  at = 2 * pairs + 2 * slots
  np.put_along_axis(inputs, at, keys, axis=1)
  targets = np.full_like(inputs, MQAR_FILLER)
  np.put_along_axis(targets, at, values, axis=1)
  answer = np.zeros(inputs.shape, np.float32)
  np.put_along_axis(answer, at, 1.0, axis=1)
  return dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32), answer_mask=answer)


def selective_copy_batch(
    seed: int, step: int, batch: int, length: int, tokens: int, vocab_size: int = 16
) -> Dict[str, np.ndarray]:
  """Selective copying as in Mamba: M data tokens among noise, then M markers answered by the data in order.

  Row layout (S4's copying.py with variable=True, L noise tokens): T - M positions of which M, chosen
  uniformly and kept in order, hold data tokens from 1..V-2 and the rest noise (0), then M markers (V-1).
  At the i-th marker the target is the i-th data token; the inputs never show an answer. `length` is the
  whole input length T (the paper's setting: T = 4096, V = 16 counting the noise token, M = 16).
  """
  _check(tokens >= 1, "tokens", tokens, "an integer >= 1")
  _check(length >= 2 * tokens, "length", length, f"an integer >= 2 x tokens = {2 * tokens} (data + markers)")
  _check(vocab_size >= 3, "vocab_size", vocab_size, "an integer >= 3 (noise, marker and a data symbol)")
  rng = _rng(seed, step)
  region = length - tokens
  data = rng.integers(1, vocab_size - 1, size=(batch, tokens))
  pos = np.sort(_permutation_prefix(rng, batch, region, tokens), axis=1)
  inputs = np.full((batch, length), SELECTIVE_NOISE, np.int64)
  np.put_along_axis(inputs, pos, data, axis=1)
  inputs[:, region:] = vocab_size - 1
  targets = np.full_like(inputs, SELECTIVE_NOISE)
  targets[:, region:] = data
  answer = np.zeros(inputs.shape, np.float32)
  answer[:, region:] = 1.0
  return dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32), answer_mask=answer)


def copy_batch(seed: int, step: int, batch: int, length: int, vocab: Vocab) -> Dict[str, np.ndarray]:
  """L random symbols, SEP, the same L symbols (sequence length 2 L + 1)."""
  _check(length >= 1, "length", length, "an integer >= 1")
  rng = _rng(seed, step)
  s = rng.integers(0, vocab.symbols, size=(batch, length))
  seq = np.concatenate([s, np.full((batch, 1), vocab.sep), s], axis=1)
  answer = np.zeros_like(seq, bool)
  answer[:, length + 1 :] = True
  return _finish(seq, answer)


def recall_toy_batch(seed: int, step: int, batch: int, pairs: int, queries: int, vocab: Vocab) -> Dict[str, np.ndarray]:
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
