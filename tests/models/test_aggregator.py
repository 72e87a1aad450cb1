"""The trace aggregator LM (ema_jax/models/aggregator.py): logits against a float64 NumPy loop on the model's
own weights, causality, document resets, config validation, and training + eval.py through the LM task."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax import evaluation, trainer
from ema_jax.models import aggregator
from helpers import load_config, short

ALPHAS = (0.5, 0.1, 0.02)


def tiny_model(seed=0, **overrides):
  cfg = aggregator.AggregatorConfig(**{**dict(vocab_size=11, width=4, hidden=8, alphas=ALPHAS), **overrides})
  model = aggregator.Aggregator(cfg, rngs=nnx.Rngs(seed))
  # Random values everywhere (norm scales and biases too), so the reference checks every parameter.
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [0.5 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def reference_logits(model, tokens_BT, resets_BT):
  """float64 loop: embedding, traces restarted at each reset, LayerNorm, tanh-GELU MLP, LayerNorm, tied head."""
  f = lambda a: np.asarray(a[...], np.float64)
  emb = f(model.embed.embedding)
  eps = model.config.norm_eps

  def layernorm(v, norm):
    mu, var = v.mean(), v.var()
    return (v - mu) / np.sqrt(var + eps) * f(norm.scale) + f(norm.bias)

  def gelu(a):
    return 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))

  b, t = tokens_BT.shape
  out = np.zeros((b, t, emb.shape[0]))
  for i in range(b):
    h = np.zeros((len(ALPHAS), emb.shape[1]))
    for s in range(t):
      x = emb[tokens_BT[i, s]]
      if resets_BT[i, s]:
        h[:] = 0.0
      for k, a in enumerate(ALPHAS):
        h[k] = (1 - a) * h[k] + a * x
      z = layernorm(np.concatenate([x, h.reshape(-1)]), model.norm_in)
      hid = gelu(z @ f(model.mlp_in.kernel) + f(model.mlp_in.bias))
      y = layernorm(hid @ f(model.mlp_out.kernel) + f(model.mlp_out.bias), model.norm_out)
      out[i, s] = y @ emb.T
  return out


def test_logits_match_float64_reference():
  model = tiny_model()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 11, size=(2, 7))
  resets = np.zeros((2, 7), bool)
  resets[:, 0] = True
  resets[0, 3] = True  # a document starts inside the first row
  got = np.asarray(model(jnp.asarray(tokens, jnp.int32), resets_BT=jnp.asarray(resets)))
  assert got.dtype == np.float32 and got.shape == (2, 7, 11)
  np.testing.assert_allclose(got, reference_logits(model, tokens, resets), atol=1e-5, rtol=1e-5)
  # Without resets a row is one document: the same as a reset only at t = 0.
  plain = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(plain, reference_logits(model, tokens, np.zeros_like(resets)), atol=1e-5, rtol=1e-5)


def test_causal_and_reset_isolates_documents():
  model = tiny_model(seed=3)
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 7]], jnp.int32)
  base = np.asarray(model(tokens))
  later = np.asarray(model(tokens.at[0, 5].set(9)))
  np.testing.assert_array_equal(later[0, :5], base[0, :5])
  assert not np.allclose(later[0, 5:], base[0, 5:])
  # With a document starting at t = 3, the tokens before it do not reach t >= 3.
  resets = jnp.zeros((1, 7), bool).at[0, 3].set(True)
  a = np.asarray(model(tokens, resets_BT=resets))
  b = np.asarray(model(tokens.at[0, :3].set(jnp.asarray([8, 0, 10])), resets_BT=resets))
  np.testing.assert_allclose(a[0, 3:], b[0, 3:], atol=1e-6)
  assert not np.allclose(a[0, :3], b[0, :3])
  # segment_ids_BT alone gives the same documents.
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1]], jnp.int32)
  np.testing.assert_allclose(np.asarray(model(tokens, segment_ids_BT=seg)), a, atol=1e-6)


@pytest.mark.parametrize(
    "field,value",
    [
        ("vocab_size", 1),
        ("width", 0),
        ("alphas", ()),
        ("alphas", (0.5, 1.5)),
        ("hidden", 0),
        ("dropout", 1.0),
        ("dtype", "float16"),
        ("norm_eps", 0.0),
        ("init_std", -1.0),
    ],
)
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"`{field}`"):
    aggregator.AggregatorConfig(**{**dict(vocab_size=11), field: value})


def test_bad_inputs_and_unknown_preset():
  model = tiny_model()
  with pytest.raises(ValueError, match="inputs_BT"):
    model(jnp.zeros((2, 3, 1), jnp.int32))
  with pytest.raises(ValueError, match="resets_BT"):
    model(jnp.zeros((2, 3), jnp.int32), resets_BT=jnp.zeros((2, 4), bool))
  with pytest.raises(ValueError, match="preset"):
    aggregator.preset("huge")


@pytest.mark.slow
def test_train_and_eval_py_agree(tmp_path):
  cfg = short(load_config("aggregator", "tiny"))
  cfg.model.dropout = 0.1  # exercises the dropout path in training
  wd = str(tmp_path)
  final = trainer.train(cfg, wd)
  assert math.isfinite(final["loss"])
  with open(os.path.join(wd, f"eval_{cfg.steps}.json")) as f:
    in_loop = json.load(f)["results"]
  again = evaluation.run(wd, step=cfg.steps)
  for weights in ("raw", "ema"):
    a, b = in_loop[weights]["table"][0], again[weights]["table"][0]
    assert a["tokens"] == b["tokens"] == 3000
    assert math.isfinite(a["perplexity"])
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
    assert b["bits_per_byte"] == pytest.approx(a["bits_per_byte"], rel=1e-5)
