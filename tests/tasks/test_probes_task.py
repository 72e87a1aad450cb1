"""The probes task through the trainer and eval.py, for every model kind; evaluation against a direct count;
training sizes drawn from the range; config errors."""

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
from ema_jax.tasks.probes import ProbeIterator, ProbesTask, make_batch, sequence_length, train_size_at
from helpers import REPO

ROOT = Path(REPO)
CTX = EvalContext(
    put_batch=lambda b: {k: jnp.asarray(v) for k, v in b.items()}, process_index=0, process_count=1, workdir=None
)


def config(arg):
  spec = importlib.util.spec_from_file_location("probes_config", ROOT / "configs" / "probes.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


SLOW = pytest.mark.slow  # each run compiles a step per training size; one kind stays in the default run


@pytest.mark.parametrize(
    "arg",
    [
        "recall,gpt,tiny",
        pytest.param("copy,ema_lm,tiny", marks=SLOW),
        pytest.param("recall,selective,tiny", marks=SLOW),
        pytest.param("selective_copy,hybrid,tiny", marks=SLOW),
        pytest.param("filtering,aggregator,tiny", marks=SLOW),
        pytest.param("recall_toy,ema_lm,tiny", marks=SLOW),
    ],
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
  c = config("recall,ema_lm,tiny")
  task = ProbesTask(c)
  task.validate()
  model = task.build_model(nnx.Rngs(params=0))
  c.task.eval_sizes = [2, 8]
  res = task.evaluate(model, CTX)
  size = 8  # beyond the trained range
  b = make_batch(c.task, size, c.task.eval_seed, 0, c.task.eval_batch_size)
  pred = np.asarray(jnp.argmax(model(jnp.asarray(b["inputs"])), -1))
  want = data.accuracy(pred, b)
  i = res["per_size"]["size"].index(size)
  assert res["per_size"]["token_accuracy"][i] == pytest.approx(want["token_accuracy"])
  assert res["per_size"]["sequence_accuracy"][i] == pytest.approx(want["sequence_accuracy"])
  assert res["beyond/token_accuracy"] == pytest.approx(want["token_accuracy"])
  assert set(res) >= {"in_range/token_accuracy", "beyond/sequence_accuracy"}


def test_temperature_control_of_the_answer_cross_entropy():
  """T is the brute-force minimiser of the check set's answer cross-entropy (numpy, a grid: an
  independent path); answer_ce and t_answer_ce are the answers' NLL as-is and at T, counted directly."""
  c = config("recall,gpt,tiny")
  task = ProbesTask(c)
  task.validate()
  model = task.build_model(nnx.Rngs(params=1))
  res = task.evaluate(model, CTX)

  def answers(seed, size):
    b = make_batch(c.task, size, seed, 0, c.task.eval_batch_size)
    z = np.asarray(model(jnp.asarray(b["inputs"])), np.float64)
    m = b["answer_mask"] > 0
    return z[m], b["targets"][m]

  def ce(z, y, temp):
    s = z / temp
    s = s - s.max(-1, keepdims=True)
    return float(np.mean(np.log(np.exp(s).sum(-1)) - s[np.arange(len(y)), y]))

  check = [answers(c.task.eval_seed + 1, s) for s in sorted(set(c.task.train_sizes))]
  z, y = np.concatenate([a for a, _ in check]), np.concatenate([b for _, b in check])
  grid = np.exp(np.linspace(np.log(0.01), np.log(1000.0), 8001))  # an untrained model: T is large
  best = grid[np.argmin([ce(z, y, g) for g in grid])]
  assert res["temperature"] == pytest.approx(best, rel=2e-3)
  size = c.task.eval_sizes[-1]
  z, y = answers(c.task.eval_seed, size)  # eval_batches = 1 in the tiny config
  i = res["per_size"]["size"].index(size)
  assert res["per_size"]["answer_ce"][i] == pytest.approx(ce(z, y, 1.0), rel=1e-4)
  assert res["per_size"]["t_answer_ce"][i] == pytest.approx(ce(z, y, res["temperature"]), rel=1e-4)


def test_training_draws_every_size_of_the_range_and_splits_rows_across_processes():
  c = config("recall,gpt,tiny")
  c.task.train_sizes = [2, 3, 4]
  whole = ProbeIterator(c.task, seed=5, global_batch=8, process_index=0, process_count=1)
  halves = [ProbeIterator(c.task, seed=5, global_batch=8, process_index=p, process_count=2) for p in (0, 1)]
  seen = set()
  for step in range(30):
    size = train_size_at(c.task, 5, step)
    b = next(whole)
    assert b["inputs"].shape == (8, sequence_length(c.task, size)) == (8, 8 * size)
    assert b["answer_mask"].sum() == 8 * size  # every key queried once
    parts = [next(h) for h in halves]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), b["inputs"])
    seen.add(size)
  assert seen == {2, 3, 4}
  # The position is the step: a restored iterator continues the same stream.
  again = ProbeIterator(c.task, seed=5, global_batch=8, process_index=0, process_count=1)
  again.set_state(whole.get_state())
  np.testing.assert_array_equal(next(again)["inputs"], next(whole)["inputs"])


@pytest.mark.parametrize(
    "field,value",
    [
        ("task.probe", "sort"),
        ("task.eval_sizes", []),
        ("task.train_sizes", [0, 2]),
        ("model.kind", "rnn"),
        ("task.noise", 1.0),
        ("task.power_a", 0.0),
        ("task.vocab_size", 0),
    ],
)
def test_bad_config(field, value):
  c = config("recall,tiny")
  parent, last = field.split(".")
  c[parent][last] = value
  with pytest.raises(ValueError, match=last):
    ProbesTask(c).validate()


@pytest.mark.parametrize(
    "arg,sizes",
    [
        ("recall,tiny", [2, 40]),  # vocab 64: keys from [1, 32), so 31 pairs at most
        ("recall_toy,tiny", [2, 9]),  # 8 symbols: 8 distinct keys at most
        ("selective_copy,tiny", [8, 6]),  # 4 data tokens and 4 markers need 8 positions
    ],
)
def test_sizes_must_fit_the_probe(arg, sizes):
  c = config(arg)
  c.task.eval_sizes = sizes
  with pytest.raises(ValueError, match="eval_sizes"):
    ProbesTask(c).validate()


def test_the_default_recall_is_mqar_over_a_large_vocabulary():
  c = config("gpt")
  assert c.task.probe == "recall" and c.task.vocab_size >= 1024
  ProbesTask(c).validate()
  b = make_batch(c.task, c.task.train_sizes[0], 0, 0, 2)
  assert b["inputs"].shape[1] == c.task.seq_per_pair * c.task.train_sizes[0]
