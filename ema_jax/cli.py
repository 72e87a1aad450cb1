"""The command line shared by train.py and eval.py: quiet logs, one-line user errors, required flags.

- Quiet by default: absl's app.run turns INFO logging on, and orbax then logs ~100 INFO lines per
  checkpoint (some over 2 KB) and JAX one about a missing TPU backend. --verbose turns them back on.
- A user error (errors.USER_ERRORS, a bad flag, an unknown or ill-typed --config.a.b override, a config
  file that does not load, or raises or has a syntax error: then with its file:line) prints
  `error: <message>` on stderr and exits with status 2, without a traceback unless --verbose.
- --help, --helpshort, --helpfull exit 0 (absl's exit 1).
- When orbax fails to read one array of a checkpoint, its run_sync closes its per-call event loop while
  the other reads of the same asyncio.gather are still in flight; as each of them completes, tensorstore
  calls loop.call_soon_threadsafe on the closed loop from its own thread and reports the RuntimeError
  ("Event loop is closed", dozens of tracebacks) through sys.unraisablehook. Only that message is
  dropped: it says nothing the failed restore (a CorruptCheckpointError) does not. For the same reason,
  the other reads' own failures on the same damaged files are dropped: asyncio's "Task exception was
  never retrieved" log record and the "Exception ignored in <coroutine ...>" unraisable of an abandoned
  orbax read coroutine (whether they appear at all depends on thread timing).

This module imports no JAX, so `--help` and flag errors stay fast.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import threading
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_dict
from ml_collections.config_flags.config_flags import is_config_flag

from ema_jax import errors

USER_ERROR_STATUS = 2
# Python loggers of the libraries we use; absl's handler on the root logger prints them all.
LIBRARY_LOGGERS = (
    "absl",
    "jax",
    "jaxlib",
    "orbax",
    "etils",
    "flax",
    "tensorstore",
    "tensorflow",
    "ml_collections",
    "matplotlib",
    "PIL",
    "urllib3",
    "google",
)

VERBOSE = flags.DEFINE_bool("verbose", False, "Library INFO logs, and tracebacks with error messages.")

FLAGS = flags.FLAGS


def run(main: Callable[[Sequence[str]], Any], required: Sequence[str] = ()) -> None:
  """app.run(main) with this module's flag parsing, logging and error handling."""
  sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
  logging.getLogger("asyncio").addFilter(_drop_orphaned_read_errors)
  logging.getLogger("absl").addFilter(_drop_orphaned_read_errors)  # orbax's threads log through absl
  logging.getLogger("absl").addFilter(_drop_disk_full_noise)
  threading.excepthook = _drop_disk_full_thread_errors(threading.excepthook)
  FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS["verbose"])  # listed by --helpshort
  app.run(_guarded(main), flags_parser=lambda argv: _parse(argv, required))


def fail(message: str, verbose: bool = False, usage: bool = False) -> NoReturn:
  """Prints `error: message` (with the traceback being handled if verbose) and exits with status 2."""
  sys.stdout.flush()
  if verbose and sys.exc_info()[0] is not None:
    traceback.print_exc()
  if usage:
    sys.stderr.write(_usage())
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(USER_ERROR_STATUS)


MAX_MESSAGE = 1500  # characters of a library's message kept in the one-line error (--verbose has it all)


def one_line(message: str) -> str:
  """A message's lines joined into one, with '; ' where a line ends without punctuation.

  Some library errors (tensorstore through orbax) embed a whole traceback and spec dump in their text:
  that part is cut, as is anything past MAX_MESSAGE characters.
  """
  text = str(message).strip()
  cut = text.find("Traceback (most recent call last)")
  if cut > 0:
    text = text[:cut].rstrip() + " [details: rerun with --verbose]"
  out = ""
  for line in (l.strip() for l in text.splitlines()):
    if line:
      out += ("" if not out else " " if out[-1] in ".:;,(" else "; ") + line
  if len(out) > MAX_MESSAGE:
    out = out[:MAX_MESSAGE] + " ... [rerun with --verbose for the rest]"
  return out


# ------------------------------------------------------------------------------------------ logging


def quiet_logs(verbose: bool) -> None:
  """Library logs at WARNING (INFO with --verbose), unless --verbosity/--logger_levels were given."""
  if FLAGS["verbosity"].present or FLAGS["logger_levels"].present:
    return
  if verbose:
    absl_logging.set_verbosity(absl_logging.INFO)
    return
  absl_logging.set_verbosity(absl_logging.WARNING)  # the root logger, which absl's handler serves
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)


# orbax's coroutines that read one array of a checkpoint: when one read fails, the others are abandoned and
# their own (same) failure is reported as unraisable or as an unretrieved task exception.
_ORBAX_READS = ("async_deserialize", "_read_array_index_and_device_put", "_read_and_create_array")


_READ_FAILED = "Encountered error while reading array index"  # orbax's wrapper of a failed shard read


def _from_orbax_read(exc: Optional[BaseException]) -> bool:
  """Whether an exception (or one it was raised from) is an orbax array read's failure: a frame of its
  traceback is one of _ORBAX_READS, or its text is orbax's read-failure message."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if str(exc).startswith(_READ_FAILED):
      return True
    tb = exc.__traceback__
    while tb is not None:
      if tb.tb_frame.f_code.co_name in _ORBAX_READS:
        return True
      tb = tb.tb_next
    exc = exc.__cause__ or exc.__context__
  return False


def _drop_orphaned_read_errors(record: logging.LogRecord) -> bool:
  """asyncio logging filter: False (drop) for an orbax array read's failure that no one awaited.

  The read that failed first reaches the restore call (a CorruptCheckpointError, one line); the reads of
  the same checkpoint abandoned with it are reported by asyncio as "Task exception was never retrieved",
  "Future exception was never retrieved" or "unhandled exception during shutdown", depending on when they
  finish and are collected (often during the exit that follows the one-line error).
  """
  text = record.getMessage()
  if text.startswith("Task exception was never retrieved") and any(n in text for n in _ORBAX_READS):
    return False
  return not _from_orbax_read(record.exc_info[1] if record.exc_info else None)


def _drop_disk_full_noise(record: logging.LogRecord) -> bool:
  """absl logging filter: False (drop) for orbax's reports of a full disk and of its background threads
  stopped by the exit that follows; the trainer reports the full disk in one line (unless --verbose)."""
  if VERBOSE.present and VERBOSE.value:
    return True
  exc = record.exc_info[1] if record.exc_info else None
  text = record.getMessage()
  return not (
      (exc is not None and errors.is_disk_full(exc))
      or "No space left on device" in text
      or "cannot schedule new futures after interpreter shutdown" in text
  )


def _drop_disk_full_thread_errors(previous):
  def hook(args):
    if args.exc_value is not None and errors.is_disk_full(args.exc_value) and not VERBOSE.value:
      return  # a library's writer thread (TensorBoard, orbax): the main thread reports the full disk
    if _from_orbax_read(args.exc_value) and not (FLAGS.is_parsed() and VERBOSE.value):
      return  # a checkpoint read in orbax's thread: the restore call reports the damaged checkpoint
    previous(args)

  return hook


def _exit_now(message: str, verbose: bool) -> NoReturn:
  """fail(), but without running exit handlers or waiting for library threads."""
  sys.stdout.flush()
  if verbose:
    traceback.print_exc()
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  os._exit(USER_ERROR_STATUS)  # pylint: disable=protected-access


def _drop_closed_loop_noise(previous):
  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    if getattr(getattr(unraisable, "object", None), "__name__", None) in _ORBAX_READS:  # an abandoned read
      return
    if _from_orbax_read(exc):
      return
    previous(unraisable)

  return hook


# ------------------------------------------------------------------------------------------- flags


def _verbose_in(argv: Sequence[str]) -> bool:
  """--verbose as given on the command line (for errors raised before or while flags are parsed)."""
  verbose = False
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in ("--verbose", "-verbose") or arg.lower() in ("--verbose=true", "--verbose=1"):
      verbose = True
    elif arg in ("--noverbose", "-noverbose") or arg.lower() in ("--verbose=false", "--verbose=0"):
      verbose = False
  return verbose


def _usage() -> str:
  doc = (sys.modules["__main__"].__doc__ or "").strip()
  return (doc + "\n\n" if doc else "") + "Flags: --helpshort (this program's) or --helpfull (all).\n\n"


HELP_FLAGS = ("help", "?", "helpshort", "helpfull", "helpxml")


def _asks_for_help(argv: Sequence[str]) -> bool:
  for arg in argv[1:]:
    if arg == "--":
      break
    name, _, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in HELP_FLAGS and value.lower() not in ("false", "0"):
      return True
  return False


def _parse(argv: Sequence[str], required: Sequence[str]):
  verbose = _verbose_in(argv)
  try:
    rest = FLAGS(argv)
  except SystemExit as e:
    if e.code == 1 and _asks_for_help(argv):
      raise SystemExit(0) from None  # the help was asked for and printed: a success
    raise
  except Exception as e:  # pylint: disable=broad-except
    message = _config_failure_message(argv, e) or _flag_failure_message(argv, e)
    if message is None:
      raise  # not the user's doing: a bug, with its traceback
    fail(message, verbose)
  for name in required:
    if FLAGS[name].present and FLAGS[name].value is None and is_config_flag(FLAGS[name]):
      fail(f"--{name}={FLAGS[name].config_filename}: get_config() returned None (no return statement?).", verbose)
  missing = [f"--{name}" for name in required if FLAGS[name].value is None]
  if missing:
    fail(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required.", verbose, usage=True)
  if len(rest) > 1:
    fail(f"unexpected argument(s) {' '.join(rest[1:])!r}: every setting is a --flag.", verbose, usage=True)
  for name, flag in FLAGS._flags().items():  # pylint: disable=protected-access
    if is_config_flag(flag) and flag.value is not None and name == flag.name:
      try:
        flag.value.keys()  # a config file that failed to load raises here (ml_collections defers it)
      except OSError as e:
        fail(_config_failure_message(argv, e) or _config_load_message(name, flag.config_filename, e), verbose)
      except AttributeError:
        value = flag.value
        fail(
            f"--{name}={flag.config_filename}: get_config() returned {value!r} ({type(value).__name__}), "
            "not an ml_collections.ConfigDict.",
            verbose,
        )
  return rest


def _flag_failure_message(argv: Sequence[str], e: Exception) -> Optional[str]:
  """The one-line message for an exception of flag parsing, or None where it is not the user's doing."""
  if isinstance(e, flags.Error):
    return _unknown_override_message(argv) or _flag_error_message(e)
  if isinstance(e, (AttributeError, KeyError)):
    # ml_collections reports an override of a field that the config lacks as a bare AttributeError.
    return _unknown_override_message(argv) or f"{type(e).__name__}: {e}"
  if isinstance(e, OSError):  # a missing config file, reported once an override touches the config
    return _config_load_failure(argv, e) or str(e)
  if isinstance(e, errors.USER_ERRORS):
    return str(e)
  return None


def _flag_error_message(e: flags.Error) -> str:
  text = str(e)
  if text.startswith("flag --"):
    text = text[len("flag ") :]
  if "Error whilst parsing config file" in text:
    # ml_collections packs the config file's whole traceback into the message: keep its last line.
    head = text.split(": Error whilst parsing config file", 1)[0]
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    return f"{head}: {_strip_exception_name(last)}"
  flag_name = text[2:].split("=", 1)[0] if text.startswith("--") else ""
  if flag_name in FLAGS and flag_name.split(".", 1)[0] != flag_name:
    expected = FLAGS[flag_name].flag_type()
    return f"{text.split(':', 1)[0]}: expected {expected} ({text.split(':', 1)[1].strip()})"
  return text


def _strip_exception_name(line: str) -> str:
  name, sep, rest = line.partition(": ")
  return rest if sep and name.replace(".", "").replace("_", "").isalnum() and " " not in name else line


def _config_overrides(argv: Sequence[str]):
  """(config flag name, dotted field, the argument) for each --NAME.a.b[=v] of a config flag."""
  config_names = {
      name for name, flag in FLAGS._flags().items() if is_config_flag(flag)  # pylint: disable=protected-access
  }
  for arg in argv[1:]:
    if arg == "--":
      break
    body = arg.lstrip("-").split("=", 1)[0]
    name, dot, field = body.partition(".")
    if arg.startswith("-") and dot and name in config_names:
      yield name, field, arg


def _config_file_arg(argv: Sequence[str], name: str) -> Optional[str]:
  value = None
  for i, arg in enumerate(argv[1:], 1):
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        value = arg[len(prefix) :]
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      value = argv[i + 1]
  return value if value is not None else FLAGS[name].default_as_str


def _unknown_override_message(argv: Sequence[str]) -> Optional[str]:
  for name, field, arg in _config_overrides(argv):
    path = _config_file_arg(argv, name)
    try:
      config = FLAGS[name].parser.parse(path) if path else None  # loads the config file again
    except Exception:  # pylint: disable=broad-except
      return None
    if not isinstance(config, (config_dict.ConfigDict, dict)):
      return None
    problem = missing_field(config, field, root=name)
    if problem:
      return f"{arg}: {problem}"
  return None


def missing_field(config: Any, dotted: str, root: str = "config") -> Optional[str]:
  """Why `root.dotted` names no field of `config` (with the closest names), or None if it does."""
  node, seen = config, [root]
  for part in dotted.split("."):
    if not isinstance(node, (config_dict.ConfigDict, dict)):
      return f"{'.'.join(seen)} holds the value {node!r}, not a group of fields."
    keys = sorted(str(k) for k in node.keys())
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      return f"{'.'.join(seen)} has no field {part!r}{hint}; its fields: {', '.join(keys)}."
    node = node[part]
    seen.append(part)
  return None


def _config_load_failure(argv: Sequence[str], e: OSError) -> Optional[str]:
  for name, flag in FLAGS._flags().items():  # pylint: disable=protected-access
    if is_config_flag(flag) and name == flag.name and "Configuration is not available" in str(e):
      return _config_load_message(name, _config_file_arg(argv, name), e)
  return None


def _config_files(argv: Sequence[str]):
  """(config flag name, its argument) for each config flag that names a file."""
  for name, flag in FLAGS._flags().items():  # pylint: disable=protected-access
    if is_config_flag(flag) and name == flag.name:
      path = _config_file_arg(argv, name)
      if path:
        yield name, path


def _same_file(a: Optional[str], b: str) -> bool:
  return bool(a) and os.path.realpath(a) == os.path.realpath(b)


def _exception_chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _config_failure_message(argv: Sequence[str], e: BaseException) -> Optional[str]:
  """For an exception raised by a config file's own code (at import or in get_config, possibly wrapped by
  ml_collections or absl): the message with the file:line where it failed; else None."""
  for name, path in _config_files(argv):
    file = path.split(":", 1)[0]
    for exc in _exception_chain(e):
      if isinstance(exc, SyntaxError) and _same_file(exc.filename, file):
        code = f" ({exc.text.strip()})" if exc.text and exc.text.strip() else ""
        return f"--{name}={path}: syntax error at {exc.filename}:{exc.lineno}: {exc.msg}{code}."
      frames = traceback.extract_tb(exc.__traceback__)
      mine = [f for f in frames if _same_file(f.filename, file)]
      if mine:
        where = f"{mine[-1].filename}:{mine[-1].lineno} (in {mine[-1].name})"
        inner = frames[-1]
        if inner is not mine[-1]:
          where += f", raised at {inner.filename}:{inner.lineno}"
        return f"--{name}={path}: the config file failed at {where}: {type(exc).__name__}: {exc}"
  return None


def _config_load_message(name: str, path: Optional[str], e: OSError) -> str:
  file = (path or "").split(":", 1)[0]
  if file and not os.path.isfile(file):
    return f"--{name}={path}: no such config file (working directory {os.getcwd()})."
  cause = e.__cause__ or e
  return f"--{name}={path}: the config file could not be loaded ({one_line(str(cause))})."


# -------------------------------------------------------------------------------------------- main


def _guarded(main: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
  def wrapped(argv):
    quiet_logs(VERBOSE.value)
    try:
      return main(argv)
    except errors.USER_ERRORS as e:
      if getattr(e, "exit_now", False):
        _exit_now(str(e), VERBOSE.value)
      fail(str(e), VERBOSE.value)

  return wrapped
