"""Sequence-sharded versus unsharded EMA traces on forced CPU devices, and the bytes that cross devices.

  python -m benchmarks.shard_bench [--devices 8] [--lengths 65536,262144] [--out results/shard_bench.json]

For each T it times, in one process, jitted traces of x [B, T, D] over K timescales: unsharded (one device)
and sequence-parallel over a `seq` mesh axis of --devices shards (each shard scans locally, the shards
all-gather their final state and decay product, each corrects its outputs). It also counts what crosses
devices per layer: the trace exchange moves K x D numbers per shard and row, while attention with the
sequence split would need every shard's keys and values (2 x T/S x D per shard and row) at every other.
Forced CPU devices share the same two cores, so the timings show the overhead of the exchange and the
correction, not a speed-up; on real accelerators each shard has its own compute and memory.
"""

import argparse
import json
import os
import statistics
import time

if __name__ == "__main__":
  _p = argparse.ArgumentParser(
      prog="python -m benchmarks.shard_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  _p.add_argument("--devices", type=int, default=8)
  _p.add_argument("--lengths", default="65536,262144")
  _p.add_argument("--batch", type=int, default=1)
  _p.add_argument("--width", type=int, default=256)
  _p.add_argument("--repeats", type=int, default=5)
  _p.add_argument("--out", default="results/shard_bench.json")
  ARGS = _p.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from benchmarks import command_line  # noqa: E402
from ema_jax import sharding, traces  # noqa: E402
from ema_jax.traces import seq_parallel  # noqa: E402

ALPHAS = (0.5, 0.1, 0.02)


def timed(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main():
  s = ARGS.devices
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, seq=s)))
  k, d, b = len(ALPHAS), ARGS.width, ARGS.batch
  rows = []
  for t in [int(v) for v in ARGS.lengths.split(",")]:
    x = jax.random.normal(jax.random.key(0), (b, t, d), jnp.float32)
    one = jax.jit(lambda x: traces.ema_traces(x, ALPHAS)[0])
    x_sh = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(None, "seq", None)))
    par = jax.jit(lambda x: seq_parallel.seq_parallel_traces(x, ALPHAS, mesh=mesh)[0])
    err = float(jnp.max(jnp.abs(par(x_sh) - one(x))))
    t_one = timed(one, x, repeats=ARGS.repeats)
    t_par = timed(par, x_sh, repeats=ARGS.repeats)
    trace_bytes = 4 * s * b * (k * d + k) * (s - 1)  # each shard's state + decay product to every other
    attn_bytes = 4 * s * b * 2 * (t // s) * d * (s - 1)  # each shard's keys and values to every other
    rows.append(
        dict(
            T=t,
            shards=s,
            unsharded_ms=t_one * 1e3,
            seq_parallel_ms=t_par * 1e3,
            max_abs_diff=err,
            trace_exchange_bytes=trace_bytes,
            attention_kv_bytes=attn_bytes,
            ratio=attn_bytes / trace_bytes,
        )
    )
  print(
      f"{'T':>8}{'shards':>7}{'1 device ms':>13}{'seq-par ms':>12}{'max|diff|':>11}{'trace bytes':>13}"
      f"{'attn K/V bytes':>16}{'ratio':>9}"
  )
  for r in rows:
    print(
        f"{r['T']:>8}{r['shards']:>7}{r['unsharded_ms']:>13.1f}{r['seq_parallel_ms']:>12.1f}"
        f"{r['max_abs_diff']:>11.2e}{r['trace_exchange_bytes']:>13,}{r['attention_kv_bytes']:>16,}{r['ratio']:>9.0f}"
    )
  meta = dict(
      date=time.strftime("%Y-%m-%d"),
      backend=jax.default_backend(),
      devices=jax.device_count(),
      cpu_count=os.cpu_count(),
      batch=b,
      width=d,
      timescales=k,
      command=command_line("benchmarks.shard_bench"),
      load_avg=os.getloadavg(),
  )
  if ARGS.out:
    os.makedirs(os.path.dirname(ARGS.out) or ".", exist_ok=True)
    with open(ARGS.out, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {ARGS.out}")


if __name__ == "__main__":
  main()
