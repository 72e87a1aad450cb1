"""Multi-timescale EMA traces h_t = (1 - alpha) h_{t-1} + alpha x_t of one input x at K write rates.

Two kinds of method (ema_methods()):
  closed forms   constant rates only (fixed or learned, not per token), in CLOSED_FORMS:
                 'blocked' (closed_form.py: one elementwise pass per output; rates [K] or [K, D]) and
                 'fused' (fused.py: one batched matmul per output; rates shared over D, [K] or [K, 1]),
                 'native' (native.py: a compiled CPU kernel, one streaming pass each way; rates [K] or
                 [K, D]; elsewhere it runs 'blocked')
  linear scans   any method of kernels.KERNELS: g_t = (1 - alpha) g_{t-1} + x_t through scan.linear_scan
                 with x broadcast over K (never materialised K times), scaled by alpha
`method='auto'` picks per backend (`auto_method`). Methods are kernels.ScanMethod members or their strings.
Adding a closed form: a ScanMethod member, its function (the signature of closed_form.blocked_traces) and
its CLOSED_FORMS entry.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax.traces import closed_form, fused, kernels, native, scan
from ema_jax.traces.kernels import ScanMethod

PAPER_ALPHAS = (0.5, 0.1, 0.02)
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


class ClosedForm(NamedTuple):
  """An ema_traces method for constant rates: fn(x_BTD, alpha_KE, h0_BKD, resets_BT, chunk_size, rate_grad)
  -> raw traces [B, T, K, D] in the accumulation dtype (rates alpha_KE [K, E] and h0 in that dtype; a
  custom VJP that skips the rate cotangent when rate_grad is False); the chunk length it takes when none is
  given; and whether it takes rates per channel (E = D) or only shared ones (E = 1)."""

  fn: Callable
  default_chunk: int
  per_channel: bool


CLOSED_FORMS = {
    ScanMethod.BLOCKED: ClosedForm(closed_form.blocked_traces, kernels.DEFAULT_BLOCK, per_channel=True),
    ScanMethod.FUSED: ClosedForm(fused.fused_traces, fused.DEFAULT_FUSED_CHUNK, per_channel=False),
    ScanMethod.NATIVE: ClosedForm(native.native_traces, kernels.DEFAULT_BLOCK, per_channel=True),
}


def ema_methods() -> tuple:
  """The methods of ema_traces: 'auto', the closed forms (CLOSED_FORMS) and the linear scans (KERNELS)."""
  return (ScanMethod.AUTO, *CLOSED_FORMS, *kernels.KERNELS)


# backend -> (the method 'auto' picks for constant rates, shared over D or per channel, or None for
# scan.auto_method's choice; where and when that was measured). A closed form that needs rates shared over
# D applies to those only (per channel falls back to scan.auto_method). benchmarks.accelerator_suite reports
# whether this pick was the fastest measured on a device.
AUTO_CONSTANT_RATES = {
    "cpu": (
        ScanMethod.NATIVE,
        "measured: 2-core x86_64 CPU, 2026-12-07 (results/scan_bench_dh_reuse_heap.json, benchmarks/scan_bench.py "
        "--reuse-heap): 'native' (the compiled kernel) was the fastest forward and training step at both shapes; "
        "where it does not apply (several devices, float16/float64, no compiler) 'blocked', the fastest before it "
        "(2026-11-29, shared and per-channel rates)",
    ),
    "gpu": (None, "unmeasured: the fused and blocked paths have not been timed there; scan.auto_method's choice"),
    "tpu": (None, "unmeasured: the fused and blocked paths have not been timed there; scan.auto_method's choice"),
}


def auto_method(t_len: int, rates_shared_over_d: bool = True, backend=None, dtype=jnp.float32) -> ScanMethod:
  """The method ema_traces' 'auto' runs for T = t_len tokens of constant rates on `backend` (default: JAX's):
  AUTO_CONSTANT_RATES[backend] when it names a closed form that takes these rates ('native' only where its
  kernel runs for `dtype` here, else 'blocked'); otherwise the linear-scan method scan.auto_method picks."""
  backend = backend or jax.default_backend()
  pick = AUTO_CONSTANT_RATES.get(backend, (None, ""))[0]
  if pick is ScanMethod.NATIVE and not (backend == jax.default_backend() and native.applies(dtype)):
    pick = ScanMethod.BLOCKED
  if pick is not None and t_len >= 1 and (rates_shared_over_d or CLOSED_FORMS[pick].per_channel):
    return pick
  return scan.auto_method(t_len, backend)


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


def check_x(x, resets, where: str):
  """Validates x [B, T, D] (floating) and resets ([B, T] bool or None) at the boundary of `where`."""
  if not hasattr(x, "dtype") or x.dtype not in [np.dtype(d) for d in _FLOATS]:
    raise ValueError(f"{where}: `x` has dtype {getattr(x, 'dtype', type(x))}; accepted: float32, bfloat16, float16.")
  if x.ndim != 3:
    raise ValueError(f"{where}: `x` has shape {x.shape}; expected [B, T, D].")
  if resets is not None and (resets.shape != x.shape[:2] or resets.dtype != bool):
    raise ValueError(
        f"{where}: `resets` has shape {resets.shape} and dtype {resets.dtype}; expected bool {x.shape[:2]} ([B, T])."
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
    method: str | ScanMethod = "auto",
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
    method: a ScanMethod or its string, one of ema_methods(): a closed form ('blocked': any constant rates,
      [K] or [K, D]; 'fused': rates shared over D, [K] or [K, 1]; 'native': any constant rates, a compiled
      kernel on one CPU device, 'blocked' elsewhere), a linear-scan method ('associative',
      'sequential', 'chunked', 'unrolled'), or 'auto' (see `auto_method`).
    start_count: [B] or scalar tokens already summarised in h0 (bias correction only).
    chunk_size: chunk length of the methods that take one (default: the method's table entry).

  Returns:
    (h [B, T, K, D] in x's dtype, h_last [B, K, D] float32, the raw (uncorrected) state to continue from).
  """
  x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
  check_x(x, resets, "ema_traces")
  bsz, t_len, d = x.shape
  alpha = check_alphas(alphas, d)
  alpha_kd = alpha[:, None] if alpha.ndim == 1 else alpha  # [K, 1 or D]
  k = alpha_kd.shape[0]
  if h0 is not None:
    h0 = jnp.asarray(h0)
    if h0.shape != (bsz, k, d):
      raise ValueError(f"ema_traces: `h0` has shape {h0.shape}; expected [B, K, D] = {(bsz, k, d)}.")
  method = kernels.parse_method(method, ema_methods(), "ema_traces")
  shared = alpha_kd.shape[1] == 1
  closed = CLOSED_FORMS.get(method)
  if closed is not None and t_len < 1:
    raise ValueError(f"ema_traces: method='{method}' needs at least one token; `x` has shape {x.shape}.")
  if closed is not None and not closed.per_channel and not shared:
    raise ValueError(
        f"ema_traces: method='{method}' needs write rates shared over D ([K] or [K, 1]); got "
        f"`alphas` of shape {tuple(alpha_kd.shape)}. Use method='auto' or 'blocked' for per-channel rates."
    )
  if method is ScanMethod.AUTO:
    method = auto_method(t_len, shared, dtype=x.dtype)
  if chunk_size is None:
    entry = CLOSED_FORMS.get(method) or kernels.KERNELS[method]
    chunk_size = entry.default_chunk or 1
  chunk_size = scan.check_chunk_size(chunk_size, "ema_traces")
  # Concrete rates cannot be differentiated (no transformation traces them): skip their cotangent.
  rate_grad = not _is_concrete(alpha_kd)
  return _ema_traces(x, alpha_kd, h0, resets, start_count, bias_correction, method, chunk_size, rate_grad)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _ema_traces(x, alpha_kd, h0, resets, start_count, bias_correction, method, chunk_size, rate_grad=True):
  bsz, t_len, d = x.shape
  closed = CLOSED_FORMS.get(method)
  if closed is not None:
    acc = kernels.acc_dtype(x.dtype)
    alpha_KE = jnp.asarray(alpha_kd, acc)
    h0_BKD = jnp.zeros((bsz, alpha_KE.shape[0], d), acc) if h0 is None else h0.astype(acc)
    raw = closed.fn(x, alpha_KE, h0_BKD, resets, min(chunk_size, t_len), rate_grad)
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
