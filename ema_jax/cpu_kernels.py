"""Compiled CPU kernels (XLA FFI custom calls): how they are built, cached, loaded and registered.

A kernel is one C++ source beside the Python module that uses it (`nn/topk_mask_cpu.cc`,
`traces/ema_traces_cpu.cc`), compiled with the system's C++ compiler ($CXX, else g++) on first use into a
cache keyed by a hash of the source, jaxlib's version and the flags (which include -mavx2 where the CPU
has it) ($EMA_JAX_KERNEL_CACHE, else
~/.cache/ema_jax/kernels). The build writes a temporary file and renames it, so several processes may build
at once. Where a kernel cannot be built or loaded, `available()` warns once, saying why and what runs
instead, and returns False; the caller then uses its XLA path (the same numbers: each kernel's tests say
how close). An environment variable per kernel ("xla", "0", "off" or "false") turns it off.

The kernels run only when the computation is on one CPU device: a custom call has no partitioning rule,
so on a sharded mesh XLA would gather its operands; there the XLA paths run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from typing import Optional

import jax

# No fused multiply-add contraction: a kernel rounds the same way whichever vector width it is built for.
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-ffp-contract=off")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> tuple:
  """The instruction-set flags for this machine's CPU: -mavx2 where /proc/cpuinfo lists avx2 (the kernels
  then use 8-float vectors, else SSE2's 4). Part of the cache key, so machines sharing a home directory
  each get a build their CPU runs."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return ("-mavx2",) if "avx2" in line.split() else ()
  except OSError:
    pass
  return ()


def flags() -> tuple:
  return FLAGS + cpu_flags()


_log = logging.getLogger(__name__)


def cache_dir() -> str:
  return os.environ.get("EMA_JAX_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ema_jax", "kernels")


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get("CXX", "g++"))


def one_cpu_device() -> bool:
  """Whether JAX computes on one CPU device (where the kernels apply)."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1


class CpuKernel:
  """One C++ source with its FFI handlers: `targets` maps XLA target names to the symbols that define them.

  `switch`: the environment variable that turns it off; `fallback`: what runs instead, for the warning."""

  def __init__(self, source: str, targets: dict, switch: str, fallback: str):
    self.source = source
    self.targets = dict(targets)
    self.switch = switch
    self.fallback = fallback
    self._enabled = [True]

  @property
  def stem(self) -> str:
    return os.path.splitext(os.path.basename(self.source))[0]

  def library_path(self) -> str:
    """Where the built kernel lives: named by a hash of its source, jaxlib's version and the flags."""
    import jaxlib  # pylint: disable=import-outside-toplevel

    digest = hashlib.sha256()
    with open(self.source, "rb") as f:
      digest.update(f.read())
    digest.update(jaxlib.__version__.encode())
    digest.update(" ".join(flags()).encode())
    return os.path.join(cache_dir(), f"{self.stem}-{digest.hexdigest()[:16]}.so")

  def build(self, path: Optional[str] = None) -> str:
    """Compiles the kernel to `path` (atomically: several processes may build at once) and returns it."""
    path = path or self.library_path()
    if os.path.exists(path):
      return path
    cxx = _compiler()
    if cxx is None:
      raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH; set CXX or install g++")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
      cmd = [cxx, *flags(), "-I", jax.ffi.include_dir(), self.source, "-o", tmp]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-800:]}")
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return path

  def _load(self) -> bool:
    if os.environ.get(self.switch, "").lower() in ("xla", "0", "off", "false"):
      return False
    try:
      library = ctypes.cdll.LoadLibrary(self.build())
      for target, symbol in self.targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
      return True
    except Exception as e:  # pylint: disable=broad-except  (any failure: the XLA path is always there)
      _log.warning(
          "ema_jax: the CPU kernel %s is not used (%s is, same results, slower): %s", self.stem, self.fallback, e
      )
      return False

  @functools.cached_property
  def _loaded(self) -> bool:
    return self._load()

  def available(self) -> bool:
    """Whether the kernel is built, loaded and registered with XLA in this process (warns once if not)."""
    return self._loaded

  def active(self) -> bool:
    """Whether functions traced now use the kernel: enabled, one CPU device, built and loaded."""
    return self._enabled[0] and one_cpu_device() and self.available()

  @contextlib.contextmanager
  def enabled(self, on: bool):
    """Within: whether functions traced use the kernel (False: the XLA path), e.g. to time one against the
    other in one process."""
    before = self._enabled[0]
    self._enabled[0] = on
    try:
      yield
    finally:
      self._enabled[0] = before


def beside(module_file: str, name: str) -> str:
  """The path of `name` in the directory of `module_file` (a kernel's source beside its module)."""
  return os.path.join(os.path.dirname(os.path.abspath(module_file)), name)
