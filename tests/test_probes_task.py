"""The probes task through the trainer and eval.py, for every model kind; evaluation against a direct count."""

import importlib.util
import json
import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax import evaluation, trainer
from ema_jax.data import probes as data
from ema_jax.tasks.base import EvalContext
from ema_jax.tasks.probes import ProbesTask, make_batch

ROOT = Path(__file__).resolve().parents[1]
CTX = EvalContext(
    put_batch=lambda b: {k: jnp.asarray(v) for k, v in b.items()}, process_index=0, process_count=1, workdir=None
)


def config(arg):
  spec = importlib.util.spec_from_file_location("probes_config", ROOT / "configs" / "probes.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize(
    "arg", ["copy,ema_lm,tiny", "recall,selective,tiny", "selective_copy,gpt,tiny", "filtering,aggregator,tiny"]
)
def test_train_and_eval_py_agree(tmp_path, arg):
  c = config(arg)
  wd = str(tmp_path)
  out = trainer.train(c, wd)
  assert out["status"] == "done" and math.isfinite(out["loss"])
  with open(os.path.join(wd, f"eval_{c.steps}.json")) as f:
    in_loop = json.load(f)["results"]
  again = evaluation.run(wd)
  for w in ("raw", "ema"):
    assert in_loop[w]["per_size"] == again[w]["per_size"]
    assert in_loop[w]["per_size"]["size"] == sorted(c.task.eval_sizes)


def test_evaluate_matches_a_direct_count():
  c = config("copy,ema_lm,tiny")
  task = ProbesTask(c)
  task.validate()
  model = task.build_model(nnx.Rngs(params=0))
  res = task.evaluate(model, CTX)
  size = c.task.eval_sizes[1]
  b = make_batch(c.task, size, c.task.eval_seed, 0, c.task.eval_batch_size)
  pred = np.asarray(jnp.argmax(model(jnp.asarray(b["inputs"])), -1))
  want = data.accuracy(pred, b)
  i = res["per_size"]["size"].index(size)
  assert res["per_size"]["token_accuracy"][i] == pytest.approx(want["token_accuracy"])
  assert res["per_size"]["sequence_accuracy"][i] == pytest.approx(want["sequence_accuracy"])


@pytest.mark.parametrize(
    "field,value",
    [
        ("task.probe", "sort"),
        ("task.eval_sizes", []),
        ("task.train_size", 0),
        ("model.kind", "rnn"),
        ("task.noise", 1.0),
    ],
)
def test_bad_config(field, value):
  c = config("copy,tiny")
  parent, last = field.split(".")
  c[parent][last] = value
  with pytest.raises(ValueError, match=field.split(".")[-1]):
    ProbesTask(c).validate()


def test_recall_sizes_must_fit_the_symbols():
  c = config("recall,tiny")
  c.task.eval_sizes = [2, 9]
  with pytest.raises(ValueError, match="eval_sizes"):
    ProbesTask(c).validate()
