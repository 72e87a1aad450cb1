"""KV-cache decoding of the GPT and one-pass prefill of the GPT and the EMA LM.

Decoding one token at a time must give the full forward's logits at every position, across document
resets (absolute positions continue; attention stays in the document); prefill of a prompt followed by
decoding must give what decoding the prompt token by token gives, with right-padded rows of different
lengths.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax.models import ema_lm, transformer
from helpers import EMA_SMALL, GPT_SMALL, REPO, perturbed


def gpt(**overrides):
  return perturbed(transformer.GPT(transformer.GPTConfig(**{**GPT_SMALL, **overrides}), rngs=nnx.Rngs(0)))


def ema(**overrides):
  return perturbed(ema_lm.EMALM(ema_lm.EMALMConfig(**{**EMA_SMALL, **overrides}), rngs=nnx.Rngs(0)))


def tokens_and_resets(b=3, t=14, seed=2):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 23, size=(b, t)).astype(np.int32)
  resets = np.zeros((b, t), bool)
  resets[0, 6] = resets[2, 3] = resets[2, 11] = True
  return tokens, resets


def decode_all(model, cache, tokens, resets):
  step = nnx.jit(lambda m, c, tok, r: m.decode_step(c, tok, reset_B=r))
  out = []
  for t in range(tokens.shape[1]):
    cache, logits = step(model, cache, jnp.asarray(tokens[:, t]), jnp.asarray(resets[:, t]))
    out.append(np.asarray(logits))
  return cache, np.stack(out, axis=1)


GPT_CASES = [dict(), dict(norm_position="post"), dict(tie_embeddings=False)]
case_id = lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"


@pytest.mark.parametrize("overrides", GPT_CASES, ids=case_id)
def test_gpt_decoding_matches_full_forward(overrides):
  model = gpt(**overrides)
  tokens, resets = tokens_and_resets()
  full = np.asarray(model(jnp.asarray(tokens), resets_BT=jnp.asarray(resets)))
  _, got = decode_all(model, model.init_cache(3, 16), tokens, resets)
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


def test_gpt_decoding_positions_continue_across_a_reset():
  """After a reset the next document is not at position 0: its logits differ from the same document alone."""
  model = gpt()
  tokens = tokens_and_resets()[0][:1]
  resets = np.zeros_like(tokens, bool)
  resets[0, 5] = True
  _, packed = decode_all(model, model.init_cache(1), tokens, resets)
  _, alone = decode_all(model, model.init_cache(1), tokens[:, 5:], np.zeros_like(tokens[:, 5:], bool))
  assert np.abs(packed[:, 5:] - alone).max() > 1e-3


@pytest.mark.parametrize("kind", ["gpt", "ema_fixed", "ema_attention", "ema_selective", "ema_hybrid"])
def test_prefill_then_decode_equals_token_by_token(kind):
  model = {
      "gpt": lambda: gpt(),
      "ema_fixed": lambda: ema(),
      "ema_attention": lambda: ema(predictor="attention"),
      "ema_selective": lambda: ema(trace_kind="selective"),
      "ema_hybrid": lambda: ema(window=4, trace_kind="selective"),
  }[kind]()
  tokens, resets = tokens_and_resets(t=20)
  lengths = np.array([9, 14, 5], np.int32)  # row 2's prompt holds a reset (position 3)
  init = (lambda b: model.init_cache(b, 20)) if kind == "gpt" else model.init_cache
  kwargs = dict(max_len=20) if kind == "gpt" else {}
  cache, prefill_logits = nnx.jit(lambda m, x, r, n: m.prefill(x, resets_BT=r, lengths_B=n, **kwargs))(
      model, jnp.asarray(tokens[:, :14]), jnp.asarray(resets[:, :14]), jnp.asarray(lengths)
  )
  full = np.asarray(model(jnp.asarray(tokens), resets_BT=jnp.asarray(resets)))
  np.testing.assert_allclose(np.asarray(prefill_logits), full[:, :14], rtol=1e-5, atol=1e-5)
  for i, n in enumerate(lengths):
    _, reference = decode_all(model, init(1), tokens[i : i + 1], resets[i : i + 1])
    # Continue each row from its own length: gather that row's next tokens.
    row_cache = jax.tree.map(lambda x: x[i : i + 1], cache)
    _, continued = decode_all(model, row_cache, tokens[i : i + 1, n:], resets[i : i + 1, n:])
    np.testing.assert_allclose(continued, reference[:, n:], rtol=1e-5, atol=1e-5, err_msg=f"row {i}")


@pytest.mark.slow
def test_prefill_cache_equals_decoded_cache():
  model = ema(window=3)
  tokens, resets = tokens_and_resets(t=13)
  cache, _ = model.prefill(jnp.asarray(tokens), resets_BT=jnp.asarray(resets))
  decoded, _ = decode_all(model, model.init_cache(3), tokens, resets)
  for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(decoded)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_gpt_cache_errors_name_the_limit():
  model = gpt()
  with pytest.raises(ValueError, match="max_len.*context_len=24"):
    model.init_cache(2, 25)
  cache = model.init_cache(1, 3)
  for t in range(3):
    cache, _ = model.decode_step(cache, jnp.array([t], jnp.int32))
  with pytest.raises(ValueError, match="position 3 is past the cache's max_len=3"):
    model.decode_step(cache, jnp.array([0], jnp.int32))
  with pytest.raises(ValueError, match="prompt of 5 tokens"):
    model.prefill(jnp.zeros((1, 5), jnp.int32), max_len=4)
  # Under jit there is no host check per token: rows past the cache get NaN logits, never silent garbage.
  _, logits = nnx.jit(lambda m, c, tok: m.decode_step(c, tok))(model, cache, jnp.array([0], jnp.int32))
  assert np.isnan(np.asarray(logits)).all()


def test_gpt_cache_size_grows_with_context_ema_does_not():
  nbytes = lambda cache: sum(x.nbytes for x in jax.tree.leaves(cache))
  model = gpt()
  assert nbytes(model.init_cache(1, 16)) - nbytes(model.init_cache(1, 8)) == 2 * 2 * 8 * 16 * 4
  lm = ema()
  assert nbytes(lm.prefill(jnp.zeros((1, 5), jnp.int32))[0]) == nbytes(lm.prefill(jnp.zeros((1, 9), jnp.int32))[0])


@pytest.mark.slow  # runs a benchmark in a subprocess
def test_decode_bench_quick(tmp_path):
  import json
  import subprocess
  import sys

  repo = REPO
  out = str(tmp_path / "decode_bench.json")
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.decode_bench", "--quick", "--out", out],
      cwd=repo,
      capture_output=True,
      text=True,
  )
  assert done.returncode == 0, done.stderr
  result = json.load(open(out))
  assert len(result["machine"]["loadavg_before"]) == 3 and result["date"]
  rows = {(r["model"], r["batch"], r["context"]): r for r in result["rows"]}
  assert len(rows) == 8 and all(r["tokens_per_s"] > 0 for r in rows.values())
  # The GPT's state grows with the context (2 L T D float32 plus two counters), the EMA LM's does not.
  assert rows[("gpt", 1, 256)]["state_bytes_per_sequence"] == 2 * 2 * 256 * 32 * 4 + 8
  assert rows[("ema_lm", 1, 64)]["state_bytes_per_sequence"] == rows[("ema_lm", 1, 256)]["state_bytes_per_sequence"]
