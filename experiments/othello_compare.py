"""OthelloGPT: raw vs weight-EMA vs BEMA weights, in and beyond the trained positions, paired over seeds.

  python -m experiments.othello_compare --workdir W [--config configs/othello.py:default] [--seeds 0,1,2]
      [--dropouts 0,0.1] [--results results/othello] [--config.steps=1000 ...]

For every (seed, dropout) it trains the config once through ema_jax.trainer into W/runs/s<seed>_d<dropout>
(a run whose final eval JSON exists is not retrained, so an interrupted comparison resumes). The run keeps
every average named by config.weight_ema.kind side by side ('ema,bema' in every preset of
configs/othello.py; 'configs/othello.py:default,ema' keeps EMA alone) and its final evaluation scores the raw
weights and each average, so EMA - raw and BEMA - raw are paired comparisons on one trajectory: same seed,
data order and dropout keys. Paired differences get a 95% t-interval over seeds.

Writes to --results (default W): summary.md, summary.json, runs.csv, and plots/othello_compare_*.png
(per-position curves, mean over seeds, and paired differences per position).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ema_jax.tasks.othello import METRIC_LABELS, METRICS

REGIONS = ("in_range", "out_of_range")
HIGHER_IS_BETTER = {"legal_mass": True, "top1_legal": True, "kl": False}


def define_flags():
  """The command-line flags, defined only when the module runs as a script (tests import it)."""
  global _CONFIG, _WORKDIR, _SEEDS, _DROPOUTS, _RESULTS
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/othello.py:default", "The Othello config.", lock_config=False
  )
  _WORKDIR = flags.DEFINE_string(
      "workdir",
      None,
      "Runs go to <workdir>/runs/<name>; data to <workdir>/data " "unless config.task.data_dir is set.",
      required=True,
  )
  _SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated training seeds.")
  _DROPOUTS = flags.DEFINE_string("dropouts", "0,0.1", "Comma-separated model.dropout values.")
  _RESULTS = flags.DEFINE_string("results", None, "Where summary.md/json, runs.csv and plots go (default: workdir).")


def run_name(seed: int, dropout: float) -> str:
  return f"s{seed}_d{dropout:g}"


def averaging_kinds(config) -> List[str]:
  """The averages every run keeps (config.weight_ema.kind, e.g. 'ema,bema' -> ['ema', 'bema'])."""
  from ema_jax import optim

  kinds = optim.parse_kinds(config.weight_ema.kind)
  if not kinds:
    raise ValueError(
        f"config.weight_ema.kind={config.weight_ema.kind!r}: the comparison needs at least one average "
        "(ema, bema or 'ema,bema')."
    )
  return kinds


def train_runs(
    config, workdir: str, seeds: Sequence[int], dropouts: Sequence[float], log=print
) -> List[Dict[str, Any]]:
  """Trains every (dropout, seed) not already done; returns one record per run."""
  from ema_jax import trainer

  records_path = os.path.join(workdir, "runs.json")
  records = {}
  if os.path.exists(records_path):
    with open(records_path) as f:
      records = {r["name"]: r for r in json.load(f)}
  out = []
  for dropout in dropouts:
    for seed in seeds:
      name = run_name(seed, dropout)
      wd = os.path.join(workdir, "runs", name)
      final = os.path.join(wd, f"eval_{config.steps}.json")
      if not os.path.exists(final):
        c = config.copy_and_resolve_references()
        c.eval_every = 0  # the final evaluation is the one compared
        c.seed = int(seed)
        c.model.dropout = float(dropout)
        if c.task.data_dir is None:
          c.task.data_dir = os.path.join(workdir, "data")
        log(f"== {name}: training {c.steps} steps, averages {c.weight_ema.kind}")
        start = time.time()
        trainer.train(c, wd)
        records[name] = dict(name=name, seed=int(seed), dropout=float(dropout), wall_s=round(time.time() - start, 1))
        with open(records_path, "w") as f:
          json.dump(list(records.values()), f, indent=1)
      rec = dict(records.get(name, dict(name=name, seed=int(seed), dropout=float(dropout), wall_s=None)))
      with open(final) as f:
        rec["results"] = json.load(f)["results"]
      out.append(rec)
  return out


# ----------------------------------------------------------------------------------------------- analysis


def collect(runs: Sequence[Dict[str, Any]], kinds: Sequence[str]) -> Dict[float, Dict[int, Dict[str, Any]]]:
  """{dropout: {seed: {weights: eval results}}} with weights raw and each of kinds, all from the one run."""
  table: Dict[float, Dict[int, Dict[str, Any]]] = {}
  for r in runs:
    missing = [w for w in ("raw", *kinds) if w not in r["results"]]
    if missing:
      raise ValueError(
          f"run {r['name']}: its final evaluation has weights {sorted(r['results'])}, not {missing}; it was "
          "trained with other averages than config.weight_ema.kind: remove the run or use another --workdir."
      )
    table.setdefault(r["dropout"], {})[r["seed"]] = {w: r["results"][w] for w in ("raw", *kinds)}
  return table


def t_interval(values: Sequence[float], level: float = 0.95) -> Optional[List[float]]:
  """Student-t confidence interval for the mean of values; None for fewer than two values."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return None
  from scipy import stats

  half = float(stats.t.ppf(0.5 + level / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
  return [float(v.mean()) - half, float(v.mean()) + half]


def describe(values: Sequence[float]) -> Dict[str, Any]:
  v = np.asarray(values, np.float64)
  return dict(
      n=int(v.size),
      mean=float(v.mean()),
      sd=float(v.std(ddof=1)) if v.size > 1 else 0.0,
      min=float(v.min()),
      max=float(v.max()),
  )


def summarize_runs(table, kinds: Sequence[str]) -> Dict[str, Any]:
  """Per dropout, region and metric: each weights kind over seeds, and paired (averaged - raw) differences."""
  out = {}
  for dropout, by_seed in sorted(table.items()):
    seeds = sorted(by_seed)
    block = {}
    for region in REGIONS:
      for m in METRICS:
        key = f"{region}/{m}"
        entry = {"values": {}, "paired": {}}
        for w in ["raw", *kinds]:
          vals = [by_seed[s][w][key] for s in seeds if w in by_seed[s]]
          if vals:
            entry["values"][w] = describe(vals)
        for k in kinds:
          pairs = [(by_seed[s][k][key], by_seed[s]["raw"][key]) for s in seeds if k in by_seed[s]]
          if pairs:
            d = [a - b for a, b in pairs]
            better = sum((x > 0) if HIGHER_IS_BETTER[m] else (x < 0) for x in d)
            entry["paired"][k] = dict(describe(d), ci95=t_interval(d), better=int(better), seeds=len(d))
        block[key] = entry
    out[f"{dropout:g}"] = dict(seeds=seeds, metrics=block)
  # Dropout's own effect on the raw weights, paired by seed.
  drops = sorted(table)
  if len(drops) > 1:
    base = drops[0]
    out["dropout_effect"] = {}
    for d in drops[1:]:
      common = sorted(set(table[base]) & set(table[d]))
      out["dropout_effect"][f"{d:g}-{base:g}"] = {
          f"{g}/{m}": _with_ci([table[d][s]["raw"][f"{g}/{m}"] - table[base][s]["raw"][f"{g}/{m}"] for s in common])
          for g in REGIONS
          for m in METRICS
      }
  return out


def _with_ci(values: Sequence[float]) -> Dict[str, Any]:
  return dict(describe(values), ci95=t_interval(values))


def _pm(e, digits=4) -> str:
  return f"{e['mean']:.{digits}f} ± {e['sd']:.{digits}f}"


def write_markdown(path: str, summary: Dict[str, Any], meta: Dict[str, Any], kinds: Sequence[str]) -> None:
  lines = [
      f"# OthelloGPT: raw vs weight EMA vs BEMA ({meta['date']})",
      "",
      f"Command: `{meta['command']}`",
      "",
      f"Machine: {meta['machine']}; load average (1/5/15 min) {meta['load_start']} at the start, "
      f"{meta['load_end']} at the end. Wall time {meta['wall_s']:.0f} s in all, training "
      f"{meta['train_wall_s']:.0f} s ({meta['run_wall_s']}).",
      "",
      f"Model and training: {meta['config_summary']}.",
      f"Seeds {meta['seeds']}, dropout {meta['dropouts']}: {meta['runs']} runs, each keeping the averages "
      f"{list(kinds)} of its own trajectory beside the raw weights.",
      "",
      f"Positions 1..{meta['train_len']} are trained (in), {meta['train_len'] + 1}..59 are not (out). "
      "Values: mean ± sd over seeds of the per-position averages; Δ = averaged - raw of the same run, "
      "paired by seed: mean, 95% t-interval over seeds, and 'better', the seeds where the averaged weights "
      "did better.",
      "",
  ]
  for dropout in meta["dropouts"]:
    block = summary.get(f"{dropout:g}")
    if not block:
      continue
    lines += [
        f"## dropout {dropout:g}",
        "",
        "| region | metric | raw | "
        + " | ".join(kinds)
        + " | "
        + " | ".join(f"Δ {k} - raw [95% CI], better" for k in kinds)
        + " |",
        "|---|---|---|" + "---|" * len(kinds) * 2,
    ]
    for key, entry in block["metrics"].items():
      region, m = key.split("/")
      cells = [region.replace("_range", "").replace("_of", ""), m, _pm(entry["values"]["raw"])]
      cells += [_pm(entry["values"][k]) if k in entry["values"] else "-" for k in kinds]
      for k in kinds:
        p = entry["paired"].get(k)
        ci = f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p and p["ci95"] else "[n/a]"
        cells.append(f"{p['mean']:+.4f} {ci}, {p['better']}/{p['seeds']}" if p else "-")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  if "dropout_effect" in summary:
    lines += [
        "## dropout effect on the raw weights (paired by seed)",
        "",
        "| contrast | region | metric | Δ mean | 95% CI | sd | [min, max] |",
        "|---|---|---|---|---|---|---|",
    ]
    for contrast, ent in summary["dropout_effect"].items():
      for key, e in ent.items():
        region, m = key.split("/")
        lines.append(
            f"| {contrast} | {region} | {m} | {e['mean']:+.4f} | "
            + (f"[{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}]" if e["ci95"] else "n/a")
            + f" | {e['sd']:.4f} | "
            f"[{e['min']:+.4f}, {e['max']:+.4f}] |"
        )
    lines.append("")
  lines += [
      "Plots: plots/othello_compare_curves.png (per-position means over seeds, trained range shaded), "
      "plots/othello_compare_deltas.png (paired averaged - raw per position: mean and min..max over seeds).",
      "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def write_csv(path: str, runs: Sequence[Dict[str, Any]], kinds: Sequence[str]) -> None:
  """One row per run and weights (raw and each average)."""
  fields = ["name", "seed", "dropout", "wall_s", "weights"] + [f"{g}/{m}" for g in REGIONS for m in METRICS]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in runs:
      for weights in ("raw", *kinds):
        res = r["results"][weights]
        w.writerow(
            dict(
                name=r["name"],
                seed=r["seed"],
                dropout=r["dropout"],
                wall_s=r["wall_s"],
                weights=weights,
                **{f"{g}/{m}": round(res[f"{g}/{m}"], 6) for g in REGIONS for m in METRICS},
            )
        )


def plot(table, kinds: Sequence[str], train_len: int, out_dir: str) -> List[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  drops = sorted(table)
  weights = ["raw", *kinds]
  colors = {"raw": "C0", "ema": "C1", "bema": "C2"}
  paths = []
  for which in ("curves", "deltas"):
    fig, axes = plt.subplots(
        len(METRICS), len(drops), figsize=(4.2 * len(drops), 2.6 * len(METRICS)), dpi=80, squeeze=False
    )
    for j, d in enumerate(drops):
      by_seed = table[d]
      seeds = sorted(by_seed)
      for i, m in enumerate(METRICS):
        ax = axes[i, j]
        ax.axvspan(0.5, train_len + 0.5, color="0.92")
        pos = np.asarray(by_seed[seeds[0]]["raw"]["per_position"]["position"])
        curve = lambda w: np.array([by_seed[s][w]["per_position"][m] for s in seeds if w in by_seed[s]])
        if which == "curves":
          for w in weights:
            c = curve(w)
            if c.size:
              ax.plot(pos, c.mean(0), color=colors.get(w), label=w, lw=1.2)
          if m == "kl":
            ax.set_yscale("log")
        else:
          ax.axhline(0.0, color="0.5", lw=0.8)
          raw = curve("raw")
          for k in kinds:
            c = curve(k)
            if c.size:
              diff = c - raw[: len(c)]
              ax.plot(pos, diff.mean(0), color=colors.get(k), label=f"{k} - raw", lw=1.2)
              ax.fill_between(pos, diff.min(0), diff.max(0), color=colors.get(k), alpha=0.2, lw=0)
        ax.set_title(f"dropout {d:g}: {METRIC_LABELS[m]}" + (" (Δ)" if which == "deltas" else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        if i == len(METRICS) - 1:
          ax.set_xlabel("position p (moves seen)", fontsize=8)
        if i == 0 and j == 0:
          ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, f"othello_compare_{which}.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths


def machine() -> str:
  return f"{platform.platform()} ({platform.machine()}), {os.cpu_count()} CPU cores"


def load_average() -> str:
  """The 1, 5 and 15 minute load averages, or 'n/a' where the platform has none."""
  return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def compare(
    config,
    workdir: str,
    seeds: Sequence[int],
    dropouts: Sequence[float],
    results: Optional[str] = None,
    command: str = "",
    plots: bool = True,
    log=print,
) -> Dict[str, Any]:
  """Trains (or reuses) one run per (seed, dropout), then writes summary.md/json, runs.csv and plots."""
  start, load_start = time.time(), load_average()
  results = results or workdir
  kinds = averaging_kinds(config)
  os.makedirs(results, exist_ok=True)
  runs = train_runs(config, workdir, seeds, dropouts, log=log)
  table = collect(runs, kinds)
  summary = summarize_runs(table, kinds)
  walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
  c = config
  bema = (
      f", BEMA burn-in {c.weight_ema.burn_in} steps (its other schedules at their defaults)" if "bema" in kinds else ""
  )
  meta = dict(
      date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      machine=machine(),
      command=command,
      norm_position=str(c.model.get("norm_position", "pre")),
      kinds=list(kinds),
      config_summary=(
          f"GPT {c.model.num_layers} layers x width {c.model.width} ({c.model.num_heads} heads), "
          f"{c.model.get('norm_position', 'pre')}-norm blocks, {c.task.num_games} games, train_len "
          f"{c.task.train_len}, {c.steps} steps of batch {c.batch_size}, lr {c.optim.lr} {c.optim.schedule}, "
          f"EMA decay {c.weight_ema.decay}{bema}, {c.task.eval_games} validation games"
      ),
      seeds=list(seeds),
      dropouts=list(dropouts),
      runs=len(runs),
      train_wall_s=float(sum(walls)) if walls else 0.0,
      run_wall_s=(f"{min(walls):.0f}-{max(walls):.0f} s per run trained now" if walls else "no run trained now"),
      train_len=int(c.task.train_len),
      load_start=load_start,
  )
  summary["meta"] = meta
  write_csv(os.path.join(results, "runs.csv"), runs, kinds)
  if plots:
    plot(table, kinds, int(c.task.train_len), os.path.join(results, "plots"))
  meta.update(wall_s=round(time.time() - start, 1), load_end=load_average())
  with open(os.path.join(results, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  write_markdown(os.path.join(results, "summary.md"), summary, meta, kinds)
  return summary


def main(argv):
  del argv
  seeds = [int(s) for s in _SEEDS.value.split(",") if s]
  dropouts = [float(d) for d in _DROPOUTS.value.split(",") if d]
  results = _RESULTS.value or _WORKDIR.value
  command = "python -m experiments.othello_compare " + shlex.join(sys.argv[1:])
  compare(_CONFIG.value, _WORKDIR.value, seeds, dropouts, results=results, command=command)
  with open(os.path.join(results, "summary.md")) as f:
    print(f.read())


if __name__ == "__main__":
  define_flags()
  app.run(main)
