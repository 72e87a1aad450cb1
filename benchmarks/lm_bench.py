"""Training tokens/s of the EMA LM and the GPT at equal width and depth, for several context lengths.

  python -m benchmarks.lm_bench [--lengths 256,1024,4096] [--tokens 8192] [--width 128] [--depth 2]
                                [--out results/lm_bench.json] [--profile T]

Every step sees the same number of tokens (--tokens = B x T), so a cost per token that is flat in T shows
up as flat tokens/s. One jitted AdamW step (forward, backward, update), median of repeats after warm-up.

MFU: achieved FLOP/s of the step over the float32 matmul peak measured in the same process before and after
the timings (the higher of the two, so a peak measured in a slow moment cannot inflate the MFU; each is the
best of square matmuls of 512, 1024 and 2048 and of the models' own [B T, D] x [D, 4 D] shape). FLOPs
per token are the models' analytic counts (ema_lm.flops_per_token, transformer.flops_per_token): for the EMA
LM both as computed (the top-k FFN's dense matmuls, zeros included: `mfu`) and as a kernel that skips the
zeros would need (only the kept units: `mfu_sparse`, the honest count of useful work); the GPT's includes
its dense T x T attention.

--allocator-ab ROUNDS times the same benchmark in fresh processes instead, ROUNDS with and ROUNDS without huge
pages for big buffers (EMA_JAX_HUGEPAGES=1 / 0, ema_jax/host_memory.py: glibc reads its tunables only at
start, so the two cannot share a process), in a fresh random order each round; each process measures its
own matmul peak. It writes every run's rows and the medians per setting to --out.

--profile T also runs the EMA LM's step at T under jax.profiler and lists its biggest kernels (XLA's own
times, summed over threads) with the source lines they come from: where an MFU below peak goes.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import command_line
from ema_jax import host_memory
from ema_jax.models import ema_lm, transformer
from ema_jax.nn import cpu_topk
from ema_jax.traces import native as native_traces
from ema_jax.tasks.lm import token_nll


def adamw_step(model):
  """(step, params, opt state) of one AdamW step on the LM loss: step(params, opt, batch) -> (params, opt,
  loss), ready to jit with donated params and optimizer state (shared with accelerator_suite.py)."""
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(1e-3)
  opt = tx.init(params)

  def step(params, opt, batch):
    def loss(p):
      s, n = token_nll(nnx.merge(graphdef, p), batch, rngs=None, train=True)
      return s / n

    l, g = jax.value_and_grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, l

  return step, params, opt


def interleaved_step_times(contenders, batch, repeats, seed=0, faults=None):
  """{name: median step time} for {name: (model, trace_context)}: each jitted once (traced inside its
  context), then timed repeat by repeat in a fresh random order, so drifting load hits every contender.
  `faults`, a dict, also receives {name: median minor page faults per step} (getrusage around each step)."""
  fns = {}
  for name, (model, context) in contenders.items():
    step, params, opt = adamw_step(model)
    fn = jax.jit(step, donate_argnums=(0, 1))
    with context:
      params, opt, _ = fn(params, opt, batch)  # traced and compiled here, inside the context
    jax.block_until_ready(params)
    fns[name] = [fn, params, opt]
  ts = {name: [] for name in fns}
  fs = {name: [] for name in fns}
  order = list(fns)
  rng = np.random.default_rng(seed)
  for _ in range(repeats):
    for name in rng.permutation(order):
      fn, params, opt = fns[name]
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      params, opt, l = fn(params, opt, batch)
      jax.block_until_ready(l)
      ts[name].append(time.perf_counter() - t0)
      fs[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
      fns[name][1:] = [params, opt]
  if faults is not None:
    faults.update({name: statistics.median(v) for name, v in fs.items()})
  return {name: statistics.median(v) for name, v in ts.items()}


def matmul_peak(shapes, repeats=5):
  """Best float32 FLOP/s over matmuls of the given (M, K, N) shapes, each the median of `repeats`."""
  best = 0.0
  for m, k, n in shapes:
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a, b))
      ts.append(time.perf_counter() - t0)
    best = max(best, 2.0 * m * k * n / statistics.median(ts))
  return best


def make_batch(b, t, vocab):
  """A [b, t] LM batch of random tokens (seed 0), one document per row."""
  inputs = np.random.default_rng(0).integers(0, vocab - 1, size=(b, t)).astype(np.int32)
  return dict(
      inputs=inputs,
      targets=np.roll(inputs, -1, 1),
      resets=np.zeros((b, t), bool),
      segment_ids=np.zeros((b, t), np.int32),
      mask=np.ones((b, t), np.float32),
  )


def profile_ema_step(args, top=16):
  """The EMA LM's AdamW step at T = args.profile under jax.profiler: kernels (ms per step, summed over the
  threads that ran them) with their output shape and project source lines, the biggest first."""
  import tempfile

  from benchmarks.trace_profile import profile, source_map

  t = args.profile
  b = max(1, args.tokens // t)
  batch = make_batch(b, t, args.vocab)
  cfg = ema_lm.preset("tiny", vocab_size=args.vocab, width=args.width, num_blocks=args.depth, ffn_hidden=4 * args.width)
  step, params, opt = adamw_step(ema_lm.EMALM(cfg, rngs=nnx.Rngs(0)))
  fn = jax.jit(step)
  smap = source_map(fn.lower(params, opt, batch).compile().as_text())
  with tempfile.TemporaryDirectory() as tmp:
    totals, wall = profile(fn, (params, opt, batch), args.repeats, tmp)
  print(f"\nEMA LM step at T={t} (batch {b}): {wall * 1e3:.1f} ms per step with the profiler on; kernels:")
  out = []
  for kernel, ms in totals.most_common(top):
    shape, op, lines = smap.get(kernel, ("?", "?", []))
    print(f"  {ms:8.2f}  {kernel:34s} {shape:24s} {op if op != 'fusion' else ''} {'; '.join(lines)[:120]}")
    out.append(dict(kernel=kernel, ms=ms, shape=shape, op=op, lines=lines, wall_ms=wall * 1e3))
  return out


def allocator_ab(args):
  """Runs this benchmark (args without --allocator-ab and --profile) in child processes, args.allocator_ab
  rounds of {huge pages on, off} in random order; returns {meta, runs, medians}."""
  import subprocess
  import tempfile

  child = [sys.executable, "-m", "benchmarks.lm_bench", "--lengths", args.lengths, "--tokens", str(args.tokens)]
  child += ["--width", str(args.width), "--depth", str(args.depth), "--vocab", str(args.vocab)]
  child += ["--repeats", str(args.repeats)] + ["--topk-ab"] * args.topk_ab + ["--traces-ab"] * args.traces_ab
  settings = {"huge_pages": "1", "no_huge_pages": "0"}
  rng = np.random.default_rng(args.seed)
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.allocator_ab):
      for name in rng.permutation(list(settings)):
        out = os.path.join(tmp, f"{name}_{r}.json")
        env = {**os.environ, host_memory.OPT_OUT: settings[name]}
        env.pop("GLIBC_TUNABLES", None)  # the child decides, from its setting alone
        started = time.strftime("%H:%M:%S")
        proc = subprocess.run(child + ["--out", out], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
          raise SystemExit(f"error: the {name} run failed:\n{proc.stderr[-3000:]}")
        data = json.load(open(out))
        runs.append(dict(setting=str(name), round=r, started=started, meta=data["meta"], rows=data["rows"]))
        t = data["rows"][0]
        print(
            f"  round {r} {name:14s} peak {data['meta']['matmul_peak_flops'] / 1e9:6.1f} GFLOP/s  T={t['T']}: "
            f"EMA {t['ema_tokens_per_s']:,.0f} tok/s, MFU {t['ema_mfu']:.2f}, "
            f"{t['ema_minor_faults_per_step']:,.0f} page faults per step",
            flush=True,
        )
  medians = {}
  for name in settings:
    mine = [x for x in runs if x["setting"] == name]
    medians[name] = {
        str(row["T"]): {
            key: statistics.median(x["rows"][i][key] for x in mine)
            for key in row
            if isinstance(row[key], (int, float)) and not isinstance(row[key], bool)
        }
        for i, row in enumerate(mine[0]["rows"])
    }
  print(f"\nmedians over {args.allocator_ab} rounds:")
  for name in settings:
    for t, m in medians[name].items():
      print(
          f"  {name:14s} T={t}: EMA {m['ema_tokens_per_s']:,.0f} tok/s, MFU {m['ema_mfu']:.2f}, "
          f"{m['ema_minor_faults_per_step']:,.0f} page faults per step; GPT MFU {m['gpt_mfu']:.2f}"
      )
  meta = dict(
      date=time.strftime("%Y-%m-%d %H:%M"),
      command=command_line("benchmarks.lm_bench"),
      child=" ".join(child[1:]),
      load_avg_after=os.getloadavg(),
      design="each run a fresh process with its own matmul peak; settings in a fresh random order per round",
  )
  return dict(meta=meta, runs=runs, medians=medians)


def main():
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.lm_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--lengths", default="256,1024,4096")
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--vocab", type=int, default=257)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="results/lm_bench.json")
  p.add_argument(
      "--profile",
      type=int,
      default=0,
      help="also profile the EMA LM's step at this T: XLA's kernel times by source line (trace_profile.py)",
  )
  p.add_argument(
      "--topk-ab",
      action="store_true",
      help="also time the EMA LM with XLA's TopK instead of the CPU top-k kernel (ema_jax/nn/cpu_topk.py), "
      "interleaved with the others",
  )
  p.add_argument(
      "--traces-ab",
      action="store_true",
      help="also time the EMA LM with the traces' XLA closed form ('blocked') instead of the CPU traces kernel "
      "(ema_jax/traces/native.py), interleaved with the others",
  )
  p.add_argument(
      "--allocator-ab",
      type=int,
      default=0,
      metavar="ROUNDS",
      help="run the benchmark ROUNDS times with and ROUNDS times without huge pages, each in a fresh process "
      "(see above)",
  )
  p.add_argument("--seed", type=int, default=0, help="the order of the --allocator-ab runs")
  args = p.parse_args()
  if args.allocator_ab:
    result = allocator_ab(args)
    if args.out:
      os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
      print(f"wrote {args.out}")
    return
  host_memory.reexec()  # as train.py does: big buffers on huge pages (ema_jax/host_memory.py)
  rows = []
  peak = matmul_peak(
      [(512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (args.tokens, args.width, 4 * args.width)]
  )
  print(f"  float32 matmul peak measured here: {peak / 1e9:.1f} GFLOP/s", flush=True)
  for t in [int(v) for v in args.lengths.split(",")]:
    b = max(1, args.tokens // t)
    batch = make_batch(b, t, args.vocab)
    ema_config = ema_lm.preset(
        "tiny", vocab_size=args.vocab, width=args.width, num_blocks=args.depth, ffn_hidden=4 * args.width
    )
    ema = ema_lm.EMALM(ema_config, rngs=nnx.Rngs(0))
    gpt = transformer.GPT(
        transformer.preset("tiny", vocab_size=args.vocab, width=args.width, num_layers=args.depth, context_len=t),
        rngs=nnx.Rngs(0),
    )
    contenders = dict(ema=(ema, contextlib.nullcontext()), gpt=(gpt, contextlib.nullcontext()))
    if args.topk_ab:
      # its own arrays (the same values): each step donates its parameters
      contenders["ema_xla_topk"] = (ema_lm.EMALM(ema_config, rngs=nnx.Rngs(0)), cpu_topk.enabled(False))
    if args.traces_ab:
      contenders["ema_xla_traces"] = (ema_lm.EMALM(ema_config, rngs=nnx.Rngs(0)), native_traces.KERNEL.enabled(False))
    faults = {}
    times = interleaved_step_times(contenders, batch, args.repeats, faults=faults)
    t_ema, t_gpt = times["ema"], times["gpt"]
    ema_tps, gpt_tps = b * t / t_ema, b * t / t_gpt
    row = dict(
        T=t,
        batch=b,
        ema_tokens_per_s=ema_tps,
        gpt_tokens_per_s=gpt_tps,
        ema_over_gpt=t_gpt / t_ema,
        ema_minor_faults_per_step=faults["ema"],
        gpt_minor_faults_per_step=faults["gpt"],
        ema_mfu=ema_tps * ema_lm.flops_per_token(ema.config, t) / peak,
        ema_mfu_sparse=ema_tps * ema_lm.flops_per_token(ema.config, t, sparse_ffn=True) / peak,
        gpt_mfu=gpt_tps * transformer.flops_per_token(gpt.config, t) / peak,
        ema_topk=("cpu kernel" if cpu_topk.applies(jnp.zeros(1)) else "xla"),
        ema_traces=("cpu kernel" if native_traces.applies(jnp.float32) else "xla (blocked)"),
    )
    if args.topk_ab:
      xla_tps = b * t / times["ema_xla_topk"]
      row.update(
          ema_xla_topk_tokens_per_s=xla_tps, ema_xla_topk_mfu=xla_tps * ema_lm.flops_per_token(ema.config, t) / peak
      )
    if args.traces_ab:
      xla_tps = b * t / times["ema_xla_traces"]
      row.update(
          ema_xla_traces_tokens_per_s=xla_tps,
          ema_xla_traces_mfu=xla_tps * ema_lm.flops_per_token(ema.config, t) / peak,
      )
    rows.append(row)
    print(f"  T={t}: EMA {ema_tps:,.0f} tok/s, GPT {gpt_tps:,.0f} tok/s", flush=True)
  peak_before = peak
  peak_after = matmul_peak(
      [(512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (args.tokens, args.width, 4 * args.width)]
  )
  print(f"  the peak again after the timings: {peak_after / 1e9:.1f} GFLOP/s", flush=True)
  if peak_after > peak:
    for r in rows:
      for key in [k for k in r if "mfu" in k]:
        r[key] *= peak / peak_after
    peak = peak_after
  print(
      f"\n{'T':>6}{'batch':>7}{'EMA LM tok/s':>14}{'GPT tok/s':>12}{'EMA / GPT':>11}"
      f"{'EMA MFU':>9}{'(sparse)':>9}{'GPT MFU':>9}"
  )
  for r in rows:
    print(
        f"{r['T']:>6}{r['batch']:>7}{r['ema_tokens_per_s']:>14,.0f}{r['gpt_tokens_per_s']:>12,.0f}"
        f"{r['ema_over_gpt']:>11.2f}{r['ema_mfu']:>9.2f}{r['ema_mfu_sparse']:>9.2f}{r['gpt_mfu']:>9.2f}"
    )
  if args.topk_ab:
    print(f"\nthe EMA LM with XLA's TopK instead of the {rows[0]['ema_topk']} (same numbers):")
    for r in rows:
      print(f"  T={r['T']}: {r['ema_xla_topk_tokens_per_s']:,.0f} tok/s, MFU {r['ema_xla_topk_mfu']:.2f}")
  if args.traces_ab:
    print(f"\nthe EMA LM with the traces' XLA closed form instead of the {rows[0]['ema_traces']} (same to rounding):")
    for r in rows:
      print(f"  T={r['T']}: {r['ema_xla_traces_tokens_per_s']:,.0f} tok/s, MFU {r['ema_xla_traces_mfu']:.2f}")
  profile_rows = profile_ema_step(args) if args.profile else None
  meta = dict(
      date=time.strftime("%Y-%m-%d"),
      backend=jax.default_backend(),
      devices=str(jax.devices()),
      cpu_count=os.cpu_count(),
      width=args.width,
      depth=args.depth,
      vocab=args.vocab,
      tokens_per_step=args.tokens,
      command=command_line("benchmarks.lm_bench"),
      load_avg=os.getloadavg(),
      glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
      huge_pages=host_memory.describe(),
      matmul_peak_flops=peak,
      matmul_peak_flops_before_after=[peak_before, peak_after],
      mfu="achieved FLOP/s (analytic count per token x tokens/s) / the float32 matmul peak measured in this process",
  )
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, rows=rows, ema_step_profile=profile_rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
