"""The sparse FFN's top-k mask on CPU as a compiled XLA FFI kernel (`topk_mask_cpu.cc` beside this file).

XLA:CPU's TopK runs on one thread and partially sorts every row's H indices: at the LM's [8192, 1024]
with k = 61 it took about a quarter of the training step (docs/trace_core.md, benchmarks/lm_bench.py).
The kernel finds each row's k-th largest value with a linear-time selection and splits the rows over
XLA's intra-op thread pool. Its order is XLA's (the floats' total order, ties to the lower index), so the
mask, and so the model's numbers, are the same bit for bit as the one built from jax.lax.top_k
(tests/nn/test_cpu_topk.py).

Built, cached and loaded by ema_jax.cpu_kernels (one CPU device only; where it cannot be built, one
warning and XLA's TopK). EMA_JAX_CPU_TOPK=xla turns it off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import cpu_kernels

TARGET = "ema_jax_topk_mask"
DTYPES = (jnp.float32, jnp.bfloat16)
KERNEL = cpu_kernels.CpuKernel(
    cpu_kernels.beside(__file__, "topk_mask_cpu.cc"),
    {TARGET: "EmaJaxTopKMask"},
    switch="EMA_JAX_CPU_TOPK",
    fallback="XLA's TopK",
)
library_path = KERNEL.library_path
build = KERNEL.build
available = KERNEL.available
enabled = KERNEL.enabled


def applies(a) -> bool:
  """Whether topk_mask(a, k) will run the kernel: one CPU device, a float32 or bfloat16 input."""
  return any(a.dtype == d for d in DTYPES) and a.ndim >= 1 and KERNEL.active()


def topk_mask(a, k: int) -> jax.Array:
  """The kernel's bool mask: True at the k largest entries of each row of `a` (last axis)."""
  out = jax.ShapeDtypeStruct(a.shape, jnp.bool_)
  return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(a, k=np.int64(k))
