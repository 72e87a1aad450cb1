"""EMA trace throughput: every scan method against the textbook form and a plain copy, in one process.

  python benchmarks/scan_bench.py [--shapes 8x2048x256x3,1x65536x256x3] [--repeats 7] [--out results/scan_bench.json]

For each shape (B, T, D, K) it times, after warm-up, the median of --repeats runs of
  forward            x [B, T, D] -> traces h [B, T, K, D]
  forward+backward   the VJP of the above for a given output cotangent
for: each linear_scan method through ema_traces (custom VJP); the textbook form
(jax.lax.associative_scan on a decay broadcast to the full [B, T, K, D] shape, b = alpha * x materialised,
autodiff through the scan); and a plain copy that writes an output of the same size (the memory-bandwidth
bound: its forward+backward is the copy too, the goals compare against it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ema_jax import scan, traces  # noqa: E402

ALPHAS = (0.5, 0.1, 0.02)


def textbook(x, alphas):
  a = jnp.asarray([1 - al for al in alphas], x.dtype)
  al = jnp.asarray(alphas, x.dtype)
  b = x[:, :, None, :] * al[None, None, :, None]
  a_full = jnp.broadcast_to(a[None, None, :, None], b.shape)

  def combine(l, r):
    return l[0] * r[0], r[0] * l[1] + r[1]

  return jax.lax.associative_scan(combine, (a_full, b), axis=1)[1]


def copy_op(x, k):
  return jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (k,) + x.shape[2:]) + 0.0


def timed(fn, args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def candidates(k, chunk_sizes):
  out = {}
  for m in ("sequential", "associative"):
    out[m] = lambda x, m=m: traces.ema_traces(x, ALPHAS, method=m)[0]
  for c in chunk_sizes:
    out[f"chunked/{c}"] = lambda x, c=c: traces.ema_traces(x, ALPHAS, method="chunked", chunk_size=c)[0]
  out["auto"] = lambda x: traces.ema_traces(x, ALPHAS, method="auto")[0]
  out["textbook"] = lambda x: textbook(x, ALPHAS)
  out["copy"] = lambda x: copy_op(x, k)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="8x2048x256x3,1x65536x256x3", help="BxTxDxK,...")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--chunks", default="16,32,64")
  p.add_argument("--skip", default="", help="comma-separated names to skip (e.g. sequential)")
  p.add_argument("--out", default="results/scan_bench.json")
  args = p.parse_args()
  chunk_sizes = [int(c) for c in args.chunks.split(",") if c]
  skip = set(s for s in args.skip.split(",") if s)
  rows = []
  for shape in args.shapes.split(","):
    bsz, t_len, d, k = (int(v) for v in shape.split("x"))
    x = jax.random.normal(jax.random.key(0), (bsz, t_len, d), jnp.float32)
    g = jax.random.normal(jax.random.key(1), (bsz, t_len, k, d), jnp.float32)
    nbytes = 4 * (x.size + g.size)  # read x, write h
    results = {}
    for name, f in candidates(k, chunk_sizes).items():
      if name in skip:
        continue
      fwd = jax.jit(f)
      bwd = jax.jit(lambda x, g, f=f: jax.vjp(f, x)[1](g)[0])
      t_f = timed(fwd, (x,), args.repeats)
      t_b = t_f if name == "copy" else timed(bwd, (x, g), args.repeats)
      results[name] = (t_f, t_b)
      print(f"  measured {shape} {name}: fwd {t_f * 1e3:.2f} ms, fwd+bwd {t_b * 1e3:.2f} ms", flush=True)
    copy_f = results["copy"][0]
    text_f, text_b = results.get("textbook", (float("nan"), float("nan")))
    best = min((n for n in results if n not in ("copy", "textbook", "auto")), key=lambda n: results[n][0])
    best_b = min((n for n in results if n not in ("copy", "textbook", "auto")), key=lambda n: results[n][1])
    for name, (t_f, t_b) in results.items():
      rows.append(dict(shape=shape, method=name, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_b * 1e3,
                       fwd_gbps=nbytes / t_f / 1e9, fwd_vs_copy=t_f / copy_f, fwd_bwd_vs_copy=t_b / copy_f,
                       fwd_speedup_vs_textbook=text_f / t_f, fwd_bwd_speedup_vs_textbook=text_b / t_b,
                       best_fwd=name == best, best_fwd_bwd=name == best_b))
  hdr = (f"{'shape BxTxDxK':<18}{'method':<13}{'fwd ms':>9}{'GB/s':>7}{'/copy':>7}{'x text':>8}"
         f"{'f+b ms':>9}{'/copy':>7}{'x text':>8}")
  print()
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    mark = ("*" if r["best_fwd"] else " ") + ("*" if r["best_fwd_bwd"] else " ")
    print(f"{r['shape']:<18}{r['method']:<13}{r['fwd_ms']:>9.2f}{r['fwd_gbps']:>7.2f}{r['fwd_vs_copy']:>7.2f}"
          f"{r['fwd_speedup_vs_textbook']:>8.2f}{r['fwd_bwd_ms']:>9.2f}{r['fwd_bwd_vs_copy']:>7.2f}"
          f"{r['fwd_bwd_speedup_vs_textbook']:>8.2f} {mark}")
  print("(* best forward, best forward+backward; auto chose "
        f"{scan._auto_method(1 << 20)} for long sequences on {jax.default_backend()})")
  meta = dict(date=time.strftime("%Y-%m-%d"), backend=jax.default_backend(), devices=str(jax.devices()),
              cpu_count=os.cpu_count(), platform=platform.platform(), processor=platform.processor(),
              jax=jax.__version__, repeats=args.repeats, command=" ".join(sys.argv))
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
