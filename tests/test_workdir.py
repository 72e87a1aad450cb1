"""The workdir format (ema_jax/workdir.py): atomic eval JSONs, metrics.jsonl truncation, latest eval."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from ema_jax import workdir as wd_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Rewrites eval_7.json again and again with a large payload that changes each time.
WRITER = """
import sys
from ema_jax import workdir
n = 0
while True:
  n += 1
  workdir.write_eval(sys.argv[1], 7, {"raw": {"values": [n] * 200000}}, table="t" * 1000, n=n)
  print(n, flush=True)
"""


def test_kill9_during_eval_json_writes_never_leaves_a_truncated_file(tmp_path):
  rng = random.Random(0)
  path = tmp_path / "eval_7.json"
  seen = set()
  for trial in range(8):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    writes = rng.randint(1, 3)  # complete writes before the kill (counted, not timed: the test runs under load)
    for _ in range(writes):
      assert proc.stdout.readline()
    time.sleep(rng.uniform(0.0, 0.3))  # then a random moment, mostly inside the next write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = json.loads(path.read_text())  # never torn: the old file or the new one
    assert saved["step"] == 7 and len(saved["results"]["raw"]["values"]) == 200000
    assert set(saved["results"]["raw"]["values"]) == {saved["n"]}
    assert saved["n"] >= writes
    seen.add(saved["n"])
  assert len(seen) > 1
  # Temporary files a killed writer leaves are hidden dot-files, never eval_<step>.json.
  assert wd_lib.eval_steps(tmp_path) == [7]
  assert oct(path.stat().st_mode & 0o777) != oct(0o600)


def test_truncate_metrics_and_latest_eval(tmp_path):
  rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval/raw/kl": 0.5}, {"step": 3, "loss": 1.0}]
  wd_lib.write_metrics(tmp_path, rows)
  with open(wd_lib.metrics_path(tmp_path), "a") as f:
    f.write('{"step": 4, "lo')  # a torn last line from a killed run
  assert wd_lib.read_metrics(tmp_path) == rows
  assert wd_lib.truncate_metrics(tmp_path, 2) == rows[:3]
  assert wd_lib.truncate_metrics(tmp_path, 2, drop_eval_at_step=True) == rows[:2]
  assert wd_lib.read_metrics(tmp_path) == rows[:2]
  with pytest.raises(FileNotFoundError, match="no eval"):
    wd_lib.latest_eval(tmp_path)
  wd_lib.write_eval(tmp_path, 10, {"raw": {"kl": 1.0}})
  wd_lib.write_eval(tmp_path, 200, {"raw": {"kl": 0.5}})
  wd_lib.write_eval(tmp_path, 200, {"raw": {"kl": 0.4}}, tag="_raw_16")
  assert wd_lib.eval_steps(tmp_path) == [10, 200]
  assert wd_lib.latest_eval(tmp_path)["results"] == {"raw": {"kl": 0.5}}
