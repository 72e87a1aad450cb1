"""The closed form 'blocked' of ema_traces: constant write rates (shared [K] or per channel [K, D]), any T.

Time is cut into N chunks of C tokens (C = 8 by default). Within a chunk the traces have a closed form,
  raw[n, t, k] = P[t, k] carry[n, k] + sum_{s <= t} W[t, k, s] x[n, s],
  W[t, k, s] = alpha_k (1 - alpha_k)^(t - s),   P[t, k] = (1 - alpha_k)^(t + 1),
so the whole output is one elementwise pass: C broadcast multiply-adds per output element, which XLA emits
as a single loop that reads x and the carries and writes the [B, T, K, D] output once, in place. Unlike
the 'fused' path (fused.py: the same weights as one batched matmul), there is no [M, C + K, D] input to build and
no small-matrix kernel, and rates per channel take the same code (W gets a D axis; the output pass then
loads a weight per multiply-add, 1.4-1.5x the time of shared rates in benchmarks.scan_bench --learned).
The carries (the raw state entering each chunk) come from the chunk-end states
  E[n, k] = sum_s alpha_k (1 - alpha_k)^(C - 1 - s) x[n, s]
and the chunk-level recurrence carry[n + 1] = (1 - alpha_k)^C carry[n] + E[n], carry[0] = h0 (chunk_scan,
shared with fused.py).

A reset at t zeroes what flows into t: with seg the number of resets so far in the chunk, W[t, s] keeps
only seg[t] == seg[s], P[t] only seg[t] == 0, E only the tokens of the chunk's last segment, and the chunk
decay only chunks without a reset. The last chunk is padded with zeros at the end: that changes only its
padded outputs, which are dropped, and the state after it, which is never used (h_last is the last real
output row).

The custom VJP is the transposed pass: the carries' cotangents sum P against the output cotangent, run the
chunk recurrence from the right, and dx sums W^T against the output cotangent plus the chunk-end weights
against the cotangent of the state after the chunk. Learned rates get their cotangent from
dL/dalpha = sum_t lam_t (x_t - h_{t-1}) (lam_t the state's cotangent, rebuilt inside each chunk by its own
recurrence from the output cotangent and the chunk-level cotangent, h_{t-1} the saved output; the sum over
batch and chunks a matrix-vector product), skipped when the rates are constants.

This module returns raw traces; ema_traces takes h_last from the last row and applies bias correction
(elementwise, fused by XLA into the same pass). benchmarks.scan_bench times it ('blocked/<C>').
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax.traces import kernels

# Stand-in for log(1 - alpha) at alpha = 1: exp(n * _LOG_ZERO) is exactly 0 for n >= 1 and 1 for n = 0,
# without the nan of 0 * -inf (and with a zero, not nan, write-rate gradient).
_LOG_ZERO = -1e4


def log_decay(alpha):
  """log(1 - alpha), with _LOG_ZERO at alpha = 1."""
  open_ = alpha < 1
  return jnp.where(open_, jnp.log1p(-jnp.where(open_, alpha, 0.5)), _LOG_ZERO)


def _weights(alpha_KE, c: int):
  """(W [C(t), K, C(s), E], P [C, K, E], We [K, C, E], A [K, E]) for rates [K, E], E = 1 or D."""
  log_a = log_decay(alpha_KE)
  tt = np.arange(c)
  lag = tt[:, None] - tt[None, :]
  causal = (lag >= 0)[:, None, :, None]
  w = jnp.where(
      causal, alpha_KE[None, :, None, :] * jnp.exp(np.maximum(lag, 0)[:, None, :, None] * log_a[None, :, None, :]), 0.0
  )
  p = jnp.exp((tt + 1).astype(np.float32)[:, None, None] * log_a[None])
  we = alpha_KE[:, None, :] * jnp.exp((c - 1 - tt).astype(np.float32)[None, :, None] * log_a[:, None, :])
  a = jnp.exp(float(c) * log_a)
  return w, p, we, a


class _Masks:
  """Where resets cut the chunk weights: each a float32 array, or None without resets."""

  def __init__(self, resets_BT, n: int, c: int):
    if resets_BT is None:
      self.w = self.p = self.e = self.a = None
      return
    t_len = resets_BT.shape[1]
    r = jnp.pad(resets_BT, ((0, 0), (0, n * c - t_len))).reshape(-1, n, c)
    seg = jnp.cumsum(r.astype(jnp.int32), axis=2)  # resets so far inside the chunk
    self.w = (seg[:, :, :, None] == seg[:, :, None, :]).astype(jnp.float32)  # [B, N, C(t), C(s)]
    self.p = (seg == 0).astype(jnp.float32)  # [B, N, C]
    self.e = (seg == seg[:, :, -1:]).astype(jnp.float32)  # [B, N, C]
    self.a = (seg[:, :, -1] == 0).astype(jnp.float32)  # [B, N]


def chunks(x_BTF, n: int, c: int):
  """[B, T, ...] -> [B, N, C, ...] in float32 (float64 stays), zero padding at the end."""
  t_len = x_BTF.shape[1]
  x_BTF = x_BTF.astype(jnp.promote_types(x_BTF.dtype, jnp.float32))
  if n * c != t_len:
    x_BTF = jnp.pad(x_BTF, [(0, 0), (0, n * c - t_len)] + [(0, 0)] * (x_BTF.ndim - 2))
  return x_BTF.reshape((x_BTF.shape[0], n, c) + x_BTF.shape[2:])


def chunk_scan(a_BNKE, e_BNKD, s0_BKD, reverse: bool):
  """The chunk-level recurrence s_{n+1} = a_n s_n + e_n (from the right for reverse), a broadcasting over
  batch and chunks: (the state entering each chunk [B, N, K, D], the final state [B, K, D]).

  On CPU a jax.lax.scan: about 0.5-1.3 us a step, less than the log-depth associative scan for the
  N <= 8192 chunks measured, and the loop materialises its input and output, which keeps XLA from
  recomputing the chunk level inside the output pass. Elsewhere the associative scan (a step of a loop is
  a kernel launch there; unmeasured).
  """
  a_BNKE = jnp.broadcast_to(a_BNKE, e_BNKD.shape[:2] + a_BNKE.shape[2:])
  cpu = jax.default_backend() == "cpu"
  method = kernels.ScanMethod.SEQUENTIAL if cpu else kernels.ScanMethod.ASSOCIATIVE
  return kernels.entering_states(a_BNKE, e_BNKD, s0_BKD, reverse=reverse, method=method)


def _chunk_decay(a_KE, masks):
  """The decay across each chunk, [1 or B, 1 or N, K, E]: a^C, zero for chunks with a reset."""
  a = a_KE[None, None]
  return a if masks.a is None else a * masks.a[:, :, None, None]


def _chunk_end_states(we_KCE, masks, x_BNCD):
  """E [B, N, K, D]: the state after each chunk's last token from a zero start."""
  c = x_BNCD.shape[2]
  terms = []
  for s in range(c):
    w = we_KCE[None, None, :, s]  # [1, 1, K, E]
    if masks.e is not None:
      w = w * masks.e[:, :, s, None, None]
    terms.append(w * x_BNCD[:, :, s, None, :])
  return sum(terms)


def _outputs(w_CKCE, p_CKE, masks, x_BNCD, carry_BNKD):
  """raw [B, N, C, K, D] = P carry + sum_s W[:, :, s] x_s, one elementwise pass."""
  c = x_BNCD.shape[2]
  p = p_CKE[None, None]
  if masks.p is not None:
    p = p * masks.p[:, :, :, None, None]
  h = p * carry_BNKD[:, :, None]
  for s in range(c):
    w = w_CKCE[None, None, :, :, s]  # [1, 1, C(t), K, E]
    if masks.w is not None:
      w = w * masks.w[:, :, :, s, None, None]
    h = h + w * x_BNCD[:, :, None, None, s, :]
  return h


def _forward(x_BTD, alpha_KE, h0_BKD, resets_BT, c):
  bsz, t_len, d = x_BTD.shape
  k = alpha_KE.shape[0]
  n = -(-t_len // c)
  w, p, we, a = _weights(alpha_KE, c)
  masks = _Masks(resets_BT, n, c)
  x_BNCD = chunks(x_BTD, n, c)
  e_BNKD = _chunk_end_states(we, masks, x_BNCD)
  carry_BNKD, _ = chunk_scan(_chunk_decay(a, masks), e_BNKD, h0_BKD, reverse=False)
  raw = _outputs(w, p, masks, x_BNCD, carry_BNKD).reshape(bsz, n * c, k, d)[:, :t_len]
  return raw, carry_BNKD


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_traces(x_BTD, alpha_KE, h0_BKD, resets_BT, c: int, rate_grad: bool = True):
  """Raw traces [B, T, K, D] float32 of x [B, T, D] at rates alpha_KE [K, 1 or D] (float32) from the raw
  state h0_BKD, cut by resets_BT ([B, T] bool or None), in chunks of c tokens.

  rate_grad=False (rates known to be constants) returns a zero write-rate cotangent without computing it.
  """
  return _forward(x_BTD, alpha_KE, h0_BKD, resets_BT, c)[0]


def _blocked_fwd(x_BTD, alpha_KE, h0_BKD, resets_BT, c, rate_grad):
  raw, carry_BNKD = _forward(x_BTD, alpha_KE, h0_BKD, resets_BT, c)
  return raw, (x_BTD, alpha_KE, h0_BKD, resets_BT, carry_BNKD, raw if rate_grad else None)


def _blocked_bwd(c, rate_grad, res, g_BTKD):
  x_BTD, alpha_KE, h0_BKD, resets_BT, carry_BNKD, raw_BTKD = res
  bsz, t_len, d = x_BTD.shape
  k = alpha_KE.shape[0]
  n = carry_BNKD.shape[1]
  w, p, we, a = _weights(alpha_KE, c)
  masks = _Masks(resets_BT, n, c)
  g_BNCKD = chunks(g_BTKD, n, c)
  # Cotangent of each chunk's carry: P against the output cotangent.
  p_m = p[None, None]
  if masks.p is not None:
    p_m = p_m * masks.p[:, :, :, None, None]
  dcarry_BNKD = sum(p_m[:, :, t] * g_BNCKD[:, :, t] for t in range(c))
  # lam[n]: cotangent of the state after chunk n, from the right; dh0 flows out of chunk 0.
  lam_BNKD, dh0_BKD = chunk_scan(_chunk_decay(a, masks), dcarry_BNKD, jnp.zeros_like(carry_BNKD[:, 0]), reverse=True)
  # dx[s] = sum_{t, k} W[t, k, s] g[t, k] + sum_k We[k, s] lam[k]: one pass, written [B, N, C(s), D].
  w_st = jnp.transpose(w, (2, 0, 1, 3))[None, None]  # [1, 1, C(s), C(t), K, E]
  if masks.w is not None:
    w_st = w_st * jnp.swapaxes(masks.w, 2, 3)[:, :, :, :, None, None]
  we_s = jnp.transpose(we, (1, 0, 2))[None, None]  # [1, 1, C(s), K, E]
  if masks.e is not None:
    we_s = we_s * masks.e[:, :, :, None, None]
  dx = sum(we_s[:, :, :, i] * lam_BNKD[:, :, None, i] for i in range(k))
  for t in range(c):
    for i in range(k):
      dx = dx + w_st[:, :, :, t, i] * g_BNCKD[:, :, None, t, i]
  dx_BTD = dx.reshape(bsz, n * c, d)[:, :t_len].astype(x_BTD.dtype)
  dh0_BKD = dh0_BKD.astype(h0_BKD.dtype)
  if not rate_grad:
    return dx_BTD, jnp.zeros_like(alpha_KE), dh0_BKD, None
  # Write-rate cotangent: h_t = (1 - alpha) h_{t-1} + alpha x_t gives dL/dalpha = sum_t lam_t (x_t - h_{t-1}),
  # lam_t the cotangent of the state h_t: within a chunk sum_{t' >= t} a^(t' - t) g_t' plus a^(C - t) times
  # the cotangent of the state after the chunk. One reduction over batch and time, lam never stored.
  x_BNCD = chunks(x_BTD, n, c)
  raw_prev = jnp.concatenate([h0_BKD[:, None].astype(raw_BTKD.dtype), raw_BTKD[:, :-1]], axis=1)
  prev_BNCKD = chunks(raw_prev, n, c)
  if masks.p is not None:
    prev_BNCKD = prev_BNCKD * (1.0 - chunks(resets_BT.astype(jnp.float32), n, c))[:, :, :, None, None]
  decay = (1.0 - alpha_KE)[None, None]  # [1, 1, K, E]
  # keep[t]: the state h_{t-1} flows into h_t (no reset at t), for t = 1 .. C - 1 of each chunk.
  keep = None if masks.p is None else 1.0 - chunks(resets_BT.astype(jnp.float32), n, c)
  drive = x_BNCD[:, :, :, None, :] - prev_BNCKD
  # lam_t = g_t + (1 - alpha) keep_{t+1} lam_{t+1} from the chunk's last token, whose lam is g_{C-1} plus the
  # cotangent of the state after the chunk (lam_BNKD already carries the next chunk's decay and resets).
  # Written out over the chunk (one elementwise pass over [B, N, K, D]; each lam_t is built once per element,
  # C multiply-adds in all), then summed over batch and chunks: XLA:CPU reduces a small array over its
  # leading axes far faster than the full one.
  lam_t = lam_BNKD + g_BNCKD[:, :, c - 1]
  per_chunk = lam_t * drive[:, :, c - 1]
  for t in range(c - 2, -1, -1):
    step = decay if keep is None else decay * keep[:, :, t + 1, None, None]
    lam_t = g_BNCKD[:, :, t] + step * lam_t
    per_chunk = per_chunk + lam_t * drive[:, :, t]
  flat = per_chunk.reshape(-1, per_chunk.shape[-2] * per_chunk.shape[-1])
  dalpha = jnp.dot(jnp.ones((1, flat.shape[0]), flat.dtype), flat, precision=jax.lax.Precision.HIGHEST)
  dalpha = dalpha.reshape(per_chunk.shape[-2:])
  if alpha_KE.shape[1] == 1:
    dalpha = jnp.sum(dalpha, axis=1)
  dalpha = dalpha.reshape(alpha_KE.shape).astype(alpha_KE.dtype)
  return dx_BTD, dalpha, dh0_BKD, None


blocked_traces.defvjp(_blocked_fwd, _blocked_bwd)
