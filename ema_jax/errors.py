"""Errors that mean "the user asked for something that cannot work", as opposed to a bug.

train.py / eval.py print these as one line and exit non-zero without a traceback (unless --verbose).
Config validation raises plain ValueError (the house style since the first commit); the command-line
entry points treat ValueError, FileNotFoundError and UserError alike.
"""


class UserError(Exception):
  """A bad config, data file, checkpoint or mesh; the message names what was wrong and what would work."""


class ConfigMismatchError(UserError):
  """The workdir holds checkpoints of a run whose config differs in a field that matters on resume."""


class WorkdirError(UserError):
  """A --workdir that cannot be created or written; the message names the path and the OS's reason."""


class WorkdirLockedError(WorkdirError):
  """Another training run holds the workdir's lock (ema_jax/workdir_lock.py), or the lock is unreadable."""


class DataStateError(UserError, ValueError):
  """A saved data-iterator position that does not fit the dataset, tokenizer or process layout."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError)


def config_error(field: str, value, expected: str):
  """Raises the house-style config error: the field, its value, and what would work."""
  raise ValueError(f"config.{field}={value!r}: expected {expected}.")


def is_int(x) -> bool:
  """An integer config value (bools excluded)."""
  import numbers

  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def need_int(config, field: str, lo: int) -> None:
  """config.<field> must be an integer >= lo (field may be dotted)."""
  value = config
  for part in field.split("."):
    value = value.get(part) if hasattr(value, "get") else None
  if not is_int(value) or value < lo:
    config_error(field, value, f"an integer >= {lo}")


def root_os_error(e: BaseException):
  """The OSError (with an errno) at the root of a library exception, if any: orbax and tensorstore wrap
  them in their own."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e
    e = e.__cause__ or e.__context__
  return None


def is_disk_full(e: BaseException) -> bool:
  """A full disk or an exhausted quota, however deep a library wrapped it."""
  import errno

  os_error = root_os_error(e)
  return (os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(
      e
  )
