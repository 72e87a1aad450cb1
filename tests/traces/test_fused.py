"""The closed form 'fused' (ema_jax/traces/fused.py): learned rates, low precision, jit/vmap against the float64
loop; gradients against the sequential scan. (Its values on every case: test_method_equivalence.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ema_jax import traces
from ema_jax.traces import fused
from ema_jax.traces import ema_traces
from helpers import ema_loop, make_resets, rel_err

ALPHAS = (0.5, 0.1, 0.02)


def test_learned_rate_array_and_auto():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 45, 4)).astype(np.float32)
  r = make_resets(rng, 2, 45, 16)
  alphas = jnp.asarray([[0.7], [0.05]], jnp.float32)  # [K, 1] shared over D
  ref = ema_loop(x, np.asarray(alphas[:, 0]), resets=r, bias_correction=True)[0]
  for method in ("fused", "auto"):
    h, _ = ema_traces(x, alphas, resets=r, bias_correction=True, method=method)
    assert rel_err(h, ref) < 1e-5
  assert traces.auto_method(45, False) != "fused"


@pytest.mark.parametrize("t_len,chunk,bias", [(17, 4, True), (32, 8, False), (1, 16, True)])
def test_gradients_match_sequential(t_len, chunk, bias):
  rng = np.random.default_rng(5 + t_len)
  x = jnp.asarray(rng.normal(size=(2, t_len, 3)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)
  alphas = jnp.asarray(ALPHAS, jnp.float32)
  r = jnp.asarray(make_resets(rng, 2, t_len, min(chunk, t_len)))
  w = jnp.asarray(rng.normal(size=(2, t_len, 3, 3)), jnp.float32)
  wl = jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)

  def loss(x, h0, alphas, method):
    h, h_last = ema_traces(
        x, alphas, h0, resets=r, bias_correction=bias, start_count=2, method=method, chunk_size=chunk
    )
    return jnp.sum(h * w) + jnp.sum(h_last * wl)

  g_fused = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(x, h0, alphas, "fused")
  g_seq = jax.grad(loss, (0, 1, 2))(x, h0, alphas, "sequential")
  for name, a, b in zip(("x", "h0", "alphas"), g_fused, g_seq):
    assert a.shape == b.shape, name
    assert rel_err(a, np.asarray(b, np.float64)) < 2e-5, name


@pytest.mark.slow
def test_check_grads():
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 13, 3))
    h0 = rng.normal(size=(2, 3, 3))
    r = make_resets(rng, 2, 13, 4)
    f = lambda x, h0: ema_traces(x, ALPHAS, h0, resets=r, bias_correction=True, method="fused", chunk_size=4)
    check_grads(f, (x, h0), order=1, modes=("rev",))
    # The write rates too, on the core function (ema_traces validates rates in float32).
    g = lambda x, alpha, h0: fused.fused_traces(x, alpha, h0, jnp.asarray(r), 4, True)
    check_grads(g, (x, np.array(ALPHAS)[:, None], h0), order=1, modes=("rev",), eps=1e-6)


def test_bad_arguments():
  x = np.zeros((1, 4, 3), np.float32)
  with pytest.raises(ValueError, match="shared over D"):
    ema_traces(x, np.full((2, 3), 0.5, np.float32), method="fused")
  with pytest.raises(ValueError, match="chunk_size"):
    ema_traces(x, method="fused", chunk_size=0)
  with pytest.raises(ValueError, match="method"):
    ema_traces(x, method="fast")
  # linear_scan keeps its own list of methods.
  with pytest.raises(ValueError, match="method"):
    traces.scan.linear_scan(np.float32(0.5), x, method="fused")
