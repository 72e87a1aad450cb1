"""benchmarks.main_job_profile on a small set-complement run (in a subprocess): the phases add up to the
total, every evaluation is timed (the in-loop ones in background threads, the final one in the main
thread), the train step's compile is counted, and the run's results are those of a plain train.py run.
Two subprocess runs (about 20 s): the slow set."""

import json
import subprocess
import sys

import fault_configs as fc
import pytest
from helpers import REPO

from ema_jax import host_memory

pytestmark = pytest.mark.slow

SMALL = dict(fc.SET_COMPLEMENT, steps=12, checkpoint_every=6, eval_every=4, log_every=2)


def test_phases_and_events(tmp_path):
  flags = ["--config", "configs/set_complement.py", *fc.flags(**SMALL)]
  out = tmp_path / "profile.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.main_job_profile", "--workdir", str(tmp_path / "wd"), "--out", str(out)]
      + ["--", *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  got = json.loads(out.read_text())
  phases = got["phases"]
  parts = sum(phases[k] for k in ("imports", "to_first_step", "training", "final_eval", "exit"))
  assert abs(parts - phases["total"]) < 1e-6 and min(phases.values()) >= 0
  evals = [e for e in got["events"] if e["label"] == "evaluate_all"]
  assert [e["thread"] for e in evals] == ["ema_jax-eval-4", "ema_jax-eval-8", "MainThread"]
  assert sum(e["label"] == "temperature fit" for e in got["events"]) == 3 * 3  # raw, ema, bema each time
  assert got["compile_seconds"]["jit(first_marked)"] > 0  # the train step
  # run as train.py runs: re-executed with huge pages where they apply here
  assert got["meta"]["huge_pages"].startswith("on (" if host_memory.why_not({}) is None else "off: ")
  # The profiled run is an ordinary run: its final evaluation equals a plain train.py run's.
  plain = tmp_path / "plain"
  done = subprocess.run(
      [sys.executable, "train.py", *flags, "--workdir", str(plain)], cwd=REPO, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert fc.read_eval(str(plain), 12) == fc.read_eval(str(tmp_path / "wd"), 12)
