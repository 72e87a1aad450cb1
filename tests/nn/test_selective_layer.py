"""SelectiveTraces (ema_jax/nn/selective_layer.py) and the EMA LM with trace_kind='selective'."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax import traces
from ema_jax.models import ema_lm
from ema_jax.nn import EMATraces, SelectiveTraces


def test_starts_equal_to_fixed_traces_and_steps_agree():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 11, 5)), jnp.float32)
  resets = jnp.asarray(rng.uniform(size=(2, 11)) < 0.2)
  sel = SelectiveTraces(5, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(sel.rates(x)[0, 0, :, 0], traces.PAPER_ALPHAS, rtol=1e-6)
  h_sel, st_sel = sel(x, resets_BT=resets)
  h_fix, st_fix = EMATraces(5)(x, resets_BT=resets)
  np.testing.assert_allclose(h_sel, h_fix, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(st_sel.count, st_fix.count)
  # Move the rates off their start, then decode token by token.
  sel.rate.kernel.value = jnp.asarray(rng.normal(size=(5, 15)) * 0.5, jnp.float32)
  h_scan, last = sel(x, resets_BT=resets)
  state = sel.init_state(2)
  for t in range(11):
    state, h_t = sel.step(state, x[:, t], reset_B=resets[:, t])
    np.testing.assert_allclose(h_t, h_scan[:, t], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.h, last.h, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state.count, last.count)


def test_rates_get_gradients():
  sel = SelectiveTraces(4, alphas=(0.3, 0.05), rngs=nnx.Rngs(1))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 7, 4)), jnp.float32)

  def loss(model):
    return jnp.sum(model(x)[0] ** 2)

  grads = nnx.grad(loss)(sel)
  assert float(jnp.abs(grads.rate.kernel.value).sum()) > 0 and float(jnp.abs(grads.rate.bias.value).sum()) > 0


def test_ema_lm_with_selective_traces():
  cfg = ema_lm.preset("tiny", trace_kind="selective", vocab_size=17, width=8, ffn_hidden=16, heads=2)
  model = ema_lm.EMALM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 17, size=(2, 9)))
  logits = model(tokens)
  assert logits.shape == (2, 9, 17) and bool(jnp.all(jnp.isfinite(logits)))
  fixed = ema_lm.EMALM(ema_lm.preset("tiny", vocab_size=17, width=8, ffn_hidden=16, heads=2), rngs=nnx.Rngs(0))
  # The rate projection: K D^2 + K D more parameters per block, K D^2 more multiply-adds.
  extra = ema_lm.param_count(cfg) - ema_lm.param_count(fixed.config)
  assert extra == cfg.num_blocks * (3 * 8 * 8 + 3 * 8)
  assert ema_lm.flops_per_token(cfg, 9) - ema_lm.flops_per_token(fixed.config, 9) == 6.0 * cfg.num_blocks * 3 * 64


@pytest.mark.parametrize(
    "edits,field",
    [
        (dict(trace_kind="gated"), "trace_kind"),
        (dict(trace_kind="selective", trace_learn="per_channel"), "trace_learn"),
        (dict(trace_kind="selective", alphas=(1.0, 0.1)), "alphas"),
    ],
)
def test_bad_selective_configs(edits, field):
  with pytest.raises(ValueError, match=field):
    ema_lm.preset("tiny", **edits)


def test_layer_rejects_bad_arguments():
  with pytest.raises(ValueError, match="features"):
    SelectiveTraces(0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="inside"):
    SelectiveTraces(3, alphas=(1.0,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="method"):
    SelectiveTraces(3, method="fused", rngs=nnx.Rngs(0))
