"""The set-complement sweep's outputs: runs.csv columns, summary.md, findings and plots
(experiments/set_complement_sweep.py); the numbers come from set_complement_sweep_stats.py."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

import numpy as np

from ema_jax.models.set_transformer import DROPOUT_SITES
from ema_jax.tasks import set_complement_metrics as scm
from experiments.set_complement_sweep_stats import burn_in_of, direction, factor

RUN_COLUMNS = (
    ["run", "group", "seed", "embed_dim", "value_dim", "num_heads", "lr", "dropout", "dropout_on"]
    + [f"drop_{s}" for s in DROPOUT_SITES]
    + ["ema_decay", "steps_trained", "plateau_step", "final_train_loss", "diverged"]
)
METRICS = scm.BASE_METRICS + scm.TEMPERED + scm.ATTENTION


def csv_columns(weights: Sequence[str]) -> List[str]:
  """runs.csv: the sampled values and convergence, then per weights its temperature and range means."""
  cols = list(RUN_COLUMNS)
  for w in weights:
    cols.append(f"{w}_temperature")
    cols += [f"{w}_{p}_{m}" for p in ("in", "out") for m in METRICS]
  return cols


def label(name: str) -> str:
  tau = burn_in_of(name)
  return {"raw": "raw", "ema": "EMA"}.get(name, f"BEMA tau={tau}" if tau is not None else name)


def _ci(res, key="t_ci", digits=3) -> str:
  if not res or "mean" not in res:
    return "n/a"
  ci = res.get(key)
  return f"{res['mean']:.{digits}g}" + (f" [{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]" if ci else "")


def _header(s: Dict[str, Any]) -> List[str]:
  conv = s["convergence"]
  wall = s.get("wall_time_s") or s.get("training_wall_time_s") or float("nan")
  lines = [
      f"# Set-complement random search ({s['n_runs']} runs), temperature-controlled",
      "",
      f"Command: `{s['command']}`  ",
      f"Wall time: {wall:.0f} s on {s['device']} ({s['date']}, load average at the start {s['load_start']}, at "
      f"the end {s.get('load_end')}); {s['n_groups']} compiled groups; diverged runs: {s['n_diverged']}.  ",
      f"Task: N = {s['task']['num_tokens']}, training sizes {s['task']['train_min_size']}.."
      f"{s['task']['train_max_size']}, evaluation at sizes {s['eval_sizes'][0]}..{s['eval_sizes'][-1]}, "
      f"{s['task']['eval_examples']} examples per size; model '{s['model_kind']}'; batch {s['batch_size']}, "
      f"lr schedule '{s['schedule']}'.  ",
      f"Convergence: trained until the raw in-range KL stopped improving (no gain > {conv['rel_tol']:.0%} over "
      f"the last {conv['patience']} checks of {conv['check_every']} steps, at least {conv['min_steps']} steps; "
      f"cap {s['steps']} steps){', each run read at that step' if conv.get('stop_at_plateau') else ''}: "
      f"**{conv['n_plateau']} of {s['n_runs']} runs reached their plateau**; steps trained "
      f"{conv['steps_min']}..{conv['steps_max']}.  ",
      f"Weights per run: {', '.join(label(w) for w in s['weights'])}. BEMA does not use the sampled EMA decay: "
      "its averaging rate is its own schedule (rho + gamma t)^-kappa with the BEMA paper's defaults "
      "(kappa 0.5, eta 0.2, gamma 1, rho 10); only the debiased EMA uses the sampled decay.  ",
      "Temperature control: one temperature T per run and per weights, fitted (cross-entropy) on the in-range "
      "check set (seed eval_seed + 1, every in-range size); 'at T' = the logits divided by it, at every size. "
      "Raw weights at their own T are the 'sharpening only' control.",
  ]
  for c in s.get("continuations", []):
    lines.append(
        f"Run{'s' if len(c['runs']) > 1 else ''} {', '.join(map(str, c['runs']))} retrained (same hyperparameters, data and seeds) with a cap of "
        f"{c['steps_cap']} steps: `{c['command']}` ({c['wall_time_s']:.0f} s, load {c['load_start']} -> "
        f"{c['load_end']}); {'their rows replace the first ones' if len(c['runs']) > 1 else 'its row replaces the first one'}.  "
    )
  return lines


def _claims_table(claims) -> List[str]:
  lines = ["| claim | as-is (95% CI) | temperature-controlled (95% CI) | verdict |", "|---|---|---|---|"]
  lines += [f"| {c['claim']} | {c['as_is']} | {c['temperature_controlled']} | {c['verdict']} |" for c in claims]
  return lines


def _averaging_table(s) -> List[str]:
  lines = [
      "| weights | n | T / T_raw | out-of-range KL as-is | at T (temperature-controlled) | as-is vs raw at its T "
      "| in-range KL as-is | in-range at T | improved as-is / at T |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  sh = s["sharpening"]
  if "out_of_range/log_kl" in sh:
    o, i = sh["out_of_range/log_kl"]["as_is"], sh["in_range/log_kl"]["as_is"]
    lines.append(
        f"| raw at its own T (sharpening only) | {o['n']} | {factor(sh['log_temperature'])} (T itself) | {factor(o)} "
        f"| - | - | {factor(i)} | - | {o['frac_improved']:.0%} / - |"
    )
  for w, r in s["averaging"].items():
    if "out_of_range/log_kl" not in r:
      lines.append(f"| {label(w)} | {r['n_runs']} | n/a | | | | | | |")
      continue
    o, i = r["out_of_range/log_kl"], r["in_range/log_kl"]
    lines.append(
        f"| {label(w)} | {o['as_is']['n']} | {factor(r['log_temperature'])} | {factor(o['as_is'])} | "
        f"{factor(o['temperature_controlled'])} | {factor(o['vs_sharpening'])} | {factor(i['as_is'])} | "
        f"{factor(i['temperature_controlled'])} | {o['as_is']['frac_improved']:.0%} / "
        f"{o['temperature_controlled']['frac_improved']:.0%} |"
    )
  return lines


def _gap_table(s) -> List[str]:
  lines = [
      "| weights | gap factor in range | gap factor out of range | out / in |",
      "|---|---|---|---|",
  ]
  for w, r in s["averaging"].items():
    g = r.get("log_gap_ratio")
    if g:
      lines.append(
          f"| {label(w)} | {factor(g['in_range'])} | {factor(g['out_of_range'])} | {factor(g['out_minus_in'])} |"
      )
  return lines


def _other_metrics_table(s) -> List[str]:
  lines = [
      "| weights | metric | as-is: avg - raw [95% CI] | at T: avg - raw [95% CI] |",
      "|---|---|---|---|",
  ]
  for w, r in s["averaging"].items():
    for m in ("invalid_mass", "tv", "precision", "top1_valid", "attn_dispersion"):
      e = r.get(f"out_of_range/{m}")
      if e:
        tc = "same (no temperature changes it)" if e.get("note") else _ci(e["temperature_controlled"])
        lines.append(f"| {label(w)} | {m} | {_ci(e['as_is'])} | {tc} |")
  return lines


def _dropout_table(s) -> List[str]:
  d = s["dropout"]
  if "sites" not in d:
    return ["(too few runs)"]
  lines = [
      f"Runs without dropout: {d['n_no_dropout']}. Slope: OLS of log KL (raw weights) on each site's rate, all "
      "sites and log lr (and widths where they vary) together, shown as the KL factor per +0.1 rate; vs none: "
      "geometric-mean KL of the site's runs over the no-dropout runs (Welch 95% CI).",
      "",
      "| placement | n | rate | out KL per +0.1, as-is | at T | out KL vs none, as-is | at T | in-range KL per +0.1 "
      "| T per +0.1 | out-of-range dispersion per +0.1 |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for site, e in d["sites"].items():
    rr = e["rate_range"]
    rate = f"{rr[0]:.2f}..{rr[1]:.2f}" if rr[0] is not None else "-"
    disp = e.get("out_of_range_attn_dispersion/as_is/slope")
    lines.append(
        f"| {site} | {e['n']} | {rate} | {factor(e['out_of_range/as_is/slope'], scale=0.1)} | "
        f"{factor(e['out_of_range/temperature_controlled/slope'], scale=0.1)} | "
        f"{factor(e['out_of_range/as_is/vs_none'])} | {factor(e['out_of_range/temperature_controlled/vs_none'])} | "
        f"{factor(e['in_range/as_is/slope'], scale=0.1)} | {factor(e['log_temperature/as_is/slope'], scale=0.1)} | "
        + (f"{0.1 * disp['estimate']:+.3g} [{0.1 * disp['ci'][0]:+.3g}, {0.1 * disp['ci'][1]:+.3g}]" if disp else "n/a")
        + " |"
    )
  p = d["pooled"]
  lines.append(
      f"| any (pooled) | {p['out_of_range/as_is/vs_none'].get('n')} | | "
      f"{factor(p['out_of_range/as_is/slope'], scale=0.1)} | "
      f"{factor(p['out_of_range/temperature_controlled/slope'], scale=0.1)} | {factor(p['out_of_range/as_is/vs_none'])} | "
      f"{factor(p['out_of_range/temperature_controlled/vs_none'])} | {factor(p['in_range/as_is/slope'], scale=0.1)} | | |"
  )
  return lines


def _per_size_table(s, show=(1, 2, 4, 8, 9, 12, 16, 20, 24, 31)) -> List[str]:
  ps = s["per_size"]
  sizes = ps["sizes"]
  cols = [z for z in show if z in sizes]
  idx = [sizes.index(z) for z in cols]
  lines = [
      "| weights | " + " | ".join(f"s={z}" for z in cols) + " |",
      "|---|" + "---|" * len(cols),
  ]
  for w, c in ps["attn_dispersion"].items():
    if c:
      lines.append(f"| {label(w)} | " + " | ".join(f"{c[i]:.3f}" for i in idx) + " |")
  for p, c in ps["attn_dispersion_raw_by_placement"].items():
    if c:
      lines.append(f"| raw, dropout on {p} | " + " | ".join(f"{c[i]:.3f}" for i in idx) + " |")
  return lines


def write_markdown(path: str, summary: Dict[str, Any]) -> None:
  s = summary
  lines = _header(s)
  lines += ["", "## The paper's claims, as-is and temperature-controlled", ""] + _claims_table(s["claims"])
  pl = s.get("plateaued")
  if pl and pl["n_runs"] < s["n_runs"]:
    lines += ["", f"The same on the {pl['n_runs']} runs that reached their plateau within the cap:", ""]
    lines += _claims_table(pl["claims"])
  lines += [
      "",
      "## Weight averaging vs the raw weights of the same run",
      "",
      "Geometric-mean factor on KL (averaged / raw) with 95% t-intervals over runs. 'at T': both at their own "
      "fitted temperature. 'as-is vs raw at its T': the average as it is against the raw weights merely "
      "sharpened (below 1: the average beats a temperature). A BEMA enters only for runs trained past its "
      "burn-in.",
      "",
  ]
  lines += _averaging_table(s)
  lines += [
      "",
      "Valid-minus-invalid logit gap, averaged / raw (geometric mean): a factor that is the same in and out of "
      "range (out / in = 1) is what a temperature does.",
      "",
  ]
  lines += _gap_table(s)
  lines += ["", "Other out-of-range metrics (averaged - raw, means over runs):", ""] + _other_metrics_table(s)
  lines += ["", "## Dropout per placement (raw weights)", ""] + _dropout_table(s)
  sep = s["separation"]
  lines += [
      "",
      "## Attention dispersion per size (entropy of the last set token's attention / log s; 1 = uniform)",
      "",
      "Mean over runs; no temperature changes it. Out-of-range minus in-range, raw weights: "
      f"{_ci(sep['attn_dispersion'])}.",
      "",
  ]
  lines += _per_size_table(s)
  ed = s.get("ema_decay", {})
  c_ai = ed.get("as_is", {}).get("coef", {}).get("log10_1_minus_decay")
  c_tc = ed.get("temperature_controlled", {}).get("coef", {}).get("log10_1_minus_decay")
  if c_ai and c_tc:
    lines += [
        "",
        f"EMA gain (log KL ratio, out of range) per decade of 1 - decay: as-is {c_ai['estimate']:.3g} "
        f"[{c_ai['ci'][0]:.3g}, {c_ai['ci'][1]:.3g}], at T {c_tc['estimate']:.3g} [{c_tc['ci'][0]:.3g}, {c_tc['ci'][1]:.3g}].",
    ]
  lines += ["", "## Findings", ""] + [f"- {f}" for f in s["findings"]] + [""]
  lines += ["Plots: " + ", ".join(f"`{p}`" for p in s["plots"]), ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def findings(s: Dict[str, Any]) -> List[str]:
  """One-line readings, each stating the as-is and the temperature-controlled estimate."""
  out = [f"{c['claim']}: as-is {c['as_is']}; at T {c['temperature_controlled']}; {c['verdict']}." for c in s["claims"]]
  sh = s["sharpening"].get("out_of_range/log_kl", {}).get("as_is")
  if sh:
    out.append(
        f"sharpening only (raw weights at their own T): out-of-range KL {factor(sh)}, {sh['frac_improved']:.0%} of runs."
    )
  for w, r in s["averaging"].items():
    v = r.get("out_of_range/log_kl", {}).get("vs_sharpening")
    g = r.get("log_gap_ratio")
    if v and g:
      out.append(
          f"{label(w)} as-is vs raw sharpened to its T: {factor(v)} ({direction(v)}); T / T_raw "
          f"{factor(r['log_temperature'])}; logit-gap factor in range {factor(g['in_range'])}, out of range "
          f"{factor(g['out_of_range'])}."
      )
  return out


def make_plots(rows, weights: Sequence[str], sizes, train_max_size: int, out_dir: str) -> List[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  ok = [r for r in rows if not r["diverged"]]
  paths = []
  colors = {w: f"C{i}" for i, w in enumerate(weights)}

  def save(fig, name):
    fig.tight_layout()
    paths.append(os.path.join(out_dir, name))
    fig.savefig(paths[-1])
    plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=80, sharey=True)
  placements = sorted({r["dropout_on"] for r in ok})
  for ax, (key, title) in zip(axes, (("raw_out_kl", "as-is"), ("raw_out_t_kl", "at the fitted T"))):
    for i, p in enumerate(placements):
      sel = [r for r in ok if r["dropout_on"] == p]
      ax.scatter([r["dropout"] for r in sel], [r[key] for r in sel], s=14, label=p or "none", color=f"C{i}")
    ax.set_yscale("log")
    ax.set_xlabel("dropout rate")
    ax.set_title(f"raw weights, {title}")
  axes[0].set_ylabel("out-of-range KL")
  axes[-1].legend(fontsize=7, title="placement", title_fontsize=7)
  save(fig, "kl_out_vs_dropout.png")

  fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=90)
  for off, key, marker in ((-0.15, "out_kl", "o"), (0.15, "out_t_kl", "s")):
    for i, w in enumerate(weights):
      v = [r[f"{w}_{key}"] for r in ok if w in ("raw", "ema") or r["steps_trained"] > (burn_in_of(w) or 0)]
      if v:
        ax.scatter(np.full(len(v), i + off), v, s=6, color=colors[w], marker=marker, alpha=0.5)
        ax.plot([i + off - 0.1, i + off + 0.1], [np.exp(np.mean(np.log(v)))] * 2, color="k", lw=2)
  ax.set_xticks(range(len(weights)), [label(w) for w in weights], rotation=30, fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("out-of-range KL")
  ax.set_title(
      "Per weights: as-is (left, circles) and at its fitted T (right, squares); bar: geometric mean", fontsize=9
  )
  save(fig, "kl_out_vs_averaging.png")

  fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
  ax.axvspan(0.5, train_max_size + 0.5, color="0.9", label="training sizes")
  # Raw, EMA, and the shortest and the longest BEMA burn-in: the others lie between them.
  bemas = [w for w in weights if burn_in_of(w) is not None]
  shown = (
      [w for w in weights if w in ("raw", "ema")] + sorted({bemas[0], bemas[-1]}, key=weights.index)
      if bemas
      else weights
  )
  for w in shown:
    for m, ls in (("kl", "-"), ("t_kl", "--")):
      c = [r[f"{w}_per_size"][m] for r in ok if m in r.get(f"{w}_per_size", {})]
      if c:
        ax.plot(
            sizes,
            np.nanmedian(np.asarray(c, np.float64), 0),
            ls=ls,
            color=colors[w],
            lw=1,
            label=f"{label(w)}{' at T' if ls == '--' else ''}",
        )
  ax.set_yscale("log")
  ax.set_xlabel("set size s")
  ax.set_ylabel("median KL over runs")
  ax.set_title("KL(target || p) per size: as-is (solid), at the fitted T (dashed)", fontsize=9)
  ax.legend(fontsize=5, ncol=2)
  save(fig, "kl_per_size.png")

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80, sharey=True)
  for w in weights:
    c = [r[f"{w}_per_size"]["attn_dispersion"] for r in ok if "attn_dispersion" in r.get(f"{w}_per_size", {})]
    if c:
      axes[0].plot(sizes, np.nanmean(np.asarray(c, np.float64), 0), color=colors[w], lw=1, label=label(w))
  for i, p in enumerate(placements):
    c = [
        r["raw_per_size"]["attn_dispersion"]
        for r in ok
        if r["dropout_on"] == p and "attn_dispersion" in r["raw_per_size"]
    ]
    if c:
      axes[1].plot(sizes, np.nanmean(np.asarray(c, np.float64), 0), color=f"C{i}", lw=1, label=p or "none")
  for ax, title in zip(axes, ("by weights (all runs)", "raw weights, by dropout placement")):
    ax.axvspan(0.5, train_max_size + 0.5, color="0.9")
    ax.set_xlabel("set size s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
  axes[0].set_ylabel("attention dispersion (entropy / log s)")
  save(fig, "attn_dispersion_per_size.png")

  histories = {r["run"]: r.get("in_range_history") for r in rows}
  fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
  for r in ok:
    h = histories.get(r["run"])
    if h and h["steps"]:
      ax.plot(h["steps"], h["in_kl"], lw=0.6, color="C3" if r["plateau_step"] is None else "0.5")
      if r["plateau_step"] is not None and r["plateau_step"] in h["steps"]:
        ax.scatter([r["plateau_step"]], [h["in_kl"][h["steps"].index(r["plateau_step"])]], s=8, color="k")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("raw in-range KL (check set)")
  ax.set_title("Convergence (dot: plateau reached; red: never)")
  save(fig, "convergence.png")
  return paths
