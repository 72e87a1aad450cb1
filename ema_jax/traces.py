"""Multi-timescale EMA traces h_t = (1 - alpha) h_{t-1} + alpha x_t.

The K write rates share one input x. Two implementations:
  blocked      constant rates, shared ([K]) or per channel ([K, D]), fixed or learned: the closed form inside
               chunks of C tokens as one elementwise pass, written once (traces_blocked.py, custom VJP)
  fused        rates shared over D ([K], fixed or learned): per chunk of C tokens the whole output is one
               batched matmul (decay matrix x [tokens; carried states]) written once, with a custom VJP
               that is the transposed matmul (see the "fused chunked path" section below)
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


# ----------------------------------------------------------------------------------------------
# fused chunked path (write rates shared over D)
#
# Time is cut into N chunks of C tokens; M = B * N chunk rows. In chunk row m, with local times t, s < C,
#   h[m, t, k] = sum_s W[t, k, s] x[m, s] + W[t, k, C + k] carry[m, k]
#   W[t, k, s] = alpha_k (1 - alpha_k)^(t - s) for s <= t,   W[t, k, C + k] = (1 - alpha_k)^(t + 1)
# (zero across a reset, the carry column zero from a reset in the chunk on; rows divided by
# 1 - (1 - alpha_k)^n_t for bias correction). So the whole output is ONE batched matmul
# [M, C*K, C+K] x [M, C+K, D] -> [M, C*K, D], which is [B, T, K, D] after a reshape: it is written once,
# with no transpose and no second pass. The carries (raw state entering each chunk) come first from
# chunk-end states E[m, k] = sum_s W_end[k, s] x[m, s] (a small matmul) and the chunk-level recurrence
# carry_{n+1} = (1 - alpha)^C carry_n + E_n, carry_0 = h0. The VJP is the transposed matmul
# [M, C*K, C+K]^T x G -> [M, C+K, D]: its last K rows are the carries' direct cotangents, which run the
# chunk-level recurrence from the right (starting from the cotangent of h_last); dx adds W_end^T times
# the cotangent of the state after each chunk; dh0 is what flows out of chunk 0. The write rates get
# their cotangent through the small chunk matrices (jax.vjp of `_fused_weights`); XLA removes that part
# when nothing uses it (fixed rates).

DEFAULT_FUSED_CHUNK = 16  # benchmarks/scan_bench.py on a 2-core CPU: 16 beat 8, 32 and 64 overall
_HIGHEST = jax.lax.Precision.HIGHEST
# Stand-in for log(1 - alpha) at alpha = 1: exp(n * _LOG_ZERO) is exactly 0 for n >= 1 and 1 for n = 0,
# without the nan of 0 * -inf (and with a zero, not nan, write-rate gradient).
_LOG_ZERO = -1e4


def _log_decay(alpha_K):
  open_ = alpha_K < 1
  return jnp.where(open_, jnp.log1p(-jnp.where(open_, alpha_K, 0.5)), _LOG_ZERO)


def _chunk_ends(t_len: int, c: int) -> np.ndarray:
  """Local index of each chunk's last real token (the last chunk may be partly padding)."""
  n = -(-t_len // c)
  ends = np.full((n,), c - 1)
  ends[-1] = t_len - 1 - (n - 1) * c
  return ends


def _fused_weights(alpha_K, resets_BT, counts_BT, bsz: int, t_len: int, c: int, bias: bool):
  """Chunk matrices from the write rates (all powers as exp(n log(1 - alpha))).

  Returns (w_MRS, we_BNKC, ac_BNK): R = C*K output rows, S = C+K inputs (tokens, then carried states).
  w_MRS: output rows from a chunk's inputs; leading axis 1 (shared) without resets and bias correction.
  we_BNKC: the state after the chunk's last real token from its inputs; leading axis 1 without resets.
  ac_BNK: decay of the carried state across the chunk (0 when a reset lies in it); leading axis likewise.
  """
  k = alpha_K.shape[0]
  n = -(-t_len // c)
  acc = alpha_K.dtype
  log_a = _log_decay(alpha_K)
  tt = np.arange(c)
  lag_CC = tt[:, None] - tt[None, :]  # t - s
  w_tok = (
      (lag_CC >= 0).astype(acc)[:, None, :]
      * alpha_K[None, :, None]
      * jnp.exp(np.maximum(lag_CC, 0)[:, None, :].astype(acc) * log_a[None, :, None])
  )  # [C, K, C]
  w_car = jnp.eye(k, dtype=acc)[None] * jnp.exp((tt + 1).astype(acc)[:, None, None] * log_a[None, :, None])
  ends_N = _chunk_ends(t_len, c)
  lag_NC = ends_N[:, None] - tt[None, :]
  we_BNKC = (
      (lag_NC >= 0).astype(acc)[:, None, :]
      * alpha_K[None, :, None]
      * jnp.exp(np.maximum(lag_NC, 0)[:, None, :].astype(acc) * log_a[None, :, None])
  )[None]
  ac_BNK = jnp.exp((ends_N + 1).astype(acc)[:, None] * log_a[None, :])[None]
  if resets_BT is None and not bias:
    return jnp.concatenate([w_tok, w_car], axis=-1).reshape(1, c * k, c + k), we_BNKC, ac_BNK
  m = bsz * n
  w_tok = jnp.broadcast_to(w_tok, (m,) + w_tok.shape)
  w_car = jnp.broadcast_to(w_car, (m,) + w_car.shape)
  if resets_BT is not None:
    r_BNC = jnp.pad(resets_BT, ((0, 0), (0, n * c - t_len))).reshape(bsz, n, c)
    seg_BNC = jnp.cumsum(r_BNC.astype(jnp.int32), axis=2)  # documents started in the chunk
    seg_MC = seg_BNC.reshape(m, c)
    w_tok = w_tok * (seg_MC[:, :, None, None] == seg_MC[:, None, None, :])
    w_car = w_car * (seg_MC == 0)[:, :, None, None]
    seg_end_BN1 = seg_BNC[:, jnp.arange(n), ends_N][:, :, None]
    we_BNKC = we_BNKC * (seg_end_BN1 == seg_BNC)[:, :, None, :]
    ac_BNK = ac_BNK * (seg_end_BN1 == 0)
  w_MCKS = jnp.concatenate([w_tok, w_car], axis=-1)
  if bias:
    n_MC = jnp.pad(counts_BT, ((0, 0), (0, n * c - t_len)), constant_values=1).reshape(m, c)
    w_MCKS = w_MCKS / (-jnp.expm1(n_MC.astype(acc)[:, :, None] * log_a))[..., None]
  return w_MCKS.reshape(m, c * k, c + k), we_BNKC, ac_BNK


def _chunk_scan(a_BNK1, e_BNKD, s0_BKD, reverse: bool):
  """s_{n+1} = a_n s_n + e_n over chunks (from the right for reverse): (state entering each chunk, final).

  On CPU one step costs about 0.5 us, less than the log-depth associative scan for the N <= 4096 chunks
  measured; accelerators take the associative scan (a step there is a kernel launch).
  """
  a_BNK1 = jnp.broadcast_to(a_BNK1, e_BNKD.shape[:1] + a_BNK1.shape[1:])
  cpu = jax.default_backend() == "cpu"
  method = scan.ScanMethod.SEQUENTIAL if cpu else scan.ScanMethod.ASSOCIATIVE
  return scan.entering_states(a_BNK1, e_BNKD, s0_BKD, reverse=reverse, method=method)


def _batched_matmul(w_MRS, v_MSD):
  """[M|1, R, S] x [M, S, D] -> [M, R, D], float32 (float64 for x64) accumulation."""
  w_MRS = jnp.broadcast_to(w_MRS, v_MSD.shape[:1] + w_MRS.shape[1:])
  return jax.lax.dot_general(
      w_MRS, v_MSD, (((2,), (1,)), ((0,), (0,))), precision=_HIGHEST, preferred_element_type=v_MSD.dtype
  )


def _chunked_input(x_BTD, c: int, acc):
  """x as [B, N, C, D] in the accumulation dtype (zero padding at the end)."""
  bsz, t_len, d = x_BTD.shape
  n = -(-t_len // c)
  x_BTD = x_BTD.astype(acc)
  if n * c != t_len:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, n * c - t_len), (0, 0)))
  return x_BTD.reshape(bsz, n, c, d)


def _fused_forward(x_BTD, alpha_K, h0_BKD, resets_BT, counts_BT, c, bias):
  bsz, t_len, d = x_BTD.shape
  k = alpha_K.shape[0]
  w_MRS, we_BNKC, ac_BNK = _fused_weights(alpha_K, resets_BT, counts_BT, bsz, t_len, c, bias)
  x_BNCD = _chunked_input(x_BTD, c, alpha_K.dtype)
  n = x_BNCD.shape[1]
  e_BNKD = jnp.einsum(
      "bnks,bnsd->bnkd", jnp.broadcast_to(we_BNKC, (bsz,) + we_BNKC.shape[1:]), x_BNCD, precision=_HIGHEST
  )
  carry_BNKD, last_BKD = _chunk_scan(ac_BNK[..., None], e_BNKD, h0_BKD.astype(e_BNKD.dtype), reverse=False)
  xs_MSD = jnp.concatenate([x_BNCD, carry_BNKD], axis=2).reshape(bsz * n, c + k, d)
  h_BTKD = _batched_matmul(w_MRS, xs_MSD).reshape(bsz, n * c, k, d)[:, :t_len]
  return h_BTKD.astype(x_BTD.dtype), last_BKD, carry_BNKD


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused_traces(x_BTD, alpha_K, h0_BKD, resets_BT, counts_BT, c, bias, rate_grad=True):
  """Raw (bias corrected if asked) traces [B, T, K, D] in x's dtype and the raw final state [B, K, D].

  rate_grad=False (rates known to be constants) returns a zero write-rate cotangent without computing it.
  """
  h_BTKD, last_BKD, _ = _fused_forward(x_BTD, alpha_K, h0_BKD, resets_BT, counts_BT, c, bias)
  return h_BTKD, last_BKD


def _fused_traces_fwd(x_BTD, alpha_K, h0_BKD, resets_BT, counts_BT, c, bias, rate_grad=True):
  h_BTKD, last_BKD, carry_BNKD = _fused_forward(x_BTD, alpha_K, h0_BKD, resets_BT, counts_BT, c, bias)
  return (h_BTKD, last_BKD), (x_BTD, alpha_K, h0_BKD, resets_BT, counts_BT, carry_BNKD)


def _fused_traces_bwd(c, bias, rate_grad, res, cts):
  x_BTD, alpha_K, h0_BKD, resets_BT, counts_BT, carry_BNKD = res
  g_BTKD, g_last_BKD = cts
  bsz, t_len, d = x_BTD.shape
  k = alpha_K.shape[0]
  n = carry_BNKD.shape[1]
  acc = alpha_K.dtype
  (w_MRS, we_BNKC, ac_BNK), weights_vjp = jax.vjp(
      lambda al: _fused_weights(al, resets_BT, counts_BT, bsz, t_len, c, bias), alpha_K
  )
  g_BTKD = g_BTKD.astype(acc)
  if n * c != t_len:
    g_BTKD = jnp.pad(g_BTKD, ((0, 0), (0, n * c - t_len), (0, 0), (0, 0)))
  g_MRD = g_BTKD.reshape(bsz * n, c * k, d)
  # One transposed matmul: rows < C are the tokens' direct cotangents, the last K the carries'. W is
  # transposed first (it is small): XLA:CPU then runs the plain batched-matmul kernel, 10-20% faster.
  dxs_BNSD = _batched_matmul(jnp.swapaxes(w_MRS, 1, 2), g_MRD).reshape(bsz, n, c + k, d)
  # Cotangent of the state after chunk n (lam_next[n]) from the right, starting from h_last's.
  lam_next_BNKD, dh0_BKD = _chunk_scan(ac_BNK[..., None], dxs_BNSD[:, :, c:], g_last_BKD.astype(acc), reverse=True)
  we_full_BNKC = jnp.broadcast_to(we_BNKC, (bsz,) + we_BNKC.shape[1:])
  # Sums over K written out: XLA:CPU runs some small-axis reductions very slowly (YNN reduce fusions).
  dx_BNCD = dxs_BNSD[:, :, :c] + sum(we_full_BNKC[:, :, i, :, None] * lam_next_BNKD[:, :, i, None, :] for i in range(k))
  dx_BTD = dx_BNCD.reshape(bsz, n * c, d)[:, :t_len].astype(x_BTD.dtype)
  dh0_BKD = dh0_BKD.astype(h0_BKD.dtype)
  if not rate_grad:
    return dx_BTD, jnp.zeros_like(alpha_K), dh0_BKD, None, None
  # Write-rate cotangent through the chunk matrices (under jit, XLA drops it when nothing uses it).
  x_BNCD = _chunked_input(x_BTD, c, acc)
  xs_MSD = jnp.concatenate([x_BNCD, carry_BNKD], axis=2).reshape(bsz * n, c + k, d)
  dw_MRS = jax.lax.dot_general(
      g_MRD, xs_MSD, (((2,), (2,)), ((0,), (0,))), precision=_HIGHEST, preferred_element_type=acc
  )
  dwe_BNKC = jnp.einsum("bnkd,bnsd->bnks", lam_next_BNKD, x_BNCD, precision=_HIGHEST)
  dac_BNK = jnp.einsum("bnkd,bnkd->bnk", lam_next_BNKD, carry_BNKD, precision=_HIGHEST)

  def to_shared(dv, v):
    # Sum over the batch-like leading axis as a matmul with ones (robust on every backend).
    if v.shape[0] == dv.shape[0]:
      return dv
    ones = jnp.ones((dv.shape[0],), dv.dtype)
    return jnp.tensordot(ones, dv, axes=(0, 0), precision=_HIGHEST)[None]

  (dalpha_K,) = weights_vjp((to_shared(dw_MRS, w_MRS), to_shared(dwe_BNKC, we_BNKC), to_shared(dac_BNK, ac_BNK)))
  return dx_BTD, dalpha_K, dh0_BKD, None, None


_fused_traces.defvjp(_fused_traces_fwd, _fused_traces_bwd)


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
      output; any constant rates, [K] or [K, D]), 'fused' (one batched matmul per output, see the section
      above; needs rates shared over D: [K] or [K, 1], fixed or learned), a scan.linear_scan method
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
