"""The CPU top-k kernel against an independent NumPy reference and against jax.lax.top_k's mask."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from ema_jax.nn import cpu_topk
from ema_jax.nn.ffn import TopKFFN, topk_mask


def _reference(a: np.ndarray, k: int) -> np.ndarray:
  """Rows' k largest under the floats' total order on bits (-0.0 < +0.0, NaN by sign above / below
  everything), ties to the lower index: a stable sort of order keys, written independently."""
  bits_dtype = np.int16 if a.dtype == ml_dtypes.bfloat16 else np.int32
  bits = a.view(bits_dtype).astype(np.int64)
  keys = np.where(bits < 0, -1 - (bits - np.iinfo(bits_dtype).min), bits)  # negatives reversed, below 0
  order = np.argsort(-keys, axis=-1, kind="stable")[..., :k]
  mask = np.zeros(a.shape, bool)
  np.put_along_axis(mask, order, True, axis=-1)
  return mask


def _xla_mask(a, k):
  _, idx = jax.lax.top_k(a, k)
  return jnp.put_along_axis(jnp.zeros(a.shape, jnp.bool_), idx, True, axis=-1, inplace=False)


def _cases():
  rng = np.random.default_rng(0)
  for trial in range(24):
    shape = [(int(rng.integers(1, 40)), int(rng.integers(1, 200))), (int(rng.integers(1, 300)),), (3, 5, 33)][trial % 3]
    a = rng.normal(size=shape).astype(np.float32)
    if trial % 4 == 0:
      a = np.round(a * 2) / 2  # many ties
    if trial % 4 == 1:
      flat = a.reshape(-1)
      flat[rng.integers(0, flat.size, 6)] = 0.0
      flat[rng.integers(0, flat.size, 6)] = -0.0
    if trial % 4 == 2:
      flat = a.reshape(-1)
      flat[rng.integers(0, flat.size, 2)] = np.nan
      flat[rng.integers(0, flat.size, 2)] = -np.nan
      flat[rng.integers(0, flat.size, 2)] = np.inf
      flat[rng.integers(0, flat.size, 2)] = -np.inf
    h = shape[-1]
    k = [0, 1, h, int(rng.integers(0, h + 1))][trial % 4]
    yield a, k


pytestmark = pytest.mark.skipif(not cpu_topk.applies(jnp.zeros(1)), reason="needs one CPU device and g++")


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_mask_matches_reference_and_xla(dtype):
  for a, k in _cases():
    a = a.astype(dtype)
    got = np.asarray(jax.jit(cpu_topk.topk_mask, static_argnums=1)(jnp.asarray(a), k))
    np.testing.assert_array_equal(got, _reference(a, k), err_msg=f"shape {a.shape} k {k}")
    np.testing.assert_array_equal(got, np.asarray(_xla_mask(jnp.asarray(a), k)), err_msg=f"{a.shape} {k}")
    assert (got.sum(-1) == k).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_large_rows_over_the_thread_pool(dtype):
  a = jax.random.normal(jax.random.key(1), (2048, 1024)).astype(dtype)
  a = a.at[0].set(1.0).at[1, ::2].set(-0.0).at[1, 1::2].set(0.0)  # a row all equal; a row of signed zeros
  got = jax.jit(cpu_topk.topk_mask, static_argnums=1)(a, 61)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(_xla_mask(a, 61)))
  np.testing.assert_array_equal(np.asarray(got[0]), np.arange(1024) < 61)


def test_vmap_and_the_ffn_use_it_with_the_same_numbers():
  a = jax.random.normal(jax.random.key(2), (4, 6, 50))
  np.testing.assert_array_equal(
      np.asarray(jax.vmap(lambda r: cpu_topk.topk_mask(r, 7))(a)), np.asarray(_xla_mask(a, 7))
  )
  jaxpr = str(jax.make_jaxpr(lambda x: topk_mask(x, 7))(a))
  assert "ffi_call" in jaxpr and "top_k" not in jaxpr
  ffn = TopKFFN(16, 64, 5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (3, 10, 16))

  def loss(model, x):
    return jnp.sum(model(x) ** 2)

  value, grads = nnx.value_and_grad(loss)(ffn, x)
  ref = nnx.clone(ffn)
  with cpu_topk.enabled(False):  # XLA's TopK
    assert "top_k" in str(jax.make_jaxpr(lambda x: topk_mask(x, 7))(a))
    ref_value, ref_grads = nnx.value_and_grad(loss)(ref, x)
  assert np.asarray(value) == np.asarray(ref_value)
  for g, r in zip(jax.tree.leaves(nnx.state(grads)), jax.tree.leaves(nnx.state(ref_grads))):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_build_goes_to_a_hashed_cache_and_a_missing_compiler_falls_back(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("EMA_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
  path = cpu_topk.library_path()
  assert path.startswith(str(tmp_path / "cache")) and os.path.basename(path).startswith("topk_mask_cpu-")
  assert cpu_topk.build() == path and os.path.getsize(path) > 0
  assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]  # no temporary file left behind
  monkeypatch.setenv("EMA_JAX_KERNEL_CACHE", str(tmp_path / "empty"))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
    cpu_topk.build()
  with caplog.at_level("WARNING"):
    assert cpu_topk.KERNEL._load() is False
  assert "XLA's TopK is" in caplog.text and "no C++ compiler" in caplog.text
  monkeypatch.setenv("EMA_JAX_CPU_TOPK", "xla")
  assert cpu_topk.KERNEL._load() is False
