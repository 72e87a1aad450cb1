"""Sampling, the jitted generation loop and generate.py.

Greedy continuations are checked against the full forward (each new token is the argmax of the full
model's logits on prompt + continuation so far); padding in a batch must never change a row's continuation;
the sampling filters against their definitions on a known distribution.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax import decoding, export
from ema_jax.models import ema_lm, transformer
from helpers import EMA_SMALL, GPT_SMALL, REPO, perturbed

MODELS = {
    "gpt": lambda: perturbed(
        transformer.GPT(transformer.GPTConfig(**{**GPT_SMALL, "context_len": 40}), rngs=nnx.Rngs(0))
    ),
    "ema_fixed": lambda: perturbed(ema_lm.EMALM(ema_lm.EMALMConfig(**EMA_SMALL), rngs=nnx.Rngs(0))),
    "ema_hybrid": lambda: perturbed(
        ema_lm.EMALM(ema_lm.EMALMConfig(**EMA_SMALL, window=4, predictor="attention"), rngs=nnx.Rngs(0))
    ),
    "ema_selective": lambda: perturbed(
        ema_lm.EMALM(ema_lm.EMALMConfig(**EMA_SMALL, trace_kind="selective"), rngs=nnx.Rngs(0))
    ),
}


def prompts(seed=0, lengths=(3, 11, 7)):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(0, 23, size=n)) for n in lengths]


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_is_the_full_forward_argmax(kind):
  model = MODELS[kind]()
  tokens_BT, lengths_B = decoding.pad_prompts(prompts())
  new_BN = decoding.generate(model, tokens_BT, lengths_B, max_new_tokens=8, temperature=0.0)
  for row, n in enumerate(lengths_B):
    seq = np.concatenate([tokens_BT[row, :n], new_BN[row]])
    logits = np.asarray(model(jnp.asarray(seq[None], jnp.int32)))[0]
    np.testing.assert_array_equal(np.argmax(logits[n - 1 : -1], axis=-1), new_BN[row], err_msg=f"row {row}")


@pytest.mark.parametrize("kind", list(MODELS))
def test_padding_never_changes_a_continuation(kind):
  model = MODELS[kind]()
  short = prompts(seed=1, lengths=(4,))[0]
  alone = decoding.generate(model, np.asarray([short]), max_new_tokens=10, temperature=0.0)[0]
  batch = [prompts(seed=2, lengths=(15,))[0], short, prompts(seed=3, lengths=(9,))[0]]
  tokens_BT, lengths_B = decoding.pad_prompts(batch, pad_id=5)
  together = decoding.generate(model, tokens_BT, lengths_B, max_new_tokens=10, temperature=0.0)
  np.testing.assert_array_equal(together[1], alone)


def test_one_compilation_for_any_settings_and_seed():
  model = MODELS["ema_fixed"]()
  tokens_BT, lengths_B = decoding.pad_prompts(prompts())
  settings = [dict(temperature=0.0), dict(temperature=0.7, top_k=5, seed=3), dict(temperature=1.3, top_p=0.9, seed=4)]
  outs = [decoding.generate(model, tokens_BT, lengths_B, max_new_tokens=6, **s) for s in settings]
  graphdef, _ = nnx.split(model)
  fn = decoding._generate_fn(graphdef, 6, tokens_BT.shape[1] + 6, None, True)  # max_len = prompt + new tokens
  assert fn._cache_size() == 1
  assert not np.array_equal(outs[1], outs[2])
  again = decoding.generate(model, tokens_BT, lengths_B, max_new_tokens=6, **settings[1])
  np.testing.assert_array_equal(again, outs[1])  # seeded


def test_stops_at_end_of_document():
  model = MODELS["ema_fixed"]()
  first = decoding.generate(model, np.asarray([[1, 2, 3]]), max_new_tokens=1, temperature=0.0)[0, 0]
  out = decoding.generate(model, np.asarray([[1, 2, 3]]), max_new_tokens=5, temperature=0.0, eod_id=int(first))
  np.testing.assert_array_equal(out[0], [first] * 5)


def test_gpt_generation_limit_is_a_clear_error():
  model = MODELS["gpt"]()
  with pytest.raises(ValueError, match="past the GPT's context_len=40.*at most 30 new tokens"):
    decoding.generate(model, np.zeros((2, 10), np.int32), max_new_tokens=31)


LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))


def draws(n=20000, **settings):
  logits_BV = jnp.broadcast_to(jnp.asarray(LOGITS), (n, 4))
  s = dict(temperature=1.0, top_k=0, top_p=1.0)
  s.update(settings)
  tokens = decoding.sample(logits_BV, jax.random.key(0), s["temperature"], s["top_k"], s["top_p"])
  return np.bincount(np.asarray(tokens), minlength=4) / n


def test_sampling_matches_its_definitions():
  np.testing.assert_allclose(draws(), [0.5, 0.3, 0.15, 0.05], atol=0.015)
  np.testing.assert_array_equal(draws(temperature=0.0, top_k=3, top_p=0.2), [1, 0, 0, 0])  # greedy
  np.testing.assert_allclose(draws(top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
  # Nucleus p = 0.7: the mass before token 1 is 0.5 < 0.7 (kept), before token 2 it is 0.8 (dropped).
  np.testing.assert_allclose(draws(top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
  np.testing.assert_array_equal(draws(top_p=0.4), [1, 0, 0, 0])
  # Temperature 2: probabilities proportional to p ** 0.5.
  p = np.sqrt([0.5, 0.3, 0.15, 0.05])
  np.testing.assert_allclose(draws(temperature=2.0), p / p.sum(), atol=0.015)


@pytest.mark.parametrize(
    "settings,match",
    [(dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p")],
)
def test_bad_settings_are_refused(settings, match):
  with pytest.raises(ValueError, match=match):
    decoding.generate(MODELS["ema_fixed"](), np.zeros((1, 3), np.int32), max_new_tokens=2, **settings)


@pytest.mark.slow
def test_generate_py_on_an_export(tmp_path):
  cfg = ema_lm.EMALMConfig(**{**EMA_SMALL, "vocab_size": 257})
  info = dict(
      format=export.FORMAT,
      task="lm",
      model_kind="ema_lm",
      model_config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
      tokenizer=dict(name="byte", vocab_size=257, eod_id=256),
      step=0,
      weights="raw",
      config={},
  )
  path, _ = export.save(ema_lm.EMALM(cfg, rngs=nnx.Rngs(0)), info, str(tmp_path / "m.safetensors"))
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("first prompt\nthe second, longer prompt\n")
  cmd = [sys.executable, "generate.py", "--export", path, "--max_new_tokens", "12", "--temperature", "0"]
  done = subprocess.run(cmd + ["--prompts_file", str(prompts_file)], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert "=== 0 ===\nfirst prompt" in done.stdout and "=== 1 ===\nthe second, longer prompt" in done.stdout
  both = subprocess.run(cmd + ["--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
  assert both.returncode == 2 and "exactly one of --workdir" in both.stderr
  ema = subprocess.run(cmd + ["--weights", "ema"], cwd=REPO, capture_output=True, text=True)
  assert ema.returncode == 2 and "--weights" in ema.stderr and "an export holds" in ema.stderr, ema.stderr
  missing = subprocess.run(cmd[:3] + [str(tmp_path / "nothing.safetensors")], cwd=REPO, capture_output=True, text=True)
  assert missing.returncode == 2 and "error: generate.py: " in missing.stderr, missing.stderr
  assert "load_exported" not in missing.stderr
