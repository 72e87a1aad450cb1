"""The closed form 'fused' of ema_traces: write rates shared over D ([K, 1]), one batched matmul per output.

Time is cut into N chunks of C tokens; M = B * N chunk rows. In chunk row m, with local times t, s < C,
  h[m, t, k] = sum_s W[t, k, s] x[m, s] + W[t, k, C + k] carry[m, k]
  W[t, k, s] = alpha_k (1 - alpha_k)^(t - s) for s <= t,   W[t, k, C + k] = (1 - alpha_k)^(t + 1)
(zero across a reset, the carry column zero from a reset in the chunk on). So the whole output is ONE
batched matmul [M, C*K, C+K] x [M, C+K, D] -> [M, C*K, D], which is [B, T, K, D] after a reshape: it is
written once, with no transpose and no second pass. The carries (raw state entering each chunk) come first
from chunk-end states E[m, k] = sum_s W_end[k, s] x[m, s] (a small matmul) and the chunk-level recurrence
carry_{n+1} = (1 - alpha)^C carry_n + E_n, carry_0 = h0 (closed_form.chunk_scan). The VJP is the transposed
matmul [M, C*K, C+K]^T x G -> [M, C+K, D]: its last K rows are the carries' direct cotangents, which run
the chunk-level recurrence from the right; dx adds W_end^T times the cotangent of the state after each
chunk; dh0 is what flows out of chunk 0. The write rates get their cotangent through the small chunk
matrices (jax.vjp of `_fused_weights`), skipped when the rates are constants.

The same traces as 'blocked' (closed_form.py), which replaced it as auto's pick on CPU (2026-11-29): its
forward is about 2.5x slower there, and since the rate gradient of 'blocked' was rebuilt (2026-12-06) its
training step with learned shared rates is slower too (results/scan_bench_learned_dh_reuse_heap.json: 1.31
against 1.05 x the fixed path at (8, 2048, 256, 3), 1.33 against 1.06 at (1, 65536, 256, 3)). It is kept
as the matmul form an accelerator may prefer (unmeasured). benchmarks.scan_bench times it ('fused/<C>').
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax.traces.closed_form import chunk_scan, chunks, log_decay

DEFAULT_FUSED_CHUNK = 16  # benchmarks.scan_bench on a 2-core CPU: 16 beat 8, 32 and 64 overall
_HIGHEST = jax.lax.Precision.HIGHEST


def _last_in_chunk(t_len: int, c: int) -> np.ndarray:
  """Local index of each chunk's last real token (the last chunk may be partly padding)."""
  n = -(-t_len // c)
  ends = np.full((n,), c - 1)
  ends[-1] = t_len - 1 - (n - 1) * c
  return ends


def _fused_weights(alpha_K, resets_BT, bsz: int, t_len: int, c: int):
  """Chunk matrices from the write rates (all powers as exp(n log(1 - alpha))).

  Returns (w_MRS, we_BNKC, ac_BNK): R = C*K output rows, S = C+K inputs (tokens, then carried states).
  w_MRS: output rows from a chunk's inputs; leading axis 1 (shared) without resets.
  we_BNKC: the state after the chunk's last real token from its inputs; leading axis 1 without resets.
  ac_BNK: decay of the carried state across the chunk (0 when a reset lies in it); leading axis likewise.
  """
  k = alpha_K.shape[0]
  n = -(-t_len // c)
  acc = alpha_K.dtype
  log_a = log_decay(alpha_K)
  tt = np.arange(c)
  lag_CC = tt[:, None] - tt[None, :]  # t - s
  w_tok = (
      (lag_CC >= 0).astype(acc)[:, None, :]
      * alpha_K[None, :, None]
      * jnp.exp(np.maximum(lag_CC, 0)[:, None, :].astype(acc) * log_a[None, :, None])
  )  # [C, K, C]
  w_car = jnp.eye(k, dtype=acc)[None] * jnp.exp((tt + 1).astype(acc)[:, None, None] * log_a[None, :, None])
  ends_N = _last_in_chunk(t_len, c)
  lag_NC = ends_N[:, None] - tt[None, :]
  we_BNKC = (
      (lag_NC >= 0).astype(acc)[:, None, :]
      * alpha_K[None, :, None]
      * jnp.exp(np.maximum(lag_NC, 0)[:, None, :].astype(acc) * log_a[None, :, None])
  )[None]
  ac_BNK = jnp.exp((ends_N + 1).astype(acc)[:, None] * log_a[None, :])[None]
  if resets_BT is None:
    return jnp.concatenate([w_tok, w_car], axis=-1).reshape(1, c * k, c + k), we_BNKC, ac_BNK
  m = bsz * n
  w_tok = jnp.broadcast_to(w_tok, (m,) + w_tok.shape)
  w_car = jnp.broadcast_to(w_car, (m,) + w_car.shape)
  r_BNC = jnp.pad(resets_BT, ((0, 0), (0, n * c - t_len))).reshape(bsz, n, c)
  seg_BNC = jnp.cumsum(r_BNC.astype(jnp.int32), axis=2)  # documents started in the chunk
  seg_MC = seg_BNC.reshape(m, c)
  w_tok = w_tok * (seg_MC[:, :, None, None] == seg_MC[:, None, None, :])
  w_car = w_car * (seg_MC == 0)[:, :, None, None]
  seg_end_BN1 = seg_BNC[:, jnp.arange(n), ends_N][:, :, None]
  we_BNKC = we_BNKC * (seg_end_BN1 == seg_BNC)[:, :, None, :]
  ac_BNK = ac_BNK * (seg_end_BN1 == 0)
  return jnp.concatenate([w_tok, w_car], axis=-1).reshape(m, c * k, c + k), we_BNKC, ac_BNK


def _batched_matmul(w_MRS, v_MSD):
  """[M|1, R, S] x [M, S, D] -> [M, R, D], float32 (float64 for x64) accumulation."""
  w_MRS = jnp.broadcast_to(w_MRS, v_MSD.shape[:1] + w_MRS.shape[1:])
  return jax.lax.dot_general(
      w_MRS, v_MSD, (((2,), (1,)), ((0,), (0,))), precision=_HIGHEST, preferred_element_type=v_MSD.dtype
  )


def _fused_forward(x_BTD, alpha_K, h0_BKD, resets_BT, c):
  bsz, t_len, d = x_BTD.shape
  k = alpha_K.shape[0]
  w_MRS, we_BNKC, ac_BNK = _fused_weights(alpha_K, resets_BT, bsz, t_len, c)
  n = -(-t_len // c)
  x_BNCD = chunks(x_BTD, n, c)
  e_BNKD = jnp.einsum(
      "bnks,bnsd->bnkd", jnp.broadcast_to(we_BNKC, (bsz,) + we_BNKC.shape[1:]), x_BNCD, precision=_HIGHEST
  )
  carry_BNKD, _ = chunk_scan(ac_BNK[..., None], e_BNKD, h0_BKD.astype(e_BNKD.dtype), reverse=False)
  xs_MSD = jnp.concatenate([x_BNCD, carry_BNKD], axis=2).reshape(bsz * n, c + k, d)
  raw_BTKD = _batched_matmul(w_MRS, xs_MSD).reshape(bsz, n * c, k, d)[:, :t_len]
  return raw_BTKD, carry_BNKD


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_traces(x_BTD, alpha_KE, h0_BKD, resets_BT, c: int, rate_grad: bool = True):
  """Raw traces [B, T, K, D] float32 (float64 for x64) of x [B, T, D] at rates alpha_KE [K, 1] from the raw
  state h0_BKD, cut by resets_BT ([B, T] bool or None), in chunks of c tokens.

  rate_grad=False (rates known to be constants) returns a zero write-rate cotangent without computing it.
  """
  return _fused_forward(x_BTD, alpha_KE[:, 0], h0_BKD, resets_BT, c)[0]


def _fused_fwd(x_BTD, alpha_KE, h0_BKD, resets_BT, c, rate_grad):
  raw_BTKD, carry_BNKD = _fused_forward(x_BTD, alpha_KE[:, 0], h0_BKD, resets_BT, c)
  return raw_BTKD, (x_BTD, alpha_KE, h0_BKD, resets_BT, carry_BNKD)


def _fused_bwd(c, rate_grad, res, g_BTKD):
  x_BTD, alpha_KE, h0_BKD, resets_BT, carry_BNKD = res
  bsz, t_len, d = x_BTD.shape
  k = alpha_KE.shape[0]
  n = carry_BNKD.shape[1]
  acc = alpha_KE.dtype
  (w_MRS, we_BNKC, ac_BNK), weights_vjp = jax.vjp(
      lambda al: _fused_weights(al, resets_BT, bsz, t_len, c), alpha_KE[:, 0]
  )
  g_MRD = chunks(g_BTKD.astype(acc), n, c).reshape(bsz * n, c * k, d)
  # One transposed matmul: rows < C are the tokens' direct cotangents, the last K the carries'. W is
  # transposed first (it is small): XLA:CPU then runs the plain batched-matmul kernel, 10-20% faster.
  dxs_BNSD = _batched_matmul(jnp.swapaxes(w_MRS, 1, 2), g_MRD).reshape(bsz, n, c + k, d)
  # Cotangent of the state after chunk n (lam_next[n]) from the right; dh0 flows out of chunk 0.
  lam_next_BNKD, dh0_BKD = chunk_scan(
      ac_BNK[..., None], dxs_BNSD[:, :, c:], jnp.zeros_like(carry_BNKD[:, 0]), reverse=True
  )
  we_full_BNKC = jnp.broadcast_to(we_BNKC, (bsz,) + we_BNKC.shape[1:])
  # Sums over K written out: XLA:CPU runs some small-axis reductions very slowly (YNN reduce fusions).
  dx_BNCD = dxs_BNSD[:, :, :c] + sum(we_full_BNKC[:, :, i, :, None] * lam_next_BNKD[:, :, i, None, :] for i in range(k))
  dx_BTD = dx_BNCD.reshape(bsz, n * c, d)[:, :t_len].astype(x_BTD.dtype)
  dh0_BKD = dh0_BKD.astype(h0_BKD.dtype)
  if not rate_grad:
    return dx_BTD, jnp.zeros_like(alpha_KE), dh0_BKD, None
  # Write-rate cotangent through the chunk matrices.
  x_BNCD = chunks(x_BTD, n, c)
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
  return dx_BTD, dalpha_K.reshape(alpha_KE.shape).astype(alpha_KE.dtype), dh0_BKD, None


fused_traces.defvjp(_fused_fwd, _fused_bwd)
