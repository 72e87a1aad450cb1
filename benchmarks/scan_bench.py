"""EMA trace throughput: every trace method against the textbook form and a plain copy, in one process.

  python -m benchmarks.scan_bench [--shapes 8x2048x256x3,1x65536x256x3] [--repeats 7] [--out results/scan_bench.json]
                                  [--chunks 16,32,64] [--fused-chunks 8,16,32,64] [--blocks 4,8,16]
                                  [--per-channel] [--reuse-heap]
  python -m benchmarks.scan_bench --selective [--selective-chunks 8,16] [--reuse-heap] [--out results/scan_bench_selective.json]
  python -m benchmarks.scan_bench --learned [--blocks 8] [--reuse-heap] [--out results/scan_bench_learned.json]

For each shape (B, T, D, K) it times, after warm-up, the median (and range) of --repeats runs of
  forward            x [B, T, D] -> traces h [B, T, K, D]
  training           forward and backward as a model sees them: the upstream gradient dh [B, T, K, D] is an
                     argument, as when the traces feed a matmul: jax.value_and_grad of vdot(h, dh) w.r.t. x
                     (and the rates where they are learned or selective). The value needs the forward, the
                     gradient reads dh and writes dx: at least twice a copy's traffic. (A loss such as
                     mean(h^2) lets XLA build the gradient from h inside the forward's fusion, which no
                     model does; --with-mse adds it as a second, labelled row.)
for: the compiled CPU kernel (method='native', traces/native.py: one streaming pass each way; on other
backends and several devices it runs 'blocked'); the blocked path (traces.ema_traces method='blocked', the closed form inside chunks as one elementwise
pass, custom VJP; rates shared or per channel) at each --blocks size; the fused path (method='fused', one
batched matmul per output, custom VJP) at each --fused-chunks size; each linear_scan method through ema_traces
(custom VJP; 'unrolled' at its default chunk); 'auto'; the textbook
form (jax.lax.associative_scan on a decay broadcast to the full [B, T, K, D] shape, b = alpha * x
materialised, autodiff through the scan); and a plain copy that writes an output of the same size (the
memory-bandwidth bound; its forward+backward is the same loss through the copy; the goals compare against
the copy's forward).
--per-channel uses [K, D] rates instead (no fused path there).
The candidates run in a fresh random order within each repeat (interleaved), so neither a change of machine
load nor what ran just before favours one of them; the JSON meta records the load average before and after.

--selective times selective traces (traces.selective_traces: a write rate per token, timescale and channel,
given as an input [B, T, K, D]) instead: each of its methods, 'auto', the fixed-rate path (ema_traces 'auto'
with the paper's rates shared over D) and the copy, forward and a training-like forward+backward (the
gradient of mean(h^2), a loss that uses the output, w.r.t. x and, for the selective path, the rates), in
random order within each repeat; it reports the ratios to the copy's forward and to the fixed-rate path.
The chunked method builds a [c, c] decay matrix per chunk, timescale and channel, so its chunks stay small.

--learned times learned write rates: the rates are an argument of the jitted function, so the training-like
step also computes their gradient (w.r.t. x and the rates): shared [K] and per-channel [K, D] through the
blocked path, shared through 'fused', per channel through 'sequential' and 'auto', and constant per-channel
rates ('fixed per-channel/auto'), each against the constant shared-rate path ('fixed/auto') and the copy.

--reuse-heap re-runs the benchmark with glibc told to keep freed memory (MALLOC_ARENA_MAX etc.).
By default glibc maps every buffer over 32 MB afresh, so each call pays a page fault per 4 KiB page it
writes; on the 2-core VM this was written on that is most of the copy's time (about 4.5 us a page under
load). With the flag the times show compute and memory bandwidth alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import command_line, rerun_argv
from ema_jax import traces
from ema_jax.traces import scan

ALPHAS = (0.5, 0.1, 0.02)


def rates(k, d, per_channel):
  """The papers' three rates for K = 3 (else K rates spaced geometrically), [K] or [K, D] per channel."""
  alphas = np.array(ALPHAS if k == 3 else np.geomspace(0.5, 0.02, k), np.float32)
  return np.repeat(alphas[:, None], d, axis=1) if per_channel else tuple(float(a) for a in alphas)


def textbook(x, alphas):
  al = jnp.asarray(alphas, x.dtype)
  al = al[:, None] if al.ndim == 1 else al  # [K, 1 or D]
  b = x[:, :, None, :] * al[None, None]
  a_full = jnp.broadcast_to(1 - al[None, None], b.shape)

  def combine(l, r):
    return l[0] * r[0], r[0] * l[1] + r[1]

  return jax.lax.associative_scan(combine, (a_full, b), axis=1)[1]


def copy_op(x, k):
  return jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (k,) + x.shape[2:]) + 0.0


def candidates(alphas, k, chunk_sizes, fused_chunk_sizes, block_sizes=()):
  out = {"native": lambda x: traces.ema_traces(x, alphas, method="native")[0]}
  for c in block_sizes:
    out[f"blocked/{c}"] = lambda x, c=c: traces.ema_traces(x, alphas, method="blocked", chunk_size=c)[0]
  if not isinstance(alphas, np.ndarray):  # the fused path needs rates shared over D
    for c in fused_chunk_sizes:
      out[f"fused/{c}"] = lambda x, c=c: traces.ema_traces(x, alphas, method="fused", chunk_size=c)[0]
  for m in ("sequential", "associative", "unrolled"):
    out[m] = lambda x, m=m: traces.ema_traces(x, alphas, method=m)[0]
  for c in chunk_sizes:
    out[f"chunked/{c}"] = lambda x, c=c: traces.ema_traces(x, alphas, method="chunked", chunk_size=c)[0]
  out["auto"] = lambda x: traces.ema_traces(x, alphas, method="auto")[0]
  out["textbook"] = lambda x: textbook(x, alphas)
  out["copy"] = lambda x: copy_op(x, k)
  return out


def uptime():
  """`uptime` output (load averages over 1, 5, 15 minutes): the machine may be shared."""
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


# One arena (XLA's worker threads would otherwise map big buffers from their own arenas), no mmap for big
# buffers, no trimming: freed memory is reused without page faults. Values found by counting minor faults.
_HEAP_ENV = dict(
    MALLOC_ARENA_MAX="1",
    MALLOC_MMAP_THRESHOLD_="2000000000",
    MALLOC_TRIM_THRESHOLD_="4000000000",
    MALLOC_TOP_PAD_="536870912",
)


def selective_candidates(k, chunk_sizes):
  """name -> (f(x, r), argnums of the gradient): x and the rates for selective, x for the others."""
  fixed = rates(k, 1, False)
  out = {}
  for m in ["native", "sequential", "associative", "unrolled"] + [f"chunked/{c}" for c in chunk_sizes] + ["auto"]:
    method, _, c = m.partition("/")
    f = lambda x, r, method=method, c=c: traces.selective_traces(x, r, method=method, chunk_size=int(c) if c else None)[
        0
    ]
    out[f"selective/{m}"] = (f, (0, 1))
  out["fixed/auto"] = (lambda x, r: traces.ema_traces(x, fixed, method="auto")[0], 0)
  out["copy"] = (lambda x, r: copy_op(x, k), 0)
  return out


def train_step(f, argnums=0):
  """jit(value_and_grad(vdot(f(*args), dh))): the training-like step; dh is the last argument."""
  loss = lambda *a: jnp.vdot(f(*a[:-1]), a[-1])
  return jax.jit(jax.value_and_grad(loss, argnums=argnums))


def mse_step(f, argnums=0):
  """jit(grad(mean(f(*args)^2))): the earlier, fusable training-like loss (--with-mse)."""
  return jax.jit(jax.grad(lambda *a: jnp.mean(jnp.square(f(*a))), argnums=argnums))


def mse_fields(res, name, prefix, copy_f):
  """The --with-mse row of a candidate (empty without the flag): its median, range and ratio to the copy."""
  if (name, "train_mse") not in res:
    return {}
  t, lo, hi = res[(name, "train_mse")]
  return {
      f"{prefix}_mse_ms": t * 1e3,
      f"{prefix}_mse_ms_range": [lo * 1e3, hi * 1e3],
      f"{prefix}_mse_vs_copy": t / copy_f,
  }


def upstream(shape_btkd, seed=2):
  """A fixed upstream gradient dh of the traces' shape."""
  return jax.random.normal(jax.random.key(seed), shape_btkd, jnp.float32)


def time_interleaved_random(fns, repeats, seed=0):
  """{name: (fn, args)} -> {name: (median, min, max) seconds}: after a compile and a warm run of each, every
  repeat runs each candidate once, in a fresh random order."""
  rng = np.random.default_rng(seed)
  for fn, args in fns.values():
    for _ in range(2):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  names = list(fns)
  for _ in range(repeats):
    for i in rng.permutation(len(names)):
      fn, args = fns[names[i]]
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[names[i]].append(time.perf_counter() - t0)
  return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def selective_main(args):
  chunk_sizes = [int(c) for c in args.selective_chunks.split(",") if c]
  load_before, uptime_before = os.getloadavg(), uptime()
  rows = []
  for shape in args.shapes.split(","):
    bsz, t_len, d, k = (int(v) for v in shape.split("x"))
    x = jax.random.normal(jax.random.key(0), (bsz, t_len, d), jnp.float32)
    # Rates near the paper's (logit(alpha) plus noise), as SelectiveTraces makes them.
    base = np.log(np.asarray(rates(k, 1, False)) / (1 - np.asarray(rates(k, 1, False))))
    r = jax.nn.sigmoid(base[:, None] + 0.5 * jax.random.normal(jax.random.key(1), (bsz, t_len, k, d)))
    dh = upstream((bsz, t_len, k, d))
    fns = {}
    for name, (f, argnums) in selective_candidates(k, chunk_sizes).items():
      fns[(name, "fwd")] = (jax.jit(f), (x, r))
      fns[(name, "train")] = (train_step(f, argnums), (x, r, dh))
      if args.with_mse:
        fns[(name, "train_mse")] = (mse_step(f, argnums), (x, r))
    res = time_interleaved_random(fns, args.repeats)
    copy_f = res[("copy", "fwd")][0]
    fixed_f, fixed_t = res[("fixed/auto", "fwd")][0], res[("fixed/auto", "train")][0]
    for name in dict.fromkeys(n for n, _ in fns):
      (tf, tf_lo, tf_hi), (tt, tt_lo, tt_hi) = res[(name, "fwd")], res[(name, "train")]
      rows.append(
          dict(
              shape=shape,
              method=name,
              fwd_ms=tf * 1e3,
              fwd_ms_range=[tf_lo * 1e3, tf_hi * 1e3],
              train_ms=tt * 1e3,
              train_ms_range=[tt_lo * 1e3, tt_hi * 1e3],
              fwd_vs_copy=tf / copy_f,
              train_vs_copy=tt / copy_f,
              fwd_vs_fixed=tf / fixed_f,
              train_vs_fixed=tt / fixed_t,
              **mse_fields(res, name, "train", copy_f),
          )
      )
      print(
          f"{shape:<18}{name:<24}fwd {tf * 1e3:9.2f} ms ({tf / copy_f:5.2f}x copy, {tf / fixed_f:5.2f}x fixed)"
          f"   train {tt * 1e3:9.2f} ms ({tt / copy_f:5.2f}x copy fwd, {tt / fixed_t:5.2f}x fixed)",
          flush=True,
      )
  load_after, uptime_after = os.getloadavg(), uptime()
  meta = run_meta(args, load_before, load_after, uptime_before, uptime_after)
  meta.update(
      selective_auto=str(scan.auto_method(1 << 20)),
      train="jax.value_and_grad of vdot(h, dh), dh an argument, w.r.t. x (and the rates for selective)",
  )
  write_json(args.out, meta, rows)


def learned_candidates(k, d, block_sizes):
  """name -> (rates argument, f(x, rates)): learned rates are arguments (traced), so their gradient is
  computed; 'fixed' is the constant-rate path (auto) every ratio is taken against."""
  shared = jnp.asarray(rates(k, d, False))
  channel = jnp.asarray(rates(k, d, True))
  out = {
      "learned shared/native": (shared, lambda x, r: traces.ema_traces(x, r, method="native")[0]),
      "learned per-channel/native": (channel, lambda x, r: traces.ema_traces(x, r, method="native")[0]),
  }
  for c in block_sizes:
    out[f"learned shared/blocked/{c}"] = (
        shared,
        lambda x, r, c=c: traces.ema_traces(x, r, method="blocked", chunk_size=c)[0],
    )
    out[f"learned per-channel/blocked/{c}"] = (
        channel,
        lambda x, r, c=c: traces.ema_traces(x, r, method="blocked", chunk_size=c)[0],
    )
  out["learned shared/fused/16"] = (shared, lambda x, r: traces.ema_traces(x, r, method="fused", chunk_size=16)[0])
  out["learned per-channel/sequential"] = (channel, lambda x, r: traces.ema_traces(x, r, method="sequential")[0])
  out["learned per-channel/auto"] = (channel, lambda x, r: traces.ema_traces(x, r, method="auto")[0])
  fixed, fixed_channel = rates(k, d, False), rates(k, d, True)
  out["fixed/auto"] = (shared, lambda x, r: traces.ema_traces(x, fixed, method="auto")[0])
  out["fixed per-channel/auto"] = (shared, lambda x, r: traces.ema_traces(x, fixed_channel, method="auto")[0])
  out["copy"] = (shared, lambda x, r: copy_op(x, k))
  return out


def learned_main(args):
  block_sizes = [int(c) for c in args.blocks.split(",") if c]
  load_before, uptime_before = os.getloadavg(), uptime()
  rows = []
  for shape in args.shapes.split(","):
    bsz, t_len, d, k = (int(v) for v in shape.split("x"))
    x = jax.random.normal(jax.random.key(0), (bsz, t_len, d), jnp.float32)
    dh = upstream((bsz, t_len, k, d))
    fns = {}
    for name, (r, f) in learned_candidates(k, d, block_sizes).items():
      fns[(name, "fwd")] = (jax.jit(f), (x, r))
      fns[(name, "train")] = (train_step(f, (0, 1)), (x, r, dh))
      if args.with_mse:
        fns[(name, "train_mse")] = (mse_step(f, (0, 1)), (x, r))
    res = time_interleaved_random(fns, args.repeats)
    copy_f = res[("copy", "fwd")][0]
    fixed_f, fixed_t = res[("fixed/auto", "fwd")][0], res[("fixed/auto", "train")][0]
    for name in dict.fromkeys(n for n, _ in fns):
      (tf, tf_lo, tf_hi), (tt, tt_lo, tt_hi) = res[(name, "fwd")], res[(name, "train")]
      rows.append(
          dict(
              shape=shape,
              method=name,
              fwd_ms=tf * 1e3,
              fwd_ms_range=[tf_lo * 1e3, tf_hi * 1e3],
              train_ms=tt * 1e3,
              train_ms_range=[tt_lo * 1e3, tt_hi * 1e3],
              fwd_vs_copy=tf / copy_f,
              train_vs_copy=tt / copy_f,
              fwd_vs_fixed=tf / fixed_f,
              train_vs_fixed=tt / fixed_t,
              **mse_fields(res, name, "train", copy_f),
          )
      )
      print(
          f"{shape:<18}{name:<34}fwd {tf * 1e3:9.2f} ms ({tf / fixed_f:5.2f}x fixed)"
          f"   train {tt * 1e3:9.2f} ms ({tt / copy_f:5.2f}x copy fwd, {tt / fixed_t:5.2f}x fixed)",
          flush=True,
      )
  load_after, uptime_after = os.getloadavg(), uptime()
  meta = run_meta(args, load_before, load_after, uptime_before, uptime_after)
  meta.update(
      train="jax.value_and_grad of vdot(h, dh), dh an argument, w.r.t. x and the rates (the rates of fixed/auto "
      "and copy are constants: their gradient is zero)",
      auto_per_channel=str(traces.auto_method(1 << 20, False)),
  )
  write_json(args.out, meta, rows)


def run_meta(args, load_before, load_after, uptime_before, uptime_after):
  """What every results file records about the machine, its load and the command."""
  return dict(
      date=time.strftime("%Y-%m-%d %H:%M:%S"),
      backend=jax.default_backend(),
      devices=str(jax.devices()),
      cpu_count=os.cpu_count(),
      platform=platform.platform(),
      processor=platform.processor(),
      jax=jax.__version__,
      repeats=args.repeats,
      command=command_line("benchmarks.scan_bench"),
      loadavg_before=list(load_before),
      loadavg_after=list(load_after),
      uptime_before=uptime_before,
      uptime_after=uptime_after,
      malloc_env={k: os.environ[k] for k in _HEAP_ENV if k in os.environ},
      timing="median [min, max] of --repeats, candidates in a random order within each repeat",
  )


def write_json(path, meta, rows):
  if path:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {path}")


def main():
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.scan_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--shapes", default="8x2048x256x3,1x65536x256x3", help="BxTxDxK,...")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--chunks", default="16,32,64", help="chunk sizes of the 'chunked' linear_scan method")
  p.add_argument("--fused-chunks", default="8,16,32,64", help="chunk sizes of the 'fused' path")
  p.add_argument("--blocks", default="4,8,16", help="chunk sizes of the 'blocked' path")
  p.add_argument("--skip", default="", help="comma-separated names to skip (e.g. sequential)")
  p.add_argument(
      "--per-channel",
      action="store_true",
      help="[K, D] write rates (one per timescale and channel): the linear_scan methods only",
  )
  p.add_argument("--reuse-heap", action="store_true", help="keep freed memory in glibc's heap (see above)")
  p.add_argument("--with-mse", action="store_true", help="also time the gradient of mean(h^2) (see above)")
  p.add_argument("--selective", action="store_true", help="time selective traces instead (see above)")
  p.add_argument("--learned", action="store_true", help="time learned rates instead (see above)")
  p.add_argument("--selective-chunks", default="8,16", help="chunk sizes of selective 'chunked'")
  p.add_argument("--out", default=None, help="default results/scan_bench.json (--selective: _selective)")
  args = p.parse_args()
  if args.reuse_heap and any(os.environ.get(k) != v for k, v in _HEAP_ENV.items()):
    # glibc reads these at start
    os.execve(sys.executable, rerun_argv("benchmarks.scan_bench"), {**os.environ, **_HEAP_ENV})
  if args.out is None:
    args.out = {True: "results/scan_bench_selective.json"}.get(args.selective) or (
        "results/scan_bench_learned.json" if args.learned else "results/scan_bench.json"
    )
  if args.selective:
    return selective_main(args)
  if args.learned:
    return learned_main(args)
  chunk_sizes = [int(c) for c in args.chunks.split(",") if c]
  fused_chunk_sizes = [int(c) for c in args.fused_chunks.split(",") if c]
  block_sizes = [int(c) for c in args.blocks.split(",") if c]
  skip = set(s for s in args.skip.split(",") if s)
  load_before, uptime_before = os.getloadavg(), uptime()
  rows = []
  for shape in args.shapes.split(","):
    bsz, t_len, d, k = (int(v) for v in shape.split("x"))
    x = jax.random.normal(jax.random.key(0), (bsz, t_len, d), jnp.float32)
    nbytes = 4 * (x.size + x.size * k)  # read x, write h
    al = rates(k, d, args.per_channel)
    dh = upstream((bsz, t_len, k, d))
    fns = {}
    for name, f in candidates(al, k, chunk_sizes, fused_chunk_sizes, block_sizes).items():
      if name in skip:
        continue
      fns[(name, "fwd")] = (jax.jit(f), (x,))
      fns[(name, "train")] = (train_step(f), (x, dh))
      if args.with_mse:
        fns[(name, "train_mse")] = (mse_step(f), (x,))
    res = time_interleaved_random(fns, args.repeats)
    results = {name: (res[(name, "fwd")], res[(name, "train")]) for name in dict.fromkeys(n for n, _ in fns)}
    for name, ((t_f, _, _), (t_b, _, _)) in results.items():
      print(f"  measured {shape} {name}: fwd {t_f * 1e3:.2f} ms, training fwd+bwd {t_b * 1e3:.2f} ms", flush=True)
    copy_f, copy_b = results["copy"][0][0], results["copy"][1][0]
    nan3 = (float("nan"),) * 3
    text_f, text_b = results.get("textbook", (nan3, nan3))[0][0], results.get("textbook", (nan3, nan3))[1][0]
    contenders = [n for n in results if n not in ("copy", "textbook", "auto")]
    best = min(contenders, key=lambda n: results[n][0][0])
    best_b = min(contenders, key=lambda n: results[n][1][0])
    for name, ((t_f, f_lo, f_hi), (t_b, b_lo, b_hi)) in results.items():
      rows.append(
          dict(
              shape=shape,
              method=name,
              fwd_ms=t_f * 1e3,
              fwd_ms_range=[f_lo * 1e3, f_hi * 1e3],
              fwd_bwd_ms=t_b * 1e3,
              fwd_bwd_ms_range=[b_lo * 1e3, b_hi * 1e3],
              fwd_gbps=nbytes / t_f / 1e9,
              fwd_vs_copy=t_f / copy_f,
              fwd_bwd_vs_copy=t_b / copy_f,
              fwd_bwd_vs_copy_fwd_bwd=t_b / copy_b,
              fwd_speedup_vs_textbook=text_f / t_f,
              fwd_bwd_speedup_vs_textbook=text_b / t_b,
              best_fwd=name == best,
              best_fwd_bwd=name == best_b,
              **mse_fields(res, name, "fwd_bwd", copy_f),
          )
      )
  load_after, uptime_after = os.getloadavg(), uptime()
  hdr = (
      f"{'shape BxTxDxK':<18}{'method':<13}{'fwd ms':>9}{'GB/s':>7}{'/copy':>7}{'x text':>8}"
      f"{'f+b ms':>9}{'/copy':>7}{'x text':>8}"
  )
  print()
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    mark = ("*" if r["best_fwd"] else " ") + ("*" if r["best_fwd_bwd"] else " ")
    print(
        f"{r['shape']:<18}{r['method']:<13}{r['fwd_ms']:>9.2f}{r['fwd_gbps']:>7.2f}{r['fwd_vs_copy']:>7.2f}"
        f"{r['fwd_speedup_vs_textbook']:>8.2f}{r['fwd_bwd_ms']:>9.2f}{r['fwd_bwd_vs_copy']:>7.2f}"
        f"{r['fwd_bwd_speedup_vs_textbook']:>8.2f} {mark}"
    )
  auto = traces.auto_method(1 << 20, not args.per_channel)
  print(
      f"(* best forward, best forward+backward; auto chose {auto}"
      f"{'/' + str(traces.DEFAULT_FUSED_CHUNK) if auto == 'fused' else ''} on {jax.default_backend()}; "
      f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)"
  )
  meta = run_meta(args, load_before, load_after, uptime_before, uptime_after)
  meta.update(
      rates="per_channel [K, D]" if args.per_channel else "shared [K]",
      auto=auto,
      fused_default_chunk=traces.DEFAULT_FUSED_CHUNK,
      linear_scan_auto=scan.auto_method(1 << 20),
      fwd_bwd="jax.value_and_grad of vdot(h, dh) w.r.t. x, dh [B, T, K, D] an argument (the training step as a "
      "model sees it); fwd_bwd_mse_ms (--with-mse): jax.grad of mean(h^2), which XLA can fuse into the forward",
  )
  write_json(args.out, meta, rows)


if __name__ == "__main__":
  main()
