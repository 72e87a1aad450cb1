"""The README's main job end to end on a small setting: train.py's trainer on the set-complement config,
then eval.py's restore reproduces the in-loop per-size numbers for raw and EMA weights."""

import importlib.util
import json
import os

import pytest

from ema_jax import evaluation, trainer
from helpers import REPO

pytestmark = pytest.mark.slow  # train.py and eval.py end to end in subprocesses: the slow set


def config(arg=None):
  spec = importlib.util.spec_from_file_location("sc_cfg", os.path.join(REPO, "configs", "set_complement.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_train_then_eval_py_reproduces(tmp_path):
  c = config()
  c.task.num_tokens = 16
  c.task.train_max_size = 4
  c.task.eval_examples = 32
  c.model.embed_dim = c.model.value_dim = 16
  c.steps = 60
  c.optim.warmup_steps = 5
  c.log_every = 20
  c.eval_every = 30
  c.checkpoint_every = 30
  wd = str(tmp_path)
  out = trainer.train(c, wd)
  assert out["status"] == "done"
  with open(os.path.join(wd, "eval_60.json")) as f:
    saved = json.load(f)
  assert "*" in saved["table"]  # the table reaches beyond the training range
  again = evaluation.run(wd, step=60)
  for weights in ("raw", "ema"):
    for key, value in saved["results"][weights].items():
      if isinstance(value, float):
        assert again[weights][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (weights, key)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("task.num_tokens", 1, "num_tokens"),
        ("task.train_max_size", 64, "train_max_size"),
        ("model.dropout", -0.1, "dropout"),
        ("weight_ema.kind", "swa", "weight_ema.kind"),
    ],
)
def test_bad_config_fails_before_compilation(field, value, match):
  c = config()
  node = c
  *parents, last = field.split(".")
  for p in parents:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=match):
    trainer.build(c)
