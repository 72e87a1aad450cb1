"""Benchmarks of the codebase, each a module run from the repository root as `python -m benchmarks.<name>`:
each prints a table and writes JSON. Speed goals are checked here, never by timed asserts in tests."""

import shlex
import sys


def command_line(module: str, argv=None) -> str:
  """The command that reruns this benchmark, `python -m <module> <arguments>` (argv: the arguments, default
  sys.argv[1:]), as the results files record it."""
  args = sys.argv[1:] if argv is None else list(argv)
  return " ".join(["python", "-m", module] + [shlex.quote(a) for a in args])


def rerun_argv(module: str) -> list:
  """argv that re-executes the running benchmark module with the same arguments (for os.execve)."""
  return [sys.executable, "-m", module] + sys.argv[1:]
