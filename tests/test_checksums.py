"""ema_jax/checksums.py against an independent NumPy reimplementation: every dtype a train state holds, every
single-byte change and a swap detected; the same sums on any sharding of 4 devices (slow: a subprocess)."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import fault_configs as fc
from ema_jax import checksums

M32 = 0xFFFFFFFF
SEEDS, INDEX_MULT = (0x9E3779B9, 0x7F4A7C15), 0x85EBCA77


def np_fmix32(h):
  h = h ^ (h >> 16)
  h = (h * 0x85EBCA6B) & M32  # below 2**64 in uint64: exact before the mask
  h = h ^ (h >> 13)
  h = (h * 0xC2B2AE35) & M32
  return h ^ (h >> 16)


def np_checksum(x) -> str:
  """The reference: x's bytes read as little-endian words (64-bit ones as low, high), in NumPy uint64."""
  x = np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  if np.iscomplexobj(x):
    x = np.stack([x.real, x.imag], -1)
  size = x.dtype.itemsize
  v = np.ascontiguousarray(x).reshape(-1).view(np.dtype(f"<u{size}")).astype(np.uint64)
  words = np.stack([v & M32, v >> 32], -1).reshape(-1) if size == 8 else v
  index = np.arange(words.size, dtype=np.uint64)
  sums = [int(np.sum(np_fmix32(words ^ np_fmix32((index * INDEX_MULT + seed) & M32)))) & M32 for seed in SEEDS]
  return f"{sums[0]:08x}{sums[1]:08x}"


def sample_arrays(x64=False):
  """Every dtype a train state may hold, in odd shapes, with random bits (NaN patterns included)."""
  rng = np.random.default_rng(0)
  bits = lambda shape, dtype: rng.integers(0, 256, (*shape, np.dtype(dtype).itemsize), np.uint8).view(dtype)[..., 0]
  out = {
      "f32": bits((3, 5), np.float32),
      "bf16": bits((4, 3), ml_dtypes.bfloat16),
      "f16": bits((7,), np.float16),
      "f8": bits((2, 4), ml_dtypes.float8_e4m3fn),
      "i8": bits((5,), np.int8),
      "u8": bits((2, 3), np.uint8),
      "i16": bits((3,), np.int16),
      "u16": bits((2, 2), np.uint16),
      "i32": bits((4, 2), np.int32),
      "u32": bits((3,), np.uint32),
      "scalar": bits((), np.float32),
      "bool": rng.integers(0, 2, (3, 4)).astype(bool),
      "key": jax.random.split(jax.random.key(3), 4),
  }
  if x64:
    out.update(f64=bits((4, 2), np.float64), i64=bits((3,), np.int64), u64=bits((2,), np.uint64))
    out.update(c64=bits((2, 2), np.complex64), c128=bits((2,), np.complex128))
  return out


def test_checksums_match_numpy_and_change_with_any_byte():
  arrays = sample_arrays()
  got = checksums.state_checksums({"a": arrays, "b": [jax.numpy.asarray(arrays["f32"])]})
  assert got == {**{f"a/{k}": np_checksum(v) for k, v in arrays.items()}, "b/0": np_checksum(arrays["f32"])}
  rng = np.random.default_rng(1)
  for name, x in arrays.items():
    is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    raw = np.asarray(jax.random.key_data(x) if is_key else x)
    before = checksums.state_checksums({"x": x})["x"]
    seen = {before}
    for i in range(raw.nbytes):
      flipped = bytearray(raw.tobytes())
      flipped[i] ^= 1 if raw.dtype == bool else int(rng.integers(1, 256))
      y = np.frombuffer(bytes(flipped), raw.dtype).reshape(raw.shape)
      after = checksums.state_checksums({"x": jax.random.wrap_key_data(y) if is_key else y})["x"]
      # One changed word always changes both 32-bit halves (the mix is a bijection of the word).
      assert after[:8] != before[:8] and after[8:] != before[8:], (name, i)
      seen.add(after)
    assert len(seen) == raw.nbytes + 1, name
  # Swapping two elements changes it too: each word is mixed with its index.
  swapped = arrays["i32"].copy()
  swapped[0, 0], swapped[1, 1] = arrays["i32"][1, 1], arrays["i32"][0, 0]
  assert np_checksum(swapped) != np_checksum(arrays["i32"])
  assert checksums.state_checksums({"x": swapped})["x"] == np_checksum(swapped)


SHARDED = """
import json, jax, numpy as np
from test_checksums import sample_arrays, np_checksum
from ema_jax import checkpoint as ckpt_lib
from ema_jax import checksums
mesh = jax.make_mesh((2, 2), ("a", "b"))
arrays = dict(sample_arrays(x64=True), big=np.arange(4 * 6 * 10, dtype=np.float32).reshape(4, 6, 10))
specs = [jax.P(), jax.P("a"), jax.P(None, "b"), jax.P("a", "b"), jax.P(("a", "b")), jax.P("b", "a")]
out = {"numpy": {k: np_checksum(v) for k, v in arrays.items()}, "one device": checksums.state_checksums(arrays)}
for spec in specs:
  def put(x):
    fits = len(spec) <= x.ndim and all(
        ax is None or x.shape[i] % np.prod([mesh.shape[a] for a in np.atleast_1d(ax)]) == 0
        for i, ax in enumerate(spec))
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec if fits else jax.P()))
  out[str(spec)] = checksums.state_checksums({k: put(v) for k, v in arrays.items()})
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # a subprocess with 4 forced devices
def test_checksums_are_the_same_on_any_sharding():
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      JAX_ENABLE_X64="1",
      PYTHONPATH=os.pathsep.join([fc.TESTS_DIR, fc.REPO]),
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
  )
  proc = subprocess.run(
      [sys.executable, "-c", SHARDED], cwd=fc.REPO, env=env, capture_output=True, text=True, timeout=1800
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
  reference = result.pop("numpy")
  assert len(reference) == 19
  for layout, sums in result.items():
    assert sums == reference, layout
