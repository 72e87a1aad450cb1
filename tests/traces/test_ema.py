"""ema_traces and the EMATraces layer: h0, per-channel rates, decoding equals the sequence scan (every method
against the float64 loop: test_method_equivalence.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax import traces
from ema_jax.nn import EMATraces
from ema_jax.traces import ema_traces
from helpers import ema_loop, rel_err


def test_h0_and_per_channel_rates():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 29, 4)).astype(np.float32)
  alphas = rng.uniform(0.01, 0.9, size=(3, 4)).astype(np.float32)
  h0 = rng.normal(size=(2, 3, 4)).astype(np.float32)
  h, _ = ema_traces(x, jnp.asarray(alphas), h0)
  assert rel_err(h, ema_loop(x, alphas, h0)[0]) < 1e-5


def test_bias_correction_makes_first_token_exact():
  x = np.random.default_rng(2).normal(size=(1, 5, 3)).astype(np.float32)
  h, _ = ema_traces(x, (0.5, 0.1, 0.02), bias_correction=True)
  np.testing.assert_allclose(h[0, 0], np.repeat(x[0, :1], 3, 0), rtol=1e-6)
  # A constant input has a constant unbiased average.
  c = np.ones((1, 40, 2), np.float32)
  h, _ = ema_traces(c, (0.5, 0.1, 0.02), bias_correction=True)
  np.testing.assert_allclose(h, 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 200, 8)), dtype)
  h, h_last = ema_traces(x, (0.5, 0.1, 0.02))
  assert h.dtype == dtype and h_last.dtype == jnp.float32
  ref, ref_last = ema_loop(np.asarray(x.astype(jnp.float32)), (0.5, 0.1, 0.02))
  assert rel_err(h.astype(jnp.float32), ref) < (2e-2 if dtype == jnp.bfloat16 else 2e-3)
  assert rel_err(h_last, ref_last) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_step_equals_scan(bias):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 25, 4)).astype(np.float32)
  r = rng.uniform(size=(3, 25)) < 0.15
  h, _ = ema_traces(x, (0.5, 0.1, 0.02), resets=r, bias_correction=bias)
  state = traces.init_state(3, 3, 4)
  for t in range(25):
    state, h_t = traces.ema_step(
        state, jnp.asarray(x[:, t]), (0.5, 0.1, 0.02), reset=jnp.asarray(r[:, t]), bias_correction=bias
    )
    np.testing.assert_allclose(h_t, h[:, t], rtol=1e-5, atol=1e-6)


def test_gradients_match_reference():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 17, 3)).astype(np.float32)
  w = rng.normal(size=(2, 17, 3, 3)).astype(np.float32)
  r = rng.uniform(size=(2, 17)) < 0.2
  g = jax.grad(lambda x: jnp.sum(ema_traces(x, (0.5, 0.1, 0.02), resets=r, bias_correction=True)[0] * w))(x)
  g_ref = jax.grad(
      lambda x: jnp.sum(ema_traces(x, (0.5, 0.1, 0.02), resets=r, bias_correction=True, method="sequential")[0] * w)
  )(x)
  # Finite differences in float64 through the reference loop.
  eps = 1e-6
  x64 = x.astype(np.float64)
  num = np.zeros_like(x64)
  for idx in [(0, 0, 0), (1, 5, 2), (0, 16, 1), (1, 10, 0)]:
    xp, xm = x64.copy(), x64.copy()
    xp[idx] += eps
    xm[idx] -= eps
    fp = np.sum(ema_loop(xp, (0.5, 0.1, 0.02), resets=r, bias_correction=True)[0] * w)
    fm = np.sum(ema_loop(xm, (0.5, 0.1, 0.02), resets=r, bias_correction=True)[0] * w)
    num[idx] = (fp - fm) / (2 * eps)
    assert abs(g[idx] - num[idx]) < 1e-4 * max(1.0, abs(num[idx]))
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "alphas,match",
    [
        ((0.5, 0.0), r"\(0, 1\]"),
        ((1.5,), r"\(0, 1\]"),
        ((), "K >= 1"),
        (0.5, "sequence"),
        ((float("nan"),), r"\(0, 1\]"),
        (np.ones((2, 3, 4)) * 0.5, "shape"),
    ],
)
def test_bad_alphas(alphas, match):
  with pytest.raises(ValueError, match=match):
    ema_traces(np.zeros((1, 4, 3), np.float32), alphas)


def test_bad_x_h0_resets():
  with pytest.raises(ValueError, match="B, T, D"):
    ema_traces(np.zeros((4, 3), np.float32))
  with pytest.raises(ValueError, match="dtype"):
    ema_traces(np.zeros((1, 4, 3), np.int32))
  with pytest.raises(ValueError, match="h0"):
    ema_traces(np.zeros((1, 4, 3), np.float32), h0=np.zeros((1, 3), np.float32))
  with pytest.raises(ValueError, match="resets"):
    ema_traces(np.zeros((1, 4, 3), np.float32), resets=np.zeros((1, 5), bool))


# ---------------------------------------------------------------------------------------------- layer


@pytest.mark.parametrize("learn", ["none", "per_timescale", "per_channel"])
def test_layer_call_and_step(learn):
  rng = np.random.default_rng(6)
  layer = EMATraces(4, learn=learn, bias_correction=True)
  x = jnp.asarray(rng.normal(size=(2, 15, 4)), jnp.float32)
  r = jnp.asarray(rng.uniform(size=(2, 15)) < 0.2)
  np.testing.assert_allclose(
      layer.alphas(),
      np.broadcast_to(
          np.array([0.5, 0.1, 0.02])[:, None] if learn == "per_channel" else [0.5, 0.1, 0.02], layer.alphas().shape
      ),
      rtol=1e-5,
  )
  h, final = layer(x, resets_BT=r)
  ref, _ = ema_loop(np.asarray(x), np.asarray(layer.alphas()), resets=np.asarray(r), bias_correction=True)
  assert rel_err(h, ref) < 1e-5
  state = layer.init_state(2)
  for t in range(15):
    state, h_t = layer.step(state, x[:, t], reset_B=r[:, t])
    np.testing.assert_allclose(h_t, h[:, t], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.h, final.h, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state.count, final.count)
  # Continuing from the returned state equals one long call.
  h2, _ = layer(x[:, 7:], resets_BT=r[:, 7:], state=layer(x[:, :7], resets_BT=r[:, :7])[1])
  np.testing.assert_allclose(h2, h[:, 7:], rtol=1e-5, atol=1e-6)


def test_learned_rates_train_and_stay_in_range():
  layer = EMATraces(3, alphas=(0.5, 0.1), learn="per_channel")
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 20, 3)), jnp.float32)
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(layer)
  assert grads["raw_decay"][...].shape == (2, 3)
  assert bool(jnp.all(jnp.isfinite(grads["raw_decay"][...])))
  layer.raw_decay[...] = jnp.asarray([[50.0, -50.0, 0.0], [-80.0, 80.0, 3.0]])
  alphas = np.asarray(layer.alphas())
  assert np.all(alphas > 0) and np.all(alphas <= 1)


def test_layer_rejects_bad_config():
  with pytest.raises(ValueError, match="learn"):
    EMATraces(4, learn="sometimes")
  with pytest.raises(ValueError, match=r"inside \(0, 1\)"):
    EMATraces(4, alphas=(1.0, 0.1), learn="per_timescale")
  with pytest.raises(ValueError, match="features"):
    EMATraces(0)
