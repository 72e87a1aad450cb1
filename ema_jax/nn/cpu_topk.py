"""The sparse FFN's top-k mask on CPU as a compiled XLA FFI kernel (`topk_mask_cpu.cc` beside this file).

XLA:CPU's TopK runs on one thread and partially sorts every row's H indices: at the LM's [8192, 1024]
with k = 61 it took about a quarter of the training step (docs/trace_core.md, benchmarks/lm_bench.py).
The kernel finds each row's k-th largest value with a linear-time selection and splits the rows over
XLA's intra-op thread pool. Its order is XLA's (the floats' total order, ties to the lower index), so the
mask, and so the model's numbers, are the same bit for bit as the one built from jax.lax.top_k
(tests/nn/test_cpu_topk.py).

Used when the computation runs on one CPU device (jax.device_count() == 1): a sharded array would need
a partitioning rule for the custom call, and XLA's TopK is fine on GPU and TPU. The kernel is compiled
with the system's C++ compiler ($CXX, else g++) on first use into a cache keyed by the source, jaxlib's
version and the flags ($EMA_JAX_KERNEL_CACHE, else ~/.cache/ema_jax/kernels); where it cannot be
built or loaded, one warning says why and XLA's TopK is used. EMA_JAX_CPU_TOPK=xla turns it off.
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
import jax.numpy as jnp
import numpy as np

TARGET = "ema_jax_topk_mask"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "topk_mask_cpu.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
DTYPES = (jnp.float32, jnp.bfloat16)

_log = logging.getLogger(__name__)


def cache_dir() -> str:
  return os.environ.get("EMA_JAX_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ema_jax", "kernels")


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get("CXX", "g++"))


def library_path() -> str:
  """Where the built kernel lives: named by a hash of its source, jaxlib's version and the flags."""
  import jaxlib  # pylint: disable=import-outside-toplevel

  digest = hashlib.sha256()
  with open(SOURCE, "rb") as f:
    digest.update(f.read())
  digest.update(jaxlib.__version__.encode())
  digest.update(" ".join(FLAGS).encode())
  return os.path.join(cache_dir(), f"topk_mask_cpu-{digest.hexdigest()[:16]}.so")


def build(path: Optional[str] = None) -> str:
  """Compiles the kernel to `path` (atomically: several processes may build at once) and returns it."""
  path = path or library_path()
  if os.path.exists(path):
    return path
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH; set CXX or install g++")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-800:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the kernel is built, loaded and registered with XLA in this process (warns once if not)."""
  if os.environ.get("EMA_JAX_CPU_TOPK", "").lower() in ("xla", "0", "off", "false"):
    return False
  try:
    library = ctypes.cdll.LoadLibrary(build())
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.EmaJaxTopKMask), platform="cpu")
    return True
  except Exception as e:  # pylint: disable=broad-except  (any failure: XLA's TopK is always there)
    _log.warning("ema_jax: the CPU top-k kernel is not used (XLA's TopK is, same results, slower): %s", e)
    return False


_ENABLED = [True]


@contextlib.contextmanager
def enabled(on: bool):
  """Within: whether functions traced use the kernel (False: XLA's TopK), e.g. to time one against the
  other in one process (benchmarks/lm_bench.py --topk-ab)."""
  before = _ENABLED[0]
  _ENABLED[0] = on
  try:
    yield
  finally:
    _ENABLED[0] = before


def applies(a) -> bool:
  """Whether topk_mask(a, k) will run the kernel: one CPU device, a float32 or bfloat16 input."""
  return (
      _ENABLED[0]
      and jax.default_backend() == "cpu"
      and jax.device_count() == 1
      and any(a.dtype == d for d in DTYPES)
      and a.ndim >= 1
      and available()
  )


def topk_mask(a, k: int) -> jax.Array:
  """The kernel's bool mask: True at the k largest entries of each row of `a` (last axis)."""
  out = jax.ShapeDtypeStruct(a.shape, jnp.bool_)
  return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(a, k=np.int64(k))
