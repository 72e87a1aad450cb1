"""Checksums of a train state's arrays, computed on device and identical on any mesh or process count.

Orbax 0.12.8 writes arrays as zarr3 with codecs hard-coded in tensorstore_utils._build_zarr3_metadata
(crc32c on each shard's *index* only, none on the chunk data) and offers no option to add one; only
OCDBT's B-tree nodes (which hold arrays under 1 KiB inline) carry a crc32c. Bytes flipped inside a
larger array's data therefore restore silently as other numbers, so checkpoint.py records these.

The checksum of an array is a wrapped uint32 sum over its 32-bit words of murmur3-mixed (word, flat
index), with two seeds (64 bits): exact on any mesh or process count (integer addition is order-free),
sure to change when any one word changes (the mix is a bijection of the word); two changed words cancel
with odds of about 2**-64.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np


def path_name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # two sums of 32 bits -> 64 bits per array
_INDEX_MULT = 0x85EBCA77  # odd, so distinct flat indices (mod 2**32) stay distinct before mixing


def _fmix32(h):
  """murmur3's finalizer: a bijection of uint32 in which every input bit moves about half the output."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x) -> List[jax.Array]:
  """x's bits as uint32 arrays of x's shape, one per 32-bit word of an element (low word first)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return [x.astype(jnp.uint32)]
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return _words(jnp.real(x)) + _words(jnp.imag(x))
  bits = jax.dtypes.itemsize_bits(x.dtype)
  u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))  # same width: the exact bits
  if bits == 64:  # split arithmetically, so the word order does not depend on the platform's endianness
    return [(u & 0xFFFFFFFF).astype(jnp.uint32), (u >> 32).astype(jnp.uint32)]
  return [u.astype(jnp.uint32)]


def _array_checksum(x) -> jax.Array:
  """uint32[2]: per seed, the wrapped sum over words w at flat index i of fmix(w ^ fmix(i * M + seed))."""
  words = _words(x)
  shape, k = words[0].shape, len(words)
  # Row-major element index from per-axis iotas: elementwise, so it is sharded like x with no gather.
  elem, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    elem = elem + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  sums = []
  for seed in _SEEDS:
    total = jnp.uint32(0)
    for j, w in enumerate(words):
      salt = _fmix32((elem * jnp.uint32(k) + jnp.uint32(j)) * jnp.uint32(_INDEX_MULT) + jnp.uint32(seed))
      total = total + jnp.sum(_fmix32(w ^ salt), dtype=jnp.uint32)
    sums.append(total)
  return jnp.stack(sums)


@functools.lru_cache(maxsize=None)
def _checksums_fn(out_sharding):
  return jax.jit(lambda leaves: jnp.stack([_array_checksum(x) for x in leaves]), out_shardings=out_sharding)


def state_checksums(state: Any) -> Dict[str, str]:
  """{array path: 16 hex digits} for every array of `state`, identical on any mesh or process count.

  One jit over the whole state and one small fetch; with several processes it is a collective (every
  process calls it) and the result is replicated, so each reads its own copy.
  """
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  if not flat:
    return {}
  leaves = [x for _, x in flat]
  sharding = getattr(leaves[0], "sharding", None)
  # Replicated on the state's own mesh: jit wants one device order for inputs and outputs alike.
  out = None
  if isinstance(sharding, jax.sharding.NamedSharding):
    out = jax.sharding.NamedSharding(sharding.mesh, jax.P())
  sums = _checksums_fn(out)(leaves)
  local = np.asarray(jax.device_get(sums.addressable_shards[0].data))
  return {path_name(p): f"{int(a):08x}{int(b):08x}" for (p, _), (a, b) in zip(flat, local)}
