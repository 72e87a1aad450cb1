"""Random hyperparameter search on the set-complement task: does dropout, does weight averaging, help out of
range, and does the help survive a temperature?

  python -m experiments.set_complement_sweep --config configs/set_complement.py:sweep --workdir W [--runs 48]
      [--config.steps=20000 --config.sweep.dims='["32x32"]' ...]
  python -m experiments.set_complement_sweep --workdir W --reanalyse     (rebuild summary and plots from runs.json)
  python -m experiments.set_complement_sweep --config configs/set_complement.py:sweep --workdir W2 --runs 48 \\
      --only_runs 6,7 --config.steps=40000 && python -m experiments.set_complement_sweep --workdir W \\
      --reanalyse --merge_from W2                  (runs that had not plateaued, again with a higher cap)

The model is config.model.kind (the sweep preset: 'decoder', the paper's single-layer attention-only causal
model, trained on every prefix). Each run samples (config.sweep, set_complement_sweep_sampling.py): a seed,
dims, learning rate (log-uniform), one dropout placement (balanced over runs; '' = no dropout) and its rate,
and the debiased EMA's decay. Averaging does not change training, so every run keeps the EMA and one BEMA
per burn-in of sweep.bema_burn_in ('bema_<tau>'), and each set of weights (raw, EMA, BEMA per tau) is a
paired comparison within the run. BEMA does not use the sampled EMA decay: its averaging rate is its own
schedule (rho + gamma t)^-kappa (ema_jax/optim.py).

Temperature control: for each run and each set of weights, one scalar temperature T is fitted on the
in-range check set (seed eval_seed + 1, every in-range size; the plateau check's batches) and the metrics
are reported as-is and at that T (t_kl, ...). An averaging effect that a temperature reproduces is a
sharpening of the output, not length generalization; raw weights at their own T ("sharpening only") stand
beside EMA and BEMA. The attention's dispersion per size (entropy of the last set token's attention / log s)
is reported too: no temperature changes it.

Convergence: the learning rate is constant after warmup (the preset's optim.schedule) and each group of
runs trains in chunks of sweep.chunk_steps; after each chunk every run's raw in-range KL on the check set is
measured, and a run has plateaued when no check in the last sweep.patience beat the best earlier value by
more than sweep.rel_tol (relative), after at least sweep.min_steps; or never, within config.steps (the cap).
With sweep.stop_at_plateau a run is read at the step it plateaued and trains no further.

Groups are the runs sharing dims and heads (what fixes the compiled program): one jax.vmap of the trainer's
own step (trainer.make_train_step) over states with a leading run axis trains all of them together
(set_complement_sweep_training.py): each run's lr is the lr_scale in its optimizer state, its dropout rates
live in the model's state (a rate of 0 is exactly the identity), its EMA decay in the average's state, its
seed splits into a parameter key and a dropout key as config.seed does in train.py. All runs see the same
training batches (the stream of config.seed), common random numbers that take data noise out of the
comparisons.

Writes to W: runs.csv, runs.json (every run: sampled values, plateau step, temperatures, in-range and
out-of-range metrics of every set of weights as-is and at T, per-size curves, the in-range history),
summary.json and summary.md (set_complement_sweep_stats.py, set_complement_sweep_report.py: every averaging
and dropout comparison as-is and temperature-controlled with 95% intervals, and a verdict stating both),
and plots/*.png.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Any, Dict, Optional, Sequence

import jax
import ml_collections
import numpy as np

from ema_jax.data import set_complement as data
from ema_jax.tasks import set_complement as sc
from ema_jax.tasks import set_complement_metrics as scm
from experiments.set_complement_sweep_report import csv_columns, findings, make_plots, write_markdown
from experiments.set_complement_sweep_sampling import (
    group_key,
    group_runs,
    hyper_arrays,
    sample_runs,
    validate_sweep,
    weight_names,
)
from experiments.set_complement_sweep_stats import analyse, mean_ci, ols
from experiments.set_complement_sweep_training import (
    ALL_METRICS,
    GroupPrograms,
    TrainingStream,
    chunk_length,
    evaluate_group,
    fit_temperatures,
    plateau_check,
    train_group,
    training_chunks,
)

# The as-is metrics (set_complement_dims.py and accelerator_suite.py read them per size from evaluate_group).
METRICS = scm.BASE_METRICS
# Per-size curves kept in runs.json (the range means of every metric are kept in any case).
PER_SIZE = ("kl", "t_kl", "invalid_mass", "t_invalid_mass", "logit_gap", "attn_dispersion")

__all__ = [
    "ALL_METRICS",
    "GroupPrograms",
    "METRICS",
    "TrainingStream",
    "analyse",
    "chunk_length",
    "evaluate_group",
    "fit_temperatures",
    "group_key",
    "group_runs",
    "hyper_arrays",
    "mean_ci",
    "ols",
    "plateau_check",
    "reanalyse",
    "run_sweep",
    "sample_runs",
    "train_group",
    "training_chunks",
    "validate_sweep",
]


def _round(v, digits: Optional[int] = 6):
  """Floats to `digits` significant digits (None: as they are); None for NaN (JSON has no NaN)."""
  if isinstance(v, float):
    return None if not np.isfinite(v) else (v if digits is None else float(f"{v:.{digits}g}"))
  if isinstance(v, dict):
    return {k: _round(x, digits) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_round(x, digits) for x in v]
  return v


def _runs_json(row):
  """A run's row for runs.json: range means at full precision (the analysis reads them), the per-size
  curves (plots only) to 6 digits, so that the file stays small."""
  return {k: _round(v, 6 if k.endswith("_per_size") else None) for k, v in row.items()}


def _csv_value(v):
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.6g}"
  return v


def write_runs(workdir: str, rows, sizes, l_train: int, weights: Sequence[str], burn_ins: Sequence[int]) -> None:
  cols = csv_columns(weights)
  with open(os.path.join(workdir, "runs.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in rows:
      w.writerow([_csv_value(r.get(c)) for c in cols])
  saved = dict(
      sizes=list(sizes),
      train_max_size=l_train,
      weights=list(weights),
      burn_ins=list(burn_ins),
      runs=[_runs_json(r) for r in rows],
  )
  with open(os.path.join(workdir, "runs.json"), "w") as f:
    json.dump(saved, f)


def group_rows(programs, g_runs, key, state, losses_SR, info, temps, res, sizes, l_train):
  """One row per run of a trained group: its sampled values, convergence, temperatures and metrics."""
  rows = []
  for j, run in enumerate(g_runs):
    own = losses_SR[: info["steps_trained"][j], j]
    row = dict(
        run,
        group=key,
        steps_trained=int(info["steps_trained"][j]),
        plateau_step=info["plateau_step"][j],
        final_train_loss=float(np.nanmean(own[-min(100, own.size) :])),
        diverged=bool(info["diverged"][j]),
    )
    for w in programs.names:
      row[f"{w}_temperature"] = float(temps[w][j])
      per = {m: res[w][m][j].tolist() for m in res[w]}
      summ = scm.range_summary(sizes, per, l_train)
      for p, pname in (("in", "in_range"), ("out", "out_of_range")):
        for m in ALL_METRICS:
          if f"{pname}/{m}" in summ:
            row[f"{w}_{p}_{m}"] = summ[f"{pname}/{m}"]
      row[f"{w}_per_size"] = {m: per[m] for m in PER_SIZE if m in per}
    hist = info["history"][:, j]
    row["in_range_history"] = dict(
        steps=[s for s, h in zip(info["check_steps"], hist) if np.isfinite(h)],
        in_kl=[float(h) for h in hist if np.isfinite(h)],
    )
    rows.append(row)
  return rows


def run_sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    runs: Optional[int] = None,
    log=print,
    command: str = "",
    only_runs: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
  """Samples, trains to the plateau, fits temperatures, evaluates and summarises the sweep; returns
  summary.json's content.

  only_runs: train only these run ids of the `runs` sampled (the same hyperparameters, data and seeds, as
  sampling is deterministic), e.g. again with a higher step cap for runs that had not plateaued; merge
  them into the full sweep with reanalyse(workdir, merge_from=...)."""
  t_start = time.time()
  load_start = os.getloadavg()[0]
  runs = int(config.sweep.runs if runs is None else runs)
  validate_sweep(config, runs)
  os.makedirs(workdir, exist_ok=True)
  sw = config.sweep
  burn_ins = [int(t) for t in sw.bema_burn_in]
  weights = weight_names(burn_ins)
  task = sc.SetComplementTask(config)
  n_tok, l_train = task.num_tokens, task.train_max_size
  sizes = task.eval_sizes()
  t = config.task
  eval_batches = [
      data.eval_batch(int(t.eval_seed), s, int(t.eval_examples), num_tokens=n_tok, length=n_tok - 1) for s in sizes
  ]
  # The plateau check's and the temperature's in-range sets: seed eval_seed + 1, apart from the reported
  # metrics' sets (the task's own temperature fit uses the same seed).
  check_batches = [
      data.eval_batch(
          int(t.eval_seed) + sc.CHECK_SEED_OFFSET, s, int(sw.check_examples), num_tokens=n_tok, length=l_train
      )
      for s in range(int(t.train_min_size), l_train + 1)
  ]
  stream = TrainingStream(config, int(sw.chunk_steps))
  sampled = sample_runs(sw, runs)
  if only_runs is not None:
    missing = sorted(set(only_runs) - {r["run"] for r in sampled})
    if missing:
      raise ValueError(f"--only_runs: runs {missing} are not among the {runs} sampled (ids 0..{runs - 1}).")
    sampled = [r for r in sampled if r["run"] in set(only_runs)]
  groups = group_runs(sampled)
  log(
      f"sweep: {len(sampled)} runs in {len(groups)} groups, up to {config.steps} steps each (plateau stop), N={n_tok}, "
      f"L_train={l_train}; weights {', '.join(weights)}"
  )
  rows = []
  stop = bool(sw.get("stop_at_plateau", False))
  for gi, (key, g_runs) in enumerate(sorted(groups.items())):
    t0 = time.time()
    r0 = g_runs[0]
    programs = GroupPrograms(config, r0["embed_dim"], r0["value_dim"], r0["num_heads"], burn_ins)
    state, losses_SR, info = train_group(programs, g_runs, stream, check_batches, sw, log, stop_at_plateau=stop)
    t_train = time.time() - t0
    temps = fit_temperatures(programs, state, check_batches)
    res = evaluate_group(programs, state, eval_batches, temps)
    done = group_rows(programs, g_runs, key, state, losses_SR, info, temps, res, sizes, l_train)
    rows += done
    log(
        f"  group {gi + 1}/{len(groups)} {key}: {len(g_runs)} runs, {min(info['steps_trained'])}.."
        f"{max(info['steps_trained'])} steps, train {t_train:.1f} s, eval {time.time() - t0 - t_train:.1f} s; "
        "median out-of-range KL as-is / at T: "
        + ", ".join(
            f"{w} {np.median([r[f'{w}_out_kl'] for r in done]):.4g} / {np.median([r[f'{w}_out_t_kl'] for r in done]):.4g}"
            for w in ("raw", "ema", weights[2])
        )
    )
  rows.sort(key=lambda r: r["run"])
  write_runs(workdir, rows, sizes, l_train, weights, burn_ins)
  steps_trained = [r["steps_trained"] for r in rows]
  summary = dict(
      command=command,
      date=time.strftime("%Y-%m-%d"),
      n_runs=len(rows),
      n_groups=len(groups),
      n_diverged=sum(r["diverged"] for r in rows),
      device=f"{jax.devices()[0].platform} x{jax.device_count()} ({os.cpu_count()} CPU cores)",
      load_start=round(load_start, 2),
      steps=int(config.steps),
      batch_size=int(config.batch_size),
      schedule=str(config.optim.schedule),
      model_kind=str(config.model.get("kind", "query")),
      task=config.task.to_dict(),
      eval_sizes=sizes,
      sweep=sw.to_dict(),
      weights=weights,
      burn_ins=burn_ins,
      convergence=dict(
          check_every=stream.k,
          patience=int(sw.patience),
          rel_tol=float(sw.rel_tol),
          min_steps=int(sw.min_steps),
          stop_at_plateau=stop,
          n_plateau=sum(r["plateau_step"] is not None for r in rows),
          steps_min=min(steps_trained),
          steps_max=max(steps_trained),
      ),
      training_wall_time_s=time.time() - t_start,
  )
  # The metadata first: a workdir whose analysis failed can still be reanalysed.
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  summary = _analyse_and_write(workdir, summary, rows, sizes, l_train)
  summary["wall_time_s"] = time.time() - t_start
  summary["load_end"] = round(os.getloadavg()[0], 2)
  _write_summary(workdir, summary)
  log(
      f"sweep: done in {summary['wall_time_s']:.0f} s; wrote runs.csv, runs.json, summary.json, summary.md, "
      f"plots/ to {workdir}"
  )
  for line in summary["findings"]:
    log("  " + line)
  return summary


def _analyse_and_write(workdir: str, summary: Dict[str, Any], rows, sizes, l_train: int) -> Dict[str, Any]:
  rng = np.random.default_rng(12345)
  boot = int(summary["sweep"]["bootstrap"])
  weights = summary["weights"]
  summary = dict(summary)
  summary.update(analyse(rows, weights, sizes, l_train, rng, boot))
  summary["plateaued"] = analyse([r for r in rows if r["plateau_step"] is not None], weights, sizes, l_train, rng, boot)
  summary["findings"] = findings(summary)
  summary["plots"] = [
      os.path.relpath(p, workdir) for p in make_plots(rows, weights, sizes, l_train, os.path.join(workdir, "plots"))
  ]
  return summary


def _write_summary(workdir: str, summary: Dict[str, Any]) -> None:
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(_round(summary, None), f, indent=1, default=str)
  write_markdown(os.path.join(workdir, "summary.md"), summary)


def reanalyse(workdir: str, log=print, merge_from: Optional[str] = None) -> Dict[str, Any]:
  """Rebuilds summary.json/md and the plots from runs.json, keeping the training's metadata (command, wall
  time, machine, load): for a changed analysis without retraining.

  merge_from: a workdir of run_sweep(..., only_runs=...) on the same sweep: its rows replace those of the
  same run ids (runs.json and runs.csv are rewritten) and its command and wall time are recorded."""
  with open(os.path.join(workdir, "runs.json")) as f:
    saved = json.load(f)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  rows = saved["runs"]
  if merge_from:
    with open(os.path.join(merge_from, "runs.json")) as f:
      extra = {r["run"]: r for r in json.load(f)["runs"]}
    with open(os.path.join(merge_from, "summary.json")) as f:
      extra_summary = json.load(f)
    unknown = sorted(set(extra) - {r["run"] for r in rows})
    if unknown:
      raise ValueError(f"--merge_from={merge_from}: runs {unknown} are not in {workdir}/runs.json.")
    rows = [extra.get(r["run"], r) for r in rows]
    write_runs(workdir, rows, saved["sizes"], saved["train_max_size"], saved["weights"], saved["burn_ins"])
    summary.setdefault("continuations", []).append(
        dict(
            command=extra_summary["command"],
            runs=sorted(extra),
            steps_cap=extra_summary["steps"],
            wall_time_s=extra_summary.get("wall_time_s", extra_summary.get("training_wall_time_s")),
            load_start=extra_summary["load_start"],
            load_end=extra_summary.get("load_end"),
        )
    )
    steps_trained = [r["steps_trained"] for r in rows]
    summary["convergence"].update(
        n_plateau=sum(r["plateau_step"] is not None for r in rows),
        steps_min=min(steps_trained),
        steps_max=max(steps_trained),
    )
  # NaNs were stored as null.
  for r in rows:
    for k, v in r.items():
      if v is None and k.endswith(tuple(ALL_METRICS) + ("temperature",)):
        r[k] = float("nan")
  summary.setdefault("wall_time_s", summary.get("training_wall_time_s"))
  summary.setdefault("load_end", None)
  summary = _analyse_and_write(workdir, summary, rows, saved["sizes"], saved["train_max_size"])
  _write_summary(workdir, summary)
  log(f"sweep: summary.json, summary.md and plots/ rebuilt from {workdir}/runs.json")
  return summary


def main(argv):
  import sys
  from absl import flags

  del argv
  FLAGS = flags.FLAGS
  if FLAGS.reanalyse:
    reanalyse(FLAGS.workdir, merge_from=FLAGS.merge_from)
    return
  config = FLAGS.config
  if config is None or "sweep" not in config:
    raise ValueError(
        "experiments.set_complement_sweep: --config with a `sweep` field is needed; use "
        "configs/set_complement.py:sweep (or --reanalyse to rebuild a finished sweep's summary)."
    )
  only = [int(x) for x in FLAGS.only_runs.split(",") if x.strip()] if FLAGS.only_runs else None
  run_sweep(
      config,
      FLAGS.workdir,
      FLAGS.runs,
      command="python -m experiments.set_complement_sweep " + " ".join(sys.argv[1:]),
      only_runs=only,
  )


if __name__ == "__main__":
  from ema_jax import host_memory

  host_memory.reexec()  # as train.py: huge pages for big host buffers (same numbers)
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Sweep config, e.g. configs/set_complement.py:sweep.")
  flags.DEFINE_string("workdir", None, "Output directory.")
  flags.DEFINE_integer("runs", None, "Number of runs (default config.sweep.runs).")
  flags.DEFINE_bool("reanalyse", False, "Rebuild summary.json/md and plots of a finished sweep from its runs.json.")
  flags.DEFINE_string("only_runs", None, "Comma-separated run ids: train only these of the sampled runs.")
  flags.DEFINE_string(
      "merge_from", None, "With --reanalyse: a workdir of an --only_runs sweep whose rows replace these."
  )
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
