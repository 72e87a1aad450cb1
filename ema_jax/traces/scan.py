"""Linear recurrences h_t = a_t * h_{t-1} + b_t over axis 1 of [B, T, ...] arrays.

One public function, `linear_scan`, with several methods that agree to float32 rounding (kernels.py):

  associative  jax.lax.associative_scan (log depth: the form for TPU/GPU)
  sequential   jax.lax.scan (one step per token: the reference and the decode path)
  chunked      inside chunks of C tokens the recurrence is a C x C decay matrix (a matmul); chunk
               summaries are combined by an associative scan; any T (padded internally)
  unrolled     the recurrence written out over the C steps of a chunk, so each pass (chunk summaries,
               outputs) is one XLA loop fusion; the chunk level is solved the same way, recursively
  auto         picked per backend (see `auto_method`, numbers from benchmarks.scan_bench)

Methods are `ScanMethod` members; their strings ('auto', ...) are accepted wherever a method is.

`a` and `b` broadcast against each other, so a per-channel decay (a of shape [K, 1] for instance) or an
input shared across channels never costs a [B, T, ...] array in the chunked method. State and
accumulation are float32 whatever the input dtype; `h` comes back in b's dtype, `h_last` in float32.

Gradients come from a custom VJP: the cotangent of a linear recurrence obeys the same recurrence run
in the other direction, so the backward pass is one more scan instead of differentiating through the
associative tree (which would keep O(log T) copies of the state alive).

The scan (this module and kernels.py) imports nothing else from the project.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax.traces.kernels import (
    KERNELS,
    ScanMethod,
    acc_dtype,
    breaks_mask,
    parse_method,
    scan_methods,
    shift_in_scan_order,
)

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


# ----------------------------------------------------------------------------------------------
# validation


def _check_dtype(name, x):
  if x.dtype not in [np.dtype(d) for d in _FLOAT_DTYPES]:
    raise ValueError(
        f"linear_scan: `{name}` has dtype {x.dtype}; accepted: float32, bfloat16, float16 (float64 when x64 is enabled)."
    )


def check_chunk_size(chunk_size, where: str) -> int:
  if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"{where}: `chunk_size`={chunk_size!r}; accepted: a positive integer.")
  return int(chunk_size)


def _prepare(a, b, h0, resets):
  """Validates arguments at the boundary and returns (a, b, h0, resets) as arrays, a and b of rank >= 2."""
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  _check_dtype("b", b)
  if a.dtype not in [np.dtype(d) for d in _FLOAT_DTYPES]:
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == bool:
      a = a.astype(acc_dtype(b.dtype))
    else:
      _check_dtype("a", a)
  if b.ndim < 2:
    raise ValueError(f"linear_scan: `b` has shape {b.shape}; expected [B, T, ...] with time on axis 1.")
  if a.ndim > b.ndim:
    raise ValueError(f"linear_scan: `a` has shape {a.shape}, more dimensions than `b` {b.shape}.")
  a = a.reshape((1,) * (b.ndim - a.ndim) + a.shape)
  if a.shape[1] not in (1, b.shape[1]):
    raise ValueError(
        f"linear_scan: `a` has {a.shape[1]} steps on the time axis but `b` has {b.shape[1]}; "
        "give a time axis of length 1 (constant decay) or T."
    )
  try:
    out_shape = jnp.broadcast_shapes(a.shape, b.shape)
  except ValueError:
    raise ValueError(f"linear_scan: `a` {a.shape} and `b` {b.shape} do not broadcast together.") from None
  state_shape = (out_shape[0],) + tuple(out_shape[2:])
  if h0 is not None:
    h0 = jnp.asarray(h0)
    _check_dtype("h0", h0)
    try:
      ok = jnp.broadcast_shapes(h0.shape, state_shape) == state_shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"linear_scan: `h0` has shape {h0.shape}; expected {state_shape} ([B, ...] without time).")
    h0 = jnp.broadcast_to(h0.astype(acc_dtype(b.dtype)), state_shape)
  if resets is not None:
    resets = jnp.asarray(resets)
    if resets.dtype != bool:
      raise ValueError(f"linear_scan: `resets` has dtype {resets.dtype}; expected bool [B, T].")
    if resets.ndim != 2 or resets.shape[1] != b.shape[1] or resets.shape[0] not in (1, out_shape[0]):
      raise ValueError(
          f"linear_scan: `resets` has shape {resets.shape}; expected [B, T] = [{out_shape[0]}, {b.shape[1]}]."
      )
  return a, b, h0, resets


def _reduce_to(x, shape):
  """Sums a broadcast result back to `shape` (the reverse of broadcasting)."""
  extra = x.ndim - len(shape)
  axes = tuple(range(extra)) + tuple(i + extra for i, s in enumerate(shape) if s == 1 and x.shape[i + extra] != 1)
  if axes:
    x = jnp.sum(x, axis=axes, keepdims=True)
  return x.reshape(shape)


# ----------------------------------------------------------------------------------------------
# auto


# backend -> (the method 'auto' picks there, where and when that choice was measured). A backend not named
# here gets DEFAULT_AUTO. benchmarks.accelerator_suite prints, per shape, what auto picks and whether it
# was the fastest measured, with the device and date: the numbers that fill in an 'unmeasured' entry.
AUTO_METHODS = {
    "cpu": (
        ScanMethod.SEQUENTIAL,
        "measured: 2-core x86_64 CPU, 2026-11-29 (benchmarks/scan_bench.py --reuse-heap: selective traces, "
        "results/scan_bench_selective_reuse_heap.json, 'sequential' the fastest forward and training step at both "
        "shapes, 'unrolled' (then named 'blocked') second; per-channel rates, results/scan_bench_per_channel_reuse_heap.json, 'sequential' "
        "the fastest linear_scan method at (1, 65536) and within 11% of 'associative' at (8, 2048)); details in "
        "auto_method's docstring",
    ),
    "gpu": (ScanMethod.CHUNKED, "unmeasured, as designed: matmuls inside chunks, a log-depth scan across them"),
    "tpu": (ScanMethod.CHUNKED, "unmeasured, as designed: matmuls inside chunks, a log-depth scan across them"),
}
DEFAULT_AUTO = (ScanMethod.CHUNKED, "unmeasured, as designed (a backend not in AUTO_METHODS)")


def auto_method(t_len, backend=None) -> ScanMethod:
  """The method linear_scan's (and selective_traces') 'auto' runs for T = t_len on `backend` (default: JAX's):
  AUTO_METHODS, numbers from benchmarks.scan_bench.

  cpu: 'sequential'. Measured on a 2-core CPU (medians; `scan_bench --per-channel --reuse-heap`,
    2026-11-22 and 2026-11-29) through ema_traces with [K, D] rates at (B, T, D, K) = (8, 2048, 256, 3) and
    (1, 65536, 256, 3): the fastest linear_scan method at the long shape, within 11% of 'associative' at
    the short one, well ahead of 'chunked'; and for
    selective traces (per-token decays; `scan_bench --selective --reuse-heap`, 2026-11-29) ahead of
    'unrolled' ('blocked' in those results: 1.2-1.4x forward, 1.1-1.8x training) and of 'associative' and
    'chunked'. (Constant rates, shared or per channel, take ema_traces' closed form 'blocked' instead:
    ema.AUTO_CONSTANT_RATES.)
  gpu, tpu: unmeasured; 'chunked' (matmuls inside chunks, a log-depth scan across them) as designed.
  """
  if t_len <= 2:
    return ScanMethod.SEQUENTIAL
  return AUTO_METHODS.get(backend or jax.default_backend(), DEFAULT_AUTO)[0]


# ----------------------------------------------------------------------------------------------
# dispatch and custom VJP


def _run(a, b, h0, breaks, reverse, method, chunk_size):
  acc = acc_dtype(b.dtype)
  return KERNELS[method].fn(a.astype(acc), b.astype(acc), h0, breaks, reverse, chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _scan_vjp(a, b, h0, breaks, reverse, method, chunk_size, out_dtype):
  h, h_last = _run(a, b, h0, breaks, reverse, method, chunk_size)
  return h.astype(out_dtype), h_last


def _scan_fwd(a, b, h0, breaks, reverse, method, chunk_size, out_dtype):
  h, h_last = _run(a, b, h0, breaks, reverse, method, chunk_size)
  return (h.astype(out_dtype), h_last), (a, b, h0, breaks, h)


def _scan_bwd(reverse, method, chunk_size, out_dtype, res, cts):
  a, b, h0, breaks, h = res
  g_h, g_last = cts
  acc = acc_dtype(b.dtype)
  g = jnp.asarray(g_h, acc)
  # The final state's cotangent joins the last output's (in scan order).
  last = 0 if reverse else -1
  g = g.at[:, last].add(jnp.broadcast_to(g_last, g[:, last].shape).astype(acc))
  # lambda_t = g_t + a_{t+1} lambda_{t+1}: the same recurrence in the other direction, with a and the
  # breaks shifted by one step (a constant decay needs no shift).
  a32 = a.astype(acc)
  a_bw = a32 if a.shape[1] == 1 else shift_in_scan_order(a32, reverse, 1.0)
  br_bw = None if breaks is None else shift_in_scan_order(breaks, reverse, False)
  lam, _ = _run(a_bw, g, None, br_bw, not reverse, method, chunk_size)
  # h_prev in scan order, h0 (or zero) before the first step.
  state0 = jnp.zeros_like(h[:, :1]) if h0 is None else h0[:, None]
  if reverse:
    h_prev = jnp.concatenate([h[:, 1:], state0], axis=1)
  else:
    h_prev = jnp.concatenate([state0, h[:, :-1]], axis=1)
  keep = None if breaks is None else breaks_mask(breaks, h.ndim, acc)
  da_full = lam * h_prev if keep is None else lam * h_prev * keep
  da = _reduce_to(da_full, a.shape).astype(a.dtype)
  db = _reduce_to(lam, b.shape).astype(b.dtype)
  dh0 = None
  if h0 is not None:
    first = -1 if reverse else 0
    a_first = jnp.broadcast_to(a32[:, 0 if a.shape[1] == 1 else first], lam[:, first].shape)
    if keep is not None:
      a_first = a_first * keep[:, first]
    dh0 = (a_first * lam[:, first]).astype(h0.dtype)
  return da, db, dh0, None


_scan_vjp.defvjp(_scan_fwd, _scan_bwd)


def linear_scan(
    a,
    b,
    h0=None,
    *,
    reverse: bool = False,
    resets=None,
    method: str | ScanMethod = "auto",
    chunk_size: int | None = None,
    custom_vjp: bool = True,
) -> Tuple[jax.Array, jax.Array]:
  """Solves h_t = a_t * h_{t-1} + b_t along axis 1.

  Args:
    a: decays, broadcastable against b ([B, T, ...], [1, 1, ...], [...] for a constant decay).
    b: inputs [B, T, ...] (float32, bfloat16 or float16); may itself broadcast over channel axes.
    h0: initial state [B, ...] (the state before the first step; zeros when None).
    reverse: run from t = T - 1 down to 0 (h_t = a_t * h_{t+1} + b_t; h0 is the state after T - 1).
    resets: [B, T] bool; True at t starts a new document at t: the state carried into t is dropped
      (for reverse=True, the state of t does not flow back into t - 1, so each document is scanned
      on its own in both directions).
    method: a ScanMethod or its string: 'auto' or a method of kernels.KERNELS ('associative',
      'sequential', 'chunked', 'unrolled').
    chunk_size: chunk length of 'chunked' and 'unrolled' (default: the method's KERNELS entry).
    custom_vjp: use the reverse-recurrence VJP (reverse mode only, as for any jax.custom_vjp). Set
      False for forward-mode autodiff (jax.jvp, jax.jacfwd), which then differentiates the method.

  Returns:
    (h, h_last): h with the broadcast shape of a and b, in b's dtype; h_last [B, ...] float32, the
    state after the last step in scan order.
  """
  method = parse_method(method, scan_methods(), "linear_scan")
  if chunk_size is not None:
    check_chunk_size(chunk_size, "linear_scan")
  a, b, h0, resets = _prepare(a, b, h0, resets)
  if method is ScanMethod.AUTO:
    method = auto_method(b.shape[1])
  if chunk_size is None:
    chunk_size = KERNELS[method].default_chunk or 1
  return _linear_scan(a, b, h0, resets, reverse, method, int(chunk_size), custom_vjp)


# Jitted so that eager calls compile once per shape; inside an outer jit it is simply inlined.
@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _linear_scan(a, b, h0, resets, reverse, method, chunk_size, custom_vjp):
  breaks = resets
  if resets is not None and reverse:
    breaks = shift_in_scan_order(resets, reverse=False, fill=False)
  if breaks is not None:
    out_b = jnp.broadcast_shapes(a.shape, b.shape)[0]
    breaks = jnp.broadcast_to(breaks, (out_b, breaks.shape[1]))
  if not custom_vjp:
    h, h_last = _run(a, b, h0, breaks, reverse, method, chunk_size)
    return h.astype(b.dtype), h_last
  return _scan_vjp(a, b, h0, breaks, reverse, method, chunk_size, b.dtype)


def step(h, a_t, b_t, reset=None):
  """One token of the recurrence for decoding: returns a_t * h + b_t in float32 (float64 for x64).

  h: state [B, ...]; a_t, b_t broadcastable to it; reset: optional [B] bool dropping h first.
  """
  acc = acc_dtype(jnp.result_type(h, b_t))
  h = jnp.asarray(h, acc)
  a_t = jnp.asarray(a_t, acc)
  if reset is not None:
    keep = jnp.logical_not(jnp.asarray(reset)).astype(acc)
    a_t = a_t * keep.reshape(keep.shape + (1,) * (h.ndim - 1))
  return a_t * h + jnp.asarray(b_t, acc)
