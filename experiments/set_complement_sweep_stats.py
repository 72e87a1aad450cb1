"""The set-complement sweep's statistics: every averaging and dropout comparison as-is and at each weights'
fitted temperature, with 95% intervals, and the verdicts that state both (experiments/set_complement_sweep.py).

Readings. As-is: the metrics of the weights as they are. Temperature-controlled: each run's and each
weights' logits divided by the one temperature fitted on the in-range check set (t_kl, ...): an effect
that is only a sharpening or a flattening of the output vanishes there. A claimed effect on length
generalization must hold at the fitted temperature.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ema_jax.models.set_transformer import DROPOUT_SITES

# Direction in which a metric improves (for "fraction of runs improved").
LOWER_IS_BETTER = {
    "kl": True,
    "log_kl": True,
    "tv": True,
    "invalid_mass": True,
    "precision": False,
    "logit_gap": False,
    "top1_valid": False,
}
OTHER_METRICS = ("tv", "invalid_mass", "precision", "logit_gap", "top1_valid")
READINGS = ("as_is", "temperature_controlled")


def burn_in_of(name: str) -> Optional[int]:
  m = re.fullmatch(r"bema_(\d+)", name)
  return int(m.group(1)) if m else None


def _t_quantile(df: int, level: float = 0.95) -> float:
  from scipy import stats

  return float(stats.t.ppf(0.5 + level / 2, df))


def mean_ci(d, rng: np.random.Generator, bootstrap: int) -> Dict[str, Any]:
  """Mean with a 95% t-interval, a 95% percentile bootstrap interval and a two-sided t-test p-value."""
  d = np.asarray(d, np.float64)
  d = d[np.isfinite(d)]
  n = d.size
  if n == 0:
    return dict(n=0)
  mean = float(d.mean())
  out = dict(n=int(n), mean=mean)
  if n >= 2:
    se = float(d.std(ddof=1) / math.sqrt(n))
    q = _t_quantile(n - 1)
    out.update(se=se, t_ci=[mean - q * se, mean + q * se])
    if se > 0:
      from scipy import stats

      out["p_value"] = float(2 * stats.t.sf(abs(mean / se), n - 1))
    idx = rng.integers(0, n, size=(bootstrap, n))
    boots = d[idx].mean(1)
    out["bootstrap_ci"] = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
  return out


def paired(avg, raw, rng, bootstrap: int, lower_is_better: bool = True) -> Dict[str, Any]:
  """mean_ci of avg - raw, with the means of both and the share of runs where avg is better."""
  avg, raw = np.asarray(avg, np.float64), np.asarray(raw, np.float64)
  diff = avg - raw
  res = mean_ci(diff, rng, bootstrap)
  ok = np.isfinite(diff)
  better = diff[ok] < 0 if lower_is_better else diff[ok] > 0
  res.update(
      mean_raw=float(np.mean(raw[ok])) if ok.any() else float("nan"),
      mean_avg=float(np.mean(avg[ok])) if ok.any() else float("nan"),
      frac_improved=float(np.mean(better)) if ok.any() else float("nan"),
  )
  return res


def _log(rows, key) -> np.ndarray:
  v = np.asarray([r.get(key, float("nan")) for r in rows], np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), np.nan)


def _arr(rows, key) -> np.ndarray:
  return np.asarray([r.get(key, float("nan")) for r in rows], np.float64)


def averaging_rows(rows, name: str) -> List[Dict[str, Any]]:
  """The runs a comparison of average `name` uses: not diverged, and for a BEMA past its burn-in (before
  it the BEMA is the raw weights)."""
  tau = burn_in_of(name)
  return [r for r in rows if not r["diverged"] and (tau is None or r["steps_trained"] > tau)]


def averaging_effect(rows, name: str, rng, bootstrap: int) -> Dict[str, Any]:
  """Average `name` minus the raw weights of the same runs, as-is and temperature-controlled.

  log_kl (out of range, in range): as_is log(KL_avg / KL_raw); temperature_controlled the same at each
  weights' own temperature; vs_sharpening: the average as-is against the raw weights at their temperature.
  Other metrics likewise (attn_dispersion: one reading, no temperature changes it); log_temperature: log
  (T_avg / T_raw); log_gap_ratio: log (gap_avg / gap_raw) in and out of range (a factor that is the same in
  and out of range is what a temperature does)."""
  sel = averaging_rows(rows, name)
  out: Dict[str, Any] = dict(n_runs=len(sel))
  if len(sel) < 2:
    return out
  for part, pname in (("out", "out_of_range"), ("in", "in_range")):
    raw, raw_t = _log(sel, f"raw_{part}_kl"), _log(sel, f"raw_{part}_t_kl")
    avg, avg_t = _log(sel, f"{name}_{part}_kl"), _log(sel, f"{name}_{part}_t_kl")
    out[f"{pname}/log_kl"] = dict(
        as_is=paired(avg, raw, rng, bootstrap),
        temperature_controlled=paired(avg_t, raw_t, rng, bootstrap),
        vs_sharpening=paired(avg, raw_t, rng, bootstrap),
    )
  for m in OTHER_METRICS:
    lower = LOWER_IS_BETTER[m]
    out[f"out_of_range/{m}"] = dict(
        as_is=paired(_arr(sel, f"{name}_out_{m}"), _arr(sel, f"raw_out_{m}"), rng, bootstrap, lower),
        temperature_controlled=paired(
            _arr(sel, f"{name}_out_t_{m}"), _arr(sel, f"raw_out_t_{m}"), rng, bootstrap, lower
        ),
    )
  for part, pname in (("out", "out_of_range"), ("in", "in_range")):
    d = paired(_arr(sel, f"{name}_{part}_attn_dispersion"), _arr(sel, f"raw_{part}_attn_dispersion"), rng, bootstrap)
    if d.get("n"):
      out[f"{pname}/attn_dispersion"] = dict(as_is=d, temperature_controlled=d, note="temperature-invariant")
  out["log_temperature"] = mean_ci(_log(sel, f"{name}_temperature") - _log(sel, "raw_temperature"), rng, bootstrap)
  g_in = _log(sel, f"{name}_in_logit_gap") - _log(sel, "raw_in_logit_gap")
  g_out = _log(sel, f"{name}_out_logit_gap") - _log(sel, "raw_out_logit_gap")
  out["log_gap_ratio"] = dict(
      in_range=mean_ci(g_in, rng, bootstrap),
      out_of_range=mean_ci(g_out, rng, bootstrap),
      out_minus_in=mean_ci(g_out - g_in, rng, bootstrap),
  )
  return out


def sharpening_effect(rows, rng, bootstrap: int) -> Dict[str, Any]:
  """The raw weights at their own fitted temperature against the raw weights as-is: what a temperature
  alone does, the bar an averaging must clear."""
  sel = [r for r in rows if not r["diverged"]]
  out: Dict[str, Any] = dict(n_runs=len(sel))
  if len(sel) < 2:
    return out
  for part, pname in (("out", "out_of_range"), ("in", "in_range")):
    out[f"{pname}/log_kl"] = dict(
        as_is=paired(_log(sel, f"raw_{part}_t_kl"), _log(sel, f"raw_{part}_kl"), rng, bootstrap)
    )
  for m in OTHER_METRICS:
    out[f"out_of_range/{m}"] = dict(
        as_is=paired(_arr(sel, f"raw_out_t_{m}"), _arr(sel, f"raw_out_{m}"), rng, bootstrap, LOWER_IS_BETTER[m])
    )
  out["log_temperature"] = mean_ci(_log(sel, "raw_temperature"), rng, bootstrap)
  return out


def ols(X: np.ndarray, y: np.ndarray, names: Sequence[str]) -> Dict[str, Any]:
  """Least squares with an intercept; classical standard errors and 95% t-intervals per coefficient."""
  y = np.asarray(y, np.float64)
  X = np.asarray(X, np.float64).reshape(len(y), len(names))  # no runs at all: [0, p], not [0]
  keep = np.isfinite(y) & np.all(np.isfinite(X), axis=1)
  X, y = X[keep], y[keep]
  # Columns that add nothing (constant, or a copy of earlier ones, e.g. tied widths) are left out.
  A = np.ones((X.shape[0], 1))
  kept = ["intercept"]
  for j in range(X.shape[1]):
    trial = np.concatenate([A, X[:, j : j + 1]], axis=1)
    if np.linalg.matrix_rank(trial) > A.shape[1]:
      A, kept = trial, kept + [names[j]]
  names = kept
  n, p = A.shape
  if n <= p:
    return dict(n=int(n), error=f"{n} runs for {p} coefficients: too few")
  beta, *_ = np.linalg.lstsq(A, y, rcond=None)
  resid = y - A @ beta
  dof = n - p
  sigma2 = float(resid @ resid / dof)
  cov = sigma2 * np.linalg.pinv(A.T @ A)
  se = np.sqrt(np.diag(cov))
  q = _t_quantile(dof)
  r2 = 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum()) if np.ptp(y) > 0 else float("nan")
  coef = {
      nm: dict(estimate=float(b), se=float(s), ci=[float(b - q * s), float(b + q * s)])
      for nm, b, s in zip(names, beta, se)
  }
  return dict(n=int(n), r2=r2, residual_sd=math.sqrt(sigma2), coef=coef)


def _covariates(r) -> List[float]:
  return [math.log10(r["lr"]), math.log2(r["embed_dim"]), math.log2(r["value_dim"])]


COVARIATES = ["log10_lr", "log2_embed_dim", "log2_value_dim"]


def welch(a, b, rng, bootstrap: int) -> Dict[str, Any]:
  """Mean of a minus mean of b (independent runs): Welch 95% interval and a bootstrap one."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  a, b = a[np.isfinite(a)], b[np.isfinite(b)]
  out: Dict[str, Any] = dict(n=int(a.size), n_ref=int(b.size))
  if a.size < 2 or b.size < 2:
    return out
  diff = float(a.mean() - b.mean())
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  se = math.sqrt(va + vb)
  dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if se > 0 else a.size + b.size - 2
  q = _t_quantile(max(int(dof), 1))
  boots = a[rng.integers(0, a.size, (bootstrap, a.size))].mean(1) - b[
      rng.integers(0, b.size, (bootstrap, b.size))
  ].mean(1)
  out.update(
      mean=diff,
      se=se,
      t_ci=[diff - q * se, diff + q * se],
      bootstrap_ci=[float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
  )
  return out


def dropout_effects(rows, rng, bootstrap: int) -> Dict[str, Any]:
  """Dropout on the raw weights, per site and pooled, as-is and at the fitted temperature.

  slope: OLS of log out-of-range KL on the site's rate (all sites' rates as regressors, with log lr and log
  widths), coefficient per unit rate; vs_none: mean log KL of the site's runs minus the no-dropout runs
  (Welch). In range (log KL) as the fit's reading; the temperature (log T) and the out-of-range attention
  dispersion as what dropout does to the scale and to where attention goes."""
  ok = [r for r in rows if not r["diverged"]]
  out: Dict[str, Any] = dict(n_runs=len(ok))
  if len(ok) < 3:
    return out
  site_cols = [f"drop_{s}" for s in DROPOUT_SITES]
  X_site = np.asarray([[r[c] for c in site_cols] + _covariates(r) for r in ok])
  X_pool = np.asarray([[r["dropout"]] + _covariates(r) for r in ok])
  targets = dict(
      out_of_range=dict(as_is=_log(ok, "raw_out_kl"), temperature_controlled=_log(ok, "raw_out_t_kl")),
      in_range=dict(as_is=_log(ok, "raw_in_kl"), temperature_controlled=_log(ok, "raw_in_t_kl")),
      log_temperature=dict(as_is=_log(ok, "raw_temperature")),
      out_of_range_attn_dispersion=dict(as_is=_arr(ok, "raw_out_attn_dispersion")),
  )
  regs = {}
  for tname, ys in targets.items():
    for reading, y in ys.items():
      regs[f"{tname}/{reading}/by_site"] = ols(X_site, y, site_cols + COVARIATES)
      regs[f"{tname}/{reading}/pooled"] = ols(X_pool, y, ["dropout"] + COVARIATES)
  out["regression"] = regs
  none = [i for i, r in enumerate(ok) if r["dropout"] == 0]
  sites = {}
  for s in DROPOUT_SITES:
    idx = [i for i, r in enumerate(ok) if r["dropout"] > 0 and r["dropout_on"] == s]
    entry: Dict[str, Any] = dict(
        n=len(idx),
        rate_range=[
            min((ok[i]["dropout"] for i in idx), default=None),
            max((ok[i]["dropout"] for i in idx), default=None),
        ],
    )
    for tname, ys in targets.items():
      for reading, y in ys.items():
        c = regs[f"{tname}/{reading}/by_site"].get("coef", {}).get(f"drop_{s}")
        entry[f"{tname}/{reading}/slope"] = c
        entry[f"{tname}/{reading}/vs_none"] = welch(y[idx], y[none], rng, bootstrap)
    sites[s] = entry
  out["sites"] = sites
  out["n_no_dropout"] = len(none)
  pooled = {}
  for tname in ("out_of_range", "in_range"):
    for reading in READINGS:
      pooled[f"{tname}/{reading}/slope"] = regs[f"{tname}/{reading}/pooled"].get("coef", {}).get("dropout")
      y = targets[tname][reading]
      pooled[f"{tname}/{reading}/vs_none"] = welch(
          y[[i for i, r in enumerate(ok) if r["dropout"] > 0]], y[none], rng, bootstrap
      )
  out["pooled"] = pooled
  return out


def ema_decay_regression(rows) -> Dict[str, Any]:
  """The EMA's gain (log KL ratio, EMA / raw, out of range) on its decay, as-is and at T."""
  ok = [r for r in rows if not r["diverged"]]
  X = np.asarray([[math.log10(1.0 - r["ema_decay"]), r["dropout"]] + _covariates(r) for r in ok])
  names = ["log10_1_minus_decay", "dropout"] + COVARIATES
  return {
      "as_is": ols(X, _log(ok, "ema_out_kl") - _log(ok, "raw_out_kl"), names),
      "temperature_controlled": ols(X, _log(ok, "ema_out_t_kl") - _log(ok, "raw_out_t_kl"), names),
  }


def separation(rows, rng, bootstrap: int) -> Dict[str, Any]:
  """Out-of-range minus in-range, raw weights: the logit gap as-is and at T, and the attention dispersion."""
  ok = [r for r in rows if not r["diverged"]]
  return dict(
      logit_gap=dict(
          as_is=mean_ci(_arr(ok, "raw_out_logit_gap") - _arr(ok, "raw_in_logit_gap"), rng, bootstrap),
          temperature_controlled=mean_ci(
              _arr(ok, "raw_out_t_logit_gap") - _arr(ok, "raw_in_t_logit_gap"), rng, bootstrap
          ),
      ),
      attn_dispersion=mean_ci(_arr(ok, "raw_out_attn_dispersion") - _arr(ok, "raw_in_attn_dispersion"), rng, bootstrap),
  )


def per_size_means(rows, weights: Sequence[str], sizes: Sequence[int]) -> Dict[str, Any]:
  """Mean over runs, per size: attention dispersion of every weights, and of the raw weights by placement;
  KL as-is and at T."""
  ok = [r for r in rows if not r["diverged"]]
  out: Dict[str, Any] = dict(sizes=list(sizes))

  def mean_curve(sel, w, m):
    c = [r[f"{w}_per_size"][m] for r in sel if m in r.get(f"{w}_per_size", {})]
    return np.nanmean(np.asarray(c, np.float64), 0).tolist() if c else None

  for m in ("attn_dispersion", "kl", "t_kl"):
    out[m] = {w: mean_curve(averaging_rows(ok, w) if w != "raw" else ok, w, m) for w in weights}
  placements = sorted({r["dropout_on"] for r in ok})
  out["attn_dispersion_raw_by_placement"] = {
      (p or "none"): mean_curve([r for r in ok if r["dropout_on"] == p], "raw", "attn_dispersion") for p in placements
  }
  return out


# ------------------------------------------------------------------------------------------------ verdicts


def direction(res: Optional[Dict[str, Any]], key: str = "t_ci", better_if_negative: bool = True) -> str:
  """'helps', 'hurts' or 'unclear' from a 95% interval of a difference (negative = better by default)."""
  if not res or key not in res or res[key] is None:
    return "n/a"
  lo, hi = res[key]
  if (hi < 0) if better_if_negative else (lo > 0):
    return "helps"
  if (lo > 0) if better_if_negative else (hi < 0):
    return "hurts"
  return "unclear"


def verdict(as_is: str, controlled: str) -> str:
  """A length-generalization verdict from both readings: it must survive temperature control."""
  readings = f"as-is {as_is}, temperature-controlled {controlled}"
  if controlled == "helps":
    v = "reproduced: survives temperature control" if as_is == "helps" else "helps only at the fitted temperature"
  elif controlled == "hurts":
    v = "contradicted: hurts at the fitted temperature"
  elif as_is == "helps":
    v = "not reproduced: as-is gain is a sharpening (gone at the fitted temperature)"
  elif as_is == "hurts":
    v = "as-is harm is a flattening (gone at the fitted temperature); no length effect resolved"
  else:
    v = "not resolved (both intervals include 0)"
  return f"{v} ({readings})"


def factor(res, key: str = "t_ci", scale: float = 1.0) -> str:
  """exp of a mean log difference (or of scale * a regression coefficient) with its 95% interval: a
  factor on KL or on T."""
  if not res:
    return "n/a"
  m = res.get("mean", res.get("estimate"))
  ci = res.get(key, res.get("ci"))
  if m is None or not np.isfinite(m):
    return "n/a"
  s = f"x{math.exp(scale * m):.3g}"
  return s + (f" [{math.exp(scale * ci[0]):.3g}, {math.exp(scale * ci[1]):.3g}]" if ci else "")


def claims(a: Dict[str, Any], weights: Sequence[str]) -> List[Dict[str, str]]:
  """The paper's claims, each with both readings (95% intervals) and a verdict that states both."""
  out = []
  drop = a.get("dropout", {})
  pooled = drop.get("pooled", {})
  ai, tc = pooled.get("out_of_range/as_is/slope"), pooled.get("out_of_range/temperature_controlled/slope")
  if ai and tc:
    out.append(
        dict(
            claim="dropout (any site) improves length generalization: out-of-range KL of the raw weights, per +0.1 rate",
            as_is=factor(ai, scale=0.1),
            temperature_controlled=factor(tc, scale=0.1),
            verdict=verdict(direction(ai, "ci"), direction(tc, "ci")),
        )
    )
  for s, e in drop.get("sites", {}).items():
    ai, tc = e.get("out_of_range/as_is/slope"), e.get("out_of_range/temperature_controlled/slope")
    if ai and tc:
      out.append(
          dict(
              claim=f"dropout on {s} improves length generalization (per +0.1 rate, {e['n']} runs vs "
              f"{drop.get('n_no_dropout')} without dropout)",
              as_is=factor(ai, scale=0.1),
              temperature_controlled=factor(tc, scale=0.1),
              verdict=verdict(direction(ai, "ci"), direction(tc, "ci")),
          )
      )
  for name in weights[1:]:
    r = a["averaging"].get(name, {}).get("out_of_range/log_kl")
    if not r:
      continue
    tau = burn_in_of(name)
    label = "debiased weight EMA (sampled decay)" if name == "ema" else f"BEMA, burn-in {tau}"
    out.append(
        dict(
            claim=f"{label} improves length generalization (out-of-range KL, vs the raw weights of the same run)",
            as_is=factor(r["as_is"]) + f", {r['as_is']['frac_improved']:.0%} of {r['as_is']['n']} runs",
            temperature_controlled=factor(r["temperature_controlled"])
            + f", {r['temperature_controlled']['frac_improved']:.0%} of runs",
            verdict=verdict(direction(r["as_is"]), direction(r["temperature_controlled"])),
        )
    )
  sep = a.get("separation", {}).get("logit_gap")
  if sep and "t_ci" in sep["as_is"] and "t_ci" in sep["temperature_controlled"]:
    ai, tc = sep["as_is"], sep["temperature_controlled"]
    word = {"helps": "shrinks", "hurts": "grows", "unclear": "unclear", "n/a": "n/a"}
    d_ai, d_tc = word[direction(ai)], word[direction(tc)]
    out.append(
        dict(
            claim="longer sets are solved with reduced precision: the valid-invalid logit gap (raw weights) shrinks "
            "out of range (out-of-range minus in-range gap)",
            as_is=f"{ai['mean']:.3g} [{ai['t_ci'][0]:.3g}, {ai['t_ci'][1]:.3g}]",
            temperature_controlled=f"{tc['mean']:.3g} [{tc['t_ci'][0]:.3g}, {tc['t_ci'][1]:.3g}]",
            verdict=("reproduced in both readings" if d_ai == d_tc == "shrinks" else "not reproduced")
            + f" (as-is {d_ai}, at T {d_tc})",
        )
    )
  return out


def analyse(rows, weights: Sequence[str], sizes: Sequence[int], train_max_size: int, rng, boot: int) -> Dict[str, Any]:
  """Every averaging comparison (EMA, BEMA per burn-in, sharpening only), dropout per site and pooled,
  the separation, per-size means and the claims; both readings throughout."""
  out: Dict[str, Any] = dict(
      n_runs=len(rows),
      averaging={w: averaging_effect(rows, w, rng, boot) for w in weights[1:]},
      sharpening=sharpening_effect(rows, rng, boot),
      dropout=dropout_effects(rows, rng, boot),
      ema_decay=ema_decay_regression(rows),
      separation=separation(rows, rng, boot),
      per_size=per_size_means(rows, weights, sizes),
  )
  out["claims"] = claims(out, weights)
  return out
