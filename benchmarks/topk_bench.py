"""The sparse FFN's top-k mask: the CPU kernel (ema_jax/nn/cpu_topk.py) against XLA's TopK, in one process.

  python -m benchmarks.topk_bench [--shapes 8192x1024] [--k 61] [--repeats 9] [--out results/topk_bench.json]

Each contender is jitted once and timed on the same input (an argument, so nothing is constant-folded),
repeat by repeat in a fresh random order; medians in ms. The masks are checked equal before timing.
The default shape is the LM benchmark's FFN at width 256 (8192 tokens, H = 1024, k = 61: 6% kept).
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import command_line
from ema_jax.nn import cpu_topk


def xla_mask(a, k):
  """The mask as ema_jax.nn.ffn built it before the kernel: jax.lax.top_k's indices scattered."""
  _, idx = jax.lax.top_k(a, k)
  return jnp.put_along_axis(jnp.zeros(a.shape, jnp.bool_), idx, True, axis=-1, inplace=False)


def main():
  p = argparse.ArgumentParser(prog="python -m benchmarks.topk_bench", description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="8192x1024")
  p.add_argument("--k", type=int, default=61)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--out", default="results/topk_bench.json")
  args = p.parse_args()
  if not cpu_topk.applies(jnp.zeros(1)):
    raise SystemExit("error: the CPU top-k kernel does not apply here (one CPU device and a C++ compiler needed)")
  rows = []
  rng = np.random.default_rng(0)
  for shape in args.shapes.split(","):
    n, h = (int(v) for v in shape.split("x"))
    for dtype in args.dtypes.split(","):
      a = jax.random.normal(jax.random.key(0), (n, h)).astype(dtype)
      fns = {
          "xla": jax.jit(xla_mask, static_argnums=1),
          "kernel": jax.jit(cpu_topk.topk_mask, static_argnums=1),
      }
      if not np.array_equal(np.asarray(fns["xla"](a, args.k)), np.asarray(fns["kernel"](a, args.k))):
        raise SystemExit(f"error: the masks differ at {shape} {dtype}")
      ts = {name: [] for name in fns}
      for _ in range(args.repeats):
        for name in rng.permutation(list(fns)):
          t0 = time.perf_counter()
          jax.block_until_ready(fns[name](a, args.k))
          ts[name].append(time.perf_counter() - t0)
      row = dict(shape=[n, h], dtype=dtype, k=args.k, **{f"{m}_ms": 1e3 * statistics.median(v) for m, v in ts.items()})
      row["speedup"] = row["xla_ms"] / row["kernel_ms"]
      rows.append(row)
      print(
          f"  {n}x{h} {dtype:9s} k={args.k}: XLA {row['xla_ms']:.1f} ms, kernel {row['kernel_ms']:.1f} ms "
          f"({row['speedup']:.1f}x)",
          flush=True,
      )
  meta = dict(
      date=time.strftime("%Y-%m-%d %H:%M"),
      devices=str(jax.devices()),
      cpu_count=os.cpu_count(),
      load_avg=os.getloadavg(),
      command=command_line("benchmarks.topk_bench"),
  )
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
