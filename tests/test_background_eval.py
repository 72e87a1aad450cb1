"""In-loop evaluations in a background thread (config.eval_in_background, trainer.BackgroundEval).

On the set-complement task: the same eval JSONs (bit for bit) and metrics as blocking evaluations; an
evaluation is on disk before any checkpoint past its step, even when it is slower than the steps to the
checkpoint; an error inside the evaluation stops the run with that error; only runs of one device evaluate
in the background; a run killed (SIGKILL) while an evaluation is running resumes to the records of an
uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

import fault_configs as fc
from ema_jax import checkpoint as ckpt_lib
from ema_jax import trainer

# Evaluations at 6, 12, 18 (and the final one at 20); checkpoints at 8, 16, 20: each evaluation has
# steps to run beside before the next checkpoint waits for it.
SETTINGS = dict(fc.SET_COMPLEMENT, steps=20, checkpoint_every=8, eval_every=6, log_every=2)


def run(wd, **overrides):
  cfg = fc.config("configs/set_complement.py", **dict(SETTINGS, **overrides))
  return trainer.train(cfg, str(wd))


def eval_files(wd):
  return sorted(f for f in os.listdir(wd) if f.startswith("eval_") and f.endswith(".json"))


def read_eval_results(wd, name):
  with open(os.path.join(wd, name)) as f:
    return json.load(f)["results"]


@pytest.fixture(scope="module")
def blocking(tmp_path_factory):
  wd = tmp_path_factory.mktemp("blocking")
  run(wd, eval_in_background=False)
  return str(wd)


def test_same_records_as_blocking_evaluations(blocking, tmp_path):
  run(tmp_path)
  assert eval_files(tmp_path) == eval_files(blocking) == [f"eval_{s}.json" for s in (12, 18, 20, 6)]
  for name in eval_files(blocking):
    assert read_eval_results(tmp_path, name) == read_eval_results(blocking, name), name
  assert fc.read_metrics(str(tmp_path)) == fc.read_metrics(blocking)


def test_evaluation_on_disk_before_a_later_checkpoint(monkeypatch, blocking, tmp_path):
  """A slow evaluation (0.5 s more than the steps to the next checkpoint) is waited for: when checkpoint
  n is written, every evaluation at a step <= n is on disk."""
  slow_eval = trainer.evaluate_all
  started = []

  def slow(*args, **kwargs):
    if threading.current_thread() is not threading.main_thread():
      started.append(args[3])
      time.sleep(0.5)
    return slow_eval(*args, **kwargs)

  seen = {}
  save = ckpt_lib.Checkpointer.save

  def checked_save(self, step, *args, **kwargs):
    seen[step] = eval_files(tmp_path)
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(trainer, "evaluate_all", slow)
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", checked_save)
  run(tmp_path)
  assert started == [6, 12, 18], "the evaluations did not run in the background"
  assert seen[8] == ["eval_6.json"] and seen[16] == ["eval_12.json", "eval_6.json"]
  assert fc.read_metrics(str(tmp_path)) == fc.read_metrics(blocking)


def test_only_runs_of_one_device_evaluate_in_the_background():
  cfg = fc.config("configs/set_complement.py", **SETTINGS)
  one, four = types.SimpleNamespace(devices=np.zeros((1, 1, 1))), types.SimpleNamespace(devices=np.zeros((4, 1, 1)))
  assert trainer.eval_in_background(cfg, one) and not trainer.eval_in_background(cfg, four)
  cfg.eval_in_background = False
  assert not trainer.eval_in_background(cfg, one)


def test_a_non_boolean_setting_is_refused():
  cfg = fc.config("configs/set_complement.py", **SETTINGS)
  cfg.eval_in_background = None  # a config's value from elsewhere (ConfigDict refuses other types itself)
  with pytest.raises(ValueError, match="eval_in_background.*True or False"):
    trainer.validate_config(cfg)


def test_error_in_the_evaluation_stops_the_run(monkeypatch, tmp_path):
  real = trainer.evaluate_all

  def failing(setup, state, workdir, step, **kwargs):
    if step == 12:
      raise RuntimeError("evaluation failed at step 12")
    return real(setup, state, workdir, step, **kwargs)

  monkeypatch.setattr(trainer, "evaluate_all", failing)
  with pytest.raises(RuntimeError, match="evaluation failed at step 12"):
    run(tmp_path)
  assert eval_files(tmp_path) == ["eval_6.json"]
  # The checkpoint at 16 waits for the evaluation at 12, which failed: nothing past 12 is saved.
  assert max(ckpt_lib.Checkpointer(str(tmp_path)).all_steps()) == 8


@pytest.mark.slow
def test_killed_during_a_background_evaluation_resumes_identically(tmp_path):
  """SIGKILL while the trainer waits at step 16's checkpoint for the evaluation of step 12 (made slower
  by the main job's evaluation set: every size 1..63, 256 rows each), then the same command again: it
  resumes from step 8 (or from the start, where step 8's asynchronous save had not committed), evaluates
  step 12 again, and its records equal an uninterrupted run's with blocking evaluations."""
  big = {
      "task.num_tokens": 64,
      "model.embed_dim": 64,
      "model.value_dim": 64,
      "task.eval_examples": 256,
  }
  ref = tmp_path / "ref"
  run(ref, eval_in_background=False, **big)
  wd = tmp_path / "killed"
  cmd = [sys.executable, "train.py", "--config", "configs/set_complement.py", "--workdir", str(wd)]
  cmd += fc.flags(**dict(SETTINGS, **big))
  proc = subprocess.Popen(cmd, cwd=fc.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and '"step": 16,' in metrics.read_text()):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (wd / "eval_12.json").exists(), "the evaluation of step 12 had finished before the kill"
  # Step 8's asynchronous save has normally committed by now (on a loaded machine it may not have: the
  # rerun then starts over, which must give the same records too).
  assert ckpt_lib.Checkpointer(str(wd)).all_steps() in ([], [8])
  done = subprocess.run(cmd, cwd=fc.REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stdout + done.stderr
  assert fc.read_metrics(str(wd)) == fc.read_metrics(str(ref))
  assert eval_files(wd) == eval_files(ref)
  for name in eval_files(ref):
    assert read_eval_results(wd, name) == read_eval_results(ref, name), name
