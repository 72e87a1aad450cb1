"""A write that failed (a full disk, a quota, a read-only filesystem) as one line that says what, where,
how much space there is and how much a checkpoint needs, and how to go on."""

from __future__ import annotations

import os
import shutil
from typing import List, Optional

from ema_jax import errors


class CheckpointWriteError(errors.UserError):
  """A checkpoint or another record could not be written (e.g. a full disk); older checkpoints are
  untouched. The command line exits at once after its one line (exit_now): the libraries' own cleanups
  (orbax's background saves, TensorBoard's writer) would only fail again on the same full disk."""

  exit_now = True


def message(directory: str, e: BaseException, step: Optional[int], steps: List[int], what: Optional[str] = None) -> str:
  """One line: what failed, where, the free space there and what it needs, and how to go on."""
  os_error = errors.root_os_error(e)
  full = errors.is_disk_full(e)
  where = what or (
      f"checkpoint step {step} under {directory}" if step is not None else f"a checkpoint under {directory}"
  )
  older = (
      f"the checkpoints already complete ({', '.join(map(str, steps[-3:]))}) are untouched"
      if steps
      else "no older checkpoint exists"
  )
  if full:
    free = "?"
    try:
      probe = directory
      while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
      free = _human(shutil.disk_usage(probe).free)
    except OSError:
      pass
    need = _step_size(directory, steps)
    return (
        f"no space left on the device while writing {where} ({free} free there"
        + (f"; a checkpoint of this run takes about {_human(need)}" if need else "")
        + f"); {older}. Free space and rerun the same command to resume."
    )
  detail = (
      f"{type(os_error).__name__}: {os_error}"
      if os_error is not None
      else (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
  )
  return f"could not write {where} ({detail}); {older}. Fix that and rerun the same command to resume."


def _step_size(directory: str, steps: List[int]) -> int:
  """Bytes on disk of the newest complete step (0 if none)."""
  if not steps or "://" in directory:
    return 0
  total = 0
  for root, _, files in os.walk(os.path.join(directory, str(steps[-1]))):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


def _human(n: int) -> str:
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)
