"""SIGTERM, SIGKILL and a full disk on real set-complement training runs (train.py subprocesses, via the
fault drill).

SIGTERM at any moment exits 0; after rerunning the same command, metrics.jsonl (every row), the final
eval JSON and the TensorBoard events equal those of an uninterrupted run, with no duplicate event.
"""

import signal

import pytest

pytestmark = pytest.mark.slow

from experiments import fault_drill

SHORT = {"set_complement": dict(steps=120, checkpoint_every=30, eval_every=60, log_every=7)}


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
  return fault_drill.Drill(str(tmp_path_factory.mktemp("drill")), seed=0, overrides=SHORT)


@pytest.mark.parametrize(
    "sig,when",
    [
        (signal.SIGTERM, dict(delay=0.3)),  # during start-up: imports, before any step
        (signal.SIGTERM, dict(after_checkpoint=30)),  # in the middle of training
        (signal.SIGKILL, dict(after_checkpoint=30)),
    ],
)
def test_signal_then_rerun_matches_an_uninterrupted_run(drill, sig, when):
  trial = drill.signal_trial("set_complement", sig, **when)
  assert trial.outcome == "identical", trial


@pytest.mark.parametrize("target", ["1", "all"])
def test_sigterm_to_a_multiprocess_run_saves_one_step_and_exits_0(drill, target):
  """2 processes x 2 devices: SIGTERM to one process (JAX's preemption notifier takes it) or to both;
  every process saves the same step and exits 0 within 60 s, and the resume matches an uninterrupted
  one-process run to float rounding (the all-reduce order differs)."""
  trials = drill.sigterm_multi_trial("set_complement", target, layouts=((2, 2),))
  assert len(trials) == 1 and trials[0].outcome in ("identical", "close"), trials


@pytest.mark.parametrize("first_write", ["log", "checkpoint"])
def test_full_disk_is_one_error_line_and_the_rerun_is_identical(drill, first_write):
  trial = drill.disk_full_trial("set_complement", first_write)
  if trial.outcome == "skipped":
    pytest.skip(trial.note)
  assert trial.outcome == "identical" and trial.note.startswith("error: no space left"), trial
