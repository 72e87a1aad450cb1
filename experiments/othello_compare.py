"""OthelloGPT: raw vs weight-EMA vs BEMA weights, in and beyond the trained positions, paired over seeds.

  python -m experiments.othello_compare --workdir W [--config configs/othello.py:default] [--seeds 0,1,2]
      [--dropouts 0,0.1] [--results results/othello] [--config.steps=1000 ...]

For every (seed, dropout) it trains the config once through ema_jax.trainer into W/runs/s<seed>_d<dropout>
(a run whose final eval JSON exists is not retrained, so an interrupted comparison resumes). The run keeps
every average named by config.weight_ema.kind side by side ('ema,bema' in every preset of
configs/othello.py; 'configs/othello.py:default,ema' keeps EMA alone) and its final evaluation scores the raw
weights and each average, so EMA - raw and BEMA - raw are paired comparisons on one trajectory: same seed,
data order and dropout keys. Paired differences get a 95% t-interval over seeds.

Temperature control: after training, each run's final weights (raw and every average) get one scalar logit
temperature, fitted on the in-range positions of held-out validation games (games after the evaluated ones,
so neither trained on nor scored) by minimising the cross-entropy against the task's target, uniform over the
legal moves (ema_jax.temperature); every position of the evaluated games is then scored again at that
temperature. 'raw@T' (the raw weights at their own fitted temperature) is the sharpening-only row: an
average's effect that raw@T - raw also shows is one a temperature can make.

Writes to --results (default W): summary.md, summary.json, runs.csv, and plots/othello_compare_*.png
(per-position curves, mean over seeds, and paired differences per position).

  python -m experiments.othello_compare --curve RUN_DIR --results R   (a training run's curve, no training)

writes R/curve.csv, R/curve.json and R/plots/othello_curve.png: the legal-move mass in and beyond the
trained positions against steps, tokens and wall time (from each eval_<step>.json's modification time).
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
TEMPERED = "@T"  # suffix of the weights scored at their fitted temperature (raw@T, ema@T, bema@T)
HIGHER_IS_BETTER = {"legal_mass": True, "top1_legal": True, "kl": False}


def define_flags():
  """The command-line flags, defined only when the module runs as a script (tests import it)."""
  global _CONFIG, _WORKDIR, _SEEDS, _DROPOUTS, _RESULTS, _FIT_GAMES, _CURVE, _CURVE_START, _FIT_FROM, _FIT_TO
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/othello.py:default", "The Othello config.", lock_config=False
  )
  _WORKDIR = flags.DEFINE_string(
      "workdir",
      None,
      "Runs go to <workdir>/runs/<name>; data to <workdir>/data unless config.task.data_dir is set "
      "(required unless --curve).",
  )
  _SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated training seeds.")
  _DROPOUTS = flags.DEFINE_string("dropouts", "0,0.1", "Comma-separated model.dropout values.")
  _RESULTS = flags.DEFINE_string("results", None, "Where summary.md/json, runs.csv and plots go (default: workdir).")
  _FIT_GAMES = flags.DEFINE_integer("fit_games", 1000, "Held-out validation games the temperatures are fitted on.")
  _CURVE = flags.DEFINE_string("curve", None, "A training workdir: write its curve to --results, train nothing.")
  _CURVE_START = flags.DEFINE_string("curve_start", None, "ISO time the run started (default: its config.json's).")
  _FIT_FROM = flags.DEFINE_integer("fit_from", 0, "--curve: first step of the extrapolation's fit.")
  _FIT_TO = flags.DEFINE_integer("fit_to", None, "--curve: last step of the extrapolation's fit (default: the last).")


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
    config, workdir: str, seeds: Sequence[int], dropouts: Sequence[float], log=print, fit_games: int = 1000
) -> List[Dict[str, Any]]:
  """Trains every (dropout, seed) not already done, then fits its temperatures; returns one record per run."""
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
      rec["results"].update(tempered_results(wd, int(config.steps), fit_games, rec["results"]))
      out.append(rec)
  return out


# ---------------------------------------------------------------------------------------- temperature


def tempered_results(run_dir: str, step: int, fit_games: int, as_is: Dict[str, Any]) -> Dict[str, Any]:
  """{'<weights>@T': results at the fitted temperature} of one run, cached in run_dir/temperature_<step>.json."""
  path = os.path.join(run_dir, f"temperature_{step}_{fit_games}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  out = temperature_control(run_dir, step, fit_games)
  for name, res in out.items():  # at T = 1 the scoring here must be the trainer's own
    w = name[: -len(TEMPERED)]
    gap = max(abs(res["check_T1"][k] - as_is[w][k]) for k in res["check_T1"])
    if gap > 1e-4:
      raise RuntimeError(f"{run_dir}: {w} scored at T=1 here differs from eval_{step}.json by {gap:.2e}.")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f)
  os.replace(tmp, path)
  return out


def temperature_control(run_dir: str, step: int, fit_games: int) -> Dict[str, Any]:
  """Fits one temperature per weights of a run on held-out in-range positions, scores every position at it.

  Fit games: the validation games after the evaluated ones (indices eval_games .. eval_games + fit_games), in
  range only (positions 1..train_len), target uniform over the legal moves. Scored games: the evaluated ones.
  """
  import jax
  from flax import nnx

  from ema_jax import checkpoint as ckpt_lib
  from ema_jax import evaluation, temperature, trainer
  from ema_jax.data import othello as data
  from ema_jax.tasks import othello as task_lib

  checkpointer = ckpt_lib.Checkpointer(run_dir, keep=10**6, async_save=False)
  try:
    cfg = evaluation.load_config(run_dir, step)
    setup = trainer.build(cfg, workdir=run_dir)
    state, _, _ = checkpointer.restore(step, setup.abstract_state)
  finally:
    checkpointer.close()
  task, t = setup.task, cfg.task
  _, val = task.games()
  n_eval, length, train_len = int(t.eval_games), task_lib.MAX_POSITION, int(t.train_len)
  n_fit = min(int(fit_games), val.num_games - n_eval)
  if n_fit < 1:
    raise ValueError(f"{run_dir}: no validation games left after the {n_eval} evaluated ones to fit a temperature.")
  used = val.moves[: n_eval + n_fit]
  tokens, legal = data.squares_to_tokens(used)[:, :length], data.legal_move_masks(used)[:, :length]
  graphdef = nnx.split(trainer.make_model(setup, state, "raw"))[0]
  forward = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x, deterministic=True))
  batch = int(t.eval_batch_size)

  def logits(params, rows):
    chunks = [np.asarray(forward(params, tokens[rows][i : i + batch])) for i in range(0, len(tokens[rows]), batch)]
    return np.concatenate(chunks).astype(np.float64)

  def scores(z, rows, temp):
    per = jax.device_get(task_lib.legal_move_metrics(z / temp, legal[rows]))
    valid = legal[rows].any(-1)
    positions = [p for p in range(1, length + 1) if valid[:, p - 1].any()]
    per_position = {"position": positions}
    for m in METRICS:
      per_position[m] = [float(per[m][valid[:, p - 1], p - 1].mean()) for p in positions]
    return task_lib.region_means(positions, per_position, train_len), per_position

  fit_rows, eval_rows = slice(n_eval, n_eval + n_fit), slice(0, n_eval)
  target = legal[fit_rows, :train_len] / np.maximum(legal[fit_rows, :train_len].sum(-1, keepdims=True), 1)
  mask = legal[fit_rows, :train_len].any(-1)
  out = {}
  with jax.set_mesh(setup.mesh):
    for w in trainer.weights_names(setup):
      params = nnx.split(trainer.make_model(setup, state, w))[1]
      z_fit = logits(params, fit_rows)[:, :train_len]
      temp = temperature.fit_temperature(z_fit, target, mask)
      z_eval = logits(params, eval_rows)
      region, per_position = scores(z_eval, eval_rows, temp)
      out[w + TEMPERED] = dict(
          region,
          temperature=temp,
          fit_ce_T1=temperature.cross_entropy(z_fit, target, 1.0, mask),
          fit_ce=temperature.cross_entropy(z_fit, target, temp, mask),
          fit_games=n_fit,
          per_position=per_position,
          check_T1=scores(z_eval, eval_rows, 1.0)[0],
      )
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
    names = [w + t for t in ("", TEMPERED) for w in ("raw", *kinds) if w + t in r["results"]]
    table.setdefault(r["dropout"], {})[r["seed"]] = {w: r["results"][w] for w in names}
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
        entry = {"values": {}, "paired": {}, "tempered": {}}
        for w in [w + t for t in ("", TEMPERED) for w in ("raw", *kinds)]:
          vals = [by_seed[s][w][key] for s in seeds if w in by_seed[s]]
          if vals:
            entry["values"][w] = describe(vals)
        # As-is: each average against the raw weights. Tempered: raw@T against raw (sharpening only), and
        # each average at its temperature against the raw weights at theirs.
        contrasts = [("paired", k, "raw") for k in kinds] + [("tempered", "raw" + TEMPERED, "raw")]
        contrasts += [("tempered", k + TEMPERED, "raw" + TEMPERED) for k in kinds]
        for group, k, base in contrasts:
          pairs = [(by_seed[s][k][key], by_seed[s][base][key]) for s in seeds if k in by_seed[s]]
          if pairs:
            d = [a - b for a, b in pairs]
            better = sum((x > 0) if HIGHER_IS_BETTER[m] else (x < 0) for x in d)
            entry[group][k] = dict(describe(d), ci95=t_interval(d), better=int(better), seeds=len(d), base=base)
        if not entry["tempered"]:
          del entry["tempered"]
        block[key] = entry
    out[f"{dropout:g}"] = dict(seeds=seeds, metrics=block)
    fitted = [w for w in ("raw", *kinds) if all(w + TEMPERED in by_seed[s] for s in seeds)]
    if fitted:
      out[f"{dropout:g}"]["temperature"] = {
          w: describe([by_seed[s][w + TEMPERED]["temperature"] for s in seeds]) for w in fitted
      }
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


def _delta(p) -> str:
  """'mean [95% CI], better/seeds' of a paired difference, or '-'."""
  if not p:
    return "-"
  ci = f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p["ci95"] else "[n/a]"
  return f"{p['mean']:+.4f} {ci}, {p['better']}/{p['seeds']}"


def _tempered_table(block, kinds: Sequence[str]) -> List[str]:
  """The same metrics with each weights at its fitted temperature (the '@T' rows), if the runs have them."""
  temps = block.get("temperature")
  if not temps:
    return []
  t = TEMPERED
  lines = [
      "At the fitted temperature (one per weights, fitted on in-range positions of held-out validation games; "
      "raw@T - raw is sharpening alone, the averages are compared with raw@T): fitted T "
      + ", ".join(f"{w} {_pm(e, 3)}" for w, e in temps.items())
      + ".",
      "",
      "| region | metric at T | raw@T | "
      + " | ".join(k + t for k in kinds)
      + " | Δ raw@T - raw (sharpening only) | "
      + " | ".join(f"Δ {k}@T - raw@T [95% CI], better" for k in kinds)
      + " |",
      "|---|---|---|" + "---|" * (2 * len(kinds) + 1),
  ]
  for key, entry in block["metrics"].items():
    if "tempered" not in entry:
      continue
    region, m = key.split("/")
    cells = [region.replace("_range", "").replace("_of", ""), m + t, _pm(entry["values"]["raw" + t])]
    cells += [_pm(entry["values"][k + t]) if k + t in entry["values"] else "-" for k in kinds]
    cells += [_delta(entry["tempered"].get(w + t)) for w in ("raw", *kinds)]
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


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
      cells += [_delta(entry["paired"].get(k)) for k in kinds]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _tempered_table(block, kinds)
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
  metric_keys = [f"{g}/{m}" for g in REGIONS for m in METRICS]
  fields = ["name", "seed", "dropout", "wall_s", "weights"] + metric_keys
  fields += ["temperature"] + [k + TEMPERED for k in metric_keys]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in runs:
      for weights in ("raw", *kinds):
        res = r["results"][weights]
        row = dict(name=r["name"], seed=r["seed"], dropout=r["dropout"], wall_s=r["wall_s"], weights=weights)
        row.update({k: round(res[k], 6) for k in metric_keys})
        tempered = r["results"].get(weights + TEMPERED)
        if tempered:
          row["temperature"] = round(tempered["temperature"], 6)
          row.update({k + TEMPERED: round(tempered[k], 6) for k in metric_keys})
        w.writerow(row)


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
    fit_games: int = 1000,
) -> Dict[str, Any]:
  """Trains (or reuses) one run per (seed, dropout), then writes summary.md/json, runs.csv and plots."""
  start, load_start = time.time(), load_average()
  results = results or workdir
  kinds = averaging_kinds(config)
  os.makedirs(results, exist_ok=True)
  runs = train_runs(config, workdir, seeds, dropouts, log=log, fit_games=fit_games)
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


# ------------------------------------------------------------------------------------------ training curve


def training_curve(run_dir: str, start: Optional[float] = None) -> List[Dict[str, Any]]:
  """One row per eval_<step>.json of a run: step, tokens, wall_s (the file's modification time less `start`,
  default config.json's) and every '<weights>/<region>/<metric>'."""
  from ema_jax import workdir as workdir_lib

  with open(os.path.join(run_dir, "config.json")) as f:
    cfg = json.load(f)
  tokens_per_step = int(cfg["batch_size"]) * int(cfg["task"]["train_len"])
  start = os.path.getmtime(os.path.join(run_dir, "config.json")) if start is None else start
  rows = []
  for step in workdir_lib.eval_steps(run_dir):
    path = str(workdir_lib.eval_path(run_dir, step))
    with open(path) as f:
      results = json.load(f)["results"]
    row = dict(step=step, tokens=step * tokens_per_step, wall_s=round(os.path.getmtime(path) - start, 1))
    for w, res in results.items():
      row.update({f"{w}/{g}/{m}": res[f"{g}/{m}"] for g in REGIONS for m in METRICS if f"{g}/{m}" in res})
    rows.append(row)
  return rows


def extrapolate(
    rows: Sequence[Dict[str, Any]], fit_from: int = 0, fit_to: Optional[int] = None, target: float = 0.95
) -> Optional[Dict[str, Any]]:
  """Two fits of the raw in-range legal mass against steps, on the evaluations fit_from <= step <= fit_to,
  and the step (and wall time, at the fitted rows' seconds per step) where each would reach `target`:
  a power law 1 - mass = a * step^-b, and a line in log(step), mass = c + d * ln(step) (the more optimistic
  when the power law's gains shrink). Extrapolations, not measurements."""
  pts = [
      (r["step"], r["wall_s"], r["raw/in_range/legal_mass"])
      for r in rows
      if r["step"] > 0 and r["step"] >= fit_from and (fit_to is None or r["step"] <= fit_to)
  ]
  if len(pts) < 2:
    return None
  steps, walls, mass = (np.asarray(v, np.float64) for v in zip(*pts))
  s_per_step = float((walls[-1] - walls[0]) / (steps[-1] - steps[0]))
  out = dict(target=target, points=[int(s) for s in steps], s_per_step=s_per_step, fits={})
  slope, intercept = np.polyfit(np.log(steps), np.log(1.0 - mass), 1)
  reach = float(np.exp((np.log(1.0 - target) - intercept) / slope)) if slope < 0 else None
  out["fits"]["power_law"] = dict(
      form="1 - mass = a * step^-b", a=float(np.exp(intercept)), b=float(-slope), step=reach
  )
  d, c = np.polyfit(np.log(steps), mass, 1)
  reach = float(np.exp((target - c) / d)) if d > 0 else None
  out["fits"]["log_linear"] = dict(form="mass = c + d * ln(step)", c=float(c), d=float(d), step=reach)
  for fit in out["fits"].values():
    if fit["step"] is not None:
      fit["wall_s"] = float(walls[-1] + (fit["step"] - steps[-1]) * s_per_step)
  return out


def write_curve(
    run_dir: str, out_dir: str, start: Optional[float] = None, fit_from: int = 0, fit_to: Optional[int] = None
) -> Dict[str, Any]:
  """curve.csv, curve.json (rows and the extrapolation) and plots/othello_curve.png of one training run."""
  rows = training_curve(run_dir, start)
  if not rows:
    raise FileNotFoundError(f"{run_dir}: no eval_<step>.json yet; nothing to draw.")
  os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
  with open(os.path.join(out_dir, "curve.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[-1]))
    w.writeheader()
    w.writerows({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
  out = dict(run_dir=run_dir, rows=rows, extrapolation=extrapolate(rows, fit_from, fit_to))
  with open(os.path.join(out_dir, "curve.json"), "w") as f:
    json.dump(out, f, indent=1)
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
  for ax, x, label in ((axes[0], "step", "step (top: tokens, millions)"), (axes[1], "wall_s", "wall time (min)")):
    scale = 60.0 if x == "wall_s" else 1.0
    for w, color in (("raw", "C0"), ("ema", "C1"), ("bema", "C2")):
      for g, style in (("in_range", "-"), ("out_of_range", ":")):
        key = f"{w}/{g}/legal_mass"
        pts = [(r[x] / scale, r[key]) for r in rows if key in r]
        if pts:
          ax.plot(*zip(*pts), style, color=color, marker=".", label=f"{w} {g.replace('_', ' ')}")
    ax.axhline(0.95, color="0.5", lw=0.8)
    ax.set_xlabel(label, fontsize=8)
    ax.set_ylabel("legal-move mass", fontsize=8)
    ax.tick_params(labelsize=7)
  tokens_per_step = rows[-1]["tokens"] / max(rows[-1]["step"], 1)
  top = axes[0].secondary_xaxis(
      "top", functions=(lambda s: s * tokens_per_step / 1e6, lambda t: t * 1e6 / tokens_per_step)
  )
  top.tick_params(labelsize=7)
  axes[0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "plots", "othello_curve.png"))
  plt.close(fig)
  return out


def main(argv):
  del argv
  if _CURVE.value:
    start = datetime.datetime.fromisoformat(_CURVE_START.value).timestamp() if _CURVE_START.value else None
    out = write_curve(_CURVE.value, _RESULTS.value or _CURVE.value, start, _FIT_FROM.value, _FIT_TO.value)
    for r in out["rows"]:
      print(r["step"], r["wall_s"], round(r["raw/in_range/legal_mass"], 4), round(r["raw/out_of_range/legal_mass"], 4))
    print(out["extrapolation"])
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (unless --curve).")
  seeds = [int(s) for s in _SEEDS.value.split(",") if s]
  dropouts = [float(d) for d in _DROPOUTS.value.split(",") if d]
  results = _RESULTS.value or _WORKDIR.value
  command = "python -m experiments.othello_compare " + shlex.join(sys.argv[1:])
  compare(_CONFIG.value, _WORKDIR.value, seeds, dropouts, results=results, command=command, fit_games=_FIT_GAMES.value)
  with open(os.path.join(results, "summary.md")) as f:
    print(f.read())


if __name__ == "__main__":
  from ema_jax import host_memory

  host_memory.reexec()  # as train.py: huge pages for big host buffers (same numbers)
  define_flags()
  app.run(main)
