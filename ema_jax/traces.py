"""Multi-timescale EMA traces h_t = (1 - alpha) h_{t-1} + alpha x_t on top of `scan.linear_scan`.

The K write rates share one input: the scan runs g_t = (1 - alpha) g_{t-1} + x_t with x broadcast over
the K axis (never materialised K times) and the result is scaled by alpha in the same fused pass.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import scan

PAPER_ALPHAS = (0.5, 0.1, 0.02)
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_alphas(alphas, features: Optional[int] = None, name: str = "alphas") -> jax.Array:
  """Validates write rates; returns a float32 array [K] or [K, D]."""
  if isinstance(alphas, (int, float)):
    raise ValueError(f"`{name}`={alphas!r}: expected a sequence of K write rates in (0, 1], e.g. (0.5, 0.1, 0.02).")
  if not isinstance(alphas, jax.Array):
    try:
      alphas = np.asarray(alphas, dtype=np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"`{name}`={alphas!r}: expected a sequence of K numbers in (0, 1].") from None
  if alphas.ndim not in (1, 2) or alphas.shape[0] < 1:
    raise ValueError(f"`{name}` has shape {tuple(alphas.shape)}: expected [K] or [K, D] with K >= 1.")
  if alphas.ndim == 2 and features is not None and alphas.shape[1] not in (1, features):
    raise ValueError(f"`{name}` has shape {tuple(alphas.shape)}: its channel axis must be 1 or D={features}.")
  if _is_concrete(alphas):
    values = np.asarray(alphas, dtype=np.float64)
    bad = ~np.isfinite(values) | (values <= 0) | (values > 1)
    if bad.any():
      raise ValueError(f"`{name}`={values.tolist()}: every write rate must lie in (0, 1] "
                       f"(0.5, 0.1, 0.02 give windows of about 2, 10 and 50 tokens).")
    if not isinstance(alphas, jax.Array):
      return values.astype(np.float32)  # stays NumPy, so it is usable while tracing (eval_shape, jit init)
  return jnp.asarray(alphas, jnp.float32)


def _check_x(x, h0, resets):
  if not hasattr(x, "dtype") or x.dtype not in [np.dtype(d) for d in _FLOATS]:
    raise ValueError(f"ema_traces: `x` has dtype {getattr(x, 'dtype', type(x))}; accepted: float32, bfloat16, float16.")
  if x.ndim != 3:
    raise ValueError(f"ema_traces: `x` has shape {x.shape}; expected [B, T, D].")
  if resets is not None and (resets.shape != x.shape[:2] or resets.dtype != bool):
    raise ValueError(f"ema_traces: `resets` has shape {resets.shape} and dtype {resets.dtype}; "
                     f"expected bool {x.shape[:2]} ([B, T]).")


def token_counts(resets, batch: int, length: int, start_count=None) -> jax.Array:
  """Tokens seen so far, including t, since the start (plus start_count) or the last reset: [B, T]."""
  idx = jnp.arange(length, dtype=jnp.int32)
  start = jnp.zeros((batch,), jnp.int32) if start_count is None else jnp.broadcast_to(
      jnp.asarray(start_count, jnp.int32), (batch,))
  n = idx[None, :] + 1 + start[:, None]
  if resets is not None:
    last = jax.lax.cummax(jnp.where(resets, idx[None, :], -1), axis=1)
    n = jnp.where(last >= 0, idx[None, :] - last + 1, n)
  return n


def debias_factor(alphas_kd, counts_bt) -> jax.Array:
  """1 - (1 - alpha)^n as [B, T, K, 1 or D], through exp(n log(1 - alpha)) in float32."""
  log_a = jnp.log1p(-alphas_kd)                              # -inf for alpha = 1: factor 1 below
  n = counts_bt.astype(jnp.float32)[:, :, None, None]
  return -jnp.expm1(n * log_a[None, None])


def ema_traces(x, alphas: Union[Sequence[float], jax.Array] = PAPER_ALPHAS, h0=None, *, resets=None,
               bias_correction: bool = False, method: str = "auto", start_count=None,
               chunk_size: int = scan.DEFAULT_CHUNK):
  """EMA traces of x at K timescales.

  Args:
    x: [B, T, D] float32, bfloat16 or float16.
    alphas: K write rates in (0, 1], or a [K] / [K, D] array (learned rates, per timescale or channel).
    h0: [B, K, D] state before the first token (zeros when None).
    resets: [B, T] bool; True at t starts a new document there (the state is zeroed before t).
    bias_correction: divide by 1 - (1 - alpha)^n, n the tokens since the start or the last reset,
      so each trace is an unbiased average from its first token.
    method: passed to scan.linear_scan.
    start_count: [B] or scalar tokens already summarised in h0 (bias correction only).

  Returns:
    (h [B, T, K, D] in x's dtype, h_last [B, K, D] float32, the raw (uncorrected) state to continue from).
  """
  x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
  _check_x(x, h0, resets)
  bsz, t_len, d = x.shape
  alpha = check_alphas(alphas, d)
  alpha_kd = alpha[:, None] if alpha.ndim == 1 else alpha     # [K, 1 or D]
  k = alpha_kd.shape[0]
  if h0 is not None:
    h0 = jnp.asarray(h0)
    if h0.shape != (bsz, k, d):
      raise ValueError(f"ema_traces: `h0` has shape {h0.shape}; expected [B, K, D] = {(bsz, k, d)}.")
  if method not in scan.METHODS:
    raise ValueError(f"ema_traces: `method`={method!r}; accepted: {', '.join(scan.METHODS)}.")
  return _ema_traces(x, alpha_kd, h0, resets, start_count, bias_correction, method, int(chunk_size))


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _ema_traces(x, alpha_kd, h0, resets, start_count, bias_correction, method, chunk_size):
  bsz, t_len, _ = x.shape
  # g_t = (1 - alpha) g_{t-1} + x_t, h = alpha * g. The scan sees x as [B, T, 1, D].
  g0 = None if h0 is None else h0.astype(jnp.float32) / alpha_kd[None]
  g, g_last = scan.linear_scan((1.0 - alpha_kd)[None, None], x[:, :, None, :], g0, resets=resets,
                               method=method, chunk_size=chunk_size)
  h = g.astype(jnp.float32) * alpha_kd[None, None]
  h_last = g_last * alpha_kd[None]
  if bias_correction:
    counts = token_counts(resets, bsz, t_len, start_count)
    h = h / debias_factor(alpha_kd, counts)
  return h.astype(x.dtype), h_last


class TraceState(NamedTuple):
  """Decoding state: raw traces [B, K, D] float32 and tokens since the last reset [B] int32."""
  h: jax.Array
  count: jax.Array


def init_state(batch: int, k: int, d: int) -> TraceState:
  return TraceState(jnp.zeros((batch, k, d), jnp.float32), jnp.zeros((batch,), jnp.int32))


def ema_step(state: TraceState, x_t, alphas=PAPER_ALPHAS, *, reset=None, bias_correction: bool = False):
  """One token: returns (new_state, h_t [B, K, D] in x_t's dtype), equal to ema_traces token by token."""
  alpha = check_alphas(alphas, x_t.shape[-1])
  alpha_kd = alpha[:, None] if alpha.ndim == 1 else alpha
  h = scan.step(state.h, (1.0 - alpha_kd)[None], alpha_kd[None] * x_t[:, None, :].astype(jnp.float32),
                reset=reset)
  count = state.count + 1 if reset is None else jnp.where(reset, 1, state.count + 1)
  out = h
  if bias_correction:
    out = h / debias_factor(alpha_kd, count[:, None])[:, 0]
  return TraceState(h, count), out.astype(x_t.dtype)
