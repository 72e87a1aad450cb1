"""One writer per workdir: the lock file <workdir>/train.lock, taken by process 0 of a training run.

- The lock is a JSON file {"host", "pid", "started", "pid_start"}, created atomically (O_CREAT | O_EXCL)
  before anything else is written to the workdir, and deleted when the run ends in any way Python sees
  (normal end, an exception, SIGTERM: preemption.py turns it into a normal end).
- A second run while the lock is held is refused (WorkdirLockedError) naming the holder, with the workdir
  unchanged. A lock of a dead process of this host (os.kill(pid, 0); a zombie or a reused pid counts as
  dead) is taken over with one WARNING line. A lock from another host cannot be checked and is refused,
  with how to remove it if that run is dead.
- Several processes: only process 0 takes the lock; the others learn through one tiny collective whether
  it did, so that all of them stop together instead of waiting on process 0.
- Buckets (gs://...) have no exclusive create: there the lock is checked and written best effort (two runs
  that start within the same moment may both proceed).
- eval.py and generate.py only read a workdir: they never look at the lock.

A process killed by SIGKILL or the OOM killer leaves its lock behind; the next run on the same host takes
it over. check_writable is the cheap check train.py makes before JAX starts; the lock's own creation is
the first write, so a workdir that cannot be written is reported there with the OS's reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from typing import Any, Dict, Iterator, List, Optional

from ema_jax.errors import WorkdirError, WorkdirLockedError

LOCK_FILE = "train.lock"
# A lock that does not parse may be one another run is writing at this moment (O_EXCL makes it exist
# before its bytes do): read it again for this long before calling it malformed.
READ_PATIENCE_S = 1.0


WHAT_TO_DO = "choose a --workdir where you can write"


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def _reason(e: OSError) -> str:
  return e.strerror or str(e)


# --------------------------------------------------------------------------------------------- liveness


def _proc_stat(pid: int):
  """(state letter, start time in clock ticks since boot) from /proc, or None where there is no /proc."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      text = f.read()
  except OSError:
    return None
  fields = text[text.rfind(")") + 2 :].split()  # the command name in (...) may hold spaces
  try:
    return fields[0], int(fields[19])
  except (IndexError, ValueError):
    return None


def _alive(pid: int, pid_start: Optional[int]) -> bool:
  """Whether process `pid` of this host still runs (and is the one that wrote the lock)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it exists and belongs to another user
  stat = _proc_stat(pid)
  if stat is None:
    return True
  state, started = stat
  if state in ("Z", "X"):
    return False  # exited, not yet reaped by its parent
  return pid_start is None or started == pid_start  # else the pid was reused by a new process


# ------------------------------------------------------------------------------------------------ the file


def _content() -> str:
  stat = _proc_stat(os.getpid())
  return json.dumps(
      dict(
          host=socket.gethostname(),
          pid=os.getpid(),
          started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          pid_start=None if stat is None else stat[1],
      )
  )


def _parse(text: str) -> Dict[str, Any]:
  try:
    holder = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"not JSON ({e})") from e
  if not isinstance(holder, dict) or not isinstance(holder.get("host"), str):
    raise ValueError("no 'host' field")
  pid = holder.get("pid")
  if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
    raise ValueError(f"'pid' is {pid!r}, not a process id")
  return holder


def read_holder(path: str) -> Dict[str, Any]:
  """The lock's {"host", "pid", "started", ...}; WorkdirLockedError if it is not a lock this module wrote."""
  deadline = time.time() + READ_PATIENCE_S
  while True:
    try:
      text = _read(path)
      return _parse(text)
    except FileNotFoundError:
      raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
      if time.time() < deadline:
        time.sleep(0.05)
        continue
      raise WorkdirLockedError(
          f"{path}: the workdir lock is malformed ({e}); if no training run uses "
          f"{os.path.dirname(path)}, remove {path} and rerun."
      ) from e


def _read(path: str) -> str:
  if "://" in path:
    from etils import epath

    return epath.Path(path).read_text()
  with open(path) as f:
    return f.read()


def _describe(holder: Dict[str, Any]) -> str:
  return f"host {holder['host']}, pid {holder['pid']}, started {holder.get('started', '(unknown)')}"


def _refusal(workdir: str, path: str, holder: Dict[str, Any]) -> WorkdirLockedError:
  if holder["host"] != socket.gethostname():
    return WorkdirLockedError(
        f"{workdir} is locked by a training run on another host ({_describe(holder)}; lock {path}); this "
        f"host ({socket.gethostname()}) cannot check whether it still runs. Wait for it to finish, or train "
        f"in another --workdir; if that run is dead, remove {path} and rerun."
    )
  return WorkdirLockedError(
      f"{workdir} is in use by another training run ({_describe(holder)}; lock {path}); nothing was "
      f"changed. Wait for it to finish or stop it (kill {holder['pid']}: it saves and exits), or train in "
      f"another --workdir."
  )


# ---------------------------------------------------------------------------------------------- the lock


class WorkdirLock:
  """The lock of one workdir, held by this process; release() deletes it (idempotent)."""

  def __init__(self, workdir: str, content: str, created_dirs: List[str]):
    self.workdir, self.path, self.content = workdir, lock_path(workdir), content
    self._created_dirs = created_dirs  # removed again if the run wrote nothing else in them
    self.held = True

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    try:
      if _read(self.path) == self.content:  # never delete a lock that is not ours
        _remove(self.path)
    except OSError:
      pass
    for d in reversed(self._created_dirs):
      try:
        os.rmdir(d)  # only if empty: a run refused before its first write leaves no folder behind
      except OSError:
        break


def _remove(path: str) -> None:
  if "://" in path:
    from etils import epath

    epath.Path(path).unlink()
  else:
    os.unlink(path)


def _make_dirs(workdir: str) -> List[str]:
  """Creates the workdir (and missing parents); returns the folders it created, outermost first."""
  missing, p = [], os.path.abspath(workdir)
  while not os.path.lexists(p):
    missing.append(p)
    parent = os.path.dirname(p)
    if parent == p:
      break
    p = parent
  created = []
  for d in reversed(missing):
    try:
      os.mkdir(d)
    except FileExistsError:
      continue  # another process made it meanwhile
    except OSError as e:
      for c in reversed(created):
        with contextlib.suppress(OSError):
          os.rmdir(c)
      raise WorkdirError(f"--workdir={workdir}: cannot create {d} ({_reason(e)}); {WHAT_TO_DO}.") from e
    created.append(d)
  if not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir}: it exists and is not a folder; {WHAT_TO_DO}.")
  return created


def acquire(workdir: str) -> WorkdirLock:
  """Takes the workdir's lock (creating the workdir); WorkdirLockedError if another run holds it."""
  if "://" in workdir:
    return _acquire_bucket(workdir)
  created = _make_dirs(workdir)
  path = lock_path(workdir)
  try:
    for _ in range(10):  # each turn either takes the lock or removes a dead holder's
      content = _content()
      try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        pass
      except OSError as e:
        raise WorkdirError(f"--workdir={workdir}: cannot write {path} ({_reason(e)}); {WHAT_TO_DO}.") from e
      else:
        try:
          with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        except BaseException as e:  # e.g. a full disk: leave no empty lock behind
          with contextlib.suppress(OSError):
            os.unlink(path)
          if isinstance(e, OSError):
            raise WorkdirError(f"--workdir={workdir}: cannot write {path} ({_reason(e)}); {WHAT_TO_DO}.") from e
          raise
        return WorkdirLock(workdir, content, created)
      try:
        holder = read_holder(path)
      except FileNotFoundError:
        continue  # released meanwhile
      if holder["host"] != socket.gethostname() or _alive(holder["pid"], holder.get("pid_start")):
        raise _refusal(workdir, path, holder)
      _take_over(path, holder)
    raise WorkdirLockedError(f"{path}: could not take the workdir lock (other runs keep taking it); retry.")
  except BaseException:
    for d in reversed(created):
      with contextlib.suppress(OSError):
        os.rmdir(d)
    raise


def _take_over(path: str, holder: Dict[str, Any]) -> None:
  """Removes a dead holder's lock. Moved aside first and checked, so that of two runs taking over at once,
  the slower one does not delete the lock the faster one has just created."""
  aside = f"{path}.stale-{os.getpid()}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return
  try:
    mine = _parse(_read(aside))
  except (OSError, ValueError):
    mine = None
  if mine != holder:  # a live run's fresh lock: put it back
    os.rename(aside, path)
    return
  os.unlink(aside)
  print(
      f"WARNING: {path} was left by a run that is no longer running ({_describe(holder)}); taking it over.",
      flush=True,
  )


def _acquire_bucket(workdir: str) -> WorkdirLock:
  from etils import epath

  path = lock_path(workdir)
  lock = epath.Path(path)
  if lock.exists():
    holder = read_holder(path)
    if holder["host"] != socket.gethostname() or _alive(holder["pid"], holder.get("pid_start")):
      raise _refusal(workdir, path, holder)
    print(
        f"WARNING: {path} was left by a run that is no longer running ({_describe(holder)}); taking it over.",
        flush=True,
    )
  content = _content()
  try:
    lock.write_text(content)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir}: cannot write {path} ({_reason(e)}); {WHAT_TO_DO}.") from e
  return WorkdirLock(workdir, content, [])


# ---------------------------------------------------------------------------------------------- the run


def _all_processes(ok: bool) -> bool:
  """True only if `ok` holds on every process (a collective: every process must call it)."""
  import jax
  import numpy as np

  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  got = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
  return bool(np.all(np.asarray(got)))


@contextlib.contextmanager
def held(workdir: Optional[str]) -> Iterator[Optional[WorkdirLock]]:
  """The workdir's lock for the duration of a training run (None without a workdir, or off process 0).

  Every process must enter it: process 0 takes the lock, and all of them learn whether it did.
  """
  if workdir is None:
    yield None
    return
  import jax

  lock, failure = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except Exception as e:  # pylint: disable=broad-except
      failure = e
  try:
    if not _all_processes(failure is None):
      if failure is not None:
        raise failure
      raise WorkdirLockedError(f"process 0 could not take the lock of {workdir} (its error says why).")
    yield lock
  finally:
    if lock is not None:
      lock.release()


def check_writable(workdir: Optional[str]) -> None:
  """WorkdirError if the workdir cannot be a folder this user writes in; creates and writes nothing.

  A cheap early check (no JAX yet, so every process of a run fails at once): the lock's creation is the
  real test, since root passes permission checks that the file system then refuses (/proc, ...).
  """
  if not workdir or "://" in workdir:
    return
  path = p = os.path.abspath(workdir)
  while not os.path.lexists(p) and os.path.dirname(p) != p:
    p = os.path.dirname(p)
  if not os.path.isdir(p):
    what = "it" if p == path else p
    raise WorkdirError(
        f"--workdir={workdir}: {what} is a file, not a folder ({os.strerror(errno.ENOTDIR)}); {WHAT_TO_DO}."
    )
  if not os.access(p, os.W_OK | os.X_OK):
    read_only = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    reason = os.strerror(errno.EROFS if read_only else errno.EACCES)
    where = "write in it" if p == path else f"create it in {p}"
    raise WorkdirError(f"--workdir={workdir}: cannot {where} ({reason}); {WHAT_TO_DO}.")
