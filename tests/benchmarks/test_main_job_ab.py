"""benchmarks.main_job_ab on a small set-complement run: every checkout runs once per round, the rows and
medians are written, and two checkouts of the same code give the same result bits."""

import json
import subprocess
import sys

import pytest

import fault_configs as fc
from helpers import REPO

SMALL = dict(fc.SET_COMPLEMENT, steps=8, checkpoint_every=4, eval_every=4, log_every=2)


def run(*args, cwd=REPO):
  return subprocess.run(
      [sys.executable, "-m", "benchmarks.main_job_ab", *args], cwd=cwd, capture_output=True, text=True
  )


@pytest.mark.slow
def test_two_checkouts_one_round(tmp_path):
  out = tmp_path / "ab.json"
  proc = run(
      "--checkouts",
      f"a={REPO},b={REPO}",
      "--rounds",
      "1",
      "--workdir",
      str(tmp_path / "wd"),
      "--out",
      str(out),
      "--",
      *fc.flags(**SMALL),
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  got = json.loads(out.read_text())
  assert sorted(r["label"] for r in got["rows"]) == ["a", "b"]
  assert all(r["wall_s"] > 0 and r["probe_ms_after"] > 0 and r["eval"] == "eval_8.json" for r in got["rows"])
  assert got["same_result_bits"] is True and set(got["median_wall_s"]) == {"a", "b"}
  assert got["meta"]["command"].startswith("python -m benchmarks.main_job_ab --checkouts")


def test_a_checkout_without_train_py_is_one_error_line(tmp_path):
  proc = run("--checkouts", f"a={tmp_path}", "--rounds", "1")
  assert proc.returncode != 0 and proc.stderr.strip().startswith("error: --checkouts item")
