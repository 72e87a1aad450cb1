"""Selective traces: a write rate per token, timescale and channel, h_t = (1 - r_t) h_{t-1} + r_t x_t."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ema_jax.traces import kernels, native, scan
from ema_jax.traces.ema import check_x
from ema_jax.traces.kernels import ScanMethod


def selective_traces(x_BTD, rates_BTKD, h0=None, *, resets=None, method: str | ScanMethod = "auto", chunk_size=None):
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
    method: 'auto', 'native' (the compiled CPU kernel of native.py: one streaming pass each way, on one CPU
      device for float32 and bfloat16 x; elsewhere the linear scan 'auto' picks) or a linear-scan method of
      kernels.KERNELS (kernels.scan_methods()). 'auto' is 'native' where its kernel runs.
    chunk_size: chunk length of 'chunked' and 'unrolled' (default: the method's KERNELS entry).

  Returns:
    (h [B, T, K, D] in x's dtype, h_last [B, K, D] float32, the state to continue from).
  """
  x_BTD = jnp.asarray(x_BTD) if not isinstance(x_BTD, jax.Array) else x_BTD
  check_x(x_BTD, resets, "selective_traces")
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
  method = kernels.parse_method(method, selective_methods(), "selective_traces")
  if chunk_size is not None:
    scan.check_chunk_size(chunk_size, "selective_traces")
  if method in (ScanMethod.AUTO, ScanMethod.NATIVE):
    if native.applies(x_BTD.dtype):
      return _selective_native(x_BTD, rates_BTKD, h0, resets)
    method = scan.auto_method(t_len)
  if chunk_size is None:
    chunk_size = kernels.KERNELS[method].default_chunk or 1
  chunk_size = scan.check_chunk_size(chunk_size, "selective_traces")
  return _selective_traces(x_BTD, rates_BTKD, h0, resets, method, chunk_size)


def selective_methods() -> tuple:
  """The methods of selective_traces: 'auto', 'native' and the linear scans (kernels.KERNELS)."""
  return (ScanMethod.AUTO, ScanMethod.NATIVE, *kernels.KERNELS)


@jax.jit
def _selective_native(x_BTD, rates_BTKD, h0, resets):
  raw = native.selective_traces(x_BTD, rates_BTKD, h0, resets)
  return raw.astype(x_BTD.dtype), raw[:, -1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _over_timescales(x_BTD, k: int):
  """x [B, T, D] -> [B, T, K, D] (x repeated over the K timescales). Its VJP sums the K cotangent slices
  as written-out terms, which XLA:CPU fuses with their producers into one elementwise loop; the reduce that
  autodiff of a broadcast gives became an XNNPACK reduction fusion that took 4x the rest of the training
  step at (1, 16384, 256, 3) (2026-12-06, 2-core CPU)."""
  return jnp.broadcast_to(x_BTD[:, :, None, :], x_BTD.shape[:2] + (k,) + x_BTD.shape[2:])


def _over_timescales_fwd(x_BTD, k):
  return _over_timescales(x_BTD, k), None


def _over_timescales_bwd(k, _, g_BTKD):
  return (sum(g_BTKD[:, :, i] for i in range(k)),)


_over_timescales.defvjp(_over_timescales_fwd, _over_timescales_bwd)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _selective_traces(x_BTD, rates_BTKD, h0, resets, method, chunk_size):
  acc = kernels.acc_dtype(x_BTD.dtype)
  r = rates_BTKD.astype(acc)
  b = r * _over_timescales(x_BTD.astype(acc), r.shape[2])
  h, h_last = scan.linear_scan(1.0 - r, b, h0, resets=resets, method=method, chunk_size=chunk_size)
  return h.astype(x_BTD.dtype), h_last


def selective_step(h_BKD, x_BD, rates_BKD, *, reset=None):
  """One token of selective_traces: returns (new state [B, K, D] float32, h_t in x's dtype)."""
  r = jnp.asarray(rates_BKD, jnp.float32)
  h = scan.step(jnp.asarray(h_BKD, jnp.float32), 1.0 - r, r * x_BD[:, None, :].astype(jnp.float32), reset=reset)
  return h, h.astype(x_BD.dtype)
