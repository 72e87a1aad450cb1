"""ema_jax/host_memory.py: the entry points re-execute once with glibc's malloc advising huge pages.

Real processes: the re-executed image keeps its pid, arguments and `-m`; big malloc'd buffers stop
faulting page by page; a SIGTERM before or during the exec reaches the preemption handler of the new image.
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO

from ema_jax import host_memory

APPLIES = host_memory.why_not({}) is None  # glibc >= 2.35 and transparent huge pages not "never" here
needs_huge_pages = pytest.mark.skipif(not APPLIES, reason=f"no re-exec here: {host_memory.why_not({})}")


def clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  env["PYTHONPATH"] = REPO
  env.update(extra)
  return env


def run_script(tmp_path, body, *args, env=None, timeout=120):
  script = tmp_path / "script.py"
  script.write_text(textwrap.dedent(body))
  return subprocess.run(
      [sys.executable, "-u", str(script), *args],
      env=env or clean_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
      cwd=tmp_path,
  )


def test_environment_appends_the_tunable_and_keeps_the_others():
  assert host_memory.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  env = host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_opt_out_and_an_existing_setting_mean_no_reexec(value):
  assert "EMA_JAX_HUGEPAGES" in host_memory.why_not({"EMA_JAX_HUGEPAGES": value})
  assert "already" in host_memory.why_not({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert host_memory.describe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}).startswith("on")
  assert host_memory.describe({"EMA_JAX_HUGEPAGES": value}).startswith("off: $EMA_JAX_HUGEPAGES")


def test_thp_mode_reads_the_selected_one(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert host_memory._thp_mode(str(f)) == "madvise"
  f.write_text("always madvise [never]\n")
  assert host_memory._thp_mode(str(f)) == "never"
  assert host_memory._thp_mode(str(tmp_path / "absent")) is None


REPORT = """
import os, signal, sys
from ema_jax import host_memory
print("first", os.getpid(), flush=True)
host_memory.reexec()
print("now", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
      "EMA_JAX_REEXEC_BLOCKED_SIGTERM" in os.environ, sys.argv[1:], flush=True)
"""


@needs_huge_pages
def test_reexec_is_the_same_process_and_command_with_the_tunable(tmp_path):
  out = run_script(tmp_path, REPORT, "a", "--b=c")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.split("\n")
  firsts = [l for l in lines if l.startswith("first")]
  now = [l for l in lines if l.startswith("now")]
  assert len(firsts) == 2 and len(now) == 1, out.stdout  # the script ran twice, once past reexec()
  pid = firsts[0].split()[1]
  assert firsts[1].split()[1] == pid and now[0].split()[1] == pid
  # the tunable set, SIGTERM unblocked again, the marker gone, the arguments kept
  assert now[0].split(" ", 2)[2] == "glibc.malloc.hugetlb=1 [] False ['a', '--b=c']", now[0]


def test_opted_out_or_already_set_runs_once_unchanged(tmp_path):
  for env in (clean_env(EMA_JAX_HUGEPAGES="0"), clean_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")):
    out = run_script(tmp_path, REPORT, env=env)
    assert out.returncode == 0 and out.stdout.count("first") == 1, out
    assert "[] False []" in out.stdout


FAULTS = """
import ctypes, resource, sys
from ema_jax import host_memory
host_memory.reexec()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20  # far over glibc's largest mmap threshold (32 MB): mapped afresh by every malloc
def once():
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(ctypes.c_void_p(p))
once()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  once()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 4)
"""


@needs_huge_pages
def test_big_buffers_stop_faulting_page_by_page(tmp_path):
  """A 64 MiB buffer written after each malloc: 16,384 faults of 4 KiB pages without the tunable, a few
  hundred at most with it (2 MiB pages, where the kernel can find them)."""
  without = float(run_script(tmp_path, FAULTS, env=clean_env(EMA_JAX_HUGEPAGES="0")).stdout)
  with_ = float(run_script(tmp_path, FAULTS).stdout)
  assert without >= 16000, without
  assert with_ < without / 8, (with_, without)


SIGTERM_AT_START = """
import os, signal, sys, time
import ema_jax.preemption
ema_jax.preemption.install()
if "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
  open("installed", "w").close()  # the first image has its handler from here on
  if sys.argv[1] == "before":
    os.kill(os.getpid(), signal.SIGTERM)  # caught by the first image's handler, before the exec
import ema_jax.host_memory
ema_jax.host_memory.reexec(sigterm_seen=ema_jax.preemption.requested())
time.sleep(float(sys.argv[2]))
print("requested", ema_jax.preemption.requested(), flush=True)
"""


@needs_huge_pages
def test_a_sigterm_caught_before_the_exec_reaches_the_new_image(tmp_path):
  out = run_script(tmp_path, SIGTERM_AT_START, "before", "0")
  assert out.returncode == 0 and out.stdout.strip() == "requested True", out


@needs_huge_pages
def test_sigterm_at_random_moments_of_the_start_is_never_lost(tmp_path):
  """A SIGTERM sent from outside at a random moment of the start (the first image, the exec, the new
  image): once the first image has installed its handler, the signal always ends as the new image's flag,
  never as a kill (status -15) and never lost. Half the trials wait for the first image's handler and then
  a few random milliseconds (the exec window, whatever the machine's load); the others send at a random
  moment from the spawn on."""
  rng = random.Random(0)
  (tmp_path / "script.py").write_text(textwrap.dedent(SIGTERM_AT_START))
  caught = 0
  for trial in range(12):
    if os.path.exists(tmp_path / "installed"):
      os.remove(tmp_path / "installed")
    proc = subprocess.Popen(
        [sys.executable, "-u", "script.py", "outside", "0.5"],
        env=clean_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if trial % 2 == 0:
      deadline = time.monotonic() + 60
      while not os.path.exists(tmp_path / "installed") and time.monotonic() < deadline:
        time.sleep(0.001)
      time.sleep(rng.uniform(0.0, 0.05))
    else:
      time.sleep(rng.uniform(0.0, 0.25))
    installed = os.path.exists(tmp_path / "installed")  # before the signal: then it must be caught
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if installed or proc.returncode == 0:
      assert proc.returncode == 0 and stdout.strip() == "requested True", (trial, proc.returncode, stdout, stderr)
      caught += 1
    else:  # before any handler: Python's default, a kill, as before this module existed
      assert proc.returncode == -signal.SIGTERM, (trial, proc.returncode, stdout, stderr)
  assert caught >= 6, caught
