"""SIGTERM and SIGKILL on real set-complement training runs (train.py subprocesses, via the fault drill).

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
