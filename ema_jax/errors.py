"""Errors that mean "the user asked for something that cannot work", as opposed to a bug.

train.py / eval.py print these as one line and exit non-zero without a traceback (unless --verbose).
Config validation raises plain ValueError (the house style since the first commit); the command-line
entry points treat ValueError, FileNotFoundError and UserError alike.
"""


class UserError(Exception):
  """A bad config, data file, checkpoint or mesh; the message names what was wrong and what would work."""


class ConfigMismatchError(UserError):
  """The workdir holds checkpoints of a run whose config differs in a field that matters on resume."""


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
