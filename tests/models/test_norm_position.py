"""GPT norm_position ('pre' GPT-2 / 'post' GPT-1) and the set-complement query model's norm='post'."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax.models import transformer
from ema_jax.models.set_transformer import SetTransformer, SetTransformerConfig
from ema_jax.nn.attention import causal_segment_mask
from helpers import REPO

TINY = dict(vocab_size=20, context_len=8, num_layers=2, num_heads=2, width=8, mlp_ratio=2)


def gpt(norm_position, seed=0, **overrides):
  cfg = transformer.GPTConfig(**{**TINY, "norm_position": norm_position, **overrides})
  return transformer.GPT(cfg, rngs=nnx.Rngs(seed))


def perturb(module, seed):
  """Every parameter moved by N(0, 0.3): LayerNorm scales and biases are no longer 1 and 0."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(module, jax.tree.unflatten(treedef, leaves))


def np64(p):
  return np.asarray(p[...], np.float64)


def ref_layer_norm(x, ln, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np64(ln.scale) + np64(ln.bias)


def ref_linear(x, lin):
  return x @ np64(lin.kernel) + np64(lin.bias)


def ref_attention(x_TD, attn, num_heads):
  t, d = x_TD.shape
  hd = d // num_heads
  q = ref_linear(x_TD, attn.query).reshape(t, num_heads, hd)
  k = ref_linear(x_TD, attn.key).reshape(t, num_heads, hd)
  v = ref_linear(x_TD, attn.value).reshape(t, num_heads, hd)
  scores = np.einsum("shd,thd->hst", q, k) / np.sqrt(hd)
  scores = np.where(np.tril(np.ones((t, t), bool))[None], scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.einsum("hst,thd->shd", weights, v).reshape(t, d)
  return ref_linear(y, attn.out)


def ref_gelu(a):
  return 0.5 * a * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a**3)))


def test_post_norm_block_matches_float64_reference():
  cfg = transformer.GPTConfig(**{**TINY, "norm_position": "post"})
  block = transformer.GPTBlock(cfg, rngs=nnx.Rngs(0))
  perturb(block, 1)
  t = 6
  x_BTD = jax.random.normal(jax.random.key(2), (2, t, cfg.width), jnp.float32)
  got = block(x_BTD, mask_B1TT=causal_segment_mask(t, jnp.zeros((2, t), jnp.int32)))
  for b in range(2):
    x = np.asarray(x_BTD[b], np.float64)
    x = ref_layer_norm(x + ref_attention(x, block.attention, cfg.num_heads), block.norm_attn, cfg.norm_eps)
    m = ref_linear(ref_gelu(ref_linear(x, block.mlp.up)), block.mlp.down)
    want = ref_layer_norm(x + m, block.norm_mlp, cfg.norm_eps)
    np.testing.assert_allclose(np.asarray(got[b]), want, rtol=1e-5, atol=1e-5)


def test_pre_and_post_differ_post_is_causal_and_has_no_final_norm():
  pre, post = gpt("pre"), gpt("post")
  assert pre.norm_out is not None and post.norm_out is None
  width = TINY["width"]
  assert transformer.param_count(pre.config) - transformer.param_count(post.config) == 2 * width
  assert transformer.flops_per_token(pre.config, 8) == transformer.flops_per_token(post.config, 8)
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, TINY["vocab_size"])
  y_pre, y_post = pre(tokens), post(tokens)
  assert np.isfinite(np.asarray(y_pre)).all() and np.isfinite(np.asarray(y_post)).all()
  assert not np.allclose(np.asarray(y_pre), np.asarray(y_post), atol=1e-3)
  changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % TINY["vocab_size"])
  y_changed = post(changed)
  np.testing.assert_allclose(np.asarray(y_changed[:, :5]), np.asarray(y_post[:, :5]), rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(y_changed[:, 5:]), np.asarray(y_post[:, 5:]))


@pytest.mark.parametrize("value", ["postt", "sandwich", None])
def test_bad_norm_position_names_the_field(value):
  with pytest.raises(ValueError, match="norm_position") as e:
    transformer.GPTConfig(**{**TINY, "norm_position": value})
  assert repr(value) in str(e.value) and "'pre'" in str(e.value) and "'post'" in str(e.value)


def othello_config(arg):
  spec = importlib.util.spec_from_file_location("othello_config", os.path.join(REPO, "configs", "othello.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_othello_config_is_post_norm_by_default():
  from ema_jax.tasks import othello as task_lib

  for preset in ("default", "paper", "tiny"):
    assert othello_config(preset).model.norm_position == "post"
  assert othello_config("default,prenorm").model.norm_position == "pre"
  assert othello_config("tiny,prenorm,postnorm").model.norm_position == "post"
  assert task_lib.model_config(othello_config("tiny")).norm_position == "post"
  old = othello_config("tiny")
  del old.model["norm_position"]  # a config saved before the field existed
  assert task_lib.model_config(old).norm_position == "pre"
  bad = othello_config("tiny")
  bad.model.norm_position = "mid"
  with pytest.raises(ValueError, match="model.norm_position"):
    task_lib.validate_config(bad)


def test_query_model_post_norm_runs_differs_from_pre_and_ignores_order():
  kw = dict(num_tokens=10, embed_dim=8, value_dim=8, num_heads=2)
  pre = SetTransformer(SetTransformerConfig(norm="pre", **kw), rngs=nnx.Rngs(0))
  post = SetTransformer(SetTransformerConfig(norm="post", **kw), rngs=nnx.Rngs(0))
  perturb(pre, 1)
  perturb(post, 1)  # the same parameters: only where the LayerNorm acts differs
  tokens = jnp.asarray([[1, 4, 7, 10], [2, 3, 10, 10]], jnp.int32)
  mask = tokens != 10
  y_pre, y_post = pre(tokens, mask), post(tokens, mask)
  assert y_post.shape == (2, 10) and np.isfinite(np.asarray(y_post)).all()
  assert not np.allclose(np.asarray(y_pre), np.asarray(y_post), atol=1e-3)
  permuted = jnp.asarray([[7, 1, 4, 10], [3, 2, 10, 10]], jnp.int32)
  np.testing.assert_allclose(np.asarray(post(permuted, mask)), np.asarray(y_post), rtol=1e-5, atol=1e-5)
