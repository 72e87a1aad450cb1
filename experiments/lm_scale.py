"""The EMA LM against the GPT: learning curves on Wikipedia, as far as this machine goes (configs/lm_scale.py).

  python -m experiments.lm_scale --workdir W [--steps 8000] [--models ema,gpt] [--cores 0,1]
  python -m experiments.lm_scale --workdir W --report-only          (rewrite results from W's runs)
  python -m experiments.lm_scale --measure-tokenizers               (the tokenizer choice; no training)

Trains each model with `train.py --config configs/lm_scale.py:<model> --workdir W/<model>` (in parallel,
each pinned to its own core with taskset when --cores names one per model), then writes --results
(default results/lm_scale): curves.json and curves.csv (every in-loop evaluation: text seen in bytes and in
GPT-2 tokens, training seconds, bits/byte and perplexity per GPT-2 token on the Wikipedia validation file
and the C4 sample), fits.json (a power law with an offset fitted to each curve, and its extrapolation,
labelled as one), table.md and curves.png. Rerunning the command resumes both runs (the trainer's
checkpoints); a larger --steps extends them, and the constant learning rate leaves the measured part
unchanged.

--measure-tokenizers times one AdamW step of both models with the byte and the GPT-2 tokenizer (batch 16 x
512, interleaved in random order, medians) and converts it to bytes of training text per second with the
measured bytes per GPT-2 token of the training files: why configs/lm_scale.py uses GPT-2's tokenizer.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("ema", "gpt")
SOURCES = ("validation", "c4_sample")
LABELS = {"ema": "EMA LM", "gpt": "GPT"}


# ------------------------------------------------------------------------------------------- text sizes


def train_text_rates(config, max_documents: int = 400) -> dict:
  """Bytes per GPT-2 token and per byte-tokenizer token (eod included) of the training files' first
  documents: converts training tokens into text seen."""
  from ema_jax.data import tokenizer as tokenizer_lib
  from ema_jax.data.text import config as config_lib
  from ema_jax.data.text import sources

  spec = config_lib.parse_data_config(config.data)
  docs = sources.load_documents(spec, spec.train_split)
  gpt2 = tokenizer_lib.get_tokenizer("gpt2")
  n_bytes = n_gpt2 = n_docs = 0
  for text in docs.iter_range(0, min(len(docs), max_documents)):
    n_bytes += len(text.encode("utf-8", errors="surrogatepass"))
    n_gpt2 += len(gpt2.encode_array(text)) + 1  # + its end of document
    n_docs += 1
  return dict(
      documents=n_docs,
      bytes=n_bytes,
      bytes_per_gpt2_token=n_bytes / n_gpt2,
      bytes_per_byte_token=n_bytes / (n_bytes + n_docs),
  )


# --------------------------------------------------------------------------------- tokenizer choice


def measure_tokenizers(rounds: int = 5, repeats: int = 3) -> dict:
  """Seconds per AdamW step (batch 16 x 512) of both models with each tokenizer, interleaved in random
  order (median over rounds of the per-round median), and the bytes of training text per second."""
  import jax
  from flax import nnx

  from benchmarks import lm_bench
  from configs import lm_scale as cfg_lib
  from ema_jax.tasks.base import get_task

  rates = train_text_rates(cfg_lib.get_config("ema"))
  contenders = {}
  for model in MODELS:
    for tok in ("byte", "gpt2"):
      c = cfg_lib.get_config(model + (",byte" if tok == "byte" else ""))
      task = get_task(c, None)
      net = task.build_model(nnx.Rngs(0))
      step, params, opt = lm_bench.adamw_step(net)
      fn = jax.jit(step, donate_argnums=(0, 1))
      batch = lm_bench.make_batch(c.batch_size, c.task.seq_len, task.tokenizer.vocab_size)
      params, opt, _ = fn(params, opt, batch)
      jax.block_until_ready(params)
      contenders[(model, tok)] = dict(fn=fn, params=params, opt=opt, batch=batch, config=c, times=[])
  order = list(contenders)
  rng = random.Random(0)
  for _ in range(rounds):
    rng.shuffle(order)
    for key in order:
      k = contenders[key]
      ts = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        k["params"], k["opt"], loss = k["fn"](k["params"], k["opt"], k["batch"])
        jax.block_until_ready(loss)
        ts.append(time.perf_counter() - t0)
      k["times"].append(statistics.median(ts))
  rows = []
  for (model, tok), k in contenders.items():
    c = k["config"]
    s = statistics.median(k["times"])
    tokens = c.batch_size * c.task.seq_len
    bytes_per_token = rates["bytes_per_gpt2_token"] if tok == "gpt2" else rates["bytes_per_byte_token"]
    rows.append(
        dict(
            model=model,
            tokenizer=tok,
            step_s=s,
            tokens_per_s=tokens / s,
            text_bytes_per_s=tokens * bytes_per_token / s,
            context_bytes=c.task.seq_len * bytes_per_token,
        )
    )
  return dict(rows=rows, text=rates, rounds=rounds, repeats=repeats, batch="16 x 512")


# ---------------------------------------------------------------------------------------------- runs


def run_models(args) -> None:
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  cores = [c.strip() for c in args.cores.split(",") if c.strip()] if args.cores else []
  if cores and len(cores) != len(models):
    raise SystemExit(f"--cores={args.cores!r}: give one core per model ({len(models)}), or leave it out.")
  procs = []
  for i, model in enumerate(models):
    wd = os.path.join(args.workdir, model)
    os.makedirs(wd, exist_ok=True)
    cmd = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--config={os.path.join(REPO, 'configs', 'lm_scale.py')}:{model}{args.config_suffix}",
        f"--workdir={wd}",
        f"--config.steps={args.steps}",
    ] + [f"--config.{o}" for o in args.override]
    if cores:
      cmd = ["taskset", "-c", cores[i]] + cmd
    log = open(os.path.join(args.workdir, f"{model}.log"), "a")
    log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
    log.flush()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    procs.append((model, p, log))
    if not args.parallel:
      p.wait()
  failed = []
  for model, p, log in procs:
    if p.wait() != 0:
      failed.append(f"{model} (exit {p.returncode}, log {log.name})")
    log.close()
  if failed:
    raise SystemExit("lm_scale: training failed: " + ", ".join(failed))


# -------------------------------------------------------------------------------------------- report


def read_run(wd: str, rates: dict) -> dict:
  """One run's curve: every eval_<step>.json with the text seen and the training seconds to that step."""
  with open(os.path.join(wd, "config.json")) as f:
    config = json.load(f)
  tokens_per_step = config["batch_size"] * config["task"]["seq_len"]
  tok = config["data"]["tokenizer"]
  bytes_per_token = rates["bytes_per_gpt2_token"] if tok == "gpt2" else rates["bytes_per_byte_token"]
  log_rows = []
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "steps_per_s" in row:
        log_rows.append(row)
  log_rows.sort(key=lambda r: r["step"])
  # Training seconds: each log interval's steps over its measured rate (evaluations excluded); the first
  # interval after a start includes compilation and is counted at the median rate instead.
  rates_s = [r["steps_per_s"] for r in log_rows]
  median_rate = statistics.median(rates_s) if rates_s else float("nan")
  seconds, prev, cum = {}, 0, 0.0
  for r in log_rows:
    n = r["step"] - prev
    cum += n / (r["steps_per_s"] if r["steps_per_s"] > 0.25 * median_rate else median_rate)
    seconds[r["step"]] = cum
    prev = r["step"]
  points = []
  for name in sorted(os.listdir(wd)):
    if not (name.startswith("eval_") and name.endswith(".json") and name[5:-5].isdigit()):
      continue
    step = int(name[5:-5])
    with open(os.path.join(wd, name)) as f:
      ev = json.load(f)
    res = ev.get("results", ev).get("raw", ev.get("raw"))
    if res is None:
      continue
    p = dict(step=step, tokens=step * tokens_per_step)
    p["text_bytes"] = p["tokens"] * bytes_per_token
    p["text_gpt2_tokens"] = p["text_bytes"] / rates["bytes_per_gpt2_token"]
    done = [s for s in seconds if s <= step]
    p["train_seconds"] = seconds[max(done)] / max(done) * step if done else None
    for row in res["table"]:
      if row["length"] == config["task"]["seq_len"]:
        p[f"{row['source']}/bits_per_byte"] = row["bits_per_byte"]
        p[f"{row['source']}/perplexity_per_gpt2_token"] = row.get(
            "perplexity_per_gpt2_token", math.exp(row["nll"] / row["gpt2_tokens"]) if "gpt2_tokens" in row else None
        )
    points.append(p)
  points.sort(key=lambda p: p["step"])
  return dict(
      tokenizer=tok,
      tokens_per_step=tokens_per_step,
      median_tokens_per_s=statistics.median([r["tokens_per_s"] for r in log_rows]) if log_rows else None,
      points=points,
  )


def fit_power_law(x, y, offset: bool = True) -> dict | None:
  """y = e + a x^-b by least squares in log space, e over a grid in [0, min y) (offset=True) or e = 0 (a pure
  power law, two parameters); None with fewer points than parameters + 1."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < (4 if offset else 3):
    return None
  best = None
  for e in np.linspace(0.0, 0.995 * y.min(), 400) if offset else [0.0]:
    lx, ly = np.log(x), np.log(y - e)
    slope, icpt = np.polyfit(lx, ly, 1)
    pred = e + np.exp(icpt) * x**slope
    sse = float(np.sum((np.log(pred) - np.log(y)) ** 2))
    if best is None or sse < best["sse_log"]:
      best = dict(offset=float(e), scale=float(np.exp(icpt)), exponent=float(-slope), sse_log=sse)
  return best


def report(args) -> dict:
  from configs import lm_scale as cfg_lib

  rates = train_text_rates(cfg_lib.get_config("ema"))
  runs = {}
  for model in MODELS:
    wd = os.path.join(args.workdir, model)
    if os.path.exists(os.path.join(wd, "config.json")):
      runs[model] = read_run(wd, rates)
  if not runs:
    raise SystemExit(f"lm_scale: no runs under {args.workdir} (expected {', '.join(MODELS)}/config.json).")
  fits, extrapolate = {}, [1e8, 1e9, 1e10]
  for model, run in runs.items():
    for source in SOURCES:
      key = f"{source}/bits_per_byte"
      pts = [p for p in run["points"] if p.get(key) is not None and p["text_bytes"] > 0]
      for kind, with_offset in (("offset", True), ("pure", False)):
        f = fit_power_law([p["text_bytes"] for p in pts], [p[key] for p in pts], offset=with_offset)
        if f is not None:
          f["extrapolated_bits_per_byte"] = {
              f"{b:.0e}": f["offset"] + f["scale"] * b ** (-f["exponent"]) for b in extrapolate
          }
        fits[f"{model}/{source}/{kind}"] = f
  ratios = []
  if "ema" in runs and "gpt" in runs:
    gpt = {p["step"]: p for p in runs["gpt"]["points"]}
    for p in runs["ema"]["points"]:
      q = gpt.get(p["step"])
      if q is None:
        continue
      row = dict(step=p["step"], text_bytes=p["text_bytes"])
      for source in SOURCES:
        a, b = p.get(f"{source}/perplexity_per_gpt2_token"), q.get(f"{source}/perplexity_per_gpt2_token")
        row[f"{source}/ema_over_gpt_ppl"] = a / b if a and b else None
      ratios.append(row)
  out = dict(
      command=args.command or " ".join(["python -m experiments.lm_scale"] + sys.argv[1:]),
      date=time.strftime("%Y-%m-%d"),
      machine=f"{platform.machine()} CPU, {os.cpu_count()} cores",
      text=rates,
      runs=runs,
      ema_over_gpt=ratios,
      fits=fits,
      fit_note="bits/byte = offset + scale * text_bytes^-exponent, least squares in log space, with a fitted offset "
      "('offset', three parameters) and without ('pure', two); the values at 1e8-1e10 bytes are extrapolations "
      "beyond the measured range, not measurements.",
  )
  os.makedirs(args.results, exist_ok=True)
  with open(os.path.join(args.results, "curves.json"), "w") as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(args.results, "curves.csv"), "w", newline="") as f:
    w = csv.writer(f)
    cols = ["step", "tokens", "text_bytes", "text_gpt2_tokens", "train_seconds"]
    metrics = [f"{s}/{m}" for s in SOURCES for m in ("bits_per_byte", "perplexity_per_gpt2_token")]
    w.writerow(["model"] + cols + metrics)
    for model, run in runs.items():
      for p in run["points"]:
        w.writerow([model] + [p.get(c) for c in cols + metrics])
  write_table(out, os.path.join(args.results, "table.md"))
  plot(out, os.path.join(args.results, "curves.png"))
  return out


def write_table(out: dict, path: str) -> None:
  lines = [
      "| model | step | text seen (MB) | GPT-2 tokens seen (M) | train min | wiki bits/byte | wiki ppl/GPT-2 tok "
      "| C4 bits/byte | C4 ppl/GPT-2 tok |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for model, run in out["runs"].items():
    for p in run["points"]:
      mins = p["train_seconds"] / 60 if p.get("train_seconds") else float("nan")
      lines.append(
          f"| {LABELS[model]} | {p['step']} | {p['text_bytes'] / 1e6:.2f} | {p['text_gpt2_tokens'] / 1e6:.2f} "
          f"| {mins:.1f} | {p['validation/bits_per_byte']:.4f} | {p['validation/perplexity_per_gpt2_token']:.1f} "
          f"| {p['c4_sample/bits_per_byte']:.4f} | {p['c4_sample/perplexity_per_gpt2_token']:.1f} |"
      )
  if out["ema_over_gpt"]:
    lines += ["", "| step | text seen (MB) | EMA/GPT ppl, wiki | EMA/GPT ppl, C4 |", "|---:|---:|---:|---:|"]
    for r in out["ema_over_gpt"]:
      lines.append(
          f"| {r['step']} | {r['text_bytes'] / 1e6:.2f} | {r['validation/ema_over_gpt_ppl']:.3f} "
          f"| {r['c4_sample/ema_over_gpt_ppl']:.3f} |"
      )
  lines += [
      "",
      "Power-law fits (bits/byte = offset + scale * bytes^-exponent, with a fitted offset and without; the values",
      "at 1e8-1e10 bytes are extrapolations, not measurements):",
      "",
  ]
  lines += ["| curve | offset | exponent | at 1e8 bytes | at 1e9 | at 1e10 |", "|---|---:|---:|---:|---:|---:|"]
  for key, f in out["fits"].items():
    if f:
      e = f["extrapolated_bits_per_byte"]
      lines.append(
          f"| {key} | {f['offset']:.3f} | {f['exponent']:.3f} | {e['1e+08']:.3f} | {e['1e+09']:.3f} | {e['1e+10']:.3f} |"
      )
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(out: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, source, title in zip(axes, SOURCES, ("Wikipedia validation", "C4 sample")):
    for model, run in out["runs"].items():
      pts = [p for p in run["points"] if p.get(f"{source}/bits_per_byte") is not None]
      x = [p["text_bytes"] / 1e6 for p in pts]
      y = [p[f"{source}/perplexity_per_gpt2_token"] for p in pts]
      line = ax.plot(x, y, "o-", label=LABELS[model])[0]
      f = out["fits"].get(f"{model}/{source}/pure")
      if f and x:
        xs = np.geomspace(min(x), max(x) * 4, 50)
        bpb = f["offset"] + f["scale"] * (xs * 1e6) ** (-f["exponent"])
        ppl = np.exp(bpb * math.log(2) * out["text"]["bytes_per_gpt2_token"])
        ax.plot(
            xs,
            ppl,
            "--",
            color=line.get_color(),
            alpha=0.6,
            label=f"{LABELS[model]}, power law (extrapolated past the data)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training text seen (MB of Wikipedia)")
    ax.set_ylabel("perplexity per GPT-2 token")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", help="Where the runs go (one folder per model).")
  p.add_argument("--results", default=os.path.join(REPO, "results", "lm_scale"))
  p.add_argument("--models", default="ema,gpt")
  p.add_argument("--steps", type=int, default=600, help="Optimizer steps of each run (batch 16 x 512).")
  p.add_argument("--cores", default="", help="One CPU core per model for taskset (e.g. 0,1); empty: no pinning.")
  p.add_argument("--sequential", dest="parallel", action="store_false", help="One run after the other.")
  p.add_argument("--config-suffix", default="", help="Appended to the config argument (e.g. ',tiny').")
  p.add_argument("--override", action="append", default=[], help="A config override FIELD=VALUE (repeatable).")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--measure-tokenizers", action="store_true")
  p.add_argument("--command", default="", help="The command recorded in curves.json (default: this one).")
  args = p.parse_args()
  if args.measure_tokenizers:
    out = measure_tokenizers()
    out.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()} CPU, {os.cpu_count()} cores")
    out["load_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    if args.results:
      os.makedirs(args.results, exist_ok=True)
      with open(os.path.join(args.results, "tokenizer_choice.json"), "w") as f:
        json.dump(out, f, indent=1)
    return
  if not args.workdir:
    raise SystemExit("lm_scale: --workdir is required (unless --measure-tokenizers).")
  if not args.report_only:
    run_models(args)
  out = report(args)
  print(open(os.path.join(args.results, "table.md")).read())
  del out


if __name__ == "__main__":
  main()
