"""One writer per workdir (ema_jax/workdir_lock.py): the lock module in-process, then real train.py runs.

A second train.py on a workdir in use is refused (exit 2, one error line naming the holder) and changes
no file; the first then finishes with no duplicated metrics. A lock of a dead process of this host is
taken over with one WARNING line; one from another host, or a malformed one, is refused by name.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import fault_configs as fc
from experiments import fault_drill
from ema_jax import errors, workdir_lock

REPO = fc.REPO
CFG = os.path.join(REPO, "configs/set_complement.py")
# The fault tests' tiny set-complement run, 4 steps: start-up dominates (~10 s on 2 cores).
SHORT = dict(fc.SET_COMPLEMENT, steps=4, checkpoint_every=4, eval_every=0, log_every=2, **{"optim.warmup_steps": 1})
snapshot = fault_drill.snapshot


def dead_pid() -> int:
  """The pid of a process of this host that has exited and been reaped."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  path = workdir_lock.lock_path(str(workdir))
  with open(path, "w") as f:
    json.dump(dict(dict(host=socket.gethostname(), started="2026-01-01 00:00:00 UTC"), **holder), f)
  return path


def train_cmd(workdir, **overrides):
  return [sys.executable, os.path.join(REPO, "train.py"), f"--config={CFG}", f"--workdir={workdir}"] + fc.flags(
      **overrides
  )


def run_train(workdir, **overrides):
  return subprocess.run(
      train_cmd(workdir, **overrides), cwd=REPO, env=fault_drill._env(), capture_output=True, text=True, timeout=1800
  )


def one_error(proc):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return lines[0]


# ---------------------------------------------------------------------------------------------- in-process


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
  wd = str(tmp_path / "new" / "wd")
  lock = workdir_lock.acquire(wd)
  with open(lock.path) as f:
    holder = json.load(f)
  assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["started"]
  lock.release()
  lock.release()  # idempotent
  assert not os.path.exists(lock.path)
  assert os.listdir(tmp_path) == []  # the folders it created held nothing else: removed again


def test_a_live_holder_is_refused_and_nothing_changes(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    path = write_lock(tmp_path, pid=sleeper.pid)
    before = snapshot(str(tmp_path))
    with pytest.raises(errors.WorkdirLockedError) as info:
      workdir_lock.acquire(str(tmp_path))
    message = str(info.value)
    assert f"pid {sleeper.pid}" in message and socket.gethostname() in message and path in message
    assert "2026-01-01" in message and "another --workdir" in message
    assert snapshot(str(tmp_path)) == before
  finally:
    sleeper.kill()
    sleeper.wait()


def test_another_users_process_counts_as_alive(tmp_path, monkeypatch):
  def kill(pid, sig):
    raise PermissionError(1, "Operation not permitted")

  path = write_lock(tmp_path, pid=dead_pid())
  monkeypatch.setattr(workdir_lock.os, "kill", kill)
  monkeypatch.setattr(workdir_lock, "_proc_stat", lambda pid: None)
  with pytest.raises(errors.WorkdirLockedError, match="in use by another training run"):
    workdir_lock.acquire(str(tmp_path))
  assert os.path.exists(path)


def test_another_hosts_lock_is_refused_with_how_to_remove_it(tmp_path):
  path = write_lock(tmp_path, host="some-other-host", pid=dead_pid())
  before = snapshot(str(tmp_path))
  with pytest.raises(errors.WorkdirLockedError) as info:
    workdir_lock.acquire(str(tmp_path))
  message = str(info.value)
  assert "some-other-host" in message and "cannot check" in message and f"remove {path}" in message
  assert snapshot(str(tmp_path)) == before


@pytest.mark.parametrize("text", ["", "not json {", "[1, 2]", '{"host": "h"}', '{"host": "h", "pid": 0}'])
def test_malformed_lock_is_refused_naming_the_file(tmp_path, monkeypatch, text):
  monkeypatch.setattr(workdir_lock, "READ_PATIENCE_S", 0.1)
  path = workdir_lock.lock_path(str(tmp_path))
  with open(path, "w") as f:
    f.write(text)
  with pytest.raises(errors.WorkdirLockedError) as info:
    workdir_lock.acquire(str(tmp_path))
  assert f"{path}: the workdir lock is malformed" in str(info.value) and f"remove {path}" in str(info.value)
  assert open(path).read() == text


def test_dead_holder_of_this_host_is_taken_over(tmp_path, capsys):
  pid = dead_pid()
  path = write_lock(tmp_path, pid=pid)
  lock = workdir_lock.acquire(str(tmp_path))
  warnings = [l for l in capsys.readouterr().out.splitlines() if l.startswith("WARNING:")]
  assert len(warnings) == 1 and f"pid {pid}" in warnings[0] and path in warnings[0]
  assert json.load(open(path))["pid"] == os.getpid()
  lock.release()
  assert os.listdir(tmp_path) == []


def test_zombie_and_reused_pids_are_dead(tmp_path, capsys):
  zombie = subprocess.Popen([sys.executable, "-c", "pass"])
  deadline = time.time() + 30
  while workdir_lock._proc_stat(zombie.pid) and workdir_lock._proc_stat(zombie.pid)[0] != "Z":
    assert time.time() < deadline
    time.sleep(0.05)
  try:
    write_lock(tmp_path, pid=zombie.pid)  # exited, not reaped: os.kill(pid, 0) still succeeds
    workdir_lock.acquire(str(tmp_path)).release()
  finally:
    zombie.wait()
  # Our own pid, but with another process start time: the pid was reused after its holder died.
  start = workdir_lock._proc_stat(os.getpid())[1]
  write_lock(tmp_path, pid=os.getpid(), pid_start=start + 1)
  workdir_lock.acquire(str(tmp_path)).release()
  assert len([l for l in capsys.readouterr().out.splitlines() if l.startswith("WARNING:")]) == 2


def test_take_over_puts_back_a_lock_created_meanwhile(tmp_path):
  # Two runs found the same dead holder; the faster one has already replaced the lock with its own.
  path = write_lock(tmp_path, pid=os.getpid())
  fresh = open(path).read()
  workdir_lock._take_over(path, dict(host=socket.gethostname(), pid=dead_pid(), started="2026-01-01 00:00:00 UTC"))
  assert open(path).read() == fresh and os.listdir(tmp_path) == [workdir_lock.LOCK_FILE]


def test_held_releases_on_an_exception_and_without_workdir_is_none(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir_lock.held(str(tmp_path)) as lock:
      assert os.path.exists(lock.path)
      raise RuntimeError("the run failed")
  assert not os.path.exists(workdir_lock.lock_path(str(tmp_path)))
  with workdir_lock.held(None) as lock:
    assert lock is None


def test_unwritable_workdirs_are_workdir_errors(tmp_path):
  blocker = tmp_path / "afile"
  blocker.write_text("")
  with pytest.raises(errors.WorkdirError, match="is a file, not a folder"):
    workdir_lock.check_writable(str(blocker / "wd"))
  with pytest.raises(errors.WorkdirError, match="Not a directory"):
    workdir_lock.acquire(str(blocker / "wd"))
  with pytest.raises(errors.WorkdirError, match="/proc/ema_jax_wd"):
    workdir_lock.acquire("/proc/ema_jax_wd")  # root passes permission checks; the file system refuses
  assert not os.path.exists("/proc/ema_jax_wd")
  assert os.listdir(tmp_path) == ["afile"]
  workdir_lock.check_writable(str(tmp_path / "new" / "wd"))  # creates nothing
  assert os.listdir(tmp_path) == ["afile"]


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
  def fsync(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(workdir_lock.os, "fsync", fsync)
  with pytest.raises(errors.WorkdirError, match="No space left on device"):
    workdir_lock.acquire(str(tmp_path / "wd"))
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------- real train.py


@pytest.fixture(scope="module")
def stale_run(tmp_path_factory):
  """(workdir, train.py process, the dead pid, lock path) of a run started on a dead process's lock."""
  wd = str(tmp_path_factory.mktemp("stale") / "wd")
  pid = dead_pid()
  path = write_lock(wd, pid=pid)
  return wd, run_train(wd, **SHORT), pid, path


@pytest.mark.slow
def test_stale_lock_is_taken_over_and_released(stale_run):
  wd, proc, pid, path = stale_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l for l in (proc.stdout + proc.stderr).splitlines() if "WARNING" in l]
  assert len(warnings) == 1 and f"pid {pid}" in warnings[0] and "taking it over" in warnings[0], warnings
  assert not os.path.exists(path)
  assert max(fc.read_metrics(wd)) == 4


@pytest.mark.slow
def test_eval_reads_beside_a_lock_and_leaves_it_alone(stale_run, tmp_path):
  wd, proc, _, _ = stale_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = write_lock(wd, host="some-other-host", pid=1234)
  lock_bytes = open(path, "rb").read()
  try:
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "eval.py"), f"--workdir={wd}", f"--output_dir={tmp_path / 'eval'}"],
        cwd=REPO,
        env=fault_drill._env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert open(path, "rb").read() == lock_bytes
  finally:
    os.remove(path)


def test_train_on_another_hosts_lock_is_refused_unchanged(tmp_path):
  wd = str(tmp_path / "wd")
  path = write_lock(wd, host="some-other-host", pid=4242)
  before = snapshot(wd)
  line = one_error(run_train(wd, **SHORT))
  assert "some-other-host" in line and "pid 4242" in line and path in line
  assert snapshot(wd) == before


@pytest.mark.slow
def test_second_run_is_refused_while_the_first_runs(tmp_path):
  wd = str(tmp_path / "wd")
  settings = dict(fc.SET_COMPLEMENT, steps=200, checkpoint_every=50, eval_every=100)
  first = subprocess.Popen(
      train_cmd(wd, **settings),
      cwd=REPO,
      env=fault_drill._env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  path = workdir_lock.lock_path(wd)
  deadline = time.time() + 300
  while not os.path.exists(path):
    assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
    time.sleep(0.02)
  first.send_signal(signal.SIGSTOP)  # frozen: any change to the workdir from here on is the second's
  try:
    time.sleep(0.2)
    before = snapshot(wd)
    assert json.loads(before[workdir_lock.LOCK_FILE])["pid"] == first.pid
    second = run_train(wd, **settings)
    line = one_error(second)
    assert f"pid {first.pid}" in line and path in line and "in use by another training run" in line, line
    assert snapshot(wd) == before
  finally:
    first.send_signal(signal.SIGCONT)
  out, err = first.communicate(timeout=1800)
  assert first.returncode == 0, err[-3000:]
  assert max(fc.read_metrics(wd)) == 200  # raises on a duplicated (step, metric)
  assert not os.path.exists(path)


@pytest.mark.slow
def test_every_process_of_a_refused_multiprocess_run_exits_2(tmp_path):
  wd = str(tmp_path / "wd")
  path = write_lock(wd, host="some-other-host", pid=4242)
  before = snapshot(wd)
  port = fault_drill._free_port()
  procs = [
      subprocess.Popen(
          train_cmd(wd, **SHORT),
          cwd=REPO,
          env=fault_drill._env(devices=1, nproc=2, pid=i, port=port),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  results = [p.communicate(timeout=1800) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 2, (p.returncode, err[-3000:])
    assert len([l for l in err.splitlines() if l.startswith("error:")]) == 1, err[-3000:]
  assert path in results[0][1] and "some-other-host" in results[0][1]
  assert "process 0 could not take the lock" in results[1][1]
  assert snapshot(wd) == before


@pytest.mark.slow
def test_fault_drill_lock_trial(tmp_path):
  drill = fault_drill.Drill(
      str(tmp_path), overrides={"set_complement": dict(steps=120, checkpoint_every=30, eval_every=60, log_every=7)}
  )
  trial = drill.lock_trial("set_complement")
  assert trial.outcome == "refused" and "the first run: identical" in trial.note, trial
