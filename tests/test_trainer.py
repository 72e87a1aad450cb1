"""The generic trainer: exact resume after a kill, SIGTERM preemption, corrupt checkpoints, NaN stop,
bad configs, and eval.py reproducing the in-loop evaluation. Uses the toy task in tests/toy_task.py."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import toy_task
from ema_jax import checkpoint as ckpt_lib
from ema_jax import evaluation, trainer

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
VOLATILE = ("steps_per_s", "tokens_per_s", "mfu")


def read_metrics(workdir):
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      step = row.pop("step")
      rows.setdefault(step, {}).update({k: v for k, v in row.items() if k not in VOLATILE})
  return rows


def launch(workdir, **overrides):
  """Runs the toy task's training in a subprocess (so it can be killed)."""
  task = overrides.pop("task", {})
  code = (
      f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import toy_task; "
      f"from ema_jax import trainer; c = toy_task.get_config(**{overrides!r}); "
      f"c.task.update({task!r}); r = trainer.train(c, {workdir!r}); sys.exit(0)"
  )
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen(
      [sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def wait_for_checkpoint(workdir, step, proc, timeout=120):
  path = os.path.join(workdir, "checkpoints", str(step), "commit_success.txt")
  t0 = time.time()
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"training exited before checkpoint {step}: {proc.stdout.read()}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"no checkpoint {step} after {timeout}s")
    time.sleep(0.02)


def slow_config(steps, **kw):
  # A short sleep in the data iterator keeps the run alive long enough to be interrupted mid-way.
  task = dict(sleep=0.03)
  task.update(kw.pop("task", {}))
  return dict(steps=steps, task=task, **kw)


def slow_toy_config(steps):
  cfg = toy_task.get_config(steps=steps)
  cfg.checkpoint_every = 10
  cfg.eval_every = 20
  cfg.task.sleep = 0.03
  return cfg


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("full"))
  cfg = toy_task.get_config(steps=60)
  cfg.checkpoint_every = 10
  cfg.eval_every = 20
  trainer.train(cfg, wd)
  return wd


@pytest.mark.slow
def test_killed_and_resumed_run_matches(uninterrupted, tmp_path):
  wd = str(tmp_path)
  proc = launch(wd, **slow_config(60, checkpoint_every=10, eval_every=20))
  wait_for_checkpoint(wd, 20, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = ckpt_lib.Checkpointer(wd).all_steps()
  assert done and max(done) < 60, "the run was not interrupted"
  trainer.train(slow_toy_config(60), wd)
  assert read_metrics(wd) == read_metrics(uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(uninterrupted, tmp_path):
  wd = str(tmp_path)
  proc = launch(wd, **slow_config(60, checkpoint_every=10, eval_every=20))
  wait_for_checkpoint(wd, 10, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGTERM" in out
  steps = ckpt_lib.Checkpointer(wd).all_steps()
  last = max(steps)
  assert 10 <= last < 60
  metrics = read_metrics(wd)
  assert max(metrics) <= last  # nothing was logged past the checkpoint
  trainer.train(slow_toy_config(60), wd)
  assert read_metrics(wd) == read_metrics(uninterrupted)


def _garble(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage" * 3)


def test_corrupt_checkpoint_is_reported_and_skipped(uninterrupted, tmp_path, capsys):
  import shutil

  wd = str(tmp_path / "wd")
  shutil.copytree(uninterrupted, wd)
  _garble(os.path.join(wd, "checkpoints", "60"))
  setup = trainer.build(toy_task.get_config(steps=60))
  ck = ckpt_lib.Checkpointer(wd)
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="60"):
    ck.restore(60, setup.abstract_state)
  config = json.loads(toy_task.get_config(steps=60).to_json_best_effort())
  step, state, data, _ = ck.restore_latest(setup.abstract_state, config)
  assert step == 50 and data == {"step": 50}
  out = capsys.readouterr().out
  assert "moved it aside" in out and len(out.strip().splitlines()) == 1
  assert int(state["step"]) == 50
  assert 60 not in ck.all_steps()
  assert any(n.startswith("60.unreadable-") for n in os.listdir(os.path.join(wd, "checkpoints")))
  ck.close()


def test_nonfinite_stops_and_keeps_last_good_checkpoint(tmp_path):
  wd = str(tmp_path)
  cfg = toy_task.get_config(steps=40)
  cfg.checkpoint_every = 5
  cfg.task.nan_at_step = 12
  with pytest.raises(trainer.NonFiniteError, match="step 13"):
    trainer.train(cfg, wd)
  ck = ckpt_lib.Checkpointer(wd)
  assert ck.all_steps() == [5, 10]
  setup = trainer.build(cfg)
  _, state, _, _ = ck.restore_latest(setup.abstract_state, json.loads(cfg.to_json_best_effort()))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
  ck.close()


def test_eval_py_reproduces_in_loop_numbers(uninterrupted):
  with open(os.path.join(uninterrupted, "eval_60.json")) as f:
    in_loop = json.load(f)["results"]
  results = evaluation.run(uninterrupted, step=60)
  assert set(results) == {"raw", "ema"}
  for name in results:
    assert results[name]["mse"] == pytest.approx(in_loop[name]["mse"], rel=1e-6)
  raw_only = evaluation.run(uninterrupted, step=40, weights="raw")
  assert set(raw_only) == {"raw"}
  with pytest.raises(ValueError, match="step"):
    evaluation.run(uninterrupted, step=7)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("steps", 0, "config.steps"),
        ("batch_size", -4, "config.batch_size"),
        ("optim.lr", -1.0, "config.optim.lr"),
        ("optim.schedule", "sometimes", "config.optim.schedule"),
        ("weight_ema.kind", "polyak", "config.weight_ema.kind"),
        ("weight_ema.decay", 1.5, "config.weight_ema.decay"),
        ("mesh.data", 3, "devices"),
        ("task.hidden", 0, "config.task.hidden"),
        ("eval_steps", [0, 5], "config.eval_steps"),
        ("eval_steps", "10", "config.eval_steps"),
    ],
)
def test_bad_config_fails_before_compilation(field, value, match):
  cfg = toy_task.get_config()
  node = cfg
  parts = field.split(".")
  for p in parts[:-1]:
    node = node[p]
  node[parts[-1]] = value
  with pytest.raises(ValueError, match=match):
    trainer.build(cfg)


def test_eval_steps_add_evaluations(tmp_path):
  """eval_steps evaluates at the listed steps besides eval_every's and the final one."""
  cfg = toy_task.get_config(steps=12)
  cfg.eval_every = 8
  cfg.eval_steps = [1, 3, 8, 12, 50]
  trainer.train(cfg, str(tmp_path))
  evals = sorted(int(n[5:-5]) for n in os.listdir(tmp_path) if n.startswith("eval_") and n.endswith(".json"))
  assert evals == [1, 3, 8, 12]


def test_batch_not_divisible_by_mesh():
  cfg = toy_task.get_config()
  cfg.batch_size = 7
  if jax.device_count() > 1:
    with pytest.raises(ValueError, match="batch_size=7"):
      trainer.build(cfg)
