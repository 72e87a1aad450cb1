"""Set-complement data: a set of s distinct tokens in random order; the target is uniform over the rest.

Token layout (shared with ema_jax/models/set_transformer.py): set tokens are 0..N-1, PAD_ID(N) = N pads
a row after its s set tokens, QUERY_ID(N) = N + 1 is the read-out token the model appends itself. The
target is implied by the tokens (uniform over the N - s ids absent from the row), so batches carry no
labels: `tokens` int32 [B, L], `mask` bool [B, L] (True on the s set tokens), `sizes` int32 [B].

Everything is a pure function of integer seeds through np.random.SeedSequence, so a batch depends only
on (seed, step): the training iterator (ema_jax/tasks/set_complement.py) draws the *global* batch of a
step and each process keeps its rows, so the stream is the same on any number of processes and the
iterator's whole state is its step counter.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

SIZE_DISTRIBUTIONS = ("uniform", "linear", "fixed")
# Separates the evaluation stream from every training stream (training seeds are (seed, process, step)).
_EVAL_STREAM = 0x5E7C0


def pad_id(num_tokens: int) -> int:
  return num_tokens


def query_id(num_tokens: int) -> int:
  return num_tokens + 1


def vocab_size(num_tokens: int) -> int:
  """Embedding rows: N set tokens, PAD, QUERY."""
  return num_tokens + 2


def sample_sets(rng: np.random.Generator, num_tokens: int, sizes_B: np.ndarray, length: int) -> Dict[str, np.ndarray]:
  """Rows of sizes_B[b] distinct tokens from 0..N-1 in uniformly random order, padded to `length`."""
  sizes_B = np.asarray(sizes_B, np.int32)
  if sizes_B.size and (sizes_B.min() < 0 or sizes_B.max() > min(length, num_tokens)):
    raise ValueError(
        f"sample_sets: sizes must lie in [0, min(length={length}, num_tokens={num_tokens})], "
        f"got [{sizes_B.min()}, {sizes_B.max()}]."
    )
  # The argsort of i.i.d. uniforms is a uniform random permutation; its first s entries are a uniform
  # random s-subset in uniform random order.
  perm_BN = np.argsort(rng.random((sizes_B.shape[0], num_tokens)), axis=1)[:, :length]
  if length > num_tokens:
    perm_BN = np.pad(perm_BN, ((0, 0), (0, length - num_tokens)))
  mask_BL = np.arange(length)[None, :] < sizes_B[:, None]
  tokens_BL = np.where(mask_BL, perm_BN, pad_id(num_tokens)).astype(np.int32)
  return {"tokens": tokens_BL, "mask": mask_BL, "sizes": sizes_B}


def sample_sizes(rng: np.random.Generator, batch: int, min_size: int, max_size: int, dist: str) -> np.ndarray:
  """Set sizes in [min_size, max_size]: 'uniform', 'linear' (P(s) proportional to s) or 'fixed' (max_size)."""
  if dist == "uniform":
    return rng.integers(min_size, max_size + 1, size=batch).astype(np.int32)
  if dist == "linear":
    s = np.arange(min_size, max_size + 1)
    return rng.choice(s, size=batch, p=s / s.sum()).astype(np.int32)
  if dist == "fixed":
    return np.full(batch, max_size, np.int32)
  raise ValueError(f"sample_sizes: dist={dist!r}; accepted: {', '.join(SIZE_DISTRIBUTIONS)}.")


def train_batch(
    seed: int,
    step: int,
    stream: int,
    batch: int,
    *,
    num_tokens: int,
    min_size: int,
    max_size: int,
    length: int,
    dist: str = "uniform",
) -> Dict[str, np.ndarray]:
  """The training batch of `step`; a pure function of (seed, stream, step). The trainer uses stream 0
  for the global batch (processes slice their rows), so one stream serves every process layout."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(step)]))
  sizes_B = sample_sizes(rng, batch, min_size, max_size, dist)
  return sample_sets(rng, num_tokens, sizes_B, length)


def eval_batch(seed: int, size: int, examples: int, *, num_tokens: int, length: int) -> Dict[str, np.ndarray]:
  """The fixed evaluation batch of set size `size` (all rows have that size), padded to `length`."""
  rng = np.random.default_rng(np.random.SeedSequence([_EVAL_STREAM, int(seed), int(size)]))
  return sample_sets(rng, num_tokens, np.full(examples, size, np.int32), length)


def present_tokens(tokens_BL: np.ndarray, mask_BL: np.ndarray, num_tokens: int, xp: Optional[Any] = None):
  """Multi-hot of present tokens [B, N] (float32) from padded rows; works for numpy or jax.numpy (xp)."""
  xp = np if xp is None else xp
  onehot_BLN = (tokens_BL[..., None] == xp.arange(num_tokens)) & (mask_BL[..., None] > 0)
  return onehot_BLN.any(axis=1).astype(xp.float32)
