"""The README's "Adding a task" example, run as written: its two code blocks become files and train.py
trains them for a few steps (and resumes when rerun)."""

import json
import os
import re
import subprocess
import sys
from helpers import REPO


def readme_blocks():
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  section = text[text.index("## Adding a task") :]
  section = section[: section.index("\n## ", 5)]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  return {re.match(r"# (\w+\.py)", b).group(1): b for b in blocks}


def test_readme_task_trains_and_resumes(tmp_path):
  blocks = readme_blocks()
  assert set(blocks) == {"my_task.py", "my_config.py"}
  assert sum(len(b.splitlines()) for b in blocks.values()) <= 75
  for name, code in blocks.items():
    (tmp_path / name).write_text(code)
  wd = tmp_path / "wd"
  cmd = [
      sys.executable,
      os.path.join(REPO, "train.py"),
      "--config",
      str(tmp_path / "my_config.py"),
      "--workdir",
      str(wd),
  ]
  env = dict(os.environ, PYTHONPATH=str(tmp_path), JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  first, last = rows[0]["mse"], [r for r in rows if "mse" in r][-1]["mse"]
  final = json.loads((wd / "eval_300.json").read_text())["results"]
  assert last < 0.05 * first and final["raw"]["mse"] < 0.05, (first, last, final)
  again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
  assert again.returncode == 0 and "this run is finished" in again.stdout, again.stderr[-2000:]
