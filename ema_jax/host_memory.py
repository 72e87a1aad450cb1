"""Big host buffers on transparent huge pages: the entry points re-execute themselves once with glibc's
malloc told to advise huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc 2.35 and later).

Why. On a CPU device XLA allocates each step's temporaries with malloc. Those over glibc's mmap threshold
(32 MB at most) are mapped afresh on every call and unmapped after it, so the kernel faults in and zeroes
every 4 KiB page again each step: about 148,000 minor faults per step (580 MiB) for the EMA LM's training
step at width 256, T = 1024, batch 8. With the tunable, malloc asks for huge pages (madvise(MADV_HUGEPAGE))
on those mappings: 552 faults per step, and MFU 0.58 instead of 0.45, the same numbers
(`python -m benchmarks.lm_bench --lengths 1024 --width 256 --depth 2 --allocator-ab 4`, 2026-12-07, the
2-core VM; results/lm_bench_hugepages_ab.json). Keeping freed memory in the heap instead (no mmap, one
arena) removes the faults too, but keeps the step's peak memory resident between steps; huge pages do not.

glibc reads its tunables when the process starts, so the setting needs a new process image. `reexec()` is
called first thing by train.py, eval.py and generate.py (and by the benchmarks and experiment drivers that
train in their own process). It replaces the process by the same command (`sys.orig_argv`: interpreter
options and `-m` kept) with the tunable added to the environment, keeping the process id, open files and the
working directory. SIGTERM is blocked across the exec and unblocked by the new image's `reexec()` call, so a
SIGTERM that arrives meanwhile is delivered there (to the preemption handler train.py installs before), not
lost; one the old image had already turned into the preemption flag is raised again before the exec.

Nothing happens when: $EMA_JAX_HUGEPAGES is 0, off or false; the tunable (any glibc.malloc.hugetlb) is
already in GLIBC_TUNABLES (child processes inherit it, so a run re-executes once); the C library is not
glibc 2.35 or later; or transparent huge pages are "never" on this kernel
(/sys/kernel/mm/transparent_hugepage/enabled). On TPU/GPU hosts it changes only host-side allocations.

This module imports no JAX: it must run before anything has started threads or allocated much.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Mapping, Optional, Tuple

OPT_OUT = "EMA_JAX_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
_BLOCKED = "EMA_JAX_REEXEC_BLOCKED_SIGTERM"  # set across the exec: the new image unblocks SIGTERM
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> Optional[Tuple[int, int]]:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):
    return None


def _thp_mode(path: str = _THP) -> Optional[str]:
  """The selected mode of transparent huge pages ("always", "madvise", "never"), None where unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else None


def why_not(environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """None where `reexec()` would re-execute, else the reason it does not."""
  if environ.get(OPT_OUT, "").strip().lower() in ("0", "off", "false", "no"):
    return f"${OPT_OUT} is {environ[OPT_OUT]!r}"
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return "GLIBC_TUNABLES already sets glibc.malloc.hugetlb"
  version = _glibc_version()
  if version is None or version < (2, 35):
    return f"the C library is not glibc 2.35 or later ({os.confstr('CS_GNU_LIBC_VERSION') if version else 'not glibc'})"
  if _thp_mode() in (None, "never"):
    return f"transparent huge pages are off or unknown here ({_THP})"
  return None


def describe(environ: Mapping[str, str] = os.environ) -> str:
  """ "on (...)" where this process runs with the tunable, else "off: <why>" (for benchmark records)."""
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return f"on (GLIBC_TUNABLES={environ['GLIBC_TUNABLES']})"
  return f"off: {why_not(environ) or 'not re-executed'}"


def environment(environ: Mapping[str, str] = os.environ) -> dict:
  """`environ` with the tunable appended to GLIBC_TUNABLES (its other entries kept)."""
  env = dict(environ)
  old = env.get("GLIBC_TUNABLES", "")
  env["GLIBC_TUNABLES"] = f"{old}:{TUNABLE}" if old else TUNABLE
  return env


def reexec(sigterm_seen: bool = False) -> None:
  """Replaces this process by the same command with huge pages for big buffers (see the module docstring);
  returns where that is not wanted or already done. `sigterm_seen`: a SIGTERM the caller's handler already
  caught, raised again so the new image sees it. Call it before JAX is imported, from the main thread."""
  if os.environ.pop(_BLOCKED, None) is not None:
    # the new image: deliver what arrived during the exec, to whatever handler is installed by now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    return
  if why_not() is not None:
    return
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
  env = environment()
  env[_BLOCKED] = "1"
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
  if sigterm_seen:
    os.kill(os.getpid(), signal.SIGTERM)  # pending while blocked; execve keeps it pending
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError:  # could not exec: run on as we are
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
