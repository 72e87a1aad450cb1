"""The closed form 'blocked' (ema_jax/traces/closed_form.py): continuation, low precision, jit/vmap against
the float64 loop; gradients against the sequential scan and finite differences. Rates shared over D and
per channel. (Its values on every case: test_method_equivalence.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ema_jax import traces
from ema_jax.traces import closed_form
from ema_jax.traces import ema_traces
from helpers import make_resets, per_channel_rates, rel_err

ALPHAS = (0.5, 0.1, 0.02)


def test_continuing_from_h_last_equals_one_pass():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 50, 4)).astype(np.float32)
  alphas = per_channel_rates(rng, 3, 4)
  h, _ = ema_traces(x, alphas, method="blocked")
  h1, last1 = ema_traces(x[:, :23], alphas, method="blocked")
  h2, _ = ema_traces(x[:, 23:], alphas, last1, method="blocked")
  np.testing.assert_allclose(np.concatenate([h1, h2], 1), h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "t_len,chunk,bias,rates",
    [(17, 4, True, "shared"), (32, 8, False, "channel"), (1, 8, True, "channel"), (45, 8, True, "channel")],
)
def test_gradients_match_sequential(t_len, chunk, bias, rates):
  rng = np.random.default_rng(5 + t_len)
  d = 3
  x = jnp.asarray(rng.normal(size=(2, t_len, d)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(2, 3, d)), jnp.float32)
  # alpha = 1 only without bias correction, whose factor 1 / (1 - 0^n) has no derivative there (any method).
  alphas = jnp.asarray(ALPHAS if rates == "shared" else per_channel_rates(rng, 3, d, with_one=not bias), jnp.float32)
  r = jnp.asarray(make_resets(rng, 2, t_len, min(chunk, t_len)))
  w = jnp.asarray(rng.normal(size=(2, t_len, 3, d)), jnp.float32)
  wl = jnp.asarray(rng.normal(size=(2, 3, d)), jnp.float32)

  def loss(x, h0, alphas, method):
    h, h_last = ema_traces(
        x, alphas, h0, resets=r, bias_correction=bias, start_count=2, method=method, chunk_size=chunk
    )
    # A loss that uses the output (a training step's), so no part of either pass can be dropped.
    return jnp.sum(jnp.square(h) * w) + jnp.sum(h_last * wl)

  g_blocked = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(x, h0, alphas, "blocked")
  g_seq = jax.grad(loss, (0, 1, 2))(x, h0, alphas, "sequential")
  for name, a, b in zip(("x", "h0", "alphas"), g_blocked, g_seq):
    assert a.shape == b.shape, name
    assert rel_err(a, np.asarray(b, np.float64)) < 2e-5, name


@pytest.mark.parametrize("rates", ["shared", "channel"])
def test_check_grads(rates):
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 13, 3))
    h0 = rng.normal(size=(2, 3, 3))
    r = make_resets(rng, 2, 13, 4)
    alphas = np.array(ALPHAS)[:, None] if rates == "shared" else rng.uniform(0.05, 0.9, size=(3, 3))
    f = lambda x, h0: ema_traces(x, alphas, h0, resets=r, bias_correction=True, method="blocked", chunk_size=4)
    check_grads(f, (x, h0), order=1, modes=("rev",))
    # The write rates too, on the core function (ema_traces validates rates in float32).
    g = lambda x, alpha, h0: closed_form.blocked_traces(x, alpha, h0, jnp.asarray(r), 4, True)
    check_grads(g, (x, alphas, h0), order=1, modes=("rev",), eps=1e-6)


def test_constant_rates_skip_their_gradient():
  """Concrete rates take rate_grad=False: the same dx and dh0, and no rate cotangent is computed."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 30, 4)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  r = jnp.asarray(make_resets(rng, 2, 30, 8))
  alpha = jnp.asarray(np.array(ALPHAS, np.float32)[:, None])
  outs = []
  for rate_grad in (True, False):
    loss = lambda x, h0: jnp.sum(jnp.square(closed_form.blocked_traces(x, alpha, h0, r, 8, rate_grad)))
    outs.append(jax.grad(loss, (0, 1))(x, h0))
  for a, b in zip(*outs):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_auto_picks_the_cpu_kernel_else_blocked_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU entry of the auto tables")
  from ema_jax.traces import native

  kernel = "native" if native.applies(jnp.float32) else "blocked"
  assert traces.auto_method(45, True) == kernel and traces.auto_method(45, False) == kernel
  assert traces.auto_method(45, True, dtype=jnp.float16) == "blocked"  # the kernel takes float32 and bfloat16
  with native.KERNEL.enabled(False):
    assert traces.auto_method(45, True) == "blocked"


def test_bad_arguments():
  x = np.zeros((1, 4, 3), np.float32)
  with pytest.raises(ValueError, match="chunk_size"):
    ema_traces(x, method="blocked", chunk_size=0)
  with pytest.raises(ValueError, match="at least one token"):
    ema_traces(np.zeros((1, 0, 3), np.float32), method="blocked")
  with pytest.raises(ValueError, match="channel axis"):
    ema_traces(x, np.full((2, 5), 0.5, np.float32), method="blocked")
