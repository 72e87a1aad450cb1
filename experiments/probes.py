"""The probes (MQAR, selective copy, copy, filtering) for five architectures at equal parameters and tokens.

  python -m experiments.probes --workdir W [--seeds 0,1] [--probes recall,selective_copy,copy,filtering]
      [--models ema3,ema8,selective,gpt,hybrid] [--steps N] [--lr LR] [--width 64] [--window 16] [--results results/probes]
  python -m experiments.probes --workdir W --results results/probes --reanalyse   (tables and plots again)

`recall` is multi-query associative recall as in Zoology and `selective_copy` the Mamba paper's task (see
ema_jax/data/probes.py); `recall_toy`, the earlier toy recall, can be added to --probes. Every run trains on
the range of sizes configs/probes.py gives its probe (one drawn per step) and is evaluated inside the range
and beyond it; budgets (steps, batch, learning rate) are configs/probes.py's per probe.

The models (all over the probe vocabulary, 2 blocks / layers, trained by ema_jax.trainer with the same
optimiser, batch, steps and data order per seed, so every model sees the same training tokens):
  ema3       the EMA LM with the paper's fixed traces (K = 3, write rates 0.5, 0.1, 0.02), linear predictor
  ema8       the same with K = 8 fixed timescales, write rates 2^-1 .. 2^-8 (0.5 .. 0.0039)
  selective  the EMA LM with selective traces (K = 3; rates sigmoid(W x + b) starting at 0.5, 0.1, 0.02)
  gpt        the GPT baseline (learned absolute positions, causal attention over everything, one head: with
             four heads of width 16 it confused keys on MQAR and failed the check below)
  hybrid     the EMA LM with fixed K = 3 traces plus causal attention over the last --window tokens per block
Per probe, the width of each is chosen so its parameter count is the closest to the ema3 model's at --width
(default 64; FFN hidden = 4 x width for the EMA models, as in the LM task's tiny preset, 2 blocks, 4 heads for
the EMA models' mixing, 1 for the GPT).
Runs whose final evaluation exists are not retrained, so an interrupted grid continues where it stopped.

The harness check: the GPT must reach GATE (0.99) answer accuracy on MQAR at every trained size before
the table compares anything on recall; summary.json's `gate` and the top of table.md say whether it did.

Writes --results (default W/results): summary.json (every run's accuracies per size, raw and EMA weights),
table.md (answer accuracy below / within / beyond the trained range per probe and model, mean and range over
seeds; the state each model keeps per sequence at 256 .. 16k tokens), curves.png (accuracy against size,
one panel per probe, the trained range shaded) and, when the grid has filtering and copy or recall, dial.png
(copy / recall accuracy within the trained range against filtering accuracy beyond it, one point per model).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Dict, List

import numpy as np
from absl import app, flags

PROBES = ("recall", "selective_copy", "copy", "filtering", "recall_toy")
DEFAULT_PROBES = ("recall", "selective_copy", "copy", "filtering")
MODELS = ("ema3", "ema8", "selective", "gpt", "hybrid")
CONTEXTS = (256, 1024, 4096, 16384)  # for the state-size table
EMA8_ALPHAS = [2.0 ** -(i + 1) for i in range(8)]
GATE = 0.99  # the GPT's MQAR answer accuracy at every trained size, before recall is compared
# Sizes relative to the range a run trains on (rows carry train_sizes).
REGIONS = {
    "shorter": lambda r: r["size"] < min(r["train_sizes"]),
    "within": lambda r: min(r["train_sizes"]) <= r["size"] <= max(r["train_sizes"]),
    "beyond": lambda r: r["size"] > max(r["train_sizes"]),
}


def define_flags():
  """The command-line flags, defined only when the module runs as a script (tests import it)."""
  global _WORKDIR, _SEEDS, _PROBES, _MODELS, _STEPS, _LR, _WINDOW, _WIDTH, _RESULTS, _REANALYSE
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go.", required=True)
  _SEEDS = flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds.")
  _PROBES = flags.DEFINE_string("probes", ",".join(DEFAULT_PROBES), f"Comma-separated, from {PROBES}.")
  _MODELS = flags.DEFINE_string("models", ",".join(MODELS), "Comma-separated subset of the models.")
  _STEPS = flags.DEFINE_integer("steps", None, "Training steps of every run (default: configs/probes.py's per probe).")
  _LR = flags.DEFINE_float("lr", None, "Peak learning rate of every run (default: configs/probes.py's per probe).")
  _WINDOW = flags.DEFINE_integer("window", 16, "The hybrid's attention window W in tokens.")
  _WIDTH = flags.DEFINE_integer("width", 64, "Width of the ema3 model; the others match its parameter count.")
  _RESULTS = flags.DEFINE_string("results", None, "Where the results go (default: <workdir>/results).")
  _REANALYSE = flags.DEFINE_bool("reanalyse", False, "Only rewrite table.md and the plots from summary.json.")


def model_edits(model: str, width: int, window: int) -> Dict[str, Any]:
  """config.model fields of a grid model at a given width."""
  if model == "gpt":
    return dict(kind="gpt", preset="tiny", width=width, num_heads=1)  # one head: configs/probes.py
  fields = dict(kind="ema_lm", preset="tiny", width=width, ffn_hidden=4 * width)
  if model == "ema8":
    fields["alphas"] = list(EMA8_ALPHAS)
  elif model == "selective":
    fields["trace_kind"] = "selective"
  elif model == "hybrid":
    fields["window"] = int(window)
  elif model != "ema3":
    raise ValueError(f"experiments.probes: model {model!r}; accepted: {', '.join(MODELS)}.")
  return fields


def make_config(probe: str, model: str, width: int, *, seed: int, window: int, steps=None, tiny: bool = False, lr=None):
  import ml_collections

  from configs import probes as probes_config

  base = "ema_lm" if model != "gpt" else "gpt"
  c = probes_config.get_config(",".join([probe, base] + (["tiny"] if tiny else [])))
  c.model = ml_collections.ConfigDict(model_edits(model, width, window))
  if tiny:  # the test's sizes (configs/probes.py's 'tiny'): small widths, two heads, a handful of steps
    c.model["num_heads" if model == "gpt" else "heads"] = 2
  c.seed = int(seed)
  c.eval_every = 0
  if steps:
    c.steps = int(steps)
    c.checkpoint_every = int(steps)
  if lr:
    c.optim.lr = float(lr)
  return c


def param_count(c) -> int:
  from ema_jax.tasks.probes import ProbesTask

  task = ProbesTask(c)
  task.validate()
  mcfg = task.model_config()
  if c.model.kind == "gpt":
    from ema_jax.models import transformer

    return transformer.param_count(mcfg)
  from ema_jax.models import ema_lm

  return ema_lm.param_count(mcfg)


def match_width(probe: str, model: str, target: int, *, window: int, step: int = 8, tiny: bool = False) -> int:
  """The width (a multiple of `step`) whose parameter count is the closest to `target`."""
  best = None
  for width in range(step, 1024 + 1, step):
    n = param_count(make_config(probe, model, width, seed=0, window=window, tiny=tiny))
    if best is None or abs(n - target) < abs(best[1] - target):
      best = (width, n)
    if n > target:
      break
  return best[0]


def state_bytes(c, contexts=CONTEXTS) -> List[int]:
  """Bytes a model keeps per sequence while decoding, after each context length: the arrays of its decoding
  cache for one sequence. EMA models (fixed, selective, hybrid): EMALM.init_cache(1), which does not grow.
  GPT: its key/value cache GPT.init_cache(1, T), built abstractly (shapes only) with context_len = T, since
  the cache of a T-token context holds T positions whatever the probe's own length."""
  import dataclasses

  import jax
  from flax import nnx

  from ema_jax.models import transformer
  from ema_jax.tasks.probes import ProbesTask

  task = ProbesTask(c)
  mcfg = task.model_config()
  nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  if c.model.kind == "gpt":
    out = []
    for t in contexts:
      cfg = dataclasses.replace(mcfg, context_len=t)
      model = nnx.eval_shape(lambda cfg=cfg: transformer.GPT(cfg, rngs=nnx.Rngs(0)))
      out.append(nbytes(jax.eval_shape(lambda m=model, t=t: m.init_cache(1, t))))
    return out
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  return [nbytes(jax.eval_shape(lambda: model.init_cache(1)))] * len(contexts)


def train_grid(probes, models, seeds, workdir, *, window, width=64, steps=None, tiny=False, lr=None, log=print):
  """Trains what is missing; returns (runs [rows], models {name: {width, params, ...}})."""
  from ema_jax import trainer

  info: Dict[str, Dict[str, Any]] = {}
  rows: List[Dict[str, Any]] = []
  for probe in probes:
    # Matched per probe: the vocabularies differ (MQAR's 1,024 tokens make embeddings a large share).
    target = param_count(make_config(probe, "ema3", 16 if tiny else width, seed=0, window=window, tiny=tiny))
    for model in models:
      w = match_width(probe, model, target, window=window, step=4 if tiny else 8, tiny=tiny)
      c0 = make_config(probe, model, w, seed=0, window=window, steps=steps, tiny=tiny, lr=lr)
      entry = info.setdefault(model, dict(width={}, params={}, edits={}))
      entry["width"][probe] = w
      entry["params"][probe] = param_count(c0)
      entry["edits"][probe] = model_edits(model, w, window)
      entry["state_bytes"] = dict(zip([str(t) for t in CONTEXTS], state_bytes(c0)))
      for seed in seeds:
        c = make_config(probe, model, w, seed=seed, window=window, steps=steps, tiny=tiny, lr=lr)
        wd = os.path.join(workdir, f"{probe}_{model}_s{seed}")
        final = os.path.join(wd, f"eval_{c.steps}.json")
        if not os.path.exists(final):
          log(f"== {probe} {model} (width {w}) seed {seed}: training {c.steps} steps")
          t0 = time.time()
          trainer.train(c, wd)
          log(f"   {time.time() - t0:.0f} s")
        with open(final) as f:
          results = json.load(f)["results"]
        budget = dict(steps=int(c.steps), batch_size=int(c.batch_size), lr=float(c.optim.lr))
        for weights, res in results.items():
          per = res["per_size"]
          for i, size in enumerate(per["size"]):
            rows.append(
                dict(
                    probe=probe,
                    model=model,
                    seed=int(seed),
                    weights=weights,
                    size=int(size),
                    train_sizes=sorted(int(s) for s in c.task.train_sizes),
                    token_accuracy=float(per["token_accuracy"][i]),
                    sequence_accuracy=float(per["sequence_accuracy"][i]),
                    **{k: float(per[k][i]) for k in ("answer_ce", "t_answer_ce") if k in per},
                    **({"temperature": float(res["temperature"])} if "temperature" in res else {}),
                    **budget,
                )
            )
  return rows, info


def _agg(rows, probe, model, weights, pick, metric):
  """(mean, min, max) over seeds of the mean over the picked sizes."""
  per_seed = {}
  for r in rows:
    if r["probe"] == probe and r["model"] == model and r["weights"] == weights and pick(r):
      per_seed.setdefault(r["seed"], []).append(r[metric])
  if not per_seed:
    return None
  vals = [float(np.mean(v)) for v in per_seed.values()]
  return float(np.mean(vals)), float(np.min(vals)), float(np.max(vals)), len(vals)


def summarize(rows, info, probes, models, weights="raw") -> Dict[str, Any]:
  table = {}
  for probe in probes:
    for model in models:
      for region, pick in REGIONS.items():
        for metric in ("token_accuracy", "sequence_accuracy"):
          v = _agg(rows, probe, model, weights, pick, metric)
          if v:
            table[f"{probe}/{model}/{region}/{metric}"] = dict(mean=v[0], min=v[1], max=v[2], seeds=v[3])
  return table


# The averaging comparison's readings: accuracy is an argmax, the same at any temperature, so its as-is
# estimate is also its temperature-controlled one; the answer cross-entropy is read as-is and at T.
AVERAGING = (("token_accuracy", "as-is = at T"), ("answer_ce", "as-is"), ("t_answer_ce", "at T"))


def averaging(rows, probes, models, averaged: str = "ema") -> Dict[str, Any]:
  """EMA minus raw weights per probe, model and region: per seed the difference of the means over the
  region's sizes, then the mean over seeds with a 95% t-interval (n >= 2). No probe run uses dropout, so
  there is no dropout comparison here (the set-complement sweep has it)."""
  from experiments.norm_compare import t_interval

  out = {}
  for probe in probes:
    for model in models:
      for region, pick in REGIONS.items():
        for metric, reading in AVERAGING:
          d = []
          for seed in sorted({r["seed"] for r in rows if r["probe"] == probe and r["model"] == model}):
            sel = lambda w: [
                r[metric]
                for r in rows
                if (r["probe"], r["model"], r["seed"], r["weights"]) == (probe, model, seed, w)
                and pick(r)
                and metric in r
            ]
            a, b = sel(averaged), sel("raw")
            if a and b:
              d.append(float(np.mean(a)) - float(np.mean(b)))
          if d:
            out[f"{probe}/{model}/{region}/{metric}"] = dict(reading=reading, **t_interval(np.asarray(d)))
  return out


def gate(rows, threshold: float = GATE) -> Dict[str, Any]:
  """The GPT's MQAR answer accuracy (raw weights) at each trained size: its mean and worst over seeds."""
  picked = [
      r
      for r in rows
      if r["probe"] == "recall" and r["model"] == "gpt" and r["weights"] == "raw" and r["size"] in r["train_sizes"]
  ]
  if not picked:
    return dict(threshold=threshold, passed=None, note="no GPT recall run in this grid")
  per_size = {}
  for size in sorted({r["size"] for r in picked}):
    acc = [r["token_accuracy"] for r in picked if r["size"] == size]
    per_size[str(size)] = dict(mean=float(np.mean(acc)), min=float(np.min(acc)), seeds=len(acc))
  worst = min(v["min"] for v in per_size.values())
  return dict(
      threshold=threshold,
      passed=bool(worst >= threshold),
      worst=worst,
      per_trained_size=per_size,
      budget={k: picked[0][k] for k in ("steps", "batch_size", "lr") if k in picked[0]},
  )


def write_markdown(path, summary, probes, models):
  table, info = summary["table"], summary["models"]
  fmt = lambda v: "–" if v is None else f"{v['mean']:.3f} [{v['min']:.2f}, {v['max']:.2f}]"
  g = summary.get("gate") or {}
  if g.get("passed") is None:
    verdict = "no GPT MQAR run in this grid: the harness check was not made."
  else:
    sizes = ", ".join(f"{s} pairs {v['mean']:.3f}" for s, v in g["per_trained_size"].items())
    verdict = (
        f"**{'passed' if g['passed'] else 'NOT passed'}**: the GPT's MQAR answer accuracy at its trained sizes "
        f"is {sizes} (worst seed {g['worst']:.3f}; needed >= {g['threshold']})"
        + ("." if g["passed"] else "; recall comparisons below are of an undertrained harness.")
    )
  lines = [
      f"# Probes: {len(models)} models x {len(probes)} probes, seeds {summary['seeds']}",
      "",
      f"Command: `{summary['command']}`  ",
      f"Measured {summary['date']} on {summary['machine']}; load average {summary['load_start']} at the start, "
      f"{summary['load_end']} at the end; {summary['wall_s'] / 60:.0f} min wall.",
      "",
      f"Harness check {verdict}",
      "",
      "Answer accuracy of the raw weights: mean over seeds [min, max]; 'within' averages the evaluation sizes "
      "inside the range each run trains on (one size drawn per step), 'shorter' and 'beyond' those below and "
      "above it (per size: the curves and summary.json). Training sizes per probe: "
      + "; ".join(f"{p} {_train_sizes(summary['runs'], p)}" for p in probes)
      + ".",
      "",
      "## Models",
      "",
      "| model | width (per probe) | parameters (per probe) | state per sequence: "
      + " / ".join(f"{t}" for t in CONTEXTS)
      + " tokens |",
      "|---|---|---|---|",
  ]
  for m in models:
    i = info[m]
    widths = ", ".join(f"{p} {w}" for p, w in i["width"].items())
    params = ", ".join(f"{p} {n:,}" for p, n in i["params"].items())
    sb = " / ".join(_bytes(i["state_bytes"][str(t)]) for t in CONTEXTS)
    lines.append(f"| {m} | {widths} | {params} | {sb} |")
  for metric in ("token_accuracy", "sequence_accuracy"):
    lines += ["", f"## {metric.replace('_', ' ')}", "", "| probe | region | " + " | ".join(models) + " |"]
    lines.append("|---|---|" + "---:|" * len(models))
    for probe in probes:
      for region in REGIONS:
        cells = [table.get(f"{probe}/{m}/{region}/{metric}") for m in models]
        if any(cells):
          lines.append(f"| {probe} | {region} | " + " | ".join(fmt(c) for c in cells) + " |")
  avg = summary.get("averaging") or {}
  if avg:
    lines += [
        "",
        "## Weight averaging: EMA minus raw weights, paired by seed (95% t-interval where n >= 2)",
        "",
        "Token accuracy is an argmax, which no temperature changes (its as-is estimate is the temperature-"
        "controlled one); the answer cross-entropy is given as-is and at each set of weights' own fitted "
        "temperature. No probe run uses dropout.",
        "",
        "| probe | model | region | metric | reading | mean [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in avg.items():
      probe, model, region, metric = key.split("/")
      ci = f" [{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]" if "ci" in r else f" (n = {r['n']})"
      lines.append(f"| {probe} | {model} | {region} | {metric} | {r['reading']} | {r['mean']:.3g}{ci} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _train_sizes(rows, probe):
  return next((r["train_sizes"] for r in rows if r["probe"] == probe), [])


def _bytes(n: int) -> str:
  for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} B"


def plot(rows, summary, probes, models, out_dir):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(probes), figsize=(4 * len(probes), 3.4), squeeze=False)
  for ax, probe in zip(axes[0], probes):
    train = None
    for model in models:
      rs = [r for r in rows if r["probe"] == probe and r["model"] == model and r["weights"] == "raw"]
      if not rs:
        continue
      train = rs[0]["train_sizes"]
      sizes = sorted({r["size"] for r in rs})
      metric = "token_accuracy"
      by = [[r[metric] for r in rs if r["size"] == s] for s in sizes]
      mean = [np.mean(v) for v in by]
      lo = [mean[i] - np.min(v) for i, v in enumerate(by)]
      hi = [np.max(v) - mean[i] for i, v in enumerate(by)]
      ax.errorbar(sizes, mean, yerr=[lo, hi], marker="o", capsize=2, label=model)
    if train is not None:
      ax.axvspan(min(train), max(train), color="grey", alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(probe)
    ax.set_xlabel("size (shaded: trained range)")
  axes[0][0].set_ylabel("answer token accuracy")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "curves.png"), dpi=90)
  plt.close(fig)

  table = summary["table"]
  points = {}
  for model in models:
    recall = [table.get(f"{p}/{model}/within/token_accuracy") for p in ("copy", "recall")]
    filt = table.get(f"filtering/{model}/beyond/sequence_accuracy")
    recall = [r["mean"] for r in recall if r]
    if recall and filt:
      points[model] = (filt["mean"], float(np.mean(recall)))
  dial = os.path.join(out_dir, "dial.png")
  if not points:  # the grid has no filtering or no copy / recall: no dial (and none left from another grid)
    if os.path.exists(dial):
      os.remove(dial)
    return
  fig, ax = plt.subplots(figsize=(5.2, 4.4))
  for model, (x, y) in points.items():
    ax.scatter([x], [y], s=40)
    ax.annotate(model, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=9)
  ax.set_xlabel("filtering: whole-stream accuracy, streams beyond the trained lengths")
  ax.set_ylabel("copy / recall: answer accuracy within the trained range")
  ax.set_title("The copy-filter dial")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(dial, dpi=90)
  plt.close(fig)


def reanalyse(results: str, command: str = "") -> Dict[str, Any]:
  """Rewrites table.md and the plots from results/summary.json (its runs and meta kept as measured)."""
  with open(os.path.join(results, "summary.json")) as f:
    summary = json.load(f)
  rows = summary["runs"]
  probes = [p for p in PROBES if any(r["probe"] == p for r in rows)]
  models = [m for m in MODELS if any(r["model"] == m for r in rows)]
  summary["table"] = summarize(rows, summary["models"], probes, models)
  summary["table_ema"] = summarize(rows, summary["models"], probes, models, weights="ema")
  summary["gate"] = gate(rows)
  summary["averaging"] = averaging(rows, probes, models)
  summary["reanalysed"] = dict(command=command, date=time.strftime("%Y-%m-%d"))
  with open(os.path.join(results, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  write_markdown(os.path.join(results, "table.md"), summary, probes, models)
  plot(rows, summary, probes, models, results)
  return summary


def run(
    probes, models, seeds, workdir, results, *, window, width=64, steps=None, tiny=False, lr=None, command=""
) -> Dict[str, Any]:
  bad = [p for p in probes if p not in PROBES] + [m for m in models if m not in MODELS]
  if bad or not seeds:
    raise ValueError(
        f"experiments.probes: unknown {bad} or no seeds; probes from {PROBES}, models from {MODELS}, "
        f"seeds integers."
    )
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"experiments.probes: --window={window!r}; expected a positive number of tokens.")
  t0, load0 = time.time(), round(os.getloadavg()[0], 2)
  os.makedirs(workdir, exist_ok=True)
  rows, info = train_grid(probes, models, seeds, workdir, window=window, width=width, steps=steps, tiny=tiny, lr=lr)
  summary = dict(
      command=command,
      date=time.strftime("%Y-%m-%d"),
      machine=f"{platform.machine()} CPU, {os.cpu_count()} cores",
      load_start=load0,
      load_end=round(os.getloadavg()[0], 2),
      wall_s=time.time() - t0,
      seeds=list(seeds),
      window=window,
      width=width,
      models=info,
      gate=gate(rows),
      table=summarize(rows, info, probes, models),
      table_ema=summarize(rows, info, probes, models, weights="ema"),
      averaging=averaging(rows, probes, models),
      runs=rows,
  )
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  write_markdown(os.path.join(results, "table.md"), summary, probes, models)
  plot(rows, summary, probes, models, results)
  return summary


def main(argv):
  del argv
  split = lambda s: [p.strip() for p in s.split(",") if p.strip()]
  if _REANALYSE.value:
    out = _RESULTS.value or os.path.join(_WORKDIR.value, "results")
    reanalyse(out, command="python -m experiments.probes " + " ".join(sys.argv[1:]))
    print(open(os.path.join(out, "table.md")).read())
    return
  run(
      split(_PROBES.value),
      split(_MODELS.value),
      [int(s) for s in split(_SEEDS.value)],
      _WORKDIR.value,
      _RESULTS.value or os.path.join(_WORKDIR.value, "results"),
      window=_WINDOW.value,
      width=_WIDTH.value,
      steps=_STEPS.value,
      lr=_LR.value,
      command="python -m experiments.probes " + " ".join(sys.argv[1:]),
  )
  print(open(os.path.join(_RESULTS.value or os.path.join(_WORKDIR.value, "results"), "table.md")).read())


if __name__ == "__main__":
  from ema_jax import host_memory

  host_memory.reexec()  # as train.py: huge pages for big host buffers (same numbers)
  define_flags()
  app.run(main)
