"""One command that says how the codebase does on whatever backend JAX finds (issue 15, items 4 and 5).

  python -m benchmarks.accelerator_suite [--parts devices,traces,lm_step,train,sweep] [--out DIR]
      [--data-root ../shared/data] [--train-seconds 60] [--sweep-runs 8] [--sweep-steps 100]
  python -m benchmarks.accelerator_suite --smoke [--out DIR]     (every part, tiny, on CPU, < 2 minutes)

Parts (each one's numbers are measured in this run; nothing is copied from elsewhere):
  devices  jax.devices(), device_kind, backend; the device's published peak HBM bandwidth and bf16 dense
           FLOP/s from PEAKS (vendor datasheets), and always a measured copy bandwidth and bf16 matmul rate.
  traces   benchmarks.scan_bench's candidates (every method, the textbook form, a copy), forward and the
           training-like gradient of mean(h^2), at (B, T, D, K) = (8, 2048, 256, 3) and (1, 65536, 256, 3),
           rates shared over D and per channel; the fastest per shape, GB/s against the peak bandwidth, and
           what 'auto' picks there (scan.AUTO_METHODS, traces.AUTO_CONSTANT_RATES) and whether it was the fastest.
  lm_step  one jitted AdamW step of the 130m EMA LM and the 124m GPT (bfloat16) at T = 1024 and 4096:
           tokens/s, MFU against the peak bf16 FLOP/s (ema_lm.flops_per_token as computed and counting only
           the kept top-k FFN units; transformer.flops_per_token), the compiled step's memory and the
           device's peak_bytes_in_use.
  train    both models trained by ema_jax.trainer.train on Wikipedia (GPT-2 tokenizer, T = 1024) for a step
           count sized from the measured step time (--train-seconds), then the trainer's final evaluation:
           perplexity on the Wikipedia validation file and the C4 sample (evaluation only).
  sweep    item 5: the set-complement sweep's vmapped trainer step (experiments/set_complement_sweep.py,
           GroupPrograms / train_group) training --sweep-runs runs together, against the same runs one by
           one through the same code (a group of one), with the losses of both compared.
Writes DIR/suite.json and DIR/suite.md (default DIR: results/accelerator/<device_kind slug>/; with --smoke a
new temporary folder, printed, so a smoke run never overwrites a committed suite). The JSON records date,
device, load average (before and after each part) and the command.

On the device machine (no network, Python 3.12; scripts/device_wheels.sh fills .whl/ with what it lacks):
  bash scripts/device_wheels.sh; mkdir -p .acc_data/wikipedia .acc_data/c4_sample
  cp ../shared/data/wikipedia/{train-00,train-01,train-02,validation}.jsonl .acc_data/wikipedia/
  cp ../shared/data/c4_sample/c4_demo.jsonl .acc_data/c4_sample/; echo /.acc_data/ >> .git/info/exclude
  run(carry=[".whl", ".acc_data"], timeout_s=600, command="python3 -m pip install -q --no-index --no-deps
      --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
      PYTHONUNBUFFERED=1 python3 -m benchmarks.accelerator_suite --data-root .acc_data --out /tmp/acc
      --train-workdirs /tmp/acc_train; cp /tmp/acc/suite.json /tmp/acc/suite.md $OUT/")
(--out outside $OUT: $OUT is emptied before each call and brings back 8 files at most, the trainer writes
more; /tmp/acc stays while the machine is warm, so a second call can add parts to the same suite.json.)
Three of the five training files (6.6M GPT-2 tokens, 31 MB) travel: all five, the wheels (5.5 MB) and the
repository would pass the 64 MiB a call carries. A fast device may read them more than once in
--train-seconds; each train row records the tokens it trained on. If one call's 10 minutes are too few, run
--parts devices,traces,lm_step,sweep and then --parts train into the same --out: a part not run is kept from
the earlier suite.json of the same device kind, with its own date (keep_earlier_parts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import command_line, decode_bench, lm_bench
from benchmarks.scan_bench import candidates, rates, time_interleaved_random
from ema_jax import traces
from ema_jax.traces import scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARTS = ("devices", "traces", "lm_step", "decode", "train", "sweep")

# device_kind pattern (re.search, first match wins, so the specific ones come first) -> published peaks of
# one chip: HBM bandwidth (bytes/s) and dense bf16 FLOP/s (NVIDIA's "with sparsity" figures halved).
# None of these is measured here; the suite measures a copy and a matmul beside them.
PEAKS = (
    (r"H200", "NVIDIA H200 SXM", 4.8e12, 989e12, "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/h200)"),
    (r"H100 PCIe", "NVIDIA H100 PCIe", 2.0e12, 756e12, "NVIDIA H100 datasheet (nvidia.com/h100)"),
    (r"H100 NVL", "NVIDIA H100 NVL", 3.9e12, 835e12, "NVIDIA H100 datasheet (nvidia.com/h100)"),
    (r"H100", "NVIDIA H100 SXM", 3.35e12, 989e12, "NVIDIA H100 datasheet (nvidia.com/h100)"),
    (r"A100.*80GB.*PCIe", "NVIDIA A100 80GB PCIe", 1.935e12, 312e12, "NVIDIA A100 datasheet (nvidia.com/a100)"),
    (r"A100.*80GB", "NVIDIA A100 80GB SXM", 2.039e12, 312e12, "NVIDIA A100 datasheet (nvidia.com/a100)"),
    (r"A100", "NVIDIA A100 40GB", 1.555e12, 312e12, "NVIDIA A100 datasheet (nvidia.com/a100)"),
    (r"L40S", "NVIDIA L40S", 0.864e12, 362e12, "NVIDIA L40S datasheet (nvidia.com/l40s)"),
    (r"\bL4\b", "NVIDIA L4", 0.300e12, 121e12, "NVIDIA L4 Tensor Core GPU datasheet (nvidia.com/l4)"),
    (r"TPU v4", "TPU v4", 1.2e12, 275e12, "Google Cloud TPU v4 system architecture (cloud.google.com/tpu/docs/v4)"),
    (r"TPU v5 ?lite|TPU v5e", "TPU v5e", 0.819e12, 197e12, "Google Cloud TPU v5e (cloud.google.com/tpu/docs/v5e)"),
    (r"TPU v5", "TPU v5p", 2.765e12, 459e12, "Google Cloud TPU v5p (cloud.google.com/tpu/docs/v5p)"),
    (r"TPU v6", "TPU v6e (Trillium)", 1.64e12, 918e12, "Google Cloud TPU v6e (cloud.google.com/tpu/docs/v6e)"),
)


def lookup_peaks(device_kind: str):
  """The PEAKS entry matching device_kind as a dict, or None (unknown device: only measured rates)."""
  for pattern, name, bw, flops, source in PEAKS:
    if re.search(pattern, device_kind):
      return dict(name=name, hbm_bytes_per_s=bw, bf16_dense_flops=flops, source=source)
  return None


def slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def median_time(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))  # compile and warm
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


# ------------------------------------------------------------------------------------------------ parts


def part_devices(args, ctx):
  dev = jax.devices()[0]
  n = (1 << 20) if args.smoke else (1 << 28)  # float32 elements: 4 MiB / 1 GiB read and as much written
  x = jnp.ones((n,), jnp.float32)
  copy_s = median_time(jax.jit(lambda x: x + 1.0), x)
  m = 256 if args.smoke else 8192
  a = jnp.ones((m, m), jnp.bfloat16)
  mm_s = median_time(jax.jit(lambda a: a @ a), a)
  out = dict(
      backend=jax.default_backend(),
      devices=[dict(id=d.id, platform=d.platform, device_kind=d.device_kind, str=str(d)) for d in jax.devices()],
      device_kind=dev.device_kind,
      peaks=lookup_peaks(dev.device_kind),
      measured_copy_bytes_per_s=8.0 * n / copy_s,
      copy_note=f"x + 1 over {n} float32 (read and write), median of 5",
      measured_bf16_matmul_flops=2.0 * m**3 / mm_s,
      matmul_note=f"bf16 [{m}, {m}] @ [{m}, {m}], median of 5",
  )
  p = out["peaks"]
  print(f"backend {out['backend']}; devices: {[d['str'] for d in out['devices']]}; device_kind {dev.device_kind!r}")
  print(
      f"  peak: {'unknown (not in PEAKS)' if p is None else p['name'] + ', from ' + p['source']}"
      + ("" if p is None else f": {p['hbm_bytes_per_s'] / 1e9:,.0f} GB/s, {p['bf16_dense_flops'] / 1e12:,.0f} TFLOP/s")
  )
  print(
      f"  measured here: copy {out['measured_copy_bytes_per_s'] / 1e9:,.1f} GB/s, bf16 matmul "
      f"{out['measured_bf16_matmul_flops'] / 1e12:,.2f} TFLOP/s"
  )
  ctx.update(out)
  return out


def part_traces(args, ctx):
  shapes = ["2x256x32x3"] if args.smoke else ["8x2048x256x3", "1x65536x256x3"]
  chunks, fused_chunks, blocks = ([16], [16], [8]) if args.smoke else ([32, 64], [16, 32, 64], [4, 8, 16])
  # The chunk sizes 'auto' uses are always candidates, so "auto picks the fastest" can be read off by name.
  chunks = sorted({*chunks, traces.DEFAULT_CHUNK})
  fused_chunks = sorted({*fused_chunks, traces.DEFAULT_FUSED_CHUNK})
  blocks = sorted({*blocks, traces.DEFAULT_BLOCK})
  peak_bw = (ctx.get("peaks") or {}).get("hbm_bytes_per_s")
  rows, best = [], []
  for per_channel in (False, True):
    for shape in shapes:
      bsz, t_len, d, k = (int(v) for v in shape.split("x"))
      x = jax.random.normal(jax.random.key(0), (bsz, t_len, d), jnp.float32)
      nbytes = 4 * (x.size + x.size * k)  # read x, write h (as scan_bench)
      fns = {}
      for name, f in candidates(rates(k, d, per_channel), k, chunks, fused_chunks, blocks).items():
        fns[(name, "fwd")] = (jax.jit(f), (x,))
        fns[(name, "train")] = (jax.jit(jax.grad(lambda x, f=f: jnp.mean(jnp.square(f(x))))), (x,))
      res = time_interleaved_random(fns, args.repeats)
      names = list(dict.fromkeys(n for n, _ in fns))
      contenders = [n for n in names if n not in ("copy", "textbook", "auto")]
      fastest = {kind: min(contenders, key=lambda n: res[(n, kind)][0]) for kind in ("fwd", "train")}
      auto = traces.auto_method(t_len, not per_channel)
      auto_name = {
          "fused": f"fused/{traces.DEFAULT_FUSED_CHUNK}",
          "blocked": f"blocked/{traces.DEFAULT_BLOCK}",
          "chunked": f"chunked/{traces.DEFAULT_CHUNK}",
      }.get(auto.value, auto.value)
      for name in names:
        (tf, lo, hi), (tt, tlo, thi) = res[(name, "fwd")], res[(name, "train")]
        rows.append(
            dict(
                shape=shape,
                rates="per_channel" if per_channel else "shared",
                method=name,
                fwd_ms=tf * 1e3,
                fwd_ms_range=[lo * 1e3, hi * 1e3],
                train_ms=tt * 1e3,
                train_ms_range=[tlo * 1e3, thi * 1e3],
                fwd_bytes_per_s=nbytes / tf,
                fwd_fraction_of_peak_bw=None if peak_bw is None else nbytes / tf / peak_bw,
                fwd_vs_copy=tf / res[("copy", "fwd")][0],
            )
        )
      entry = dict(
          shape=shape,
          rates="per_channel" if per_channel else "shared",
          fastest_fwd=fastest["fwd"],
          fastest_train=fastest["train"],
          auto_picks=auto_name,
          auto_note=(
              traces.AUTO_CONSTANT_RATES.get(jax.default_backend(), (None, ""))[1]
              if auto in traces.CLOSED_FORMS
              else scan.AUTO_METHODS.get(jax.default_backend(), scan.DEFAULT_AUTO)[1]
          ),
          auto_fastest_fwd=auto_name == fastest["fwd"],
          auto_fastest_train=auto_name == fastest["train"],
          auto_train_ms=res[("auto", "train")][0] * 1e3,
          fastest_train_ms=res[(fastest["train"], "train")][0] * 1e3,
      )
      best.append(entry)
      print(
          f"  {shape:<15}{entry['rates']:<12}fastest fwd {fastest['fwd']} "
          f"({res[(fastest['fwd'], 'fwd')][0] * 1e3:.2f} ms, {nbytes / res[(fastest['fwd'], 'fwd')][0] / 1e9:.1f} GB/s"
          + ("" if peak_bw is None else f", {nbytes / res[(fastest['fwd'], 'fwd')][0] / peak_bw:.0%} of peak")
          + f"), fastest train {fastest['train']} ({entry['fastest_train_ms']:.2f} ms); auto picks {auto_name} "
          f"(train {entry['auto_train_ms']:.2f} ms; fastest: {'yes' if entry['auto_fastest_train'] else 'no'})",
          flush=True,
      )
  return dict(rows=rows, best=best, repeats=args.repeats, train="jax.grad of mean(h^2) w.r.t. x")


def _lm_batch(b, t, vocab):
  return lm_bench.make_batch(b, t, vocab)


def train_step_stats(model, batch, repeats):
  """benchmarks.lm_bench's jitted AdamW step, compiled once ahead so its memory analysis is at hand:
  (median seconds per step, compiled memory in bytes)."""
  step, params, opt = lm_bench.adamw_step(model)

  batch = jax.device_put(batch)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, batch).compile()
  mem = compiled.memory_analysis()
  mem_bytes = None
  if mem is not None:
    mem_bytes = int(
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    )
  params, opt, l = compiled(params, opt, batch)
  jax.block_until_ready(l)
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    params, opt, l = compiled(params, opt, batch)
    jax.block_until_ready(l)
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), mem_bytes


def _models(smoke, t, vocab):
  from ema_jax.models import ema_lm, transformer

  size = ("tiny", "tiny") if smoke else ("130m", "124m")
  ema_cfg = ema_lm.preset(size[0], dtype="bfloat16", vocab_size=vocab)
  gpt_cfg = transformer.preset(size[1], dtype="bfloat16", vocab_size=vocab, context_len=t)
  return (
      (
          "ema_lm",
          size[0],
          ema_cfg,
          ema_lm.flops_per_token(ema_cfg, t),
          ema_lm.flops_per_token(ema_cfg, t, sparse_ffn=True),
      ),
      ("gpt", size[1], gpt_cfg, transformer.flops_per_token(gpt_cfg, t), None),
  )


def _peak_flops(ctx):
  p = ctx.get("peaks")
  if p is not None:
    return p["bf16_dense_flops"], f"published bf16 dense peak of {p['name']} ({p['source']})"
  if "measured_bf16_matmul_flops" in ctx:
    return ctx["measured_bf16_matmul_flops"], "bf16 matmul rate measured in this run (peak unknown)"
  return None, "unknown (run the devices part)"


def part_lm_step(args, ctx):
  from flax import nnx
  from ema_jax.models import ema_lm, transformer

  lengths = [32, 64] if args.smoke else [1024, 4096]
  vocab = 257 if args.smoke else 50257  # GPT-2's vocabulary
  peak, peak_note = _peak_flops(ctx)
  rows = []
  for t in lengths:
    b = max(1, args.lm_tokens // t)
    batch = _lm_batch(b, t, vocab)
    for kind, size, cfg, flops, flops_sparse in _models(args.smoke, t, vocab):
      model = (ema_lm.EMALM if kind == "ema_lm" else transformer.GPT)(cfg, rngs=nnx.Rngs(0))
      step_s, mem_bytes = train_step_stats(model, batch, args.repeats)
      del model
      stats = jax.devices()[0].memory_stats() or {}
      tps = b * t / step_s
      row = dict(
          model=kind,
          preset=size,
          T=t,
          batch=b,
          step_s=step_s,
          tokens_per_s=tps,
          flops_per_token=flops,
          mfu=None if peak is None else tps * flops / peak,
          flops_per_token_sparse=flops_sparse,
          mfu_sparse=None if peak is None or flops_sparse is None else tps * flops_sparse / peak,
          compiled_step_bytes=mem_bytes,
          device_peak_bytes_in_use=stats.get("peak_bytes_in_use"),
      )
      rows.append(row)
      ctx.setdefault("step_s", {})[(kind, t, b)] = step_s
      print(
          f"  {kind:<7}{size:<6}T={t:<6}batch {b:<4}{tps:>12,.0f} tok/s  step {step_s * 1e3:8.1f} ms  MFU "
          + ("n/a" if row["mfu"] is None else f"{row['mfu']:.3f}")
          + ("" if row["mfu_sparse"] is None else f" (sparse {row['mfu_sparse']:.3f})")
          + f"  compiled {0 if mem_bytes is None else mem_bytes / 2**30:.2f} GiB",
          flush=True,
      )
  return dict(
      rows=rows,
      peak_flops=peak,
      peak_note=peak_note,
      tokens_per_step=args.lm_tokens,
      note="device_peak_bytes_in_use is the process's peak so far (JAX has no reset): it only grows down the table",
  )


def wiki_config(kind, args, data_root):
  """The 130m / 124m preset (tiny under --smoke) on Wikipedia files, evaluated on its validation file and on
  the C4 sample: lm_common's wiki preset with the GPT-2 tokenizer and T = 1024 kept."""
  import ml_collections
  from configs import ema_lm as ema_cfg, gpt2 as gpt_cfg

  preset = "tiny" if args.smoke else ("130m" if kind == "ema_lm" else "124m")
  c = (ema_cfg if kind == "ema_lm" else gpt_cfg).get_config(preset)
  wiki = os.path.join(data_root, "wikipedia", "{split}*.jsonl")
  c4 = os.path.join(data_root, "c4_sample", "c4_demo.jsonl")
  c.data.source, c.data.path, c.data.train_split, c.data.eval_split = "files", wiki, "train", "validation"
  c.data.tokenizer = "byte" if args.smoke else "gpt2"
  c.task.eval_sources = ml_collections.ConfigDict(
      {"c4_sample": dict(source="files", path=c4, eval_path=c4, eval_split="validation")}
  )
  if args.smoke:
    c.task.seq_len, c.batch_size = 64, max(1, args.lm_tokens // 64)
    c.task.eval_batch_size = 4
    c.data.eval_max_tokens_final = 4096
    if kind == "gpt":
      c.model.context_len = 64
  else:
    c.task.seq_len, c.batch_size = 1024, max(1, args.lm_tokens // 1024)
    c.task.eval_batch_size = 16
    c.data.eval_max_tokens = 0
  return c


def part_train(args, ctx):
  from ema_jax import trainer

  data_root = args.data_root
  need = [
      os.path.join(data_root, "wikipedia", "validation.jsonl"),
      os.path.join(data_root, "c4_sample", "c4_demo.jsonl"),
  ]
  missing = [p for p in need if not os.path.exists(p)]
  if missing:
    print(f"  skipped: missing {missing} (pass --data-root, the folder holding wikipedia/ and c4_sample/)")
    return dict(skipped=f"missing data files {missing}")
  rows = []
  for kind in ("ema_lm", "gpt"):
    c = wiki_config(kind, args, data_root)
    from flax import nnx
    from ema_jax.models import ema_lm, transformer

    t, b = c.task.seq_len, c.batch_size
    step_s = ctx.get("step_s", {}).get((kind, t, b))
    source = "lm_step part (same model, T and batch)"
    if step_s is None:
      model_cfg = _models(args.smoke, t, 257 if args.smoke else 50257)[0 if kind == "ema_lm" else 1][2]
      model = (ema_lm.EMALM if kind == "ema_lm" else transformer.GPT)(model_cfg, rngs=nnx.Rngs(0))
      step_s, _ = train_step_stats(model, _lm_batch(b, t, model_cfg.vocab_size), 3)
      source = "measured here before training (same model, T and batch)"
    steps = int(min(args.max_train_steps, max(args.min_train_steps, args.train_seconds / step_s)))
    c.steps = steps
    c.optim.warmup_steps = max(1, min(int(c.optim.warmup_steps), steps // 10))
    c.log_every = max(1, steps // 10)
    c.eval_every = steps  # no in-loop evaluation: only the trainer's final one
    c.checkpoint_every = 0
    workdir = os.path.join(args.train_workdirs, kind)
    if os.path.exists(os.path.join(workdir, "config.json")):
      raise ValueError(
          f"{workdir} holds an earlier run (the trainer would resume it); remove it or pass another --train-workdirs."
      )
    print(f"  {kind}: {steps} steps of batch {b} x T {t} (step {step_s * 1e3:.1f} ms from the {source})", flush=True)
    t0 = time.perf_counter()
    last = trainer.train(c, workdir)
    wall = time.perf_counter() - t0
    evals = {k: v for k, v in last.items() if k.startswith("eval/")}
    rows.append(
        dict(
            model=kind,
            preset="tiny" if args.smoke else ("130m" if kind == "ema_lm" else "124m"),
            steps=steps,
            batch=b,
            T=t,
            tokens=steps * b * t,
            tokenizer=c.data.tokenizer,
            step_s_used_for_sizing=step_s,
            step_s_source=source,
            wall_s=wall,
            train_tokens_per_s=last.get("tokens_per_s"),
            final_loss=last.get("loss"),
            status=last.get("status"),
            eval=evals,
            workdir=workdir,
        )
    )
    print(
        f"  {kind}: {wall:.0f} s; perplexity raw: validation {evals.get('eval/raw/validation/perplexity', float('nan')):.3f}, "
        f"C4 sample {evals.get('eval/raw/c4_sample/perplexity', float('nan')):.3f}",
        flush=True,
    )
  return dict(rows=rows, data_root=os.path.abspath(data_root), train_seconds=args.train_seconds)


def part_sweep(args, ctx):
  """The sweep's vmapped path against one by one, same code: GroupPrograms (one compiled vmapped step per
  group) and train_group, on runs that all share one group (dims, heads, burn-in)."""
  from configs import set_complement as sc_config
  from experiments import set_complement_sweep as sweep

  c = sc_config.get_config("sweep")
  n_runs, steps = (3, 12) if args.smoke else (args.sweep_runs, args.sweep_steps)
  c.steps = steps
  c.sweep.chunk_steps = min(100, steps)  # one chunk shape: one compilation per group size
  c.sweep.bema_burn_in = [0]
  if args.smoke:
    c.batch_size, c.task.num_tokens, c.task.train_max_size = 16, 8, 3
    c.sweep.dims = ["8x8"]
  else:
    c.sweep.dims = ["32x32"]
  c.optim.warmup_steps = min(int(c.optim.warmup_steps), max(1, steps // 10))
  runs = sweep.sample_runs(c.sweep, n_runs)
  e, v = runs[0]["embed_dim"], runs[0]["value_dim"]
  programs = sweep.GroupPrograms(c, e, v, int(c.sweep.num_heads), 0)
  chunks = sweep.training_chunks(c, int(c.sweep.chunk_steps))

  def vmapped():
    return sweep.train_group(programs, runs, chunks)[1]

  def one_by_one():
    return np.concatenate([sweep.train_group(programs, [r], chunks)[1] for r in runs], axis=1)

  t0 = time.perf_counter()
  losses_v, losses_1 = vmapped(), one_by_one()  # compiles both (a group of R runs and a group of 1)
  compile_s = time.perf_counter() - t0
  tv, t1 = [], []
  for _ in range(args.sweep_repeats):
    for fn, ts in ((vmapped, tv), (one_by_one, t1)):
      s = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - s)
  out = dict(
      runs=n_runs,
      steps=steps,
      batch=int(c.batch_size),
      dims=f"{e}x{v}",
      vmapped_s=statistics.median(tv),
      one_by_one_s=statistics.median(t1),
      speedup=statistics.median(t1) / statistics.median(tv),
      first_calls_s_incl_compile=compile_s,
      repeats=args.sweep_repeats,
      max_abs_loss_diff=float(np.nanmax(np.abs(losses_v - losses_1))),
      how="experiments/set_complement_sweep.py GroupPrograms + train_group: all runs vmapped vs each run as a "
      "group of one, same data chunks; medians after a compiling call of each, alternating",
  )
  print(
      f"  {n_runs} runs x {steps} steps: vmapped {out['vmapped_s']:.2f} s, one by one {out['one_by_one_s']:.2f} s "
      f"({out['speedup']:.2f}x); losses agree to {out['max_abs_loss_diff']:.2g}",
      flush=True,
  )
  return out


def part_decode(args, ctx):
  """benchmarks.decode_bench on this device: tokens/s of one decoded token and the state per sequence,
  EMA LM against GPT, as the context grows (the GPT's KV cache filled to it; the EMA LM's state constant).
  Full: width 768, 12 blocks (the 130m / 124m shapes, byte vocabulary), contexts 1k-16k, batch 1 and 8."""
  if args.smoke:
    argv = ["--quick"]
  else:
    argv = ["--contexts", "1024,4096,16384", "--batches", "1,8", "--width", "768", "--depth", "12", "--repeats", "10"]
  out = decode_bench.main(argv)
  return dict(settings=out["settings"], rows=out["rows"])


# ------------------------------------------------------------------------------------------------ report


def markdown(report) -> str:
  m = report["meta"]
  lines = [
      f"# Accelerator suite: {m['device_kind']} ({m['backend']})",
      "",
      f"{m['date']}, {m['command']}; load average {m['loadavg_start']} at the start. Every number was measured "
      "in this run (peaks: the vendor's datasheet, named)"
      + "".join(f"; part {k} kept from the run of {d}" for k, d in m.get("parts_kept_from_earlier_runs", {}).items())
      + ".",
      "",
  ]
  p = report.get("devices")
  if p:
    pk = p["peaks"]
    bw = "unknown" if pk is None else f"{pk['hbm_bytes_per_s'] / 1e9:,.0f}"
    fl = "unknown" if pk is None else f"{pk['bf16_dense_flops'] / 1e12:,.0f}"
    lines += [
        "| device | published HBM GB/s | published bf16 TFLOP/s | measured copy GB/s | measured bf16 matmul TFLOP/s |",
        "| --- | --- | --- | --- | --- |",
        f"| {p['device_kind']} | {bw} | {fl} | {p['measured_copy_bytes_per_s'] / 1e9:,.1f} | "
        f"{p['measured_bf16_matmul_flops'] / 1e12:,.2f} |",
        "",
    ]
  tr = report.get("traces")
  if tr:
    lines += [
        "| shape BxTxDxK | rates | fastest fwd | fastest fwd+bwd | auto picks | auto fastest (fwd / fwd+bwd) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {b['shape']} | {b['rates']} | {b['fastest_fwd']} | {b['fastest_train']} | {b['auto_picks']} | "
        f"{'yes' if b['auto_fastest_fwd'] else 'no'} / {'yes' if b['auto_fastest_train'] else 'no'} |"
        for b in tr["best"]
    ]
    lines.append("")
  lm = report.get("lm_step")
  if lm:
    lines += [
        f"MFU against: {lm['peak_note']}.",
        "",
        "| model | T | batch | tokens/s | MFU | MFU (kept FFN units) | compiled step GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in lm["rows"]:
      fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
      gib = "n/a" if r["compiled_step_bytes"] is None else f"{r['compiled_step_bytes'] / 2**30:.2f}"
      lines.append(
          f"| {r['model']} {r['preset']} | {r['T']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {fmt(r['mfu'])} | "
          f"{fmt(r['mfu_sparse'])} | {gib} |"
      )
    lines.append("")
  dec = report.get("decode")
  if dec:
    lines += [
        "| decode: model | batch | context | tokens/s | state bytes / sequence |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['model']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:,.1f} | {r['state_bytes_per_sequence']:,} |"
        for r in dec["rows"]
    ]
    lines.append("")
  t = report.get("train")
  if t and "rows" in t:
    lines += [
        "| model | steps | tokens | wall s | val perplexity (raw) | C4 perplexity (raw) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in t["rows"]:
      ev = r["eval"]
      lines.append(
          f"| {r['model']} | {r['steps']} | {r['tokens']:,} | {r['wall_s']:.0f} | "
          f"{ev.get('eval/raw/validation/perplexity', float('nan')):.3f} | "
          f"{ev.get('eval/raw/c4_sample/perplexity', float('nan')):.3f} |"
      )
    lines.append("")
  s = report.get("sweep")
  if s:
    lines += [
        f"Sweep: {s['runs']} runs x {s['steps']} steps ({s['dims']}): vmapped {s['vmapped_s']:.2f} s, one by one "
        f"{s['one_by_one_s']:.2f} s, {s['speedup']:.2f}x.",
        "",
    ]
  return "\n".join(lines)


def keep_earlier_parts(report, json_path):
  """Parts this run skipped (--parts) but an earlier run on the same device kind wrote to the same suite.json
  are kept, each with its own run record (date, command, load), so a device whose command limit is shorter
  than the whole suite can run it in pieces into one report."""
  if not os.path.exists(json_path):
    return
  with open(json_path) as f:
    earlier = json.load(f)
  same = all(earlier.get("meta", {}).get(k) == report["meta"][k] for k in ("device_kind", "smoke"))
  kept = {}
  for name in PARTS:
    if same and name not in report and name in earlier and "run" in earlier[name]:
      report[name] = earlier[name]
      kept[name] = earlier[name]["run"]["date"]
  report["meta"]["parts_kept_from_earlier_runs"] = kept


def main(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.accelerator_suite",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--smoke", action="store_true", help="every part at tiny sizes (CPU, < 2 minutes)")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
  p.add_argument(
      "--out",
      default=None,
      help="default results/accelerator/<device_kind slug>; with --smoke a new temporary folder",
  )
  p.add_argument("--data-root", default=os.path.join(REPO, "..", "shared", "data"))
  p.add_argument("--repeats", type=int, default=None, help="timing repeats (default 5; --smoke 2)")
  p.add_argument("--lm-tokens", type=int, default=None, help="tokens per LM step, B x T (default 16384)")
  p.add_argument("--train-seconds", type=float, default=None, help="training time per model (default 60)")
  p.add_argument("--min-train-steps", type=int, default=None)
  p.add_argument("--max-train-steps", type=int, default=20000)
  p.add_argument(
      "--train-workdirs",
      default=None,
      help="folder of the train part's workdirs (default: a new one under the system's temporary folder)",
  )
  p.add_argument("--sweep-runs", type=int, default=8)
  p.add_argument("--sweep-steps", type=int, default=100)
  p.add_argument("--sweep-repeats", type=int, default=3)
  args = p.parse_args(argv)
  parts = [s for s in args.parts.split(",") if s]
  bad = [s for s in parts if s not in PARTS]
  if bad:
    raise ValueError(f"--parts: unknown {bad}; accepted: {', '.join(PARTS)}")
  args.repeats = args.repeats or (2 if args.smoke else 5)
  args.lm_tokens = args.lm_tokens or (128 if args.smoke else 16384)
  args.train_seconds = args.train_seconds if args.train_seconds is not None else (1.0 if args.smoke else 60.0)
  args.min_train_steps = args.min_train_steps or (4 if args.smoke else 50)
  if args.train_workdirs is None and "train" in parts:
    args.train_workdirs = tempfile.mkdtemp(prefix="accelerator_suite_train_")
  if args.out is None and args.smoke:  # never over a committed suite
    args.out = tempfile.mkdtemp(prefix="accelerator_suite_smoke_")
    print(f"--smoke without --out: writing to {args.out}", flush=True)
  elif args.out is None:
    args.out = os.path.join(REPO, "results", "accelerator", slug(jax.devices()[0].device_kind))
  os.makedirs(args.out, exist_ok=True)
  report = dict(
      meta=dict(
          date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          command=command_line("benchmarks.accelerator_suite", argv),
          backend=jax.default_backend(),
          device_kind=jax.devices()[0].device_kind,
          devices=[str(d) for d in jax.devices()],
          jax=jax.__version__,
          python=platform.python_version(),
          platform=platform.platform(),
          cpu_count=os.cpu_count(),
          smoke=args.smoke,
          parts=parts,
          loadavg_start=list(os.getloadavg()),
          part_seconds={},
          part_loadavg={},
          auto_table=dict(
              scan={k: [m.value, note] for k, (m, note) in scan.AUTO_METHODS.items()},
              traces_constant_rates={
                  k: [None if m is None else m.value, note] for k, (m, note) in traces.AUTO_CONSTANT_RATES.items()
              },
          ),
      )
  )
  ctx = dict(peaks=lookup_peaks(jax.devices()[0].device_kind))  # the devices part adds measured rates
  fns = dict(
      devices=part_devices,
      traces=part_traces,
      lm_step=part_lm_step,
      decode=part_decode,
      train=part_train,
      sweep=part_sweep,
  )
  for name in PARTS:
    if name not in parts:
      continue
    print(f"== {name}", flush=True)
    load0, t0 = list(os.getloadavg()), time.perf_counter()
    report[name] = fns[name](args, ctx)
    report[name]["run"] = dict(
        date=report["meta"]["date"],
        command=report["meta"]["command"],
        seconds=time.perf_counter() - t0,
        loadavg_before=load0,
        loadavg_after=list(os.getloadavg()),
    )
    report["meta"]["part_seconds"][name] = report[name]["run"]["seconds"]
    report["meta"]["part_loadavg"][name] = dict(before=load0, after=list(os.getloadavg()))
  report["meta"]["loadavg_end"] = list(os.getloadavg())
  json_path, md_path = os.path.join(args.out, "suite.json"), os.path.join(args.out, "suite.md")
  keep_earlier_parts(report, json_path)
  with open(json_path + ".tmp", "w") as f:
    json.dump(report, f, indent=1, default=str)
  os.replace(json_path + ".tmp", json_path)
  with open(md_path, "w") as f:
    f.write(markdown(report) + "\n")
  print(markdown(report))
  print(f"wrote {json_path} and {md_path}")
  return report


if __name__ == "__main__":
  main()
