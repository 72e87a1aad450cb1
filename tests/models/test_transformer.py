"""GPT baseline and the shared attention layer: reference values, causality, packed documents, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ema_jax.models import transformer
from ema_jax.nn.attention import MultiHeadAttention, causal_segment_mask, resolve_documents

SMALL = dict(vocab_size=50, context_len=32, num_layers=2, num_heads=4, width=32)


def small_model(seed=0, **overrides):
  return transformer.GPT(transformer.GPTConfig(**{**SMALL, **overrides}), rngs=nnx.Rngs(seed))


def forward(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(inputs_BT, resets_BT, segment_ids_BT):
    return nnx.merge(graphdef, state)(inputs_BT, resets_BT=resets_BT, segment_ids_BT=segment_ids_BT)

  return run


def lm_loss(model, inputs_BT, **kwargs):
  logits_BTV = model(inputs_BT[:, :-1], **kwargs)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, inputs_BT[:, 1:]).mean()


def test_attention_matches_float64_reference():
  layer = MultiHeadAttention(2, 6, 5, qk_features=4, v_features=8, out_features=3, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  xq = rng.normal(size=(2, 4, 6)).astype(np.float32)
  xkv = rng.normal(size=(2, 7, 5)).astype(np.float32)
  mask = rng.random((2, 1, 4, 7)) < 0.7
  mask[:, :, :, 0] = True
  got = np.asarray(jax.jit(lambda q, kv, m: layer(q, kv, mask=m))(xq, xkv, mask))
  p = {
      name: (
          np.asarray(getattr(layer, name).kernel[...], np.float64),
          np.asarray(getattr(layer, name).bias[...], np.float64),
      )
      for name in ("query", "key", "value", "out")
  }
  want = np.zeros((2, 4, 3))
  for b in range(2):
    q = xq[b] @ p["query"][0] + p["query"][1]
    k = xkv[b] @ p["key"][0] + p["key"][1]
    v = xkv[b] @ p["value"][0] + p["value"][1]
    heads = []
    for h in range(2):
      qh, kh, vh = q[:, 2 * h : 2 * h + 2], k[:, 2 * h : 2 * h + 2], v[:, 4 * h : 4 * h + 4]
      s = qh @ kh.T / np.sqrt(2.0)
      s = np.where(mask[b, 0], s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      heads.append((w / w.sum(-1, keepdims=True)) @ vh)
    want[b] = np.concatenate(heads, -1) @ p["out"][0] + p["out"][1]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_attention_fully_masked_row_is_finite():
  layer = MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 3, 8))
  mask = jnp.ones((1, 1, 3, 3), bool).at[:, :, 1, :].set(False)
  y = np.asarray(jax.jit(lambda x, m: layer(x, mask=m))(x, mask))
  assert np.isfinite(y).all()
  np.testing.assert_allclose(y[0, 1], np.asarray(layer.out.bias[...]), atol=1e-6)


def test_masks_and_document_ids():
  resets = jnp.array([[False, False, True, False]])
  resets2, seg = resolve_documents((1, 4), resets, None)
  np.testing.assert_array_equal(np.asarray(seg), [[0, 0, 1, 1]])
  resets3, _ = resolve_documents((1, 4), None, jnp.array([[5, 5, 9, 9]]))
  np.testing.assert_array_equal(np.asarray(resets3), np.asarray(resets))
  mask = np.asarray(causal_segment_mask(4, seg))[0, 0]
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
  with pytest.raises(ValueError, match="segment_ids_BT"):
    resolve_documents((1, 4), None, jnp.zeros((1, 4), jnp.float32))


def test_causal():
  run = forward(small_model())
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, size=(2, 16)).astype(np.int32)
  base = np.asarray(run(tokens, None, None))
  for t in (0, 5, 11, 15):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 7) % 50
    out = np.asarray(run(changed, None, None))
    np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5, rtol=0)
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-4


@pytest.mark.parametrize("boundary", ["segment_ids", "resets"])
def test_packed_documents_are_independent(boundary):
  run = forward(small_model())
  rng = np.random.default_rng(1)
  r = 6
  tokens = rng.integers(0, 50, size=(2, 16)).astype(np.int32)
  changed = tokens.copy()
  changed[:, :r] = rng.integers(0, 50, size=(2, r))
  segments = np.where(np.arange(16) < r, 1, 2)[None].repeat(2, 0).astype(np.int32)
  resets = np.zeros((2, 16), bool)
  resets[:, r] = True
  args = (None, segments) if boundary == "segment_ids" else (resets, None)
  np.testing.assert_allclose(
      np.asarray(run(changed, *args))[:, r:], np.asarray(run(tokens, *args))[:, r:], atol=1e-5, rtol=0
  )
  diff = np.asarray(run(changed, None, None))[:, r:] - np.asarray(run(tokens, None, None))[:, r:]
  assert np.abs(diff).max() > 1e-4


def test_124m_preset_is_gpt2_small():
  cfg = transformer.preset("124m")
  n = transformer.param_count(cfg)  # eval_shape: nothing allocated
  assert 120e6 <= n <= 130e6
  assert n == 124_439_808  # GPT-2 small with tied embeddings


@pytest.mark.slow
def test_flops_per_token_match_xla_cost_analysis():
  cfg = transformer.preset("tiny")
  x = jnp.zeros((2, 128), jnp.int32)
  graphdef, state = nnx.split(transformer.GPT(cfg, rngs=nnx.Rngs(0)))
  loss = lambda s: optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, s)(x), x).mean()
  cost = jax.jit(jax.grad(loss)).lower(state).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ratio = cost["flops"] / x.size / transformer.flops_per_token(cfg, 128)
  assert 0.9 < ratio < 1.15, ratio


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_forward_backward_finite(dtype):
  cfg = transformer.preset("tiny", dtype=dtype, dropout=0.1)
  graphdef, state = nnx.split(transformer.GPT(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(0), (2, 65), 0, cfg.vocab_size)
  segments = jnp.zeros((2, 64), jnp.int32).at[0, 20:].set(1)

  @jax.jit
  def grad_fn(state, key):
    loss, grads = jax.value_and_grad(
        lambda s: lm_loss(
            nnx.merge(graphdef, s), tokens, segment_ids_BT=segments, deterministic=False, rngs=nnx.Rngs(dropout=key)
        )
    )(state)
    return loss, grads, nnx.merge(graphdef, state)(tokens[:, :-1], segment_ids_BT=segments)

  loss, grads, logits = grad_fn(state, jax.random.key(1))
  assert np.isfinite(float(loss))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
  for leaf in jax.tree.leaves(grads):
    assert leaf.dtype == jnp.float32 and np.isfinite(np.asarray(leaf)).all()
  assert logits.dtype == jnp.float32 and logits.shape == (2, 64, cfg.vocab_size)


def test_adam_lowers_loss_on_repeated_batch():
  graphdef, state = nnx.split(small_model(vocab_size=64))
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


def test_invalid_inputs_fail_early():
  with pytest.raises(ValueError, match="num_heads"):
    transformer.preset("tiny", num_heads=5)
  model = small_model()
  with pytest.raises(ValueError, match="context_len"):
    model(jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match="inputs_BT"):
    model(jnp.zeros((1, 4), jnp.float32))
