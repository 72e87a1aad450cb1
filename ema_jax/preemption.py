"""SIGTERM (preemption) as a flag the training loop polls, installed as early as possible.

train.py installs the handler before it imports JAX, so a SIGTERM during start-up (imports, compilation,
restore) no longer kills the process with status 143: the loop sees the flag before its first step and
exits 0, saving only if there is something new to save. Across processes the flag is reduced inside the
train step (trainer.py), so every process stops after the same step.
"""

from __future__ import annotations

import signal
import threading

_requested = False
_installed = False


def _handle(signum, frame):
  del signum, frame
  global _requested
  _requested = True


def install() -> bool:
  """Installs the SIGTERM handler (main thread only; idempotent). Returns True if it is installed."""
  global _installed
  if _installed:
    return True
  if threading.current_thread() is not threading.main_thread():
    return False
  signal.signal(signal.SIGTERM, _handle)
  _installed = True
  return True


def requested() -> bool:
  return _requested


def reset() -> None:
  """Forgets a past request (for tests that run several trainings in one process)."""
  global _requested
  _requested = False
