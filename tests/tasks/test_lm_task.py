"""The LM task end to end: training on the built-in text, eval.py reproducing the in-loop numbers, the
130m preset (parameter count without allocation, a few real steps with a short context), configs."""

import json
import math
import os

import pytest

from ema_jax import evaluation, trainer
from ema_jax.models import ema_lm
from ema_jax.tasks import lm
from ema_jax.data import text as text_lib
from helpers import load_config, short


@pytest.mark.parametrize(
    "config_name,predictor", [("ema_lm", "linear"), ("ema_lm", "attention_history"), ("gpt2", None)]
)
def test_train_and_eval_py_agree(tmp_path, config_name, predictor):
  cfg = short(load_config(config_name, "tiny"))
  if predictor:
    cfg.model.predictor = predictor
  wd = str(tmp_path)
  final = trainer.train(cfg, wd)
  assert math.isfinite(final["loss"])
  with open(os.path.join(wd, f"eval_{cfg.steps}.json")) as f:
    in_loop = json.load(f)["results"]
  again = evaluation.run(wd, step=cfg.steps)
  for weights in ("raw", "ema"):
    a, b = in_loop[weights]["table"][0], again[weights]["table"][0]
    assert a["tokens"] == b["tokens"] == 3000
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
    assert b["bits_per_byte"] == pytest.approx(a["bits_per_byte"], rel=1e-5)
    # Perplexity per GPT-2 token: the same NLL over the GPT-2 tokens of the same text (fewer than bytes).
    assert a["gpt2_tokens"] < a["tokens"]
    assert a["perplexity_per_gpt2_token"] == pytest.approx(math.exp(a["nll"] / a["gpt2_tokens"]), rel=1e-9)
  # Other context lengths from the same checkpoint, exact over the same tokens.
  lens = evaluation.run(wd, step=cfg.steps, weights="raw", lengths="32,64")
  rows = lens["raw"]["table"]
  assert [r["length"] for r in rows] == [32, 64] and all(r["tokens"] == 3000 for r in rows)
  assert rows[1]["perplexity"] == pytest.approx(in_loop["raw"]["table"][0]["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_final_evaluation_reads_the_whole_split_unless_capped(tmp_path):
  """In-loop evaluations read data.eval_max_tokens; the final one and eval.py every token of the split
  (data.eval_max_tokens_final = 0, the default)."""
  cfg = short(load_config("ema_lm", "tiny"), steps=4)
  cfg.eval_every = 2
  cfg.data.eval_max_tokens, cfg.data.eval_max_tokens_final = 1000, 0
  task = lm.LMTask(cfg)
  whole = text_lib.make_eval_batches(
      cfg.data, task.tokenizer, cfg.task.seq_len, cfg.task.eval_batch_size, max_tokens=0
  ).num_tokens
  assert whole > 1000
  wd = str(tmp_path)
  trainer.train(cfg, wd)
  tokens = lambda path: json.load(open(path))["results"]["raw"]["table"][0]["tokens"]
  assert tokens(os.path.join(wd, "eval_2.json")) == 1000
  assert tokens(os.path.join(wd, "eval_4.json")) == whole
  assert evaluation.run(wd, weights="raw")["raw"]["table"][0]["tokens"] == whole
  capped = evaluation.run(wd, weights="raw", overrides=["data.eval_max_tokens_final=500"])
  assert capped["raw"]["table"][0]["tokens"] == 500


@pytest.mark.slow
def test_130m_preset_counts_and_steps(tmp_path):
  cfg = load_config("ema_lm", "130m")
  task = lm.LMTask(cfg)
  n = ema_lm.param_count(task.model_config())
  assert 125e6 <= n <= 135e6, n
  # A few real steps on the CPU: GPT-2 tokenizer, built-in text, context 32.
  cfg.data.source = "builtin"
  cfg.model.dtype = "float32"
  cfg = short(cfg, steps=2)
  cfg.task.seq_len = 32
  cfg.batch_size = 2
  cfg.data.eval_max_tokens = 256
  cfg.checkpoint_every = 0
  out = trainer.train(cfg, None)
  assert math.isfinite(out["loss"]) and out["status"] == "done"


def test_bad_lm_config():
  cfg = load_config("ema_lm", "tiny")
  cfg.model.predictor = "lstm"
  with pytest.raises(ValueError, match="predictor"):
    trainer.build(cfg)
  cfg = load_config("gpt2", "tiny")
  cfg.task.seq_len = 512
  with pytest.raises(ValueError, match="context_len"):
    trainer.build(cfg)
  cfg = load_config("ema_lm", "tiny")
  cfg.data.source = "files"
  cfg.data.path = "/nonexistent/*.jsonl"
  with pytest.raises((ValueError, FileNotFoundError), match="nonexistent"):
    trainer.train(short(cfg), None)
