"""EMA traces with time split over the mesh's `seq` axis (jax.shard_map).

Each shard scans its own tokens from a zero state; the shards exchange only (final state, product of
decays), K x D numbers per shard and row, never activations; each rebuilds the true state entering it
and corrects its outputs. `auto_traces` is what the trace layer calls: sequence-parallel under a mesh
(jax.set_mesh) whose `seq` axis is larger than 1, plain `ema_traces` otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ema_jax.sharding import BATCH_AXES
from ema_jax.traces import ema
from ema_jax.traces.selective import selective_traces


def _current_seq_size(mesh=None) -> int:
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or getattr(mesh, "empty", True) or "seq" not in mesh.axis_names:
    return 1
  return int(mesh.shape["seq"])


def seq_parallel_traces(
    x_BTD, alphas, resets_BT=None, *, bias_correction: bool = False, method: str = "auto", mesh=None
):
  """ema_traces with time split over the mesh's `seq` axis (jax.shard_map).

  Each shard scans its own tokens from a zero state; the shards all-gather their final states and decay
  products (K x D numbers per shard and row, never activations), each rebuilds the true state entering it
  and corrects its outputs with one fused multiply-add. Resets anywhere (on shard edges included) cut the
  carried state exactly as in the unsharded scan. Returns (h [B, T, K, D], h_last [B, K, D]).
  """
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  n_seq = _current_seq_size(mesh)
  bsz, t_len, d = x_BTD.shape
  if t_len % n_seq:
    raise ValueError(f"sequence length {t_len} is not divisible by mesh seq = {n_seq}.")
  alpha = ema.check_alphas(alphas, d)
  alpha_kd = alpha[:, None] if alpha.ndim == 1 else alpha
  if resets_BT is None:
    resets_BT = jnp.zeros((bsz, t_len), bool)

  def local(x, r, alpha_kd):
    b, length, _ = x.shape
    h_raw, last_raw = ema.ema_traces(x, alpha_kd, resets=r, method=method)
    # Carry-in factor for local step t: (1 - alpha)^(t + 1), zero from the shard's first reset on.
    log_a = jnp.log1p(-alpha_kd)  # [K, 1|D]
    steps = jnp.arange(1, length + 1, dtype=jnp.float32)
    open_ = (jnp.cumsum(r.astype(jnp.int32), axis=1) == 0).astype(jnp.float32)  # [b, L]
    fac = jnp.exp(steps[:, None, None] * log_a[None])[None] * open_[:, :, None, None]  # [b, L, K, 1|D]
    lasts = jax.lax.all_gather(last_raw, "seq")  # [S, b, K, D]
    prods = jax.lax.all_gather(fac[:, -1], "seq")  # [S, b, K, 1|D]
    has_reset = r.any(axis=1)
    last_pos = jnp.max(jnp.where(r, jnp.arange(length)[None], -1), axis=1)
    tail = jnp.where(has_reset, length - last_pos, length)  # tokens since the last reset at the end
    tails = jax.lax.all_gather(tail, "seq")  # [S, b]
    resets_any = jax.lax.all_gather(has_reset, "seq")
    n_shards = lasts.shape[0]
    state = jnp.zeros_like(last_raw)
    count = jnp.zeros_like(tail)
    entering, counts_in = [], []
    for j in range(n_shards):  # S is small and static: a short unrolled combine
      entering.append(state)
      counts_in.append(count)
      state = prods[j] * state + lasts[j]
      count = jnp.where(resets_any[j], tails[j], count + length)
    i = jax.lax.axis_index("seq")
    h0 = jnp.stack(entering)[i]
    h = h_raw.astype(jnp.float32) + fac * h0[:, None]
    if bias_correction:
      counts = ema.token_counts(r, b, length, jnp.stack(counts_in)[i])
      h = h / ema.debias_factor(alpha_kd, counts)
    return h.astype(x.dtype), state

  spec_bt = P(BATCH_AXES, "seq")
  fn = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(BATCH_AXES, "seq", None), spec_bt, P()),
      out_specs=(P(BATCH_AXES, "seq", None, None), P(BATCH_AXES, None, None)),
      check_vma=False,
  )
  return fn(x_BTD, resets_BT, alpha_kd)


def seq_parallel_selective_traces(x_BTD, rates_BTKD, resets_BT=None, *, method: str = "auto", mesh=None):
  """selective_traces with time split over the mesh's `seq` axis (jax.shard_map).

  As seq_parallel_traces, but the decays 1 - r_t are data: each shard scans its tokens from a zero state
  and keeps the running product of its decays (zeroed from its first reset on); the shards all-gather
  their final states and total decay products (K x D per shard and row), each rebuilds the state entering
  it and adds product_t * state_in to its outputs. Returns (h [B, T, K, D], h_last [B, K, D] float32).
  """
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  n_seq = _current_seq_size(mesh)
  bsz, t_len, d = x_BTD.shape
  if t_len % n_seq:
    raise ValueError(f"sequence length {t_len} is not divisible by mesh seq = {n_seq}.")
  if resets_BT is None:
    resets_BT = jnp.zeros((bsz, t_len), bool)

  def local(x, rates, r):
    h_raw, last_raw = selective_traces(x, rates, resets=r, method=method)
    open_ = (jnp.cumsum(r.astype(jnp.int32), axis=1) == 0).astype(jnp.float32)  # [b, L]
    fac = jnp.cumprod(1.0 - rates.astype(jnp.float32), axis=1) * open_[:, :, None, None]  # [b, L, K, 1|D]
    lasts = jax.lax.all_gather(last_raw, "seq")  # [S, b, K, D]
    prods = jax.lax.all_gather(fac[:, -1], "seq")  # [S, b, K, 1|D]
    state = jnp.zeros_like(last_raw)
    entering = []
    for j in range(lasts.shape[0]):  # S is small and static: a short unrolled combine
      entering.append(state)
      state = prods[j] * state + lasts[j]
    h0 = jnp.stack(entering)[jax.lax.axis_index("seq")]
    h = h_raw.astype(jnp.float32) + fac * h0[:, None]
    return h.astype(x.dtype), state

  fn = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(BATCH_AXES, "seq", None), P(BATCH_AXES, "seq", None, None), P(BATCH_AXES, "seq")),
      out_specs=(P(BATCH_AXES, "seq", None, None), P(BATCH_AXES, None, None)),
      check_vma=False,
  )
  return fn(x_BTD, rates_BTKD, resets_BT)


def auto_selective_traces(x_BTD, rates_BTKD, resets_BT=None, *, method: str = "auto"):
  """selective_traces, or its sequence-parallel form when the current mesh has seq > 1."""
  if _current_seq_size() > 1:
    return seq_parallel_selective_traces(x_BTD, rates_BTKD, resets_BT, method=method)
  return selective_traces(x_BTD, rates_BTKD, resets=resets_BT, method=method)


def auto_traces(x_BTD, alphas, resets_BT=None, *, bias_correction: bool = False, method: str = "auto"):
  """ema_traces, or its sequence-parallel form when the current mesh (jax.set_mesh) has seq > 1."""
  if _current_seq_size() > 1:
    return seq_parallel_traces(x_BTD, alphas, resets_BT, bias_correction=bias_correction, method=method)
  return ema.ema_traces(x_BTD, alphas, resets=resets_BT, bias_correction=bias_correction, method=method)
