"""The method 'native': EMA traces (constant rates) and selective traces through a compiled CPU kernel.

`ema_traces_cpu.cc` (beside this file, an XLA FFI custom call built by ema_jax.cpu_kernels) runs the
recurrence raw_t = keep_t (1 - alpha) raw_{t-1} + alpha x_t in time order, and its custom VJP the reverse
recurrence over the cotangents (dx, dh0 and, for learned rates, dalpha), each as one streaming pass over
its inputs and outputs with the [K, D] state in the L1 cache; batch rows and time segments are split
over XLA's intra-op thread pool. Selective traces (a rate per token: h_t = keep_t (1 - r_t) h_{t-1} +
r_t x_t, the rates' gradient lam_t (x_t - h_{t-1})) take the same passes. On XLA:CPU the 'blocked' closed
form's training step costs about 10x a copy of the output and the selective 'sequential' scan about 30x
(benchmarks/scan_bench.py); the kernel's costs 3.5-4.3x and 6-8x, the copy's own step about 3x.

Numbers: the recurrence evaluated in float32 in time order (as 'sequential'), so it agrees with the
other methods to float32 rounding, not bit for bit (tests/traces/test_native.py). The write-rate gradient
of constant rates is summed over batch and time in float64.

Where the kernel does not apply, 'native' runs the 'blocked' closed form (constant rates; selective
traces: the linear scan 'auto' picks), the same numbers to rounding: on GPU and TPU, on more than one
device (a custom call has no partitioning rule), for float16 and float64 inputs, where it cannot be built
(one warning), or with EMA_JAX_CPU_TRACES=xla. `applies` says which.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import cpu_kernels
from ema_jax.traces import closed_form, kernels

FORWARD, BACKWARD = "ema_jax_traces_forward", "ema_jax_traces_backward"
SEL_FORWARD, SEL_BACKWARD = "ema_jax_selective_forward", "ema_jax_selective_backward"
DTYPES = (jnp.float32, jnp.bfloat16)
KERNEL = cpu_kernels.CpuKernel(
    cpu_kernels.beside(__file__, "ema_traces_cpu.cc"),
    {
        FORWARD: "EmaJaxTracesForward",
        BACKWARD: "EmaJaxTracesBackward",
        SEL_FORWARD: "EmaJaxSelectiveForward",
        SEL_BACKWARD: "EmaJaxSelectiveBackward",
    },
    switch="EMA_JAX_CPU_TRACES",
    fallback="the 'blocked' closed form",
)


def applies(dtype) -> bool:
  """Whether 'native' runs the kernel for an input of `dtype` here (else the 'blocked' closed form)."""
  return any(np.dtype(dtype) == np.dtype(d) for d in DTYPES) and KERNEL.active()


# Tokens per segment (see ema_traces_cpu.cc). With ROWS or more batch rows, one segment per row: the rows
# alone keep the threads busy, and every token is run once. With fewer, segments of SEGMENT_BYTES of input
# (at least 16 tokens) spread a row over the threads; each token is then run twice (its segment from zero,
# then from the right state), the second time from the L2 cache. benchmarks/scan_bench.py, 2-core AMD EPYC,
# 2026-12-07: at (8, 2048, 256, 3) one segment per row took 0.98x the copy's time against 1.2-1.5x for
# 64-1024-token segments; at (1, 65536, 256, 3) segments of 256-1024 tokens were the fastest. The shape alone
# fixes the segments, so the numbers do not depend on the number of threads.
ROWS, SEGMENT_BYTES = 4, 1 << 19


def segment_length(bsz: int, t_len: int, d: int) -> int:
  """Tokens per segment for a [bsz, t_len, d] input."""
  if bsz >= ROWS:
    return max(t_len, 1)
  return max(16, SEGMENT_BYTES // (4 * max(d, 1)))


def _resets(resets_BT, x_BTD):
  return jnp.zeros(x_BTD.shape[:2], jnp.bool_) if resets_BT is None else resets_BT


def _call_forward(x_BTD, alpha_KE, h0_BKD, resets_BT):
  bsz, t_len, d = x_BTD.shape
  out = jax.ShapeDtypeStruct((bsz, t_len, alpha_KE.shape[0], d), jnp.float32)
  return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(
      x_BTD,
      alpha_KE.astype(jnp.float32),
      h0_BKD.astype(jnp.float32),
      _resets(resets_BT, x_BTD),
      segment=np.int64(segment_length(bsz, t_len, d)),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _native(x_BTD, alpha_KE, h0_BKD, resets_BT, c: int, rate_grad: bool):
  return _call_forward(x_BTD, alpha_KE, h0_BKD, resets_BT)


def _native_fwd(x_BTD, alpha_KE, h0_BKD, resets_BT, c, rate_grad):
  raw = _call_forward(x_BTD, alpha_KE, h0_BKD, resets_BT)
  return raw, (x_BTD, alpha_KE, h0_BKD, resets_BT, raw if rate_grad else None)


def _native_bwd(c, rate_grad, res, g_BTKD):
  x_BTD, alpha_KE, h0_BKD, resets_BT, raw = res
  bsz, t_len, d = x_BTD.shape
  k = alpha_KE.shape[0]
  f32 = jnp.float32
  outs = (
      jax.ShapeDtypeStruct((bsz, t_len, d), f32),
      jax.ShapeDtypeStruct((bsz, k, d), f32),
      jax.ShapeDtypeStruct((k, d) if rate_grad else (0,), f32),
  )
  dx, dh0, dalpha_KD = jax.ffi.ffi_call(BACKWARD, outs, vmap_method="sequential")(
      g_BTKD.astype(f32),
      x_BTD,
      alpha_KE.astype(f32),
      h0_BKD.astype(f32),
      _resets(resets_BT, x_BTD),
      raw if rate_grad else jnp.zeros((0,), f32),
      rate_grad=rate_grad,
      segment=np.int64(segment_length(bsz, t_len, d)),
  )
  if rate_grad:
    dalpha = dalpha_KD
    if alpha_KE.shape[1] == 1:
      dalpha = jnp.sum(dalpha, axis=1, keepdims=True)
    dalpha = dalpha.astype(alpha_KE.dtype)
  else:
    dalpha = jnp.zeros_like(alpha_KE)
  return dx.astype(x_BTD.dtype), dalpha, dh0.astype(h0_BKD.dtype), None


_native.defvjp(_native_fwd, _native_bwd)


def native_traces(x_BTD, alpha_KE, h0_BKD, resets_BT, c: int, rate_grad: bool = True):
  """Raw traces [B, T, K, D] float32 (ema.ClosedForm's signature; `c` is used only by the fallback): the
  kernel where `applies(x.dtype)`, else closed_form.blocked_traces in chunks of min(DEFAULT_BLOCK, T)."""
  if not applies(x_BTD.dtype):
    c = min(kernels.DEFAULT_BLOCK, x_BTD.shape[1])
    return closed_form.blocked_traces(x_BTD, alpha_KE, h0_BKD, resets_BT, c, rate_grad)
  return _native(x_BTD, alpha_KE, h0_BKD, resets_BT, c, rate_grad)


# Selective traces (selective.selective_traces, method 'native'): a write rate per token, timescale and
# channel, h_t = keep_t (1 - r_t) h_{t-1} + r_t x_t; the same kernel file, passes and segments.


def _sel_forward(x_BTD, r_BTKE, h0_BKD, resets_BT):
  bsz, t_len, d = x_BTD.shape
  out = jax.ShapeDtypeStruct((bsz, t_len, r_BTKE.shape[2], d), jnp.float32)
  return jax.ffi.ffi_call(SEL_FORWARD, out, vmap_method="sequential")(
      x_BTD, r_BTKE, h0_BKD, _resets(resets_BT, x_BTD), segment=np.int64(segment_length(bsz, t_len, d))
  )


@jax.custom_vjp
def _selective(x_BTD, r_BTKE, h0_BKD, resets_BT):
  return _sel_forward(x_BTD, r_BTKE, h0_BKD, resets_BT)


def _selective_fwd(x_BTD, r_BTKE, h0_BKD, resets_BT):
  raw = _sel_forward(x_BTD, r_BTKE, h0_BKD, resets_BT)
  return raw, (x_BTD, r_BTKE, h0_BKD, resets_BT, raw)


def _selective_bwd(res, g_BTKD):
  x_BTD, r_BTKE, h0_BKD, resets_BT, raw = res
  bsz, t_len, d = x_BTD.shape
  f32 = jnp.float32
  outs = (
      jax.ShapeDtypeStruct((bsz, t_len, d), f32),
      jax.ShapeDtypeStruct(r_BTKE.shape, f32),
      jax.ShapeDtypeStruct(h0_BKD.shape, f32),
  )
  dx, dr, dh0 = jax.ffi.ffi_call(SEL_BACKWARD, outs, vmap_method="sequential")(
      g_BTKD.astype(f32),
      x_BTD,
      r_BTKE,
      h0_BKD,
      _resets(resets_BT, x_BTD),
      raw,
      segment=np.int64(segment_length(bsz, t_len, d)),
  )
  return dx.astype(x_BTD.dtype), dr, dh0, None


_selective.defvjp(_selective_fwd, _selective_bwd)


def selective_traces(x_BTD, r_BTKE, h0_BKD, resets_BT):
  """Raw selective traces [B, T, K, D] float32 through the kernel (callers check `applies(x.dtype)`):
  x [B, T, D] float32 or bfloat16, rates [B, T, K, 1 or D] (cast to float32), h0 [B, K, D] or None."""
  bsz, _, d = x_BTD.shape
  h0 = jnp.zeros((bsz, r_BTKE.shape[2], d), jnp.float32) if h0_BKD is None else h0_BKD.astype(jnp.float32)
  return _selective(x_BTD, r_BTKE.astype(jnp.float32), h0, resets_BT)
