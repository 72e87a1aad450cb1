"""The two-memory hybrid (EMA LM with a causal attention window) and constant-memory decoding of the EMA LM.

The window attention is checked against an independent NumPy loop (one query at a time, keys picked by
hand); decoding one token at a time must give the full forward's logits at every position, across document
resets, for fixed and selective traces, both constant-state predictors and the hybrid.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ema_jax.models import ema_lm

SMALL = dict(vocab_size=23, width=16, num_blocks=2, ffn_hidden=32, ffn_active_fraction=0.25, heads=2)


def perturbed_model(seed=0, **overrides):
  """A small EMALM whose parameters are all moved off their initial values (zero-initialised selective
  rate weights and window biases would otherwise make those paths trivially equal to simpler ones)."""
  model = ema_lm.EMALM(ema_lm.EMALMConfig(**{**SMALL, **overrides}), rngs=nnx.Rngs(seed))
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def reference_local_attention(local, u_BTD, segment_ids_BT):
  """The window attention of WindowAttention, one query at a time in float64 NumPy."""
  att = local.attention
  w = local.window
  h = att.num_heads
  p = lambda lin: (np.asarray(lin.kernel[...], np.float64), np.asarray(lin.bias[...], np.float64))
  (wq, bq), (wk, bk), (wv, bv), (wo, bo) = p(att.query), p(att.key), p(att.value), p(att.out)
  bias_HW = np.asarray(local.offset_bias[...], np.float64)
  u = np.asarray(u_BTD, np.float64)
  b, t_len, d = u.shape
  dh = wq.shape[1] // h
  out = np.zeros((b, t_len, wo.shape[1]))
  for bi in range(b):
    q = (u[bi] @ wq + bq).reshape(t_len, h, dh) / np.sqrt(dh)
    k = (u[bi] @ wk + bk).reshape(t_len, h, dh)
    v = (u[bi] @ wv + bv).reshape(t_len, h, -1)
    for t in range(t_len):
      keys = [s for s in range(max(0, t - w + 1), t + 1) if segment_ids_BT[bi, s] == segment_ids_BT[bi, t]]
      heads = []
      for hi in range(h):
        scores = np.array([q[t, hi] @ k[s, hi] + bias_HW[hi, t - s] for s in keys])
        wts = np.exp(scores - scores.max())
        wts /= wts.sum()
        heads.append(sum(wt * v[s, hi] for wt, s in zip(wts, keys)))
      out[bi, t] = np.concatenate(heads) @ wo + bo
  return out


@pytest.mark.parametrize("window", [1, 3, 8, 40])
def test_window_attention_matches_numpy_loop(window):
  model = perturbed_model(window=window)
  local = model.blocks[0].local
  rng = np.random.default_rng(0)
  u = rng.normal(size=(2, 13, SMALL["width"])).astype(np.float32)
  segments = np.zeros((2, 13), np.int32)
  segments[1, 6:] = 1  # a document boundary inside the window
  got = np.asarray(local(jnp.asarray(u), segment_ids_BT=jnp.asarray(segments)))
  np.testing.assert_allclose(got, reference_local_attention(local, u, segments), rtol=1e-4, atol=1e-5)


def test_hybrid_is_causal_and_window_limited():
  """Through the window alone, a token reaches exactly the next W - 1 positions of one block's output."""
  model = perturbed_model(window=4, num_blocks=1)
  local = model.blocks[0].local
  u = np.random.default_rng(1).normal(size=(1, 12, SMALL["width"])).astype(np.float32)
  base = np.asarray(local(jnp.asarray(u)))
  changed = u.copy()
  changed[0, 5] += 1.0
  diff = np.abs(np.asarray(local(jnp.asarray(changed))) - base).max(axis=-1)[0]
  assert (diff[:5] == 0).all() and (diff[5:9] > 1e-5).all() and (diff[9:] == 0).all(), diff


CASES = [
    dict(),
    dict(predictor="attention"),
    dict(trace_kind="selective"),
    dict(trace_kind="selective", predictor="attention", alphas=(0.5, 0.1, 0.02, 0.005)),
    dict(window=4),
    dict(window=5, trace_kind="selective"),
    dict(window=32, predictor="attention", tie_embeddings=False),
    dict(predictor="attention_history"),
    dict(predictor="attention_history", trace_kind="selective", window=3),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "fixed")
def test_decoding_matches_full_forward(overrides):
  model = perturbed_model(**overrides)
  rng = np.random.default_rng(2)
  b, t_len = 3, 14
  tokens = rng.integers(0, SMALL["vocab_size"], size=(b, t_len)).astype(np.int32)
  resets = np.zeros((b, t_len), bool)
  resets[0, 6] = resets[2, 3] = resets[2, 11] = True
  full = np.asarray(model(jnp.asarray(tokens), resets_BT=jnp.asarray(resets)))
  step = nnx.jit(lambda m, c, tok, r: m.decode_step(c, tok, reset_B=r))
  cache = model.init_cache(b, max_len=t_len)  # max_len: only 'attention_history' keeps a growing cache
  for t in range(t_len):
    cache, logits = step(model, cache, jnp.asarray(tokens[:, t]), jnp.asarray(resets[:, t]))
    np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-5, atol=1e-5, err_msg=f"position {t}")


def test_decoding_state_is_constant_in_context_length():
  model = perturbed_model(window=4)
  cache = model.init_cache(2)
  shapes = jax.tree.map(lambda x: x.shape, cache)
  step = nnx.jit(lambda m, c, tok: m.decode_step(c, tok))
  for t in range(9):
    cache, _ = step(model, cache, jnp.full((2,), t % 5, jnp.int32))
  assert jax.tree.map(lambda x: x.shape, cache) == shapes
  # K D float32 traces, a token count, W D inputs and W positions per block and sequence
  per_block = SMALL["width"] * (3 * 4 + 4 * 4) + 4 + 4 * 4
  nbytes = sum(x.nbytes for x in jax.tree.leaves(cache["blocks"]))
  assert nbytes == 2 * SMALL["num_blocks"] * per_block


def test_attention_history_cache_needs_max_len_and_marks_overflow():
  model = perturbed_model(predictor="attention_history")
  with pytest.raises(ValueError, match="max_len.*attention_history"):
    model.init_cache(1)
  with pytest.raises(ValueError, match="max_len"):
    model.prefill(jnp.zeros((1, 5), jnp.int32), max_len=4)
  cache = model.init_cache(1, max_len=2)
  for t in range(3):
    cache, logits = model.decode_step(cache, jnp.array([t], jnp.int32))
  assert np.isnan(np.asarray(logits)).all()  # position 2 has no slot: NaN, never a silently wrong answer


@pytest.mark.slow
def test_hybrid_trains_and_window_validates():
  model = perturbed_model(window=3)
  x = jnp.asarray(np.random.default_rng(3).integers(0, 23, size=(2, 10)), jnp.int32)
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x[:, :-1]), x[:, 1:]).mean()
  grads = nnx.grad(loss)(model)
  g = grads["blocks"][0]["local"]["offset_bias"][...]
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match="`window`"):
      ema_lm.EMALMConfig(**{**SMALL, "window": bad})


def test_flops_count_the_window():
  base = ema_lm.EMALMConfig(**SMALL)
  hyb = ema_lm.EMALMConfig(**{**SMALL, "window": 4})
  d = SMALL["width"]
  extra = ema_lm.flops_per_token(hyb, 64) - ema_lm.flops_per_token(base, 64)
  assert extra == 6 * SMALL["num_blocks"] * (4 * d * d + 2 * 4 * d)
