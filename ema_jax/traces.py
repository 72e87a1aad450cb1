"""Multi-timescale EMA traces h_t = (1 - alpha) h_{t-1} + alpha x_t.

The K write rates share one input x. Two implementations:
  blocked      constant rates, shared ([K]) or per channel ([K, D]), fixed or learned: the closed form inside
               chunks of C tokens as one elementwise pass, written once (traces_blocked.py, custom VJP)
  fused        rates shared over D ([K], fixed or learned): per chunk of C tokens the whole output is one
               batched matmul (decay matrix x [tokens; carried states]) written once, with a custom VJP
               that is the transposed matmul (traces_fused.py)
  linear_scan  any rates, [K, D] per channel included: g_t = (1 - alpha) g_{t-1} + x_t through
               `scan.linear_scan` with x broadcast over K (never materialised K times), scaled by alpha
`method='auto'` picks per backend (`_auto_method`). Methods are `scan.ScanMethod` members or their strings.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import scan, traces_blocked
from ema_jax.traces_fused import DEFAULT_FUSED_CHUNK, _fused_traces  # noqa: F401 (part of this module's API)

PAPER_ALPHAS = (0.5, 0.1, 0.02)
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)
METHODS = (scan.ScanMethod.FUSED.value,) + scan.METHODS  # ema_traces' methods; linear_scan's lack 'fused'


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
      raise ValueError(
          f"`{name}`={values.tolist()}: every write rate must lie in (0, 1] "
          f"(0.5, 0.1, 0.02 give windows of about 2, 10 and 50 tokens)."
      )
    if not isinstance(alphas, jax.Array):
      return values.astype(np.float32)  # stays NumPy, so it is usable while tracing (eval_shape, jit init)
  return jnp.asarray(alphas, jnp.float32)


def _check_x(x, h0, resets):
  if not hasattr(x, "dtype") or x.dtype not in [np.dtype(d) for d in _FLOATS]:
    raise ValueError(f"ema_traces: `x` has dtype {getattr(x, 'dtype', type(x))}; accepted: float32, bfloat16, float16.")
  if x.ndim != 3:
    raise ValueError(f"ema_traces: `x` has shape {x.shape}; expected [B, T, D].")
  if resets is not None and (resets.shape != x.shape[:2] or resets.dtype != bool):
    raise ValueError(
        f"ema_traces: `resets` has shape {resets.shape} and dtype {resets.dtype}; "
        f"expected bool {x.shape[:2]} ([B, T])."
    )


def token_counts(resets, batch: int, length: int, start_count=None) -> jax.Array:
  """Tokens seen so far, including t, since the start (plus start_count) or the last reset: [B, T]."""
  idx = jnp.arange(length, dtype=jnp.int32)
  start = (
      jnp.zeros((batch,), jnp.int32)
      if start_count is None
      else jnp.broadcast_to(jnp.asarray(start_count, jnp.int32), (batch,))
  )
  n = idx[None, :] + 1 + start[:, None]
  if resets is not None:
    last = jax.lax.cummax(jnp.where(resets, idx[None, :], -1), axis=1)
    n = jnp.where(last >= 0, idx[None, :] - last + 1, n)
  return n


def debias_factor(alphas_kd, counts_bt) -> jax.Array:
  """1 - (1 - alpha)^n as [B, T, K, 1 or D], through exp(n log(1 - alpha)) in float32."""
  log_a = jnp.log1p(-alphas_kd)  # -inf for alpha = 1: factor 1 below
  n = counts_bt.astype(jnp.float32)[:, :, None, None]
  return -jnp.expm1(n * log_a[None, None])


def ema_traces(
    x,
    alphas: Union[Sequence[float], jax.Array] = PAPER_ALPHAS,
    h0=None,
    *,
    resets=None,
    bias_correction: bool = False,
    method: str | scan.ScanMethod = "auto",
    start_count=None,
    chunk_size: Optional[int] = None,
):
  """EMA traces of x at K timescales.

  Args:
    x: [B, T, D] float32, bfloat16 or float16.
    alphas: K write rates in (0, 1], or a [K] / [K, D] array (learned rates, per timescale or channel).
    h0: [B, K, D] state before the first token (zeros when None).
    resets: [B, T] bool; True at t starts a new document there (the state is zeroed before t).
    bias_correction: divide by 1 - (1 - alpha)^n, n the tokens since the start or the last reset,
      so each trace is an unbiased average from its first token.
    method: a scan.ScanMethod or its string: 'blocked' (traces_blocked.py: one elementwise pass per
      output; any constant rates, [K] or [K, D]), 'fused' (traces_fused.py: one batched matmul per output;
      needs rates shared over D: [K] or [K, 1], fixed or learned), a scan.linear_scan method
      ('associative', 'sequential', 'chunked'), or 'auto' (see `_auto_method`).
    start_count: [B] or scalar tokens already summarised in h0 (bias correction only).
    chunk_size: chunk length of 'blocked' (default traces_blocked.DEFAULT_BLOCK), 'fused'
      (DEFAULT_FUSED_CHUNK) and 'chunked' (scan.DEFAULT_CHUNK).

  Returns:
    (h [B, T, K, D] in x's dtype, h_last [B, K, D] float32, the raw (uncorrected) state to continue from).
  """
  x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
  _check_x(x, h0, resets)
  bsz, t_len, d = x.shape
  alpha = check_alphas(alphas, d)
  alpha_kd = alpha[:, None] if alpha.ndim == 1 else alpha  # [K, 1 or D]
  k = alpha_kd.shape[0]
  if h0 is not None:
    h0 = jnp.asarray(h0)
    if h0.shape != (bsz, k, d):
      raise ValueError(f"ema_traces: `h0` has shape {h0.shape}; expected [B, K, D] = {(bsz, k, d)}.")
  method = scan.parse_method(method, METHODS, "ema_traces")
  shared = alpha_kd.shape[1] == 1
  if method in (scan.ScanMethod.FUSED, scan.ScanMethod.BLOCKED) and t_len < 1:
    raise ValueError(f"ema_traces: method='{method}' needs at least one token; `x` has shape {x.shape}.")
  if method is scan.ScanMethod.FUSED and not shared:
    raise ValueError(
        f"ema_traces: method='fused' needs write rates shared over D ([K] or [K, 1]); got "
        f"`alphas` of shape {tuple(alpha_kd.shape)}. Use method='auto' or 'chunked' for "
        "per-channel rates."
    )
  if method is scan.ScanMethod.AUTO:
    method = _auto_method(t_len, shared)
  if chunk_size is None:
    chunk_size = {
        scan.ScanMethod.FUSED: DEFAULT_FUSED_CHUNK,
        scan.ScanMethod.BLOCKED: traces_blocked.DEFAULT_BLOCK,
    }.get(method, scan.DEFAULT_CHUNK)
  if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"ema_traces: `chunk_size`={chunk_size!r}; accepted: a positive integer.")
  # Concrete rates cannot be differentiated (no transformation traces them): skip their cotangent.
  rate_grad = not _is_concrete(alpha_kd)
  return _ema_traces(x, alpha_kd, h0, resets, start_count, bias_correction, method, int(chunk_size), rate_grad)


# backend -> (the method 'auto' picks for constant rates, shared over D or per channel, or None for
# scan.auto_method's choice; where and when that was measured). 'fused' applies to shared rates only (per
# channel falls back to scan.auto_method). benchmarks/accelerator_suite.py reports whether this pick was the
# fastest measured on a device.
AUTO_CONSTANT_RATES = {
    "cpu": (
        scan.ScanMethod.BLOCKED,
        "measured: 2-core x86_64 CPU, 2026-11-29 (results/scan_bench*.json, benchmarks/scan_bench.py "
        "[--per-channel] [--reuse-heap]): 'blocked' was the fastest forward and training step at both shapes, "
        "for shared and per-channel rates (before it, 'fused' for shared rates and 'sequential' per channel)",
    ),
    "gpu": (None, "unmeasured: the fused and blocked paths have not been timed there; scan.auto_method's choice"),
    "tpu": (None, "unmeasured: the fused and blocked paths have not been timed there; scan.auto_method's choice"),
}


def _auto_method(t_len: int, rates_shared_over_d: bool, backend=None) -> scan.ScanMethod:
  """AUTO_CONSTANT_RATES[backend] when it names a method that takes these rates ('fused' needs them shared
  over D); otherwise the linear_scan method that scan.auto_method picks."""
  backend = backend or jax.default_backend()
  pick = AUTO_CONSTANT_RATES.get(backend, (None, ""))[0]
  if pick is not None and t_len >= 1 and (rates_shared_over_d or pick is not scan.ScanMethod.FUSED):
    return pick
  return scan.auto_method(t_len, backend)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _ema_traces(x, alpha_kd, h0, resets, start_count, bias_correction, method, chunk_size, rate_grad=True):
  bsz, t_len, d = x.shape
  if method is scan.ScanMethod.FUSED:
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    alpha_K = jnp.asarray(alpha_kd[:, 0], acc)
    h0_BKD = jnp.zeros((bsz, alpha_K.shape[0], d), acc) if h0 is None else h0
    counts = token_counts(resets, bsz, t_len, start_count) if bias_correction else None
    return _fused_traces(x, alpha_K, h0_BKD, resets, counts, min(chunk_size, t_len), bias_correction, rate_grad)
  if method is scan.ScanMethod.BLOCKED:
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    alpha_KE = jnp.asarray(alpha_kd, acc)
    h0_BKD = jnp.zeros((bsz, alpha_KE.shape[0], d), acc) if h0 is None else h0.astype(acc)
    raw = traces_blocked.blocked_traces(x, alpha_KE, h0_BKD, resets, min(chunk_size, t_len), rate_grad)
    h = raw
    if bias_correction:
      h = raw / debias_factor(alpha_KE, token_counts(resets, bsz, t_len, start_count))
    return h.astype(x.dtype), raw[:, -1]
  # g_t = (1 - alpha) g_{t-1} + x_t, h = alpha * g. The scan sees x as [B, T, 1, D].
  g0 = None if h0 is None else h0.astype(jnp.float32) / alpha_kd[None]
  g, g_last = scan.linear_scan(
      (1.0 - alpha_kd)[None, None], x[:, :, None, :], g0, resets=resets, method=method, chunk_size=chunk_size
  )
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
  h = scan.step(state.h, (1.0 - alpha_kd)[None], alpha_kd[None] * x_t[:, None, :].astype(jnp.float32), reset=reset)
  count = state.count + 1 if reset is None else jnp.where(reset, 1, state.count + 1)
  out = h
  if bias_correction:
    out = h / debias_factor(alpha_kd, count[:, None])[:, 0]
  return TraceState(h, count), out.astype(x_t.dtype)


# ------------------------------------------------------------------------------------ selective traces

SELECTIVE_METHODS = (
    scan.ScanMethod.AUTO,
    scan.ScanMethod.ASSOCIATIVE,
    scan.ScanMethod.SEQUENTIAL,
    scan.ScanMethod.CHUNKED,
    scan.ScanMethod.BLOCKED,
)


def selective_traces(
    x_BTD, rates_BTKD, h0=None, *, resets=None, method: str | scan.ScanMethod = "auto", chunk_size=None
):
  """Traces with a write rate per token, timescale and channel: h_t = (1 - r_t) h_{t-1} + r_t x_t.

  The input-dependent counterpart of ema_traces (whose rates are fixed): r_t in (0, 1) is computed from the
  input by the caller. It runs on scan.linear_scan with the per-token decay a_t = 1 - r_t and input
  b_t = r_t x_t, so gradients reach x, the rates and h0 through linear_scan's custom VJP (the reverse
  recurrence; the rate gradient is -dL/da_t + x_t dL/db_t by the chain rule). The state and the
  accumulation are float32 whatever x's dtype.

  Args:
    x_BTD: [B, T, D] float32, bfloat16 or float16.
    rates_BTKD: [B, T, K, D] write rates in (0, 1) (or [B, T, K, 1], shared over channels); values outside
      are the caller's responsibility (a sigmoid keeps them inside).
    h0: [B, K, D] state before the first token (zeros when None).
    resets: [B, T] bool; True at t starts a new document there (the state is zeroed before t).
    method: 'auto', 'associative', 'sequential', 'chunked' or 'blocked' (scan.linear_scan's methods).
    chunk_size: chunk length of 'chunked' (default scan.DEFAULT_CHUNK) and 'blocked' (scan.DEFAULT_BLOCK).

  Returns:
    (h [B, T, K, D] in x's dtype, h_last [B, K, D] float32, the state to continue from).
  """
  x_BTD = jnp.asarray(x_BTD) if not isinstance(x_BTD, jax.Array) else x_BTD
  _check_x(x_BTD, h0, resets)
  bsz, t_len, d = x_BTD.shape
  rates_BTKD = jnp.asarray(rates_BTKD)
  if (
      rates_BTKD.ndim != 4
      or rates_BTKD.shape[:2] != (bsz, t_len)
      or rates_BTKD.shape[3] not in (1, d)
      or not jnp.issubdtype(rates_BTKD.dtype, jnp.floating)
  ):
    raise ValueError(
        f"selective_traces: `rates_BTKD` has shape {rates_BTKD.shape} and dtype {rates_BTKD.dtype}; expected "
        f"floating write rates [B, T, K, D] = [{bsz}, {t_len}, K, {d}] (or [B, T, K, 1])."
    )
  k = rates_BTKD.shape[2]
  if h0 is not None:
    h0 = jnp.asarray(h0)
    if h0.shape != (bsz, k, d):
      raise ValueError(f"selective_traces: `h0` has shape {h0.shape}; expected [B, K, D] = {(bsz, k, d)}.")
  method = scan.parse_method(method, SELECTIVE_METHODS, "selective_traces")
  if method is scan.ScanMethod.AUTO:
    method = scan.auto_method(t_len)
  if chunk_size is None:
    chunk_size = scan.DEFAULT_BLOCK if method is scan.ScanMethod.BLOCKED else scan.DEFAULT_CHUNK
  if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"selective_traces: `chunk_size`={chunk_size!r}; accepted: a positive integer.")
  return _selective_traces(x_BTD, rates_BTKD, h0, resets, method, int(chunk_size))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _selective_traces(x_BTD, rates_BTKD, h0, resets, method, chunk_size):
  acc = jnp.float64 if x_BTD.dtype == jnp.float64 else jnp.float32
  r = rates_BTKD.astype(acc)
  b = r * x_BTD[:, :, None, :].astype(acc)
  h, h_last = scan.linear_scan(1.0 - r, b, h0, resets=resets, method=method, chunk_size=chunk_size)
  return h.astype(x_BTD.dtype), h_last


def selective_step(h_BKD, x_BD, rates_BKD, *, reset=None):
  """One token of selective_traces: returns (new state [B, K, D] float32, h_t in x's dtype)."""
  r = jnp.asarray(rates_BKD, jnp.float32)
  h = scan.step(jnp.asarray(h_BKD, jnp.float32), 1.0 - r, r * x_BD[:, None, :].astype(jnp.float32), reset=reset)
  return h, h.astype(x_BD.dtype)
