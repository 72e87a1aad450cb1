"""Meshes, partition rules, and process-local -> global batches.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters, optimizer state and weight
EMA sharded over it), `seq` (the time axis of activations; the trace layers scan locally and exchange
only per-shard state, see ema_jax/nn/seq_shard.py). The batch is split over (data, fsdp), time over seq.

Parameters are sharded by the rule in `param_spec`, in this one place, for every model.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "seq")
BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated: sharding them saves little and costs a collective.
MIN_FSDP_SIZE = 2 ** 14


def mesh_shape(mesh_cfg, num_devices: int) -> Dict[str, int]:
  """Axis sizes from the config with one -1 filled in; validated against the device count."""
  sizes = {}
  for name in AXES:
    v = mesh_cfg.get(name, 1) if hasattr(mesh_cfg, "get") else getattr(mesh_cfg, name, 1)
    if not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
      raise ValueError(f"config.mesh.{name}={v!r}: expected a positive integer or -1 (fill in).")
    sizes[name] = int(v)
  free = [n for n, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh={sizes}: at most one axis may be -1.")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh={sizes}: {num_devices} devices are not divisible by the fixed axes' "
                       f"product {fixed}.")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"config.mesh={sizes} needs {math.prod(sizes.values())} devices but {num_devices} are "
                     f"available; make the product of data x fsdp x seq equal {num_devices} or set one to -1.")
  return sizes


def make_mesh(mesh_cfg, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  # Auto axes: XLA's partitioner propagates shardings from the jit in/out shardings we give it.
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def param_spec(shape: Sequence[int], mesh: Mesh) -> P:
  """FSDP rule: shard the largest dimension divisible by the fsdp axis; small arrays stay replicated."""
  n = mesh.shape["fsdp"]
  if n == 1 or len(shape) == 0 or math.prod(shape) < MIN_FSDP_SIZE:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % n == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for a whole train state: parameters, optimizer moments and weight EMA alike.

  The rule depends only on shape, so Adam's moments and the EMA of a parameter land exactly where the
  parameter does.
  """
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, mesh)), abstract_state)


def batch_spec(ndim: int, shard_seq: bool) -> P:
  if ndim == 0:
    return P()
  if ndim == 1:
    return P(BATCH_AXES)
  return P(BATCH_AXES, "seq" if shard_seq else None, *([None] * (ndim - 2)))


def validate_batch(global_batch: int, seq_len: Optional[int], mesh: Mesh, shard_seq: bool) -> None:
  """Fails before compilation when the mesh cannot divide the batch or the sequence."""
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % n_batch:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by mesh data x fsdp = "
                     f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {n_batch}; use a multiple of {n_batch}.")
  if global_batch % jax.process_count():
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the {jax.process_count()} processes.")
  if shard_seq and seq_len is not None and seq_len % mesh.shape["seq"]:
    raise ValueError(f"sequence length {seq_len} is not divisible by mesh seq = {mesh.shape['seq']}; use a "
                     f"multiple of {mesh.shape['seq']}.")


def put_local_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, shard_seq: bool = False) -> Dict[str, jax.Array]:
  """Process-local numpy rows -> global jax.Arrays sharded over (data, fsdp) [and seq on axis 1]."""
  out = {}
  nproc = jax.process_count()
  for k, v in batch.items():
    v = np.asarray(v)
    seq = shard_seq and v.ndim >= 2
    sharding = NamedSharding(mesh, batch_spec(v.ndim, seq))
    global_shape = (v.shape[0] * nproc,) + v.shape[1:] if v.ndim else ()
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------- sequence


def _current_seq_size(mesh=None) -> int:
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or getattr(mesh, "empty", True) or "seq" not in mesh.axis_names:
    return 1
  return int(mesh.shape["seq"])


def seq_parallel_traces(x_BTD, alphas, resets_BT=None, *, bias_correction: bool = False, method: str = "auto",
                        mesh=None):
  """ema_traces with time split over the mesh's `seq` axis (jax.shard_map).

  Each shard scans its own tokens from a zero state; the shards all-gather their final states and decay
  products (K x D numbers per shard and row, never activations), each rebuilds the true state entering it
  and corrects its outputs with one fused multiply-add. Resets anywhere (on shard edges included) cut the
  carried state exactly as in the unsharded scan. Returns (h [B, T, K, D], h_last [B, K, D]).
  """
  from ema_jax import traces  # local: traces -> scan only; sharding stays importable without it

  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  n_seq = _current_seq_size(mesh)
  bsz, t_len, d = x_BTD.shape
  if t_len % n_seq:
    raise ValueError(f"sequence length {t_len} is not divisible by mesh seq = {n_seq}.")
  alpha = traces.check_alphas(alphas, d)
  alpha_kd = alpha[:, None] if alpha.ndim == 1 else alpha
  if resets_BT is None:
    resets_BT = jnp.zeros((bsz, t_len), bool)

  def local(x, r, alpha_kd):
    b, length, _ = x.shape
    h_raw, last_raw = traces.ema_traces(x, alpha_kd, resets=r, method=method)
    # Carry-in factor for local step t: (1 - alpha)^(t + 1), zero from the shard's first reset on.
    log_a = jnp.log1p(-alpha_kd)                                      # [K, 1|D]
    steps = jnp.arange(1, length + 1, dtype=jnp.float32)
    open_ = (jnp.cumsum(r.astype(jnp.int32), axis=1) == 0).astype(jnp.float32)  # [b, L]
    fac = jnp.exp(steps[:, None, None] * log_a[None]) [None] * open_[:, :, None, None]  # [b, L, K, 1|D]
    lasts = jax.lax.all_gather(last_raw, "seq")                       # [S, b, K, D]
    prods = jax.lax.all_gather(fac[:, -1], "seq")                     # [S, b, K, 1|D]
    has_reset = r.any(axis=1)
    last_pos = jnp.max(jnp.where(r, jnp.arange(length)[None], -1), axis=1)
    tail = jnp.where(has_reset, length - last_pos, length)            # tokens since the last reset at the end
    tails = jax.lax.all_gather(tail, "seq")                           # [S, b]
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
      counts = traces.token_counts(r, b, length, jnp.stack(counts_in)[i])
      h = h / traces.debias_factor(alpha_kd, counts)
    return h.astype(x.dtype), state

  spec_bt = P(BATCH_AXES, "seq")
  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(P(BATCH_AXES, "seq", None), spec_bt, P()),
                     out_specs=(P(BATCH_AXES, "seq", None, None), P(BATCH_AXES, None, None)),
                     check_vma=False)
  return fn(x_BTD, resets_BT, alpha_kd)


def auto_traces(x_BTD, alphas, resets_BT=None, *, bias_correction: bool = False, method: str = "auto"):
  """ema_traces, or its sequence-parallel form when the current mesh (jax.set_mesh) has seq > 1."""
  if _current_seq_size() > 1:
    return seq_parallel_traces(x_BTD, alphas, resets_BT, bias_correction=bias_correction, method=method)
  from ema_jax import traces
  return traces.ema_traces(x_BTD, alphas, resets=resets_BT, bias_correction=bias_correction, method=method)


def allgather_json(obj: Any) -> list:
  """Every process's JSON-serialisable `obj`, in process order (a collective: all processes call it)."""
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(everything, sizes)]
