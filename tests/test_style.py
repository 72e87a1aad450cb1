"""The code style: every Python file is formatted by pyink with the settings in pyproject.toml."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyink_check_passes():
  out = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "."], cwd=REPO, capture_output=True, text=True, timeout=1800
  )
  assert out.returncode == 0, ("run `pyink .` to format:\n" + out.stderr)[-3000:]
