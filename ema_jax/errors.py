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
