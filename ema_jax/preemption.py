"""SIGTERM (preemption) as a flag the training loop polls, installed as early as possible.

train.py installs the handler before it imports JAX, so a SIGTERM during start-up (imports, compilation,
restore) no longer kills the process with status 143: the loop sees the flag before its first step and
exits 0, saving only if there is something new to save. train.py then re-executes itself once
(host_memory.py: huge pages for big buffers); SIGTERM is blocked across that exec, and one the handler had
already caught is raised again, so either reaches the new image's handler. Across processes the flag is reduced inside the
train step (trainer.py), so every process stops after the same step.

Several processes: jax.distributed.initialize starts JAX's preemption notifier, which takes SIGTERM over
from this handler (it logs `preemption_notifier.cc ... SIGTERM caught`), tells the coordination service,
and the service tells every process. `sync_point_reached(step)`, called by the loop after every step,
is JAX's preemption sync (multihost_utils.reached_preemption_sync_point): it turns True on every process
at the same step, the first one after the notice that no process has passed, and the loop saves that
step and exits 0. A signal to one process therefore stops all of them at one step.
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


def sync_point_reached(step: int) -> bool:
  """True on every process at the same step once any process of a multi-process run got SIGTERM.

  Every process must call it after every step with the same step numbers (the loop does). False for a
  single process, where the flag above does the work.
  """
  import jax  # not at module level: train.py imports this module before JAX on purpose

  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils

  return bool(multihost_utils.reached_preemption_sync_point(int(step)))


def reset() -> None:
  """Forgets a past request (for tests that run several trainings in one process)."""
  global _requested
  _requested = False
