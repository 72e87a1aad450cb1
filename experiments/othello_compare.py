"""OthelloGPT: raw vs weight-EMA vs BEMA weights, in and beyond the trained positions, paired over seeds.

  python -m experiments.othello_compare --workdir W [--config configs/othello.py:default] [--seeds 0,1,2]
      [--dropouts 0,0.1] [--kinds ema,bema] [--results results/othello] [--config.steps=1000 ...]

For every (seed, dropout, kind) it trains the config through ema_jax.trainer into W/runs/<name> (a run whose
final eval JSON exists is not retrained, so an interrupted comparison resumes). The trainer keeps one
averaging kind per run and evaluates raw and averaged weights of that run: EMA - raw and BEMA - raw are
paired comparisons from one trajectory each. The raw trajectory does not depend on the averaging kind
(same seed, data order and dropout keys), so the 'ema' and 'bema' runs of a (seed, dropout) share their
raw weights; the summary reports the largest raw-metric difference between them as a check.

Writes to --results (default W): summary.md, summary.json, runs.csv, and plots/othello_compare_*.png
(per-position curves, mean over seeds, and paired differences per position).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ema_jax.tasks.othello import METRIC_LABELS, METRICS

REGIONS = ("in_range", "out_of_range")
HIGHER_IS_BETTER = {"legal_mass": True, "top1_legal": True, "kl": False}

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
_KINDS = flags.DEFINE_string("kinds", "ema,bema", "Comma-separated weight-EMA kinds, one run each.")
_RESULTS = flags.DEFINE_string("results", None, "Where summary.md/json, runs.csv and plots go (default: workdir).")


def run_name(seed: int, dropout: float, kind: str) -> str:
  return f"s{seed}_d{dropout:g}_{kind}"


def train_runs(
    config, workdir: str, seeds: Sequence[int], dropouts: Sequence[float], kinds: Sequence[str], log=print
) -> List[Dict[str, Any]]:
  """Trains every (kind, dropout, seed) not already done; returns one record per run."""
  from ema_jax import optim, trainer

  records_path = os.path.join(workdir, "runs.json")
  records = {}
  if os.path.exists(records_path):
    with open(records_path) as f:
      records = {r["name"]: r for r in json.load(f)}
  out = []
  for kind in kinds:  # all 'ema' runs first: they alone give the raw-vs-EMA comparison
    for dropout in dropouts:
      for seed in seeds:
        name = run_name(seed, dropout, kind)
        wd = os.path.join(workdir, "runs", name)
        final = os.path.join(wd, f"eval_{config.steps}.json")
        if not os.path.exists(final):
          c = config.copy_and_resolve_references()
          c.eval_every = 0  # the final evaluation is the one compared
          c.seed = int(seed)
          c.model.dropout = float(dropout)
          decay = c.weight_ema.decay
          c.weight_ema = optim.default_weight_ema_config(kind)
          c.weight_ema.decay = decay
          if c.task.data_dir is None:
            c.task.data_dir = os.path.join(workdir, "data")
          log(f"== {name}: training {c.steps} steps")
          start = time.time()
          trainer.train(c, wd)
          records[name] = dict(
              name=name, seed=int(seed), dropout=float(dropout), kind=kind, wall_s=round(time.time() - start, 1)
          )
          with open(records_path, "w") as f:
            json.dump(list(records.values()), f, indent=1)
        rec = dict(records.get(name, dict(name=name, seed=int(seed), dropout=float(dropout), kind=kind, wall_s=None)))
        with open(final) as f:
          rec["results"] = json.load(f)["results"]
        out.append(rec)
  return out


# ----------------------------------------------------------------------------------------------- analysis


def collect(runs: Sequence[Dict[str, Any]]) -> Dict[float, Dict[int, Dict[str, Dict[str, Any]]]]:
  """{dropout: {seed: {weights: eval results}}} with weights raw (from the first run), ema, bema."""
  table: Dict[float, Dict[int, Dict[str, Any]]] = {}
  for r in runs:
    cell = table.setdefault(r["dropout"], {}).setdefault(r["seed"], {})
    cell.setdefault("raw", r["results"]["raw"])
    cell[r["kind"]] = r["results"][r["kind"]]
  return table


def raw_mismatch(runs: Sequence[Dict[str, Any]]):
  """Largest |difference| of a raw region metric between runs of the same (seed, dropout); None if no pairs."""
  first, worst = {}, None
  for r in runs:
    key = (r["seed"], r["dropout"])
    raw = r["results"]["raw"]
    if key in first:
      worst = max(worst or 0.0, max(abs(raw[f"{g}/{m}"] - first[key][f"{g}/{m}"]) for g in REGIONS for m in METRICS))
    else:
      first[key] = raw
  return worst


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
            entry["paired"][k] = dict(describe(d), better=int(better), seeds=len(d))
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
          f"{g}/{m}": describe([table[d][s]["raw"][f"{g}/{m}"] - table[base][s]["raw"][f"{g}/{m}"] for s in common])
          for g in REGIONS
          for m in METRICS
      }
  return out


def _pm(e, digits=4) -> str:
  return f"{e['mean']:.{digits}f} ± {e['sd']:.{digits}f}"


def write_markdown(path: str, summary: Dict[str, Any], meta: Dict[str, Any], kinds: Sequence[str]) -> None:
  lines = [
      f"# OthelloGPT: raw vs weight EMA vs BEMA ({meta['date']})",
      "",
      f"Machine: {meta['machine']}. Command: `{meta['command']}`; {meta['config_summary']}.",
      f"Seeds {meta['seeds']}, dropout {meta['dropouts']}, averaging kinds {list(kinds)}; "
      f"{meta['runs']} runs, training wall time {meta['train_wall_s']:.0f} s in total "
      f"({meta['run_wall_s']})."
      + (
          ""
          if meta["raw_mismatch"] is None
          else f" Raw metrics of the ema and bema runs of one (seed, dropout) differ by at most "
          f"{meta['raw_mismatch']:.2g} (they share the raw trajectory)."
      ),
      "",
      f"Positions 1..{meta['train_len']} are trained (in), {meta['train_len'] + 1}..59 are not (out). "
      "Values: mean ± sd over seeds of the per-position averages; Δ = averaged - raw of the same run, "
      "paired by seed; 'better' counts the seeds where the averaged weights did better.",
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
        + " | ".join(f"Δ {k} [min, max], better" for k in kinds)
        + " |",
        "|---|---|---|" + "---|" * len(kinds) * 2,
    ]
    for key, entry in block["metrics"].items():
      region, m = key.split("/")
      cells = [region.replace("_range", "").replace("_of", ""), m, _pm(entry["values"]["raw"])]
      cells += [_pm(entry["values"][k]) if k in entry["values"] else "-" for k in kinds]
      for k in kinds:
        p = entry["paired"].get(k)
        cells.append(f"{p['mean']:+.4f} [{p['min']:+.4f}, {p['max']:+.4f}], {p['better']}/{p['seeds']}" if p else "-")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  if "dropout_effect" in summary:
    lines += [
        "## dropout effect on the raw weights (paired by seed)",
        "",
        "| contrast | region | metric | Δ mean | sd | [min, max] |",
        "|---|---|---|---|---|---|",
    ]
    for contrast, ent in summary["dropout_effect"].items():
      for key, e in ent.items():
        region, m = key.split("/")
        lines.append(
            f"| {contrast} | {region} | {m} | {e['mean']:+.4f} | {e['sd']:.4f} | "
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


def write_csv(path: str, runs: Sequence[Dict[str, Any]]) -> None:
  fields = ["name", "seed", "dropout", "kind", "wall_s", "weights"] + [f"{g}/{m}" for g in REGIONS for m in METRICS]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in runs:
      for weights in ("raw", r["kind"]):
        res = r["results"][weights]
        w.writerow(
            dict(
                name=r["name"],
                seed=r["seed"],
                dropout=r["dropout"],
                kind=r["kind"],
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
  load = os.getloadavg() if hasattr(os, "getloadavg") else ()
  return f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores" + (
      f", load average {load[0]:.1f} at the end" if load else ""
  )


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = _WORKDIR.value
  results = _RESULTS.value or workdir
  seeds = [int(s) for s in _SEEDS.value.split(",") if s]
  dropouts = [float(d) for d in _DROPOUTS.value.split(",") if d]
  kinds = [k.strip() for k in _KINDS.value.split(",") if k.strip()]
  bad = [k for k in kinds if k not in ("ema", "bema")]
  if bad or not kinds:
    raise ValueError(f"--kinds={_KINDS.value!r}: expected a comma-separated subset of ema, bema.")
  os.makedirs(results, exist_ok=True)
  runs = train_runs(config, workdir, seeds, dropouts, kinds)
  table = collect(runs)
  summary = summarize_runs(table, kinds)
  walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
  c = config
  meta = dict(
      date=datetime.date.today().isoformat(),
      machine=machine(),
      command="python -m experiments.othello_compare " + " ".join(sys.argv[1:]),
      config_summary=(
          f"GPT {c.model.num_layers} layers x width {c.model.width} ({c.model.num_heads} heads), "
          f"{c.task.num_games} games, train_len {c.task.train_len}, {c.steps} steps of batch "
          f"{c.batch_size}, lr {c.optim.lr} {c.optim.schedule}, EMA decay {c.weight_ema.decay}, "
          f"BEMA defaults, {c.task.eval_games} validation games"
      ),
      seeds=seeds,
      dropouts=dropouts,
      runs=len(runs),
      train_wall_s=float(sum(walls)) if walls else 0.0,
      run_wall_s=(f"{min(walls):.0f}-{max(walls):.0f} s per run" if walls else "wall times not recorded"),
      raw_mismatch=raw_mismatch(runs),
      train_len=int(c.task.train_len),
  )
  summary["meta"] = meta
  with open(os.path.join(results, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  write_csv(os.path.join(results, "runs.csv"), runs)
  write_markdown(os.path.join(results, "summary.md"), summary, meta, kinds)
  plot(table, kinds, int(c.task.train_len), os.path.join(results, "plots"))
  with open(os.path.join(results, "summary.md")) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
