"""Pre-norm vs post-norm, paired over seeds: OthelloGPT (GPT-1 style post-norm, the paper's) and the
set-complement query model (norm on the attention inputs vs on the residual sum, and none).

  python -m experiments.norm_compare --workdir W [--seeds 0,1,2] [--tasks othello,set_complement]
      [--results results/norm_position]

The revised version of "Learning What's Missing" (arXiv 2510.08341v2) argues that post-norm can resharpen
attention that longer inputs disperse. Each (task, norm, seed) trains its task's default preset through
ema_jax.trainer into W/<task>_<norm>_s<seed> (a run whose final eval JSON exists is not retrained), and the
final evaluation's in-range and out-of-range metrics of the raw and averaged weights are compared: means
over seeds, and post - pre differences paired by seed with 95% t-intervals (same seed: same data order and
initialisation key; the weights themselves differ in shape only by the final norm).

Set complement is read three ways, so that a verdict can be told from a sharpening of the output: as-is
(kl, invalid_mass, logit_gap), at each set of weights' own fitted temperature (t_kl, t_invalid_mass; one
scalar fitted on in-range sizes of a held-out check set, ema_jax/temperature.py), and by the attention
dispersion that no temperature changes (attn_dispersion, lower = sharper attention). A norm placement
helps length generalization only if the out-of-range t_kl improves too. OthelloGPT is off by default: its
default preset (1000 steps) puts about 0.65 of its probability on legal moves in range, so a comparison of
it is about a model that has not learned the rules (results/othello).

Writes --results (default W): summary.md, summary.json.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List

import numpy as np
from absl import app, flags


def define_flags():
  """The command-line flags, defined only when the module runs as a script (tests import it)."""
  global _WORKDIR, _SEEDS, _TASKS, _RESULTS
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go.", required=True)
  _SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
  _TASKS = flags.DEFINE_string(
      "tasks",
      "set_complement",
      "Comma-separated subset of othello, set_complement (othello: the default preset is undertrained, so its "
      "comparison describes a model that has not learned the rules).",
  )
  _RESULTS = flags.DEFINE_string("results", None, "Where summary.md/json go (default: workdir).")


# task -> (config module, preset, {norm name: config edits}, metrics (name, higher is better))
TASKS = {
    "othello": (
        "othello",
        "default",
        {"pre": {"model.norm_position": "pre"}, "post": {"model.norm_position": "post"}},
        [("legal_mass", True), ("top1_legal", True), ("kl", False)],
    ),
    "set_complement": (
        "set_complement",
        "default",
        {
            "none": {"model.kind": "query", "model.norm": "none"},
            "pre": {"model.kind": "query", "model.norm": "pre"},
            "post": {"model.kind": "query", "model.norm": "post"},
        },
        [
            ("kl", False),
            ("t_kl", False),
            ("invalid_mass", False),
            ("t_invalid_mass", False),
            ("logit_gap", True),
            ("attn_dispersion", False),
        ],
    ),
}
REGIONS = ("in_range", "out_of_range")


def load_config(module: str, preset: str):
  import importlib

  return importlib.import_module(f"configs.{module}").get_config(preset)


def set_field(c, dotted: str, value):
  *parents, last = dotted.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[last] = value


def train_all(task: str, seeds: List[int], workdir: str, log=print) -> Dict[str, Dict[int, Dict[str, Any]]]:
  """{norm: {seed: final eval results}} for one task, training what is missing."""
  from ema_jax import trainer

  module, preset, norms, _ = TASKS[task]
  out: Dict[str, Dict[int, Dict[str, Any]]] = {}
  for norm, edits in norms.items():
    for seed in seeds:
      c = load_config(module, preset)
      for k, v in edits.items():
        set_field(c, k, v)
      c.seed, c.eval_every = int(seed), 0
      if task == "othello" and c.task.data_dir is None:
        c.task.data_dir = os.path.join(workdir, "othello_data")  # games shared by every run
      wd = os.path.join(workdir, f"{task}_{norm}_s{seed}")
      final = os.path.join(wd, f"eval_{c.steps}.json")
      if not os.path.exists(final):
        log(f"== {task} {norm} seed {seed}: training {c.steps} steps")
        t0 = time.time()
        trainer.train(c, wd)
        log(f"   {time.time() - t0:.0f} s")
      with open(final) as f:
        out.setdefault(norm, {})[int(seed)] = json.load(f)["results"]
  return out


def t_interval(d: np.ndarray):
  from scipy import stats

  d = np.asarray(d, np.float64)
  n, mean = d.size, float(d.mean())
  if n < 2:
    return dict(n=int(n), mean=mean)
  se = float(d.std(ddof=1) / math.sqrt(n))
  q = float(stats.t.ppf(0.975, n - 1))
  return dict(n=int(n), mean=mean, se=se, ci=[mean - q * se, mean + q * se])


def compare(task: str, runs: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, Any]:
  _, _, norms, metrics = TASKS[task]
  seeds = sorted(set.intersection(*(set(v) for v in runs.values())))
  weights = [w for w in runs[next(iter(runs))][seeds[0]] if isinstance(runs[next(iter(runs))][seeds[0]][w], dict)]
  means, diffs = {}, {}
  for norm in norms:
    for w in weights:
      for g in REGIONS:
        for m, _ in metrics:
          means[f"{norm}/{w}/{g}/{m}"] = float(np.mean([runs[norm][s][w][f"{g}/{m}"] for s in seeds]))
  for norm in norms:
    if norm == "post":
      continue
    for w in weights:
      for g in REGIONS:
        for m, higher in metrics:
          d = np.asarray([runs["post"][s][w][f"{g}/{m}"] - runs[norm][s][w][f"{g}/{m}"] for s in seeds])
          r = t_interval(d)
          if "ci" in r:
            lo, hi = r["ci"]
            r["verdict"] = (
                "post better"
                if (lo > 0 if higher else hi < 0)
                else "post worse"
                if (hi < 0 if higher else lo > 0)
                else "not resolved"
            )
          diffs[f"post-{norm}/{w}/{g}/{m}"] = r
  return dict(seeds=seeds, weights=weights, means=means, paired=diffs)


def write_markdown(path: str, summary: Dict[str, Any]) -> None:
  lines = [
      "# Pre-norm vs post-norm, paired over seeds",
      "",
      f"Command: `{summary['command']}`  ",
      f"{summary['date']}, {summary['machine']}, load average {summary['load_start']} at the start, "
      f"{summary['load_end']} at the end; {summary['wall_s']:.0f} s.",
      "",
  ]
  for task, res in summary["tasks"].items():
    _, preset, norms, metrics = TASKS[task]
    lines += [f"## {task} (preset {preset}; seeds {res['seeds']})", "", "Means over seeds:", ""]
    head = [f"{g.split('_')[0]} {m}" for g in REGIONS for m, _ in metrics]
    lines += ["| norm | weights | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for norm in norms:
      for w in res["weights"]:
        vals = [res["means"][f"{norm}/{w}/{g}/{m}"] for g in REGIONS for m, _ in metrics]
        lines.append(f"| {norm} | {w} | " + " | ".join(f"{v:.4g}" for v in vals) + " |")
    lines += ["", "Paired differences (post minus the other, same seed), 95% t-interval:", ""]
    lines += ["| comparison | weights | region | metric | mean [95% CI] | verdict |", "|---|---|---|---|---|---|"]
    for key, r in res["paired"].items():
      comp, w, g, m = key.split("/")
      ci = f" [{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]" if "ci" in r else ""
      lines.append(f"| {comp} | {w} | {g} | {m} | {r['mean']:.3g}{ci} | {r.get('verdict', 'n/a')} |")
    lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines))


def main(argv):
  del argv
  seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
  tasks = [t.strip() for t in _TASKS.value.split(",") if t.strip()]
  bad = [t for t in tasks if t not in TASKS]
  if bad or not seeds:
    raise ValueError(
        f"--tasks={_TASKS.value!r} / --seeds={_SEEDS.value!r}: tasks from {sorted(TASKS)}, seeds integers."
    )
  t0, load0 = time.time(), round(os.getloadavg()[0], 2)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  results = {t: compare(t, train_all(t, seeds, _WORKDIR.value)) for t in tasks}
  summary = dict(
      command="python -m experiments.norm_compare " + " ".join(sys.argv[1:]),
      date=time.strftime("%Y-%m-%d"),
      machine=f"{platform.machine()} CPU, {os.cpu_count()} cores",
      load_start=load0,
      load_end=round(os.getloadavg()[0], 2),
      wall_s=time.time() - t0,
      tasks=results,
  )
  out = _RESULTS.value or _WORKDIR.value
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  write_markdown(os.path.join(out, "summary.md"), summary)
  print(open(os.path.join(out, "summary.md")).read())


if __name__ == "__main__":
  from ema_jax import host_memory

  host_memory.reexec()  # as train.py: huge pages for big host buffers (same numbers)
  define_flags()
  app.run(main)
