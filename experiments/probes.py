"""The copy / recall / selective-copy / filtering probes for five architectures at equal parameters and tokens.

  python -m experiments.probes --workdir W [--seeds 0,1] [--probes copy,recall,selective_copy,filtering]
      [--models ema3,ema8,selective,gpt,hybrid] [--steps 2000] [--width 64] [--window 16] [--results results/probes]
  python -m experiments.probes --workdir W --results results/probes --reanalyse   (tables and plots again)

The models (all over the probe vocabulary, 2 blocks / layers, trained by ema_jax.trainer with the same
optimiser, batch, steps and data order per seed, so every model sees the same training tokens):
  ema3       the EMA LM with the paper's fixed traces (K = 3, write rates 0.5, 0.1, 0.02), linear predictor
  ema8       the same with K = 8 fixed timescales, write rates 2^-1 .. 2^-8 (0.5 .. 0.0039)
  selective  the EMA LM with selective traces (K = 3; rates sigmoid(W x + b) starting at 0.5, 0.1, 0.02)
  gpt        the GPT baseline (learned absolute positions, causal attention over everything)
  hybrid     the EMA LM with fixed K = 3 traces plus causal attention over the last --window tokens per block
The width of each is chosen so its parameter count is the closest to the ema3 model's at --width (default
64; FFN hidden = 4 x width for the EMA models, as in the LM task's tiny preset, 2 blocks, 4 heads). Runs whose final
evaluation exists are not retrained, so an interrupted grid continues where it stopped.

Writes --results (default W/results): summary.json (every run's accuracies per size, raw and EMA weights),
table.md (in-range / out-of-range answer accuracy per probe and model, mean and range over seeds; the
state each model keeps per sequence at 256 .. 16k tokens), curves.png (accuracy against size, one panel
per probe) and dial.png (copy / recall accuracy against filtering accuracy, one point per model).
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

PROBES = ("copy", "recall", "selective_copy", "filtering")
MODELS = ("ema3", "ema8", "selective", "gpt", "hybrid")
CONTEXTS = (256, 1024, 4096, 16384)  # for the state-size table
EMA8_ALPHAS = [2.0 ** -(i + 1) for i in range(8)]
# Sizes relative to the one size a run trains at (every model fails at sizes it never saw, shorter ones too).
REGIONS = {
    "shorter": lambda r: r["size"] < r["train_size"],
    "trained": lambda r: r["size"] == r["train_size"],
    "beyond": lambda r: r["size"] > r["train_size"],
}


def define_flags():
  """The command-line flags, defined only when the module runs as a script (tests import it)."""
  global _WORKDIR, _SEEDS, _PROBES, _MODELS, _STEPS, _WINDOW, _WIDTH, _RESULTS, _REANALYSE
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go.", required=True)
  _SEEDS = flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds.")
  _PROBES = flags.DEFINE_string("probes", ",".join(PROBES), "Comma-separated subset of the probes.")
  _MODELS = flags.DEFINE_string("models", ",".join(MODELS), "Comma-separated subset of the models.")
  _STEPS = flags.DEFINE_integer("steps", None, "Training steps per run (default: configs/probes.py's).")
  _WINDOW = flags.DEFINE_integer("window", 16, "The hybrid's attention window W in tokens.")
  _WIDTH = flags.DEFINE_integer("width", 64, "Width of the ema3 model; the others match its parameter count.")
  _RESULTS = flags.DEFINE_string("results", None, "Where the results go (default: <workdir>/results).")
  _REANALYSE = flags.DEFINE_bool("reanalyse", False, "Only rewrite table.md and the plots from summary.json.")


def model_edits(model: str, width: int, window: int) -> Dict[str, Any]:
  """config.model fields of a grid model at a given width."""
  if model == "gpt":
    return dict(kind="gpt", preset="tiny", width=width)
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


def make_config(probe: str, model: str, width: int, *, seed: int, window: int, steps=None, tiny: bool = False):
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


def train_grid(probes, models, seeds, workdir, *, window, width=64, steps=None, tiny=False, log=print):
  """Trains what is missing; returns (runs [rows], models {name: {width, params}})."""
  from ema_jax import trainer

  target = param_count(make_config(probes[0], "ema3", 16 if tiny else width, seed=0, window=window, tiny=tiny))
  info: Dict[str, Dict[str, Any]] = {}
  rows: List[Dict[str, Any]] = []
  for probe in probes:
    for model in models:
      width = match_width(probe, model, target, window=window, step=4 if tiny else 8, tiny=tiny)
      c0 = make_config(probe, model, width, seed=0, window=window, steps=steps, tiny=tiny)
      info.setdefault(model, dict(width=width, params={}, edits=model_edits(model, width, window)))
      info[model]["params"][probe] = param_count(c0)
      info[model]["state_bytes"] = dict(zip([str(t) for t in CONTEXTS], state_bytes(c0)))
      for seed in seeds:
        c = make_config(probe, model, width, seed=seed, window=window, steps=steps, tiny=tiny)
        wd = os.path.join(workdir, f"{probe}_{model}_s{seed}")
        final = os.path.join(wd, f"eval_{c.steps}.json")
        if not os.path.exists(final):
          log(f"== {probe} {model} (width {width}) seed {seed}: training {c.steps} steps")
          t0 = time.time()
          trainer.train(c, wd)
          log(f"   {time.time() - t0:.0f} s")
        with open(final) as f:
          results = json.load(f)["results"]
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
                    train_size=int(c.task.train_size),
                    token_accuracy=float(per["token_accuracy"][i]),
                    sequence_accuracy=float(per["sequence_accuracy"][i]),
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


def write_markdown(path, summary, probes, models):
  table, info = summary["table"], summary["models"]
  fmt = lambda v: "–" if v is None else f"{v['mean']:.3f} [{v['min']:.2f}, {v['max']:.2f}]"
  lines = [
      f"# Probes: {len(models)} models x {len(probes)} probes, seeds {summary['seeds']}",
      "",
      f"Command: `{summary['command']}`  ",
      f"Measured {summary['date']} on {summary['machine']}; load average {summary['load_start']} at the start, "
      f"{summary['load_end']} at the end; {summary['wall_s'] / 60:.0f} min wall.",
      "",
      "Answer accuracy of the raw weights: mean over seeds [min, max]; 'trained' is the one size each run "
      "trains at, 'shorter' and 'beyond' average the evaluation sizes below and above it (per size: the curves "
      "and summary.json).",
      "",
      "## Models",
      "",
      "| model | width | parameters (per probe) | state per sequence: "
      + " / ".join(f"{t}" for t in CONTEXTS)
      + " tokens |",
      "|---|---:|---|---|",
  ]
  for m in models:
    i = info[m]
    params = ", ".join(f"{p} {n:,}" for p, n in i["params"].items())
    sb = " / ".join(_bytes(i["state_bytes"][str(t)]) for t in CONTEXTS)
    lines.append(f"| {m} | {i['width']} | {params} | {sb} |")
  for metric in ("token_accuracy", "sequence_accuracy"):
    lines += ["", f"## {metric.replace('_', ' ')}", "", "| probe | region | " + " | ".join(models) + " |"]
    lines.append("|---|---|" + "---:|" * len(models))
    for probe in probes:
      for region in REGIONS:
        cells = [fmt(table.get(f"{probe}/{m}/{region}/{metric}")) for m in models]
        lines.append(f"| {probe} | {region.replace('_', ' ')} | " + " | ".join(cells) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


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
      train = rs[0]["train_size"]
      sizes = sorted({r["size"] for r in rs})
      metric = "token_accuracy"
      by = [[r[metric] for r in rs if r["size"] == s] for s in sizes]
      mean = [np.mean(v) for v in by]
      lo = [mean[i] - np.min(v) for i, v in enumerate(by)]
      hi = [np.max(v) - mean[i] for i, v in enumerate(by)]
      ax.errorbar(sizes, mean, yerr=[lo, hi], marker="o", capsize=2, label=model)
    if train is not None:
      ax.axvline(train, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(probe)
    ax.set_xlabel("size (dotted: training size)")
  axes[0][0].set_ylabel("answer token accuracy")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "curves.png"), dpi=90)
  plt.close(fig)

  table = summary["table"]
  fig, ax = plt.subplots(figsize=(5.2, 4.4))
  for model in models:
    recall = [table.get(f"{p}/{model}/trained/token_accuracy") for p in ("copy", "recall")]
    filt = table.get(f"filtering/{model}/beyond/sequence_accuracy")
    recall = [r["mean"] for r in recall if r]
    if not recall or not filt:
      continue
    y = float(np.mean(recall))
    ax.scatter([filt["mean"]], [y], s=40)
    ax.annotate(model, (filt["mean"], y), textcoords="offset points", xytext=(4, 4), fontsize=9)
  ax.set_xlabel("filtering: whole-stream accuracy, streams 2-4x the trained length")
  ax.set_ylabel("copy / recall: answer accuracy at the trained size")
  ax.set_title("The copy-filter dial")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "dial.png"), dpi=90)
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
  summary["reanalysed"] = dict(command=command, date=time.strftime("%Y-%m-%d"))
  with open(os.path.join(results, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  write_markdown(os.path.join(results, "table.md"), summary, probes, models)
  plot(rows, summary, probes, models, results)
  return summary


def run(
    probes, models, seeds, workdir, results, *, window, width=64, steps=None, tiny=False, command=""
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
  rows, info = train_grid(probes, models, seeds, workdir, window=window, width=width, steps=steps, tiny=tiny)
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
      table=summarize(rows, info, probes, models),
      table_ema=summarize(rows, info, probes, models, weights="ema"),
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
      command="python -m experiments.probes " + " ".join(sys.argv[1:]),
  )
  print(open(os.path.join(_RESULTS.value or os.path.join(_WORKDIR.value, "results"), "table.md")).read())


if __name__ == "__main__":
  define_flags()
  app.run(main)
