"""train.py and eval.py as a user meets them: quiet output, one-line errors (status 2), required flags,
SIGTERM during start-up, and eval.py writing beside (never over) the training run's results.

Each test starts the real scripts in subprocesses, with a tiny set-complement run (4 steps, N = 16).
"""

import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

from ema_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config",
    os.path.join(REPO, "configs/set_complement.py"),
    "--config.steps=4",
    "--config.batch_size=8",
    "--config.optim.warmup_steps=1",
    "--config.log_every=2",
    "--config.eval_every=0",
    "--config.checkpoint_every=4",
    "--config.task.num_tokens=16",
    "--config.task.train_max_size=4",
    "--config.task.eval_examples=8",
    "--config.model.embed_dim=16",
    "--config.model.value_dim=16",
]
LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # absl's log line prefix


def script(name, *args, cwd=REPO, timeout=1800):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.run(
      [sys.executable, os.path.join(REPO, name), *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def assert_one_line_error(proc, *fragments):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """(workdir, the train.py process) of a finished tiny run."""
  wd = str(tmp_path_factory.mktemp("cli") / "run")
  proc = script("train.py", *TINY, "--workdir", wd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return wd, proc


# -------------------------------------------------------------------------------------------- train.py


def test_train_without_config_and_workdir_prints_usage(tmp_path):
  proc = script("train.py", cwd=str(tmp_path))
  assert proc.returncode != 0
  assert "python train.py --config" in proc.stderr and "--workdir" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert os.listdir(tmp_path) == []  # no default workdir, nothing trained
  proc = script("train.py", "--config", os.path.join(REPO, "configs/set_complement.py"), cwd=str(tmp_path))
  assert_one_line_error(proc, "--workdir")
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("--config.batch_size=0", ("config.batch_size=0",)),  # config validation (ValueError)
        ("--config.model.widht=3", ("config.model", "'widht'")),  # a field the config lacks
        ("--config.optim.lrr=0.1", ("'lrr'", "did you mean 'lr'")),
        ("--config.steps=abc", ("--config.steps=abc", "int")),  # a value of the wrong type
    ],
)
def test_bad_config_is_one_line_without_traceback(tmp_path, override, fragments):
  wd = str(tmp_path / "wd")
  assert_one_line_error(script("train.py", *TINY, override, "--workdir", wd), *fragments)
  assert not os.path.exists(wd)


def test_verbose_adds_the_traceback(tmp_path):
  proc = script("train.py", *TINY, "--config.batch_size=0", "--workdir", str(tmp_path / "wd"), "--verbose")
  assert proc.returncode == 2
  assert "Traceback" in proc.stderr and proc.stderr.rstrip().splitlines()[-1].startswith("error: config.batch")


def test_missing_data_file_is_one_line(tmp_path):
  proc = script(
      "train.py",
      "--config",
      os.path.join(REPO, "configs/ema_lm.py:wiki_tiny"),
      "--config.data.path=/nonexistent/train.txt",
      "--workdir",
      str(tmp_path / "wd"),
  )
  assert_one_line_error(proc, "config.data.path", "/nonexistent/train.txt")


def test_missing_config_file_is_one_line(tmp_path):
  proc = script("train.py", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "wd"))
  assert_one_line_error(proc, "nope.py")


@pytest.mark.slow
def test_normal_run_is_quiet(finished):
  _, proc = finished
  out = proc.stdout + proc.stderr
  assert "set complement, step 4" in proc.stdout
  assert not [line for line in out.splitlines() if LOG_LINE.match(line)], proc.stderr[:3000]
  assert "Unable to initialize backend" not in out and "orbax" not in out.lower()
  assert "Traceback" not in out and "Event loop is closed" not in out


@pytest.mark.slow
def test_sigterm_during_start_up_exits_0(tmp_path):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "train.py"), *TINY, "--workdir", str(tmp_path / "wd")],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  time.sleep(1.5)  # inside the imports (JAX alone takes longer); any later point must exit 0 too
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=1800)
  assert proc.returncode == 0, (proc.returncode, err[-3000:])
  assert "Traceback" not in out + err


# --------------------------------------------------------------------------------------------- eval.py


def _snapshot(wd):
  plots = os.path.join(wd, "plots")
  files = [os.path.join(wd, "eval_4.json")] + [os.path.join(plots, p) for p in os.listdir(plots)]
  return {f: (open(f, "rb").read(), os.stat(f).st_mtime_ns) for f in files}


@pytest.mark.slow
def test_eval_writes_beside_the_run_never_over_it(finished):
  wd, _ = finished
  before = _snapshot(wd)
  assert len(before) > 1  # the run's own plots exist
  proc = script("eval.py", "--workdir", wd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == "" and "set complement, step 4" in proc.stdout
  assert proc.stdout.index("set complement") < proc.stdout.index("wrote ")  # the table first
  assert _snapshot(wd) == before
  with open(os.path.join(wd, "eval_4.json")) as f:
    in_loop = json.load(f)
  with open(os.path.join(wd, "eval", "eval_4.json")) as f:
    again = json.load(f)
  assert again["results"] == in_loop["results"] and again["table"] == in_loop["table"]
  eval_plots = [p for p in glob.glob(os.path.join(wd, "eval", "eval_*", "plots"))]
  assert len(eval_plots) == 1, eval_plots
  assert sorted(os.listdir(eval_plots[0])) == sorted(os.listdir(os.path.join(wd, "plots")))
  # A subset gets its own file and leaves the full evaluation's alone.
  full = open(os.path.join(wd, "eval", "eval_4.json"), "rb").read()
  proc = script("eval.py", "--workdir", wd, "--weights", "raw", "--lengths", "2,8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(os.path.join(wd, "eval", "eval_4_raw_2-8.json"))
  assert open(os.path.join(wd, "eval", "eval_4.json"), "rb").read() == full
  # ... and its plots a folder of their own: the full evaluation's plots are still all there.
  assert os.listdir(os.path.join(wd, "eval", "eval_4_raw_2-8", "plots"))
  assert sorted(os.listdir(os.path.join(wd, "eval", "eval_4", "plots"))) == sorted(
      os.listdir(os.path.join(wd, "plots"))
  )
  assert _snapshot(wd) == before


@pytest.mark.slow
def test_eval_prints_the_table_when_it_cannot_write(finished, tmp_path):
  wd, _ = finished
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  out_dir = str(blocker / "eval")  # under a regular file: unwritable even for root
  proc = script("eval.py", "--workdir", wd, "--output_dir", out_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "set complement, step 4" in proc.stdout
  warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and out_dir in warnings[0] and "--output_dir" in warnings[0], proc.stderr
  assert "Traceback" not in proc.stderr


def test_eval_errors_list_the_steps(finished, tmp_path):
  wd, _ = finished
  assert_one_line_error(script("eval.py", "--workdir", wd, "--step", "3"), "--step=3", "available steps: 4")
  assert_one_line_error(script("eval.py", "--workdir", str(tmp_path)), "no checkpoints")
  assert os.listdir(tmp_path) == []  # nothing created in a workdir without checkpoints
  proc = script("eval.py")
  assert proc.returncode == 2 and "--workdir" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_of_a_corrupt_checkpoint_is_one_line(finished, tmp_path):
  wd, _ = finished
  bad = str(tmp_path / "bad")
  shutil.copytree(wd, bad)
  data = os.path.join(bad, "checkpoints", "4", "state", "ocdbt.process_0", "d")
  for name in os.listdir(data):
    os.truncate(os.path.join(data, name), 10)
  assert_one_line_error(script("eval.py", "--workdir", bad), "checkpoint")


# ------------------------------------------------------------------------------------------ in-process


def test_only_closed_event_loop_noise_is_dropped():
  seen = []
  hook = cli._drop_closed_loop_noise(seen.append)
  hook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed")))
  assert seen == []
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
  hook(other)
  assert seen == [other]


def test_only_orphaned_checkpoint_read_errors_are_dropped():
  def record(msg):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

  orphan = "Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize() done>>"
  assert cli._drop_orphaned_read_errors(record(orphan)) is False
  assert cli._drop_orphaned_read_errors(record("Task exception was never retrieved\nfuture: <Task coro=<f()>>"))
  assert cli._drop_orphaned_read_errors(record("something else in async_deserialize"))
  seen = []
  hook = cli._drop_closed_loop_noise(seen.append)

  async def _read_array_index_and_device_put():
    pass

  coro = _read_array_index_and_device_put()
  hook(types.SimpleNamespace(exc_value=Exception("reading array index"), object=coro))
  coro.close()
  assert seen == []


def _raised(fn):
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    return e
  raise AssertionError("no exception")


def test_abandoned_reads_are_dropped_whatever_asyncio_calls_them():
  """An orbax read's failure, as an unretrieved Future (not Task) or a shutdown report, is recognised by
  the exception's own traceback (CI once printed such a Future's traceback after the one-line error)."""

  def _read_array_index_and_device_put():
    raise ValueError("OUT_OF_RANGE: Error reading params.embed")

  def wrapped():
    try:
      _read_array_index_and_device_put()
    except ValueError as e:
      raise Exception("Encountered error while reading array index: (slice(0, 17, 1),)") from e

  def unrelated():
    raise ValueError("OUT_OF_RANGE somewhere else")

  def record(msg, exc):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, (type(exc), exc, exc.__traceback__))

  read = _raised(wrapped)
  inner = _raised(_read_array_index_and_device_put)
  other = _raised(unrelated)
  future = "Future exception was never retrieved\nfuture: <Future finished exception=Exception('...')>"
  shutdown = "unhandled exception during asyncio.run() shutdown\ntask: <Task finished coro=<gather()>>"
  assert cli._drop_orphaned_read_errors(record(future, read)) is False
  assert cli._drop_orphaned_read_errors(record(shutdown, inner)) is False
  assert cli._drop_orphaned_read_errors(record(future, other)) is True
  seen = []
  hook = cli._drop_closed_loop_noise(seen.append)
  hook(types.SimpleNamespace(exc_value=read, object=None))
  assert seen == []
  kept = types.SimpleNamespace(exc_value=other, object=None)
  hook(kept)
  assert seen == [kept]
  thread_seen = []
  thread_hook = cli._drop_disk_full_thread_errors(thread_seen.append)
  thread_hook(types.SimpleNamespace(exc_value=read))
  thread_hook(kept)
  assert thread_seen == [kept]


def test_missing_field_names_the_closest():
  import ml_collections

  c = ml_collections.ConfigDict(dict(model=dict(width=3, depth=2), steps=1))
  assert cli.missing_field(c, "model.width") is None
  assert "did you mean 'width'" in cli.missing_field(c, "model.widht")
  assert "config.steps holds the value 1" in cli.missing_field(c, "steps.x")


# ------------------------------------------------------------------------------- workdirs, config files


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_workdir_is_one_line(tmp_path, where):
  blocker = tmp_path / "afile"
  blocker.write_text("")
  # Tests run as root, which passes permission checks: a path under a regular file, and /proc (where
  # even root cannot create a folder), fail for everyone.
  wd = str(blocker / "wd") if where == "under_a_file" else "/proc/ema_jax_wd"
  reason = "Not a directory" if where == "under_a_file" else "No such file or directory"
  line = assert_one_line_error(script("train.py", *TINY, "--workdir", wd), f"--workdir={wd}", reason)
  assert "choose a --workdir" in line
  assert os.listdir(tmp_path) == ["afile"] and blocker.read_text() == ""
  assert not os.path.exists("/proc/ema_jax_wd")


def _read_only_bind(path):
  """argv prefix that runs a command with `path` bind-mounted read-only in a private mount namespace
  (root-proof: the kernel refuses writes even to root), or None where this system does not allow it."""
  prefix = ["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', path]
  try:
    probe = subprocess.run(prefix + ["touch", os.path.join(path, "probe")], capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return prefix if probe.returncode != 0 and b"Read-only file system" in probe.stderr else None


def test_read_only_workdir_is_one_line(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  prefix = _read_only_bind(str(wd))
  if prefix is None:
    pytest.skip("no read-only bind mounts here (unshare -rm)")
  for target, fragment in ((wd, "cannot write in it"), (wd / "sub", f"cannot create it in {wd}")):
    proc = subprocess.run(
        prefix + [sys.executable, os.path.join(REPO, "train.py"), *TINY, "--workdir", str(target)],
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert_one_line_error(proc, fragment, "Read-only file system")
  assert os.listdir(wd) == []


@pytest.mark.parametrize(
    "source,line,fragment",
    [
        (
            "def get_config(arg=None):\n  x = 1\n  raise RuntimeError('no such preset')\n",
            3,
            "RuntimeError: no such preset",
        ),
        ("import ml_collections\nraise KeyError('at import')\n", 2, "KeyError: 'at import'"),
        ("import ml_collections\n\ndef get_config(:\n  pass\n", 3, "syntax error"),
        ("import no_such_module_for_ema_jax\n", 1, "No module named 'no_such_module_for_ema_jax'"),
        ("def get_config(arg=None):\n  return int('x')\n", 2, "ValueError"),
    ],
    ids=["get_config_raises", "import_raises", "syntax_error", "missing_import", "value_error"],
)
def test_config_file_failure_is_one_line_with_its_line(tmp_path, source, line, fragment):
  config = tmp_path / "bad_config.py"
  config.write_text(source)
  wd = tmp_path / "wd"
  proc = script("train.py", "--config", str(config), "--config.steps=3", "--workdir", str(wd))
  assert_one_line_error(proc, f"--config={config}", f"{config}:{line}", fragment)
  assert not wd.exists()


def test_config_without_a_config_dict_is_one_line(tmp_path):
  config = tmp_path / "not_a_config.py"
  config.write_text("def get_config(arg=None):\n  return 3\n")
  proc = script("train.py", "--config", str(config), "--workdir", str(tmp_path / "wd"))
  assert_one_line_error(proc, "get_config() returned 3")


@pytest.mark.parametrize("name", ["train.py", "eval.py", "generate.py"])
def test_help_exits_0(name):
  for flag in ("--help", "--helpfull"):
    proc = script(name, flag)
    assert proc.returncode == 0, (flag, proc.returncode, proc.stderr[-2000:])
    assert "--workdir" in proc.stdout and "Traceback" not in proc.stderr
