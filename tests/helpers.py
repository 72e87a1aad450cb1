"""What many tests share: the repository's paths, config loading, small model sizes and the float64
references every trace method is checked against (one token at a time, in NumPy)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)

# Small model configs for decoding and generation tests.
GPT_SMALL = dict(vocab_size=23, context_len=24, num_layers=2, num_heads=2, width=16)
EMA_SMALL = dict(vocab_size=23, width=16, num_blocks=2, ffn_hidden=32, ffn_active_fraction=0.25, heads=2)


def load_config(name, arg=None):
  """configs/<name>.py's get_config(arg), loaded from its file."""
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def short(cfg, steps=6):
  """An LM config cut to a few steps of short rows and small evaluations."""
  cfg.steps = steps
  cfg.optim.warmup_steps = 2
  cfg.log_every = 2
  cfg.eval_every = 0
  cfg.checkpoint_every = steps
  cfg.task.seq_len = 64
  cfg.batch_size = 4
  cfg.task.eval_batch_size = 8
  cfg.data.eval_max_tokens = 3000
  cfg.data.eval_max_tokens_final = 3000
  if cfg.model.kind == "gpt":
    cfg.model.context_len = 64
  return cfg


def perturbed(model, seed=0):
  """Moves every parameter off its initial value (zero biases would hide mistakes in their paths)."""
  import jax
  from flax import nnx

  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


# ----------------------------------------------------------------------------------------- float64 references


def rel_err(x, ref):
  """max |x - ref| / max |ref|, in float64."""
  return np.max(np.abs(np.asarray(x, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30)


def ema_loop(x, alphas, h0=None, resets=None, bias_correction=False, start_count=None):
  """EMA traces h_t = (1 - alpha) h_{t-1} + alpha x_t in float64, one token at a time; rates [K] or [K, D].
  Bias correction divides by 1 - (1 - alpha)^n, n counting tokens since the start (plus start_count, a
  scalar or one per row) or the last reset. Returns (h [B, T, K, D], h_last [B, K, D])."""
  x = np.asarray(x, np.float64)
  alpha = np.asarray(alphas, np.float64)
  alpha = alpha[:, None] if alpha.ndim == 1 else alpha
  bsz, t_len, d = x.shape
  k = alpha.shape[0]
  out = np.zeros((bsz, t_len, k, d))
  last = np.zeros((bsz, k, d))
  starts = np.broadcast_to(np.zeros(bsz, int) if start_count is None else np.asarray(start_count), (bsz,))
  for b in range(bsz):
    h = np.zeros((k, d)) if h0 is None else np.array(h0[b], np.float64)
    n = int(starts[b])
    for t in range(t_len):
      if resets is not None and resets[b, t]:
        h, n = np.zeros_like(h), 0
      n += 1
      h = (1 - alpha) * h + alpha * x[b, t]
      out[b, t] = h / (1 - (1 - alpha) ** n) if bias_correction else h
    last[b] = h
  return out, last


def scan_loop(a, b, h0=None, reverse=False, resets=None):
  """The linear recurrence h_t = a_t h_{t-1} + b_t in float64, one token at a time (reverse: from the end).
  A reset at t drops the state entering t (forward) or cuts t + 1 -> t (reverse)."""
  shape = np.broadcast_shapes(np.shape(a), np.shape(b))
  a = np.broadcast_to(np.asarray(a, np.float64), shape)
  b = np.broadcast_to(np.asarray(b, np.float64), shape)
  bsz, t_len = shape[:2]
  state = np.zeros((bsz,) + shape[2:]) if h0 is None else np.array(h0, np.float64)
  h = np.zeros(shape)
  for t in range(t_len - 1, -1, -1) if reverse else range(t_len):
    a_t = a[:, t].copy()
    if resets is not None:
      cut = resets[:, t] if not reverse else (resets[:, t + 1] if t + 1 < t_len else np.zeros(bsz, bool))
      a_t[cut] = 0.0
    state = a_t * state + b[:, t]
    h[:, t] = state
  return h, state


def selective_loop(x, r, h0=None, resets=None):
  """Selective traces h_t = (1 - r_t) h_{t-1} + r_t x_t in float64 with per-token rates r [B, T, K, D or 1]."""
  x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
  bsz, t_len, d = x.shape
  k = r.shape[2]
  r = np.broadcast_to(r, (bsz, t_len, k, d))
  h = np.zeros((bsz, k, d)) if h0 is None else np.array(h0, np.float64)
  out = np.zeros((bsz, t_len, k, d))
  for t in range(t_len):
    if resets is not None:
      h = np.where(np.asarray(resets)[:, t, None, None], 0.0, h)
    h = (1 - r[:, t]) * h + r[:, t] * x[:, t, None, :]
    out[:, t] = h
  return out, h


def make_resets(rng, bsz, t_len, chunk):
  """Random document starts plus resets at t = 0, at chunk starts and at chunk ends (the edge cases)."""
  r = rng.uniform(size=(bsz, t_len)) < 0.1
  r[0, 0] = True
  r[-1, chunk::chunk] = True
  r[0, chunk - 1 :: 2 * chunk] = True
  return r


def per_channel_rates(rng, k, d, with_one=False):
  """Rates [K, D] in (0.01, 0.9), optionally one of them exactly 1."""
  a = rng.uniform(0.01, 0.9, size=(k, d)).astype(np.float32)
  if with_one:
    a[0, 0] = 1.0
  return a
