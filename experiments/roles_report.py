"""Role assignment: label-free Hebbian traces vs a supervised BiGRU, gathered from finished runs.

  python -m experiments.roles_report --hebbian W1,W2 --bigru W3,W4 [--hebbian_causal W5,W6]
      [--hebbian_ud W7 --bigru_ud W8] [--ablation LABEL=W9,W10 ...] [--walltimes FILE] --out_dir results/roles
  python -m experiments.roles_report --previous results/roles/results.json --hebbian_causal W5,W6 \
      --out_dir results/roles   # adds runs to an earlier results.json, rewrites it and causal.md only

Reads the newest eval_<step>.json of each workdir (runs of configs/roles.py: the BiGRU task
ema_jax/tasks/roles.py and the Hebbian one, roles_hebbian.py); ratios Hebbian / BiGRU are paired by seed
(same sentences). Writes to --out_dir: results.json (per model and split: mean / sd over runs of every
metric, the paired ratios, the runs), results.md (the paper's numbers beside ours, the comparison tables,
ablations, runs), depth.png (argument accuracy against embedding depth) and, given causal runs, causal.md
(forward-only traces beside bidirectional ones). See results/roles/README.md.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from ema_jax import workdir as workdir_lib
from ema_jax.tasks.roles import EVAL_SPLITS, SPLIT_TITLES

# "Hebbian" reads traces both ways (the default, model.backward=True); "Hebbian causal" only the tokens
# before each position (model.backward=False), what a streaming reader has.
MODELS = {
    "hebbian_unit_readout": ("hebbian", "unit_readout", "Hebbian, unit readout"),
    "hebbian_linear_probe": ("hebbian", "linear_probe", "Hebbian, linear probe"),
    "hebbian_causal_unit_readout": ("hebbian_causal", "unit_readout", "Hebbian causal, unit readout"),
    "hebbian_causal_linear_probe": ("hebbian_causal", "linear_probe", "Hebbian causal, linear probe"),
    "bigru": ("bigru", "raw", "BiGRU (supervised)"),
}
HEBBIAN_MODELS = tuple(m for m in MODELS if m.startswith("hebbian"))
PAPER = {"within_A_ratio": 96.0, "transfer_B": 61.8, "deep": 84.0}


def _flat(details: Mapping[str, Any]) -> Dict[str, float]:
  """The numbers of one role_metrics dict that the comparison reports, flat."""
  out = {
      k: details[k]
      for k in (
          "accuracy",
          "argument_accuracy",
          "macro_accuracy",
          "deep_argument_accuracy",
          "shallow_argument_accuracy",
          "count_arguments",
          "count_deep_arguments",
      )
  }
  out.update({f"role/{r}": v for r, v in details["per_role"].items()})
  out.update({f"depth_arg/{k}": v for k, v in details["per_depth_arguments"].items()})
  out.update({f"count_depth/{k}": v for k, v in details["count_per_depth"].items()})
  return out


def _stats(values: Sequence[float]) -> Optional[Dict[str, Any]]:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if not len(v):
    return None
  return {
      "mean": float(v.mean()),
      "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
      "n": int(len(v)),
      "values": v.tolist(),
  }


def gather(
    hebbian_dirs: Sequence[str],
    bigru_dirs: Sequence[str],
    walltimes: Mapping[str, float] = {},
    hebbian_causal_dirs: Sequence[str] = (),
    previous: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
  """Per model (MODELS) and split: mean / sd over runs of each metric, the runs' seeds, steps and wall
  times; and the Hebbian / BiGRU ratios, paired by seed (same sentences), as mean / sd. `previous` (one
  data source's part of an earlier results.json) supplies the models and runs not given as workdirs."""
  runs = {
      kind: [(w, workdir_lib.latest_eval(w)) for w in dirs]
      for kind, dirs in (("hebbian", hebbian_dirs), ("hebbian_causal", hebbian_causal_dirs), ("bigru", bigru_dirs))
  }
  for kind, want in (("hebbian", True), ("hebbian_causal", False)):
    for w, ev in runs[kind]:
      got = ev.get("config", {}).get("model", {}).get("backward")
      if got is not None and got != want:
        raise ValueError(
            f"roles_report: {w} ran with model.backward={got}; --{kind} takes runs with model.backward={want}"
        )
  out: Dict[str, Any] = {"models": {}, "ratios": {}, "runs": {}}
  per_seed: Dict[str, Dict[Any, Dict[str, Dict[str, float]]]] = {}
  if previous:
    for model, (kind, _, _) in MODELS.items():
      if runs[kind] or model not in previous["models"]:
        continue
      out["models"][model] = previous["models"][model]
      out["runs"][kind] = previous["runs"][kind]
      if model in previous.get("ratios", {}):
        out["ratios"][model] = previous["ratios"][model]
      per_seed[model] = _per_seed_from_summary(previous["models"][model], previous["runs"][kind])
  for model, (kind, key, _) in MODELS.items():
    if not runs[kind]:
      continue
    splits: Dict[str, Dict[str, list]] = {}
    for w, ev in runs[kind]:
      res = ev["results"][key]
      for split, d in res["details"].items():
        flat = _flat(d)
        flat["majority_accuracy"] = res.get(f"{split}/majority_accuracy")
        per_seed.setdefault(model, {}).setdefault(_seed_of(w, ev), {})[split] = flat
        for k, v in flat.items():
          splits.setdefault(split, {}).setdefault(k, []).append(v)
    out["models"][model] = {s: {k: _stats(v) for k, v in vals.items()} for s, vals in splits.items()}
  for kind, items in runs.items():
    if not items:
      continue
    out["runs"][kind] = [
        {
            "workdir": w,
            "seed": _seed_of(w, ev),
            "step": ev["step"],
            "wall_seconds": walltimes.get(os.path.basename(os.path.normpath(w)), ev.get("wall_seconds")),
        }
        for w, ev in items
    ]
  if "bigru" in per_seed:
    for model in HEBBIAN_MODELS:
      if model not in per_seed or not runs[MODELS[model][0]]:
        continue
      ratios: Dict[str, Dict[str, list]] = {}
      for s, by_split in per_seed[model].items():
        ref = per_seed["bigru"].get(s)
        if ref is None:
          continue
        for split, flat in by_split.items():
          for k, v in flat.items():
            r = ref.get(split, {}).get(k)
            if k.startswith("count") or r is None or v is None or not r > 0:
              continue
            ratios.setdefault(split, {}).setdefault(k, []).append(v / r)
      out["ratios"][model] = {sp: {k: _stats(v) for k, v in vals.items()} for sp, vals in ratios.items()}
  return out


def _per_seed_from_summary(stats: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]):
  """{seed: {split: {metric: value}}} back from a summary's per-run values (stored in run order)."""
  out: Dict[Any, Dict[str, Dict[str, float]]] = {}
  for split, metrics in stats.items():
    for k, s in metrics.items():
      if s is None or len(s["values"]) != len(runs):
        continue
      for r, v in zip(runs, s["values"]):
        out.setdefault(r["seed"], {}).setdefault(split, {})[k] = v
  return out


def _seed_of(workdir, ev):
  for res in ev["results"].values():
    if "seed" in res.get("info", {}):
      return res["info"]["seed"]
  if "seed" in ev.get("config", {}):
    return ev["config"]["seed"]
  raise ValueError(f"{workdir}: its eval json records no seed (results.<name>.info.seed)")


def _pct(s: Optional[Mapping[str, Any]], digits: int = 1) -> str:
  if not s:
    return "-"
  if s["n"] == 1:
    return f"{100 * s['mean']:.{digits}f}"
  return f"{100 * s['mean']:.{digits}f} ± {100 * s['std']:.{digits}f}"


ROW_METRICS = (
    ("accuracy", "accuracy (all tokens)"),
    ("argument_accuracy", "argument accuracy"),
    ("role/VERB", "VERB recall"),
    ("role/AGENT", "AGENT recall"),
    ("role/PATIENT", "PATIENT recall"),
    ("role/RECIPIENT", "RECIPIENT recall"),
    ("role/OBL", "OBL recall"),
    ("shallow_argument_accuracy", "arguments at depth 0-1"),
    ("deep_argument_accuracy", "deep arguments (depth >= 2)"),
)


def comparison_table(summary: Mapping[str, Any], splits: Sequence[str]) -> str:
  """Markdown: one row per (split, metric); the three models, then the paired Hebbian/BiGRU ratios."""
  models = [m for m in MODELS if m in summary["models"]]
  ratio_models = [m for m in HEBBIAN_MODELS if m in summary["ratios"]]
  head = (
      ["split", "metric"]
      + [MODELS[m][2] for m in models]
      + [f"ratio {MODELS[m][2].replace('Hebbian, ', '').replace('Hebbian ', '')} / BiGRU" for m in ratio_models]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for split in splits:
    for key, label in ROW_METRICS:
      cells = [summary["models"][m].get(split, {}).get(key) for m in models]
      if not any(cells):
        continue
      if key == "deep_argument_accuracy":
        n = summary["models"][models[0]][split].get("count_deep_arguments")
        label += f" (n = {n['mean']:.0f})" if n and n["n"] == 1 else (f" (n ≈ {n['mean']:.0f} per seed)" if n else "")
      row = [SPLIT_TITLES.get(split, split), label] + [_pct(c, 2 if "bigru" == m else 1) for c, m in zip(cells, models)]
      row += [
          _pct(summary["ratios"][m].get(split, {}).get(key))
          + ("%" if summary["ratios"][m].get(split, {}).get(key) else "")
          for m in ratio_models
      ]
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def headline_table(summary: Mapping[str, Any]) -> str:
  """The paper's three numbers beside ours (grammar runs)."""
  m, r = summary["models"], summary["ratios"]
  g = lambda model, split, key: _pct(m.get(model, {}).get(split, {}).get(key))
  rat = lambda model, split, key: _pct(r.get(model, {}).get(split, {}).get(key)) + "%"
  lines = [
      "| claim | paper | ours: Hebbian, unit readout | ours: Hebbian, linear probe | ours: BiGRU |",
      "|---|---|---|---|---|",
  ]
  lines.append(
      f"| Hebbian / BiGRU within grammar A (held-out sentences), all tokens | 96% | "
      f"{rat('hebbian_unit_readout', 'heldout', 'accuracy')} | "
      f"{rat('hebbian_linear_probe', 'heldout', 'accuracy')} | 100% (reference) |"
  )
  lines.append(
      f"| same, argument tokens only | - | {rat('hebbian_unit_readout', 'heldout', 'argument_accuracy')} | "
      f"{rat('hebbian_linear_probe', 'heldout', 'argument_accuracy')} | 100% (reference) |"
  )
  lines.append(
      f"| transfer A -> B, accuracy (all tokens) | 61.8 | {g('hebbian_unit_readout', 'transfer', 'accuracy')} | "
      f"{g('hebbian_linear_probe', 'transfer', 'accuracy')} | {g('bigru', 'transfer', 'accuracy')} |"
  )
  lines.append(
      f"| B's constructions with A's words (no new words), accuracy | - | "
      f"{g('hebbian_unit_readout', 'transfer_struct', 'accuracy')} | "
      f"{g('hebbian_linear_probe', 'transfer_struct', 'accuracy')} | {g('bigru', 'transfer_struct', 'accuracy')} |"
  )
  lines.append(
      f"| transfer A -> B, argument accuracy | - | {g('hebbian_unit_readout', 'transfer', 'argument_accuracy')} | "
      f"{g('hebbian_linear_probe', 'transfer', 'argument_accuracy')} | {g('bigru', 'transfer', 'argument_accuracy')} |"
  )
  for split in EVAL_SPLITS["grammar"]:
    lines.append(
        f"| deeply embedded arguments (depth >= 2), {SPLIT_TITLES[split]} | 84 (above BiGRU) | "
        f"{g('hebbian_unit_readout', split, 'deep_argument_accuracy')} | "
        f"{g('hebbian_linear_probe', split, 'deep_argument_accuracy')} | "
        f"{g('bigru', split, 'deep_argument_accuracy')} |"
    )
  return "\n".join(lines)


def directions_table(summary: Mapping[str, Any]) -> str:
  """Markdown: causal (forward-only) traces beside the bidirectional ones, per readout, with the BiGRU and
  the paper's number where it gives one (grammar runs)."""
  m, r = summary["models"], summary["ratios"]
  pairs = [
      ("hebbian_unit_readout", "hebbian_causal_unit_readout"),
      ("hebbian_linear_probe", "hebbian_causal_linear_probe"),
  ]
  head = ["split", "metric", "paper"]
  for both, causal in pairs:
    readout = MODELS[both][2].split(", ")[1]
    head += [f"both directions, {readout}", f"causal, {readout}"]
  lines = ["| " + " | ".join(head + ["BiGRU"]) + " |", "|" + "---|" * (len(head) + 1)]
  paper = {("heldout", "deep_argument_accuracy"): "84 (above BiGRU)", ("transfer", "accuracy"): "61.8"}
  ratio = [("heldout", "accuracy", "Hebbian / BiGRU, accuracy (all tokens)", "96%")]
  for split, key, label, ref in ratio:
    cells = [_pct(r.get(model, {}).get(split, {}).get(key)) + "%" for pair in pairs for model in pair]
    lines.append(f"| {SPLIT_TITLES[split]} | {label} | {ref} | " + " | ".join(cells) + " | 100% (reference) |")
  for split in EVAL_SPLITS["grammar"]:
    for key, label in (
        ("accuracy", "accuracy (all tokens)"),
        ("argument_accuracy", "argument accuracy"),
        ("deep_argument_accuracy", "deep arguments (depth >= 2)"),
    ):
      cells = [_pct(m.get(model, {}).get(split, {}).get(key)) for pair in pairs for model in pair]
      bigru = _pct(m.get("bigru", {}).get(split, {}).get(key), 2)
      lines.append(
          f"| {SPLIT_TITLES[split]} | {label} | {paper.get((split, key), '-')} | " + " | ".join(cells) + f" | {bigru} |"
      )
  return "\n".join(lines)


DIRECTIONS_NOTE = (
    "'both directions' = the default Hebbian model (configs/roles.py:hebbian, model.backward=True): each token "
    "reads EMA traces of the words before it and of the words after it. 'causal' = model.backward=False: "
    "traces of the words before it only, so the features and the role at position t do not change when "
    "later words do (tests/models/test_hebbian.py), which is what a streaming reader has. The token codes of both "
    "come from word co-occurrence counts over the training text, a property of each word, not of the "
    "sentence being read. Same sentences (seeds) in every column; accuracies in %, mean ± sd over seeds."
)


def plot_depth(summaries: Mapping[str, Mapping[str, Any]], path: str, min_tokens: int = 50) -> str:
  """Argument accuracy against embedding depth, one panel per split, mean ± sd over seeds; depths with
  fewer than min_tokens tokens (all roles) in the split are left out."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [
      (name, split)
      for name, s in summaries.items()
      for split in EVAL_SPLITS[name]
      if any(split in s["models"].get(m, {}) for m in MODELS)
  ]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=90, squeeze=False)
  for ax, (name, split) in zip(axes[0], panels):
    for model, (_, _, label) in MODELS.items():
      stats = summaries[name]["models"].get(model, {}).get(split)
      if not stats:
        continue
      depths = sorted(
          int(k.split("/")[1])
          for k in stats
          if k.startswith("depth_arg/")
          and stats[k]
          and (stats.get(f"count_depth/{k.split('/')[1]}") or {"mean": 0})["mean"] >= min_tokens
      )
      mean = [100 * stats[f"depth_arg/{d}"]["mean"] for d in depths]
      sd = [100 * stats[f"depth_arg/{d}"]["std"] for d in depths]
      ax.errorbar(depths, mean, yerr=sd, marker="o", capsize=3, label=label)
      ax.set_xticks(depths)
    ax.set_title(SPLIT_TITLES.get(split, split) + f" (depths with >= {min_tokens} tokens)", fontsize=9)
    ax.set_xlabel("embedding depth")
    ax.set_ylabel("argument accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def read_walltimes(path: Optional[str]) -> Dict[str, float]:
  """{run name: seconds} from lines 'NAME rc=0 wall_s=SECONDS ...' (results/roles/README.md's loop)."""
  out = {}
  if path and os.path.exists(path):
    with open(path) as f:
      for line in f:
        parts = dict(p.split("=", 1) for p in line.split()[1:3] if "=" in p)
        if "wall_s" in parts:
          out[line.split()[0]] = float(parts["wall_s"])
  return out


def ablation_table(entries: Sequence[str]) -> str:
  """Markdown rows for runs given as 'LABEL=WORKDIR[,WORKDIR...]': every readout / weights (raw, not the
  weight EMA) of each, mean ± sd over the workdirs."""
  cols = [(sp, k) for sp in EVAL_SPLITS["grammar"] for k in ("accuracy", "argument_accuracy", "deep_argument_accuracy")]
  short = {"accuracy": "acc", "argument_accuracy": "arg acc", "deep_argument_accuracy": "deep arg acc"}
  lines = [
      "| run | seeds | readout | " + " | ".join(f"{SPLIT_TITLES[sp]}: {short[k]}" for sp, k in cols) + " |",
      "|---|---|---|" + "---|" * len(cols),
  ]
  for entry in entries:
    label, _, workdirs = entry.partition("=")
    evals = [workdir_lib.latest_eval(w) for w in workdirs.split(",") if w]
    seeds = ",".join(str(_seed_of(w, ev)) for w, ev in zip(workdirs.split(","), evals))
    for name, res in evals[0]["results"].items():
      if name == "ema" or "details" not in res:
        continue
      cells = [
          _pct(_stats([ev["results"][name]["details"][sp][k] for ev in evals])) if sp in res["details"] else "-"
          for sp, k in cols
      ]
      lines.append(f"| {label} | {seeds} | {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  import argparse

  p = argparse.ArgumentParser(
      description="Gathers finished role runs into results.json, results.md and "
      "depth.png (see results/roles/README.md)."
  )
  for name in ("hebbian", "bigru", "hebbian_causal", "hebbian_ud", "bigru_ud"):
    p.add_argument(f"--{name}", default="", help=f"comma-separated workdirs of {name} runs")
  p.add_argument(
      "--previous",
      default=None,
      help="an earlier results.json: its models stand in for those not given as workdirs; only results.json "
      "and causal.md are then rewritten (results.md and depth.png need every workdir)",
  )
  p.add_argument(
      "--ablation",
      action="append",
      default=[],
      help="LABEL=WORKDIR[,WORKDIR...] of grammar runs for the ablation table (repeatable)",
  )
  p.add_argument("--walltimes", default=None, help="file of 'NAME rc=.. wall_s=..' lines")
  p.add_argument("--out_dir", required=True)
  a = p.parse_args(argv)
  dirs = lambda s: [w for w in s.split(",") if w]
  wall = read_walltimes(a.walltimes)
  previous = {}
  if a.previous:
    with open(a.previous) as f:
      previous = json.load(f)
  summaries = {"grammar": gather(dirs(a.hebbian), dirs(a.bigru), wall, dirs(a.hebbian_causal), previous.get("grammar"))}
  if a.hebbian_ud or a.bigru_ud:
    summaries["ud"] = gather(dirs(a.hebbian_ud), dirs(a.bigru_ud), wall)
  elif "ud" in previous:
    summaries["ud"] = previous["ud"]
  os.makedirs(a.out_dir, exist_ok=True)
  with open(os.path.join(a.out_dir, "results.json"), "w") as f:
    json.dump(summaries, f, indent=1)
  directions = None
  if "hebbian_causal_unit_readout" in summaries["grammar"]["models"]:
    directions = directions_table(summaries["grammar"])
    with open(os.path.join(a.out_dir, "causal.md"), "w") as f:
      f.write(
          "# Role assignment: causal (forward-only) vs bidirectional Hebbian traces\n\n"
          f"Written by `python -m experiments.roles_report` (commands in README.md). {DIRECTIONS_NOTE}\n\n"
          f"{directions}\n"
      )
  if a.previous:
    print(directions or "no causal runs given")
    return
  md = [
      "# Role assignment: label-free Hebbian traces vs a supervised BiGRU",
      "",
      "Written by `python -m experiments.roles_report` (commands in README.md). Accuracies in %, mean ± sd over "
      "seeds (sd with n - 1); 'ratio' = Hebbian / BiGRU computed per seed on the same sentences, then "
      "averaged. Arguments = gold AGENT, PATIENT, RECIPIENT (and OBL on UD); deep = embedding depth >= 2. "
      "Hebbian readouts: 'unit readout' = majority role of each unit's training tokens; 'linear probe' = "
      "logistic regression on the frozen unit activations. BiGRU: raw weights (the weight EMA is in the "
      "eval JSONs).",
      "",
      "## Headline: the paper's numbers beside ours (grammar A / B)",
      "",
      headline_table(summaries["grammar"]),
      "",
      "## Grammar: held-out A, A -> B transfer, B's constructions with A's words",
      "",
      comparison_table(summaries["grammar"], EVAL_SPLITS["grammar"]),
  ]
  if directions:
    md += ["", "## Causal (forward-only) vs bidirectional traces (grammar)", "", DIRECTIONS_NOTE, "", directions]
  if "ud" in summaries:
    md += ["", "## UD English EWT (one run each)", "", comparison_table(summaries["ud"], EVAL_SPLITS["ud"])]
  if a.ablation:
    md += ["", "## Ablations (grammar; mean ± sd over the seeds listed)", "", ablation_table(a.ablation)]
  md += ["", "## Runs", "", "| model | data | seed | workdir | steps | wall time (s) |", "|---|---|---|---|---|---|"]
  for data, s in summaries.items():
    for kind, items in s["runs"].items():
      for r in items:
        w = r["wall_seconds"]
        md.append(
            f"| {kind} | {data} | {r['seed']} | {r['workdir']} | {r['step']} | " f"{'-' if w is None else f'{w:.0f}'} |"
        )
  with open(os.path.join(a.out_dir, "results.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  plot_depth(summaries, os.path.join(a.out_dir, "depth.png"))
  print("\n".join(md))


if __name__ == "__main__":
  main()
