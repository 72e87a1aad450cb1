"""EMA LM: causality, document resets, the one-step trace shift, top-k FFN, presets, training sanity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ema_jax.models import ema_lm
from ema_jax.nn.ffn import TopKFFN, topk_mask

PREDICTORS = ema_lm.PREDICTORS
SMALL = dict(vocab_size=50, width=32, num_blocks=2, ffn_hidden=64, heads=4)


def small_model(predictor, seed=0, **overrides):
  cfg = ema_lm.EMALMConfig(**{**SMALL, "predictor": predictor, **overrides})
  return ema_lm.EMALM(cfg, rngs=nnx.Rngs(seed))


def forward(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(inputs_BT, resets_BT, segment_ids_BT):
    return nnx.merge(graphdef, state)(inputs_BT, resets_BT=resets_BT, segment_ids_BT=segment_ids_BT)

  return run


def lm_loss(model, inputs_BT, **kwargs):
  logits_BTV = model(inputs_BT[:, :-1], **kwargs)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, inputs_BT[:, 1:]).mean()


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_causal(predictor):
  model = small_model(predictor)
  run = forward(model)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, size=(2, 16)).astype(np.int32)
  resets = np.zeros((2, 16), bool)
  resets[1, 5] = True  # a document boundary must not break causality either
  base = np.asarray(run(tokens, resets, None))
  for t in (0, 4, 5, 9, 15):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 7) % 50
    out = np.asarray(run(changed, resets, None))
    np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5, rtol=0)
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-4, "the token at t must reach its own logits"


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("boundary", ["resets", "segment_ids"])
def test_documents_are_independent(predictor, boundary):
  model = small_model(predictor)
  run = forward(model)
  rng = np.random.default_rng(1)
  r = 7
  tokens = rng.integers(0, 50, size=(2, 16)).astype(np.int32)
  changed = tokens.copy()
  changed[:, :r] = rng.integers(0, 50, size=(2, r))
  resets = np.zeros((2, 16), bool)
  resets[:, r] = True
  segments = np.cumsum(resets, axis=1).astype(np.int32) + 3
  args = (resets, None) if boundary == "resets" else (None, segments)
  np.testing.assert_allclose(
      np.asarray(run(changed, *args))[:, r:], np.asarray(run(tokens, *args))[:, r:], atol=1e-5, rtol=0
  )
  # Without the boundary the earlier tokens do reach later positions (the check above is not vacuous).
  diff = np.asarray(run(changed, None, None))[:, r:] - np.asarray(run(tokens, None, None))[:, r:]
  assert np.abs(diff).max() > 1e-4


def test_past_traces_match_float64_loop():
  model = small_model("linear")
  block = model.blocks[0]
  rng = np.random.default_rng(2)
  u = rng.normal(size=(2, 12, 32)).astype(np.float32)
  resets = np.zeros((2, 12), bool)
  resets[0, 4] = resets[1, 9] = True
  got = np.asarray(jax.jit(lambda u, r: block.past_traces(u, resets_BT=r))(u, resets))
  alphas = np.asarray(SMALL.get("alphas", (0.5, 0.1, 0.02)), np.float64)
  want = np.zeros((2, 12, 3, 32))
  for b in range(2):
    h = np.zeros((3, 32))  # traces of u_{<t}, read before u_t is written
    for t in range(12):
      if resets[b, t]:
        h = np.zeros((3, 32))
      want[b, t] = h
      h = (1 - alphas[:, None]) * h + alphas[:, None] * u[b, t][None].astype(np.float64)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_prediction_excludes_current_input(predictor):
  block = small_model(predictor).blocks[0]
  rng = np.random.default_rng(3)
  u = rng.normal(size=(1, 10, 32)).astype(np.float32)
  predict = jax.jit(lambda u: block.predict(u)[1])
  base = np.asarray(predict(u))
  for t in (0, 3, 9):
    changed = u.copy()
    changed[:, t] += 5.0
    out = np.asarray(predict(changed))
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
    if t + 1 < 10:
      assert np.abs(out[:, t + 1] - base[:, t + 1]).max() > 1e-4


def test_topk_ffn_keeps_exactly_k():
  ffn = TopKFFN(16, 64, 5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (3, 7, 16))
  h, mask = ffn.hidden(x)
  assert (np.asarray(mask).sum(-1) == 5).all()
  assert ((np.asarray(h) != 0).sum(-1) <= 5).all()
  a = np.asarray(ffn.up(x))
  want = np.zeros_like(mask)
  np.put_along_axis(want, np.argsort(-a, axis=-1)[..., :5], True, axis=-1)
  np.testing.assert_array_equal(np.asarray(mask), want)
  # All pre-activations tied (zero input, zero bias), in bfloat16: still exactly k.
  ties = TopKFFN(16, 64, 5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  _, mask = ties.hidden(jnp.zeros((4, 16), jnp.bfloat16))
  assert (np.asarray(mask).sum(-1) == 5).all()
  assert (np.asarray(topk_mask(jnp.ones((2, 9)), 4)).sum(-1) == 4).all()


def test_topk_ffn_gradient_reaches_only_kept_units():
  ffn = TopKFFN(8, 32, 3, activation="identity", rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(1), (1, 8))
  _, mask = ffn.hidden(x)
  graphdef, state = nnx.split(ffn)
  grads = jax.grad(lambda s: nnx.merge(graphdef, s)(x).sum())(state)
  g_up = np.asarray(grads["up"]["kernel"][...])
  kept = np.asarray(mask)[0]
  assert np.abs(g_up[:, ~kept]).max() == 0
  assert (np.abs(g_up[:, kept]).max(0) > 0).all()


def test_130m_preset_parameter_count():
  cfg = ema_lm.preset("130m")
  n = ema_lm.param_count(cfg)  # eval_shape: nothing allocated
  assert 125e6 <= n <= 135e6
  d, v, h, k, layers = 768, 50257, cfg.ffn_hidden, 3, 12
  per_block = (
      2 * 2 * d  # two LayerNorms
      + k * d * d
      + d  # linear predictor
      + (k + 1) * d * d
      + d  # context mix
      + d * h
      + h
      + h * d
      + d
  )  # FFN
  assert n == v * d + layers * per_block + 2 * d
  assert cfg.ffn_k == round(0.06 * h)


@pytest.mark.slow
def test_flops_per_token_match_xla_cost_analysis():
  x = jnp.zeros((2, 64), jnp.int32)
  for predictor in PREDICTORS:
    cfg = ema_lm.preset("tiny", predictor=predictor)
    graphdef, state = nnx.split(ema_lm.EMALM(cfg, rngs=nnx.Rngs(0)))
    loss = lambda s: optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, s)(x), x).mean()
    cost = jax.jit(jax.grad(loss)).lower(state).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ratio = cost["flops"] / x.size / ema_lm.flops_per_token(cfg, 64)
    assert 0.9 < ratio < 1.15, (predictor, ratio)


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_forward_backward_finite(predictor, dtype):
  cfg = ema_lm.preset("tiny", predictor=predictor, dtype=dtype, dropout=0.1)
  model = ema_lm.EMALM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, cfg.vocab_size)
  resets = jnp.zeros((2, 32), bool).at[0, 10].set(True)

  @jax.jit
  def grad_fn(state, key):
    loss, grads = jax.value_and_grad(
        lambda s: lm_loss(nnx.merge(graphdef, s), tokens, resets_BT=resets, deterministic=False, rngs=key)
    )(state)
    return loss, grads, nnx.merge(graphdef, state)(tokens[:, :-1], resets_BT=resets)

  loss, grads, logits = grad_fn(state, jax.random.key(1))
  assert np.isfinite(float(loss))
  for leaf in jax.tree.leaves(state):
    assert leaf.dtype == jnp.float32
  for leaf in jax.tree.leaves(grads):
    assert leaf.dtype == jnp.float32 and np.isfinite(np.asarray(leaf)).all()
  assert logits.dtype == jnp.float32 and logits.shape == (2, 32, cfg.vocab_size)


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_adam_lowers_loss_on_repeated_batch(predictor):
  model = small_model(predictor, vocab_size=64)
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(2), (4, 33), 0, 64)
  tx = optax.adam(3e-3)
  opt_state = tx.init(state)

  @jax.jit
  def step(state, opt_state):
    loss, grads = jax.value_and_grad(lambda s: lm_loss(nnx.merge(graphdef, s), tokens))(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  losses = []
  for _ in range(40):
    state, opt_state, loss = step(state, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses


def test_invalid_config_and_missing_rngs_fail_early():
  with pytest.raises(ValueError, match="predictor"):
    ema_lm.preset("tiny", predictor="transformer")
  with pytest.raises(ValueError, match="heads"):
    ema_lm.preset("tiny", heads=3)
  with pytest.raises(ValueError, match="ffn_active_fraction"):
    ema_lm.preset("tiny", ffn_active_fraction=0.0001)
  model = small_model("linear", dropout=0.1)
  with pytest.raises(ValueError, match="rngs"):
    model(jnp.zeros((1, 4), jnp.int32), deterministic=False)
  with pytest.raises(ValueError, match="resets_BT"):
    model(jnp.zeros((1, 4), jnp.int32), resets_BT=jnp.zeros((1, 5), bool))
