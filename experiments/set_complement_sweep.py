"""Random hyperparameter search on the set-complement task: does dropout, does weight averaging, help out of range?

  python -m experiments.set_complement_sweep --config configs/set_complement.py:sweep --workdir W [--runs 48]
      [--config.steps=20000 --config.sweep.dims='["32x32"]' ...]
  python -m experiments.set_complement_sweep --workdir W --reanalyse     (rebuild summary and plots from runs.json)
  python -m experiments.set_complement_sweep --config configs/set_complement.py:sweep --workdir W2 --runs 48 \
      --only_runs 6,7 --config.steps=24000 && python -m experiments.set_complement_sweep --workdir W \
      --reanalyse --merge_from W2                  (runs that had not plateaued, again with a higher cap)

The model is config.model.kind (the sweep preset: 'decoder', the paper's single-layer attention-only causal
model, trained on every prefix). Each run samples (config.sweep): a seed, dims, learning rate (log-uniform),
dropout rate and placement, the debiased EMA's decay and BEMA's burn-in tau. Averaging does not change
training, so every run keeps both averages (weight_ema.kind 'ema,bema') and is evaluated three ways: raw
weights (averaging 'none'), EMA and BEMA. The averaging choice is therefore a paired comparison within
each run, everything else held fixed.

Convergence: the learning rate is constant after warmup (the preset's optim.schedule) and each group of
runs trains in chunks of sweep.chunk_steps until every run's raw in-range KL (sizes 1..L_train, a held-out
set) has stopped improving: no check in the last sweep.patience checks beat the best earlier value by more
than sweep.rel_tol (relative), and at least sweep.min_steps were trained; or until config.steps, the cap.
Each run records the step at which it reached that plateau (None if it never did within the cap).

Runs are grouped by what fixes the compiled program (dims, heads, BEMA burn-in). Inside a group the runs are
train.py runs of one config (group_config) that differ only in data held in the train state, so one
jax.vmap of the trainer's own step (trainer.make_train_step) over states with a leading run axis trains
all the group's runs together:
  - learning rate: the group's peak lr is 1 and each run's lr is the lr_scale in its optimizer state;
  - dropout: the model keeps one rate per site (attention, embedding, output) in its state
    (model.traced_dropout), 0 at the sites a run does not use (a rate of 0 is exactly the identity);
  - EMA decay: an array inside the WeightEMA state; seed: the key the trainer's init splits into a
    parameter key and a dropout key, as config.seed does in train.py.
All runs see the same training batches (the stream of config.seed), common random numbers that take data
noise out of the comparisons.

Writes to W: runs.csv, runs.json (every run: sampled values, plateau step, in-range and out-of-range
metrics of raw, EMA and BEMA weights, per-size curves and the in-range history in the JSON), summary.json
and summary.md (a claims table: each of the paper's claims with its 95% interval and a verdict, on all runs
and on the runs that reached their plateau; paired
averaged-vs-raw differences with t and bootstrap intervals; OLS of log out-of-range KL on dropout, log lr
and width), and plots/*.png.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ema_jax import optim, trainer
from ema_jax.data import set_complement as data
from ema_jax.models.set_transformer import DROPOUT_SITES, parse_dropout_on
from ema_jax.tasks import set_complement as sc

METRICS = sc.METRICS
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


# ------------------------------------------------------------------------------------------------ sampling


def _canonical_sites(value) -> str:
  sites = parse_dropout_on(value)
  return ",".join(s for s in DROPOUT_SITES if s in sites)


AVERAGES = ("ema", "bema")
WEIGHTS = ("raw",) + AVERAGES


def validate_sweep(config: ml_collections.ConfigDict, runs: int) -> None:
  sc.validate_config(config)
  s = config.sweep
  if not (isinstance(runs, int) and runs >= 1):
    raise ValueError(f"--runs / config.sweep.runs={runs!r}: expected a positive integer.")
  for d in s.dims:
    try:
      e, v = (int(x) for x in str(d).lower().split("x"))
    except ValueError:
      raise ValueError(f"config.sweep.dims entry {d!r}: expected 'EMBEDxVALUE', e.g. '64x64'.") from None
    if e < 1 or v < 1 or e % s.num_heads or v % s.num_heads:
      raise ValueError(
          f"config.sweep.dims entry {d!r}: expected positive widths divisible by " f"num_heads={s.num_heads}."
      )
  lo, hi = s.lr
  if not 0 < lo <= hi:
    raise ValueError(f"config.sweep.lr={s.lr!r}: expected 0 < low <= high.")
  lo, hi = s.dropout
  if not 0 <= lo <= hi < 1:
    raise ValueError(f"config.sweep.dropout={s.dropout!r}: expected 0 <= low <= high < 1.")
  if not 0 <= s.dropout_zero_prob <= 1:
    raise ValueError(f"config.sweep.dropout_zero_prob={s.dropout_zero_prob!r}: expected a probability.")
  for p in s.dropout_on:
    if not all(x in DROPOUT_SITES for x in parse_dropout_on(p)):
      raise ValueError(
          f"config.sweep.dropout_on entry {p!r}: expected a comma-separated subset of " f"{DROPOUT_SITES}."
      )
  lo, hi = s.ema_decay
  if not 0 < lo <= hi < 1:
    raise ValueError(f"config.sweep.ema_decay={s.ema_decay!r}: expected 0 < low <= high < 1.")
  for tau in s.bema_burn_in:
    if not (isinstance(tau, int) and 0 <= tau < config.steps):
      raise ValueError(
          f"config.sweep.bema_burn_in entry {tau!r}: expected integers in [0, steps={config.steps}) (optimizer steps)."
      )
  for f, lo_ok in (("chunk_steps", 1), ("patience", 1), ("min_steps", 0)):
    if not (isinstance(s[f], int) and s[f] >= lo_ok):
      raise ValueError(f"config.sweep.{f}={s[f]!r}: expected an integer >= {lo_ok}.")
  if not 0 <= s.rel_tol < 1:
    raise ValueError(f"config.sweep.rel_tol={s.rel_tol!r}: expected a relative tolerance in [0, 1).")


def sample_runs(sweep: ml_collections.ConfigDict, runs: int) -> List[Dict[str, Any]]:
  """The sampled hyperparameters of every run (deterministic in sweep.sample_seed)."""
  rng = np.random.default_rng(sweep.sample_seed)
  out = []
  for i in range(runs):
    e, v = (int(x) for x in str(sweep.dims[rng.integers(len(sweep.dims))]).lower().split("x"))
    lr = float(math.exp(rng.uniform(math.log(sweep.lr[0]), math.log(sweep.lr[1]))))
    zero = rng.random() < sweep.dropout_zero_prob
    rate = 0.0 if zero else float(rng.uniform(*sweep.dropout))
    sites = _canonical_sites(sweep.dropout_on[rng.integers(len(sweep.dropout_on))])
    one_minus = math.exp(rng.uniform(math.log(1 - sweep.ema_decay[1]), math.log(1 - sweep.ema_decay[0])))
    burn_in = int(sweep.bema_burn_in[rng.integers(len(sweep.bema_burn_in))])
    seed = int(rng.integers(2**31 - 1))
    run = dict(
        run=i,
        seed=seed,
        embed_dim=e,
        value_dim=v,
        num_heads=int(sweep.num_heads),
        lr=lr,
        dropout=rate,
        dropout_on=sites if rate > 0 else "",
        ema_decay=float(1.0 - one_minus),
        bema_burn_in=burn_in,
    )
    for s in DROPOUT_SITES:
      run[f"drop_{s}"] = rate if s in run["dropout_on"].split(",") else 0.0
    out.append(run)
  return out


def group_key(run) -> str:
  return f"d{run['embed_dim']}v{run['value_dim']}h{run['num_heads']}_tau{run['bema_burn_in']}"


def group_runs(runs: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
  groups: Dict[str, List[Dict[str, Any]]] = {}
  for r in runs:
    groups.setdefault(group_key(r), []).append(r)
  return groups


def hyper_arrays(runs: Sequence[Dict[str, Any]]) -> Dict[str, jax.Array]:
  """The traced per-run hyperparameters, leading axis = run."""
  return dict(
      key=jnp.stack([jax.random.key(r["seed"]) for r in runs]),
      lr=jnp.asarray([r["lr"] for r in runs], jnp.float32),
      rates=jnp.asarray([[r[f"drop_{s}"] for s in DROPOUT_SITES] for r in runs], jnp.float32),
      decay=jnp.asarray([r["ema_decay"] for r in runs], jnp.float32),
  )


# ------------------------------------------------------------------------------------------------ training


def group_config(
    config: ml_collections.ConfigDict, embed_dim: int, value_dim: int, num_heads: int, burn_in: int
) -> ml_collections.ConfigDict:
  """The train.py config of a group's runs: their dims, both averages (BEMA with the group's burn-in),
  dropout rates held in the model's state, peak learning rate 1 (each run's lr is its lr_scale)."""
  c = ml_collections.ConfigDict(config.to_dict())
  del c["sweep"]
  c.model.update(
      embed_dim=embed_dim, value_dim=value_dim, num_heads=num_heads, dropout=0.0, dropout_on="", traced_dropout=True
  )
  c.optim.lr = 1.0
  c.weight_ema.kind = ",".join(AVERAGES)
  c.weight_ema.burn_in = int(burn_in)
  return c


class GroupPrograms:
  """The trainer's setup and step for all runs sharing dims, heads and BEMA burn-in, vmapped over runs."""

  def __init__(self, config: ml_collections.ConfigDict, embed_dim: int, value_dim: int, num_heads: int, burn_in: int):
    self.setup = trainer.build(group_config(config, embed_dim, value_dim, num_heads, burn_in))
    self.num_tokens = self.setup.task.num_tokens
    # Runs share the batch; everything else (the whole train state) has a leading run axis.
    step = jax.vmap(trainer.make_train_step(self.setup), in_axes=(0, None))

    def chunk(state, batches_K):
      def body(st, batch):
        st, m = step(st, batch)
        # The loss of a step that kept no update (non-finite loss or gradient) reads as NaN.
        return st, jnp.where(m["finite"], m["loss"], jnp.nan)

      return jax.lax.scan(body, state, batches_K)

    self.init = jax.jit(jax.vmap(self.init_one))
    self.train_chunk = jax.jit(chunk, donate_argnums=0)
    self.averaged = jax.jit(jax.vmap(self.averaged_one))
    self.eval_metrics = jax.jit(jax.vmap(self.eval_one, in_axes=(0, 0, None, None)))

  def init_one(self, hp):
    """The trainer's initial state for seed hp['key'], with the run's lr, dropout rates and EMA decay."""
    s = self.setup
    state = s.init_fn(hp["key"])
    model = nnx.merge(s.graphdef, state["params"], state["other"])
    model.dropout_rates.value = hp["rates"]
    _, _, other = nnx.split(model, nnx.Param, ...)
    state = dict(state, other=other, opt=optim.set_lr_scale(state["opt"], hp["lr"]))
    state["ema"] = dict(state["ema"], ema=state["ema"]["ema"]._replace(decay=hp["decay"]))
    return state

  def averaged_one(self, state):
    """{'ema': params, 'bema': params} of one run."""
    return {k: self.setup.weight_ema.value(state["ema"], state["params"], k) for k in AVERAGES}

  def eval_one(self, params, other, tokens_BL, mask_BL):
    model = nnx.merge(self.setup.graphdef, params, other)
    logits_BN = sc.set_logits(model, dict(tokens=tokens_BL, mask=mask_BL), deterministic=True)
    present_BN = data.present_tokens(tokens_BL, mask_BL, self.num_tokens, xp=jnp)
    return {k: jnp.mean(v) for k, v in sc.complement_metrics(logits_BN, present_BN).items()}


def chunk_length(steps: int, chunk_steps: int) -> int:
  """The largest divisor of steps <= chunk_steps (equal chunks compile once), unless that is much smaller."""
  k = next(k for k in range(min(chunk_steps, steps), 0, -1) if steps % k == 0)
  return k if 4 * k >= min(chunk_steps, steps) else min(chunk_steps, steps)


class TrainingStream:
  """The shared training stream (process 0 of 1) in chunks of K stacked batches, built as far as needed and
  kept, so every group reads the same batches."""

  def __init__(self, config: ml_collections.ConfigDict, chunk_steps: int):
    self.steps = int(config.steps)
    self.k = chunk_length(self.steps, chunk_steps)
    self._it = sc.SetComplementTask(config).train_iterator(0, 1)
    self._chunks: List[Dict[str, np.ndarray]] = []

  def __len__(self):
    return -(-self.steps // self.k)

  def chunk(self, i: int) -> Dict[str, np.ndarray]:
    while len(self._chunks) <= i:
      start = len(self._chunks) * self.k
      batches = [next(self._it) for _ in range(min(self.k, self.steps - start))]
      self._chunks.append({k: np.stack([b[k] for b in batches]) for k in batches[0]})
    return self._chunks[i]


def training_chunks(config: ml_collections.ConfigDict, chunk_steps: int):
  """[{name: [K, ...]}]: every chunk of the shared training stream up to config.steps."""
  stream = TrainingStream(config, chunk_steps)
  return [stream.chunk(i) for i in range(len(stream))]


def plateau_check(history: Sequence[float], patience: int, rel_tol: float) -> bool:
  """True when none of the last `patience` values beat the best earlier value by more than rel_tol."""
  h = np.asarray(history, np.float64)
  if h.size <= patience or not np.all(np.isfinite(h)):
    return False
  return bool(h[-patience:].min() > (1.0 - rel_tol) * h[:-patience].min())


def in_range_kl(programs: GroupPrograms, state, batches) -> np.ndarray:
  """[R] mean KL of the raw weights over the in-range check batches (one per size)."""
  kls = [
      np.asarray(jax.device_get(programs.eval_metrics(state["params"], state["other"], b["tokens"], b["mask"]))["kl"])
      for b in batches
  ]
  return np.mean(kls, axis=0)


def train_group(programs: GroupPrograms, runs, chunks, check_batches=None, sweep=None, log=None):
  """Trains the group's runs together.

  chunks: a TrainingStream or a list of chunks. With check_batches and sweep, the raw in-range KL of every
  run is measured after each chunk and training stops once every run has plateaued (plateau_check, after
  sweep.min_steps) or the stream ends. Returns (final states, losses [steps, R] (NaN where a step failed),
  info {steps, history [checks, R], check_steps, plateau_step [R] (None: not reached)}).
  """
  state = programs.init(hyper_arrays(runs))
  n = len(chunks)
  get = chunks.chunk if isinstance(chunks, TrainingStream) else chunks.__getitem__
  losses, history, check_steps = [], [], []
  plateau_step: List[Optional[int]] = [None] * len(runs)
  steps = 0
  for i in range(n):
    batches_K = get(i)
    state, loss_KR = programs.train_chunk(state, batches_K)
    losses.append(np.asarray(loss_KR))
    steps += loss_KR.shape[0]
    if check_batches is None:
      continue
    history.append(in_range_kl(programs, state, check_batches))
    check_steps.append(steps)
    hist = np.stack(history)
    for j in range(len(runs)):
      if (
          plateau_step[j] is None
          and steps >= sweep.min_steps
          and plateau_check(hist[:, j], sweep.patience, sweep.rel_tol)
      ):
        plateau_step[j] = steps
    diverged = ~np.all(np.isfinite(np.concatenate(losses, 0)), axis=0)
    if all(p is not None or d for p, d in zip(plateau_step, diverged)):
      break
  if log is not None and check_batches is not None:
    log(f"    stopped at step {steps}: {sum(p is not None for p in plateau_step)}/{len(runs)} runs at their plateau")
  info = dict(
      steps=steps,
      history=np.stack(history) if history else np.zeros((0, len(runs))),
      check_steps=check_steps,
      plateau_step=plateau_step,
  )
  return state, np.concatenate(losses, 0), info


def evaluate_group(programs: GroupPrograms, state, eval_batches) -> Dict[str, Dict[str, np.ndarray]]:
  """{'raw'|'ema'|'bema': {metric: [R, S]}} over the evaluation sizes."""
  out = {}
  averaged = programs.averaged(state)
  for name in WEIGHTS:
    params = state["params"] if name == "raw" else averaged[name]
    per = {m: [] for m in METRICS}
    for b in eval_batches:
      res = jax.device_get(programs.eval_metrics(params, state["other"], b["tokens"], b["mask"]))
      for m in METRICS:
        per[m].append(np.asarray(res[m], np.float64))
    out[name] = {m: np.stack(v, axis=1) for m, v in per.items()}
  return out


# ------------------------------------------------------------------------------------------------ statistics


def _t_quantile(df: int, level: float = 0.95) -> float:
  from scipy import stats

  return float(stats.t.ppf(0.5 + level / 2, df))


def mean_ci(d: np.ndarray, rng: np.random.Generator, bootstrap: int) -> Dict[str, Any]:
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


def paired_comparison(rows, kind: str, rng, bootstrap: int) -> Dict[str, Any]:
  """Averaged (kind) minus raw weights of the same runs, out of range (and in range for KL)."""
  sel = [r for r in rows if not r["diverged"]]
  out = {"n_runs": len(sel)}
  if not sel:
    return out
  for part in ("out", "in"):
    metrics = list(METRICS) + ["log_kl"] if part == "out" else ["kl", "log_kl", "precision"]
    for m in metrics:
      if m == "log_kl":
        raw = np.log([r[f"raw_{part}_kl"] for r in sel])
        avg = np.log([r[f"{kind}_{part}_kl"] for r in sel])
      else:
        raw = np.asarray([r[f"raw_{part}_{m}"] for r in sel])
        avg = np.asarray([r[f"{kind}_{part}_{m}"] for r in sel])
      diff = avg - raw
      res = mean_ci(diff, rng, bootstrap)
      better = diff < 0 if LOWER_IS_BETTER[m] else diff > 0
      res.update(mean_raw=float(np.mean(raw)), mean_avg=float(np.mean(avg)), frac_improved=float(np.mean(better)))
      out[f"{'out_of_range' if part == 'out' else 'in_range'}/{m}"] = res
  return out


def ols(X: np.ndarray, y: np.ndarray, names: Sequence[str]) -> Dict[str, Any]:
  """Least squares with an intercept; classical standard errors and 95% t-intervals per coefficient."""
  X = np.asarray(X, np.float64)
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


def regressions(rows) -> Dict[str, Any]:
  ok = [r for r in rows if not r["diverged"] and r["raw_out_kl"] > 0]
  if not ok:
    return {}
  y_raw = np.log([r["raw_out_kl"] for r in ok])
  common = lambda r: [math.log10(r["lr"]), math.log2(r["embed_dim"]), math.log2(r["value_dim"])]
  common_names = ["log10_lr", "log2_embed_dim", "log2_value_dim"]
  out = {}
  X = np.asarray([[r["dropout"]] + common(r) for r in ok])
  out["raw_log_kl_out__dropout"] = dict(
      target="log out-of-range KL, raw weights", **ols(X, y_raw, ["dropout"] + common_names)
  )
  # The same predictors for the in-range fit: separates "fits worse" from "generalises worse".
  y_in = np.log([max(r["raw_in_kl"], 1e-12) for r in ok])
  out["raw_log_kl_in__dropout"] = dict(
      target="log in-range KL, raw weights", **ols(X, y_in, ["dropout"] + common_names)
  )
  X = np.asarray([[r[f"drop_{s}"] for s in DROPOUT_SITES] + common(r) for r in ok])
  out["raw_log_kl_out__dropout_by_site"] = dict(
      target="log out-of-range KL, raw weights", **ols(X, y_raw, [f"drop_{s}" for s in DROPOUT_SITES] + common_names)
  )
  # The averaging gains (log KL ratio, averaged / raw) against the averaging's own hyperparameter.
  gain = lambda k: np.log([r[f"{k}_out_kl"] / r["raw_out_kl"] for r in ok])
  X = np.asarray([[math.log10(1.0 - r["ema_decay"]), r["dropout"]] + common(r) for r in ok])
  out["ema_gain_out__decay"] = dict(
      target="log (EMA / raw) out-of-range KL", **ols(X, gain("ema"), ["log10_1_minus_decay", "dropout"] + common_names)
  )
  X = np.asarray([[r["bema_burn_in"] / 1000.0, r["dropout"]] + common(r) for r in ok])
  out["bema_gain_out__burn_in"] = dict(
      target="log (BEMA / raw) out-of-range KL", **ols(X, gain("bema"), ["burn_in_ksteps", "dropout"] + common_names)
  )
  return out


def dropout_split(rows, rng, bootstrap: int) -> Dict[str, Any]:
  """Raw-weight log out-of-range KL: runs with dropout > 0 minus runs without (difference of means)."""
  ok = [r for r in rows if not r["diverged"]]
  a = np.log([r["raw_out_kl"] for r in ok if r["dropout"] > 0])
  b = np.log([r["raw_out_kl"] for r in ok if r["dropout"] == 0])
  out = dict(n_dropout=int(a.size), n_no_dropout=int(b.size))
  if a.size >= 2 and b.size >= 2:
    diff = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))  # Welch
    q = _t_quantile(max(int(dof), 1))
    boots = a[rng.integers(0, a.size, (bootstrap, a.size))].mean(1) - b[
        rng.integers(0, b.size, (bootstrap, b.size))
    ].mean(1)
    out.update(
        mean_diff_log_kl=diff,
        welch_ci=[diff - q * se, diff + q * se],
        bootstrap_ci=[float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        ratio=math.exp(diff),
    )
  return out


# ------------------------------------------------------------------------------------------------ outputs


def _fmt_ci(res, key="t_ci", digits=3) -> str:
  if not res or "mean" not in res:
    return "n/a"
  ci = res.get(key)
  ci_s = f" [{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]" if ci else ""
  return f"{res['mean']:.{digits}g}{ci_s}"


def _verdict(lo: float, hi: float, better_if_negative: bool = True) -> str:
  if (hi < 0) if better_if_negative else (lo > 0):
    return "reproduced"
  if (lo > 0) if better_if_negative else (hi < 0):
    return "contradicted"
  return "not resolved (interval includes 0)"


def claims(summary: Dict[str, Any]) -> List[Dict[str, str]]:
  """The paper's claims, each with this sweep's estimate, its 95% interval and a verdict."""
  out = []
  c = summary["regression"].get("raw_log_kl_out__dropout", {}).get("coef", {}).get("dropout")
  if c:
    lo, hi = c["ci"]
    out.append(
        dict(
            claim="dropout improves length generalisation (lower out-of-range KL of the raw weights)",
            estimate=f"KL factor {math.exp(0.1 * c['estimate']):.3g} per +0.1 dropout rate "
            f"(95% CI [{math.exp(0.1 * lo):.3g}, {math.exp(0.1 * hi):.3g}]; OLS with lr and widths)",
            verdict=_verdict(lo, hi),
        )
    )
  for kind, label in (("ema", "weight EMA (debiased)"), ("bema", "BEMA with burn-in")):
    r = summary["paired"].get(kind, {}).get("out_of_range/log_kl")
    if r and "t_ci" in r:
      lo, hi = r["t_ci"]
      out.append(
          dict(
              claim=f"{label} improves length generalisation (out-of-range KL, averaged vs raw weights of a run)",
              estimate=f"KL factor {math.exp(r['mean']):.3g} (95% CI [{math.exp(lo):.3g}, {math.exp(hi):.3g}]), "
              f"{r['frac_improved']:.0%} of {r['n']} runs improved",
              verdict=_verdict(lo, hi),
          )
      )
  r = summary.get("separation_drop")
  if r and "t_ci" in r:
    lo, hi = r["t_ci"]
    out.append(
        dict(
            claim="longer sets are solved with reduced precision: the valid-invalid logit separation shrinks",
            estimate=f"out-of-range minus in-range logit gap (raw weights) {r['mean']:.3g} "
            f"(95% CI [{lo:.3g}, {hi:.3g}]), {r['n']} runs",
            verdict=_verdict(lo, hi),
        )
    )
  return out


def analyse(rows, rng, boot: int) -> Dict[str, Any]:
  """Paired averaging comparisons, the separation drop, regressions, the dropout split and the claims."""
  ok = [r for r in rows if not r["diverged"]]
  out = dict(
      n_runs=len(rows),
      paired={k: paired_comparison(rows, k, rng, boot) for k in AVERAGES},
      separation_drop=mean_ci(np.asarray([r["raw_out_logit_gap"] - r["raw_in_logit_gap"] for r in ok]), rng, boot),
      regression=regressions(rows),
      dropout_split=dropout_split(rows, rng, boot),
  )
  out["claims"] = claims(out)
  return out


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
    saved["runs"] = rows
    with open(os.path.join(workdir, "runs.json"), "w") as f:
      json.dump(saved, f, indent=1)
    with open(os.path.join(workdir, "runs.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(CSV_COLUMNS)
      for r in rows:
        w.writerow([_csv_value(r[c]) for c in CSV_COLUMNS])
    summary.setdefault("continuations", []).append(
        dict(
            command=extra_summary["command"],
            runs=sorted(extra),
            steps_cap=extra_summary["steps"],
            wall_time_s=extra_summary["wall_time_s"],
            load_start=extra_summary["load_start"],
            load_end=extra_summary["load_end"],
        )
    )
    steps_trained = [r["steps_trained"] for r in rows]
    summary["convergence"].update(
        n_plateau=sum(r["plateau_step"] is not None for r in rows),
        steps_min=min(steps_trained),
        steps_max=max(steps_trained),
    )
  rng = np.random.default_rng(12345)
  boot = int(summary["sweep"]["bootstrap"])
  summary.update(analyse(rows, rng, boot))
  summary["plateaued"] = analyse([r for r in rows if r["plateau_step"] is not None], rng, boot)
  summary["findings"] = findings(summary)
  histories = {r["run"]: r["in_range_history"] for r in rows}
  summary["plots"] = make_plots(
      rows, saved["sizes"], saved["train_max_size"], os.path.join(workdir, "plots"), histories
  )
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  write_markdown(os.path.join(workdir, "summary.md"), summary)
  log(f"sweep: summary.json, summary.md and plots/ rebuilt from {workdir}/runs.json")
  return summary


def write_markdown(path: str, summary: Dict[str, Any]) -> None:
  s = summary
  conv = s["convergence"]
  lines = [
      f"# Set-complement random search ({s['n_runs']} runs)",
      "",
      f"Command: `{s['command']}`  ",
      f"Wall time: {s['wall_time_s']:.0f} s on {s['device']} ({s['date']}, load average at the start "
      f"{s['load_start']}, at the end {s['load_end']}); {s['n_groups']} compiled groups; diverged runs: "
      f"{s['n_diverged']}.  ",
      f"Task: N = {s['task']['num_tokens']}, training sizes {s['task']['train_min_size']}.."
      f"{s['task']['train_max_size']}, evaluation at sizes {s['eval_sizes'][0]}..{s['eval_sizes'][-1]}, "
      f"{s['task']['eval_examples']} examples per size; model '{s['model_kind']}'; batch {s['batch_size']}, "
      f"lr schedule '{s['schedule']}'.  ",
      f"Convergence: trained until the raw in-range KL stopped improving (no gain > {conv['rel_tol']:.0%} over "
      f"the last {conv['patience']} checks of {conv['check_every']} steps, at least {conv['min_steps']} steps; "
      f"cap {s['steps']} steps): {conv['n_plateau']} of {s['n_runs']} runs reached their plateau; steps "
      f"trained per group {conv['steps_min']}..{conv['steps_max']}.",
  ]
  for c in s.get("continuations", []):
    lines.append(
        f"Runs {', '.join(map(str, c['runs']))} retrained (same hyperparameters, data and seeds) with a cap of "
        f"{c['steps_cap']} steps: `{c['command']}` ({c['wall_time_s']:.0f} s, load {c['load_start']} -> "
        f"{c['load_end']}); their rows replace the first ones.  "
    )
  lines += [
      "",
      "## The paper's claims",
      "",
      "| claim | estimate (95% CI) | verdict |",
      "|---|---|---|",
  ]
  lines += [f"| {c['claim']} | {c['estimate']} | {c['verdict']} |" for c in s["claims"]]
  pl = s.get("plateaued")
  if pl and pl["n_runs"] < s["n_runs"]:
    lines += [
        "",
        f"The same claims on the {pl['n_runs']} runs that reached their plateau within the cap:",
        "",
        "| claim | estimate (95% CI) | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {c['claim']} | {c['estimate']} | {c['verdict']} |" for c in pl["claims"]]
  lines += [
      "",
      "## Weight averaging vs the raw weights of the same run (averaged - raw)",
      "",
      "Mean difference with 95% t-interval; bootstrap 95% interval; share of runs where averaging helped.",
      "",
      "| kind | metric | n | mean raw | mean avg | diff [t 95% CI] | bootstrap CI | p | improved |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for kind, res in s["paired"].items():
    for m, r in res.items():
      if not isinstance(r, dict) or "mean" not in r:
        continue
      b = r.get("bootstrap_ci")
      lines.append(
          f"| {kind} | {m} | {r['n']} | {r['mean_raw']:.4g} | {r['mean_avg']:.4g} | {_fmt_ci(r)} | "
          f"{'[%.3g, %.3g]' % tuple(b) if b else 'n/a'} | {r.get('p_value', float('nan')):.2g} | "
          f"{r['frac_improved']:.0%} |"
      )
  lines += [
      "",
      "log_kl differences are log ratios: exp(diff) is the geometric-mean factor on KL.",
      "",
      "## Regressions (OLS, 95% t-intervals)",
      "",
  ]
  for name, reg in s["regression"].items():
    lines.append(
        f"**{name}**: {reg.get('target', '')}; n = {reg.get('n')}, " f"R^2 = {reg.get('r2', float('nan')):.3f}"
    )
    if "coef" not in reg:
      lines += [f"  {reg.get('error', '')}", ""]
      continue
    lines += ["", "| coefficient | estimate | 95% CI |", "|---|---|---|"]
    for c, v in reg["coef"].items():
      lines.append(f"| {c} | {v['estimate']:.4g} | [{v['ci'][0]:.4g}, {v['ci'][1]:.4g}] |")
    lines.append("")
  d = s["dropout_split"]
  if "mean_diff_log_kl" in d:
    lines += [
        "## Dropout > 0 vs dropout = 0 (raw weights, log out-of-range KL)",
        "",
        f"{d['n_dropout']} vs {d['n_no_dropout']} runs: difference {d['mean_diff_log_kl']:.3g} "
        f"(Welch 95% CI [{d['welch_ci'][0]:.3g}, {d['welch_ci'][1]:.3g}], bootstrap "
        f"[{d['bootstrap_ci'][0]:.3g}, {d['bootstrap_ci'][1]:.3g}]), KL ratio {d['ratio']:.3g}.",
        "",
    ]
  lines += ["## Findings", ""] + [f"- {f}" for f in s["findings"]] + [""]
  lines += ["Plots: " + ", ".join(f"`plots/{os.path.basename(p)}`" for p in s["plots"]), ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def findings(summary: Dict[str, Any]) -> List[str]:
  """One-line readings of the estimates (interval excludes 0 or not)."""
  out = [f"{c['claim']}: {c['verdict']}; {c['estimate']}." for c in summary["claims"]]
  for kind in AVERAGES:
    r = summary["paired"].get(kind, {}).get("in_range/log_kl")
    if r and "t_ci" in r:
      lo, hi = r["t_ci"]
      out.append(
          f"{kind} weights in range: KL factor {math.exp(r['mean']):.3g} "
          f"(95% CI [{math.exp(lo):.3g}, {math.exp(hi):.3g}])."
      )
  c = summary["regression"].get("raw_log_kl_in__dropout", {}).get("coef", {}).get("dropout")
  if c:
    out.append(
        f"dropout and in-range KL of the raw weights: {c['estimate']:.3g} per unit rate "
        f"(95% CI [{c['ci'][0]:.3g}, {c['ci'][1]:.3g}])."
    )
  reg = summary["regression"].get("raw_log_kl_out__dropout_by_site", {})
  for s in DROPOUT_SITES:
    c = reg.get("coef", {}).get(f"drop_{s}")
    if c:
      out.append(f"dropout on {s}: {c['estimate']:.3g} per unit rate (95% CI [{c['ci'][0]:.3g}, {c['ci'][1]:.3g}]).")
  for name, coef in (("ema_gain_out__decay", "log10_1_minus_decay"), ("bema_gain_out__burn_in", "burn_in_ksteps")):
    c = summary["regression"].get(name, {}).get("coef", {}).get(coef)
    if c:
      out.append(f"{name}: {coef} {c['estimate']:.3g} (95% CI [{c['ci'][0]:.3g}, {c['ci'][1]:.3g}]).")
  return out


def make_plots(rows, sizes, train_max_size: int, out_dir: str, histories=None) -> List[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  ok = [r for r in rows if not r["diverged"]]
  paths = []
  colors = {"raw": "C0", "ema": "C1", "bema": "C2"}

  fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=80, sharey=True)
  for ax, w in zip(axes, WEIGHTS):
    placements = sorted({r["dropout_on"] for r in ok})
    for i, p in enumerate(placements):
      sel = [r for r in ok if r["dropout_on"] == p]
      ax.scatter(
          [r["dropout"] for r in sel],
          [r[f"{w}_out_kl"] for r in sel],
          s=14,
          label=p or "none",
          color=plt.cm.tab10(i % 10),
      )
    ax.set_yscale("log")
    ax.set_xlabel("dropout rate")
    ax.set_title(f"{w} weights")
  axes[0].set_ylabel("out-of-range KL")
  axes[-1].legend(fontsize=6, title="placement", title_fontsize=6)
  fig.suptitle("Out-of-range KL against dropout rate")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "kl_out_vs_dropout.png"))
  fig.savefig(paths[-1])
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=90)
  for r in ok:
    ax.plot(range(3), [r[f"{w}_out_kl"] for w in WEIGHTS], color="0.8", lw=0.6, zorder=1)
  for i, w in enumerate(WEIGHTS):
    v = [r[f"{w}_out_kl"] for r in ok]
    ax.scatter(np.full(len(v), i), v, s=12, color=colors[w], zorder=2)
    if v:
      ax.plot([i - 0.25, i + 0.25], [np.exp(np.mean(np.log(v)))] * 2, color="k", lw=2, zorder=3)
  ax.set_xticks(range(3), ["none (raw)", "EMA", "BEMA"])
  ax.set_yscale("log")
  ax.set_ylabel("out-of-range KL")
  ax.set_title("Averaging choice, same runs\n(bar: geometric mean)", fontsize=10)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "kl_out_vs_averaging.png"))
  fig.savefig(paths[-1])
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
  ax.axvspan(0.5, train_max_size + 0.5, color="0.9", label="training sizes")
  for w in WEIGHTS:
    for drop, ls in ((False, "-"), (True, "--")):
      c = [r[f"{w}_per_size"]["kl"] for r in ok if (r["dropout"] > 0) == drop]
      if c:
        ax.plot(
            sizes,
            np.median(np.asarray(c), 0),
            ls=ls,
            color=colors[w],
            label=f"{w}, dropout {'> 0' if drop else '= 0'} (n={len(c)})",
        )
  ax.set_yscale("log")
  ax.set_xlabel("set size s")
  ax.set_ylabel("median KL over runs")
  ax.set_title("KL(target || p) against set size")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "kl_per_size.png"))
  fig.savefig(paths[-1])
  plt.close(fig)

  if histories:
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
    for r in ok:
      h = histories.get(r["run"])
      if h:
        ax.plot(h["steps"], h["in_kl"], lw=0.6, color="C3" if r["plateau_step"] is None else "0.5")
        if r["plateau_step"] is not None:
          ax.scatter([r["plateau_step"]], [h["in_kl"][h["steps"].index(r["plateau_step"])]], s=8, color="k")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("raw in-range KL (check set)")
    ax.set_title("Convergence (dot: plateau reached; red: never)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "convergence.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
  return paths


def _csv_value(v):
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.6g}"
  return v


CSV_COLUMNS = (
    ["run", "group", "seed", "embed_dim", "value_dim", "num_heads", "lr", "dropout", "dropout_on"]
    + [f"drop_{s}" for s in DROPOUT_SITES]
    + ["ema_decay", "bema_burn_in", "steps_trained", "plateau_step", "final_train_loss", "diverged"]
    + [f"{w}_{p}_{m}" for w in WEIGHTS for p in ("in", "out") for m in METRICS]
)


# ------------------------------------------------------------------------------------------------ driver


def run_sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    runs: Optional[int] = None,
    log=print,
    command: str = "",
    only_runs: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
  """Samples, trains to the plateau, evaluates and summarises the sweep; returns summary.json's content.

  only_runs: train only these run ids of the `runs` sampled (the same hyperparameters, data and seeds, as
  sampling is deterministic), e.g. again with a higher step cap for runs that had not plateaued; merge
  them into the full sweep with reanalyse(workdir, merge_from=...)."""
  t_start = time.time()
  load_start = os.getloadavg()[0]
  runs = int(config.sweep.runs if runs is None else runs)
  validate_sweep(config, runs)
  os.makedirs(workdir, exist_ok=True)
  sw = config.sweep
  task = sc.SetComplementTask(config)
  n_tok, l_train = task.num_tokens, task.train_max_size
  sizes = task.eval_sizes()
  t = config.task
  eval_batches = [
      data.eval_batch(int(t.eval_seed), s, int(t.eval_examples), num_tokens=n_tok, length=n_tok - 1) for s in sizes
  ]
  # The plateau check's own in-range sets: another seed, so the reported in-range metrics are not the ones
  # that decided when to stop.
  check_batches = [
      data.eval_batch(int(t.eval_seed) + 1, s, int(sw.check_examples), num_tokens=n_tok, length=l_train)
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
      f"L_train={l_train}"
  )
  rows, histories = [], {}
  for gi, (key, g_runs) in enumerate(sorted(groups.items())):
    t0 = time.time()
    r0 = g_runs[0]
    programs = GroupPrograms(config, r0["embed_dim"], r0["value_dim"], r0["num_heads"], r0["bema_burn_in"])
    state, losses_SR, info = train_group(programs, g_runs, stream, check_batches, sw, log)
    t_train = time.time() - t0
    res = evaluate_group(programs, state, eval_batches)
    tail = losses_SR[-min(100, losses_SR.shape[0]) :]
    for j, run in enumerate(g_runs):
      row = dict(
          run,
          group=key,
          steps_trained=int(info["steps"]),
          plateau_step=info["plateau_step"][j],
          final_train_loss=float(np.nanmean(tail[:, j])),
          diverged=bool(not np.all(np.isfinite(losses_SR[:, j]))),
      )
      for w in WEIGHTS:
        per = {m: res[w][m][j].tolist() for m in METRICS}
        summ = sc.range_summary(sizes, per, l_train)
        for p, pname in (("in", "in_range"), ("out", "out_of_range")):
          for m in METRICS:
            row[f"{w}_{p}_{m}"] = summ.get(f"{pname}/{m}")
        row[f"{w}_per_size"] = per
      histories[run["run"]] = dict(steps=list(info["check_steps"]), in_kl=info["history"][:, j].tolist())
      rows.append(row)
    done = rows[-len(g_runs) :]
    log(
        f"  group {gi + 1}/{len(groups)} {key}: {len(g_runs)} runs, {info['steps']} steps, train {t_train:.1f} s, "
        f"eval {time.time() - t0 - t_train:.1f} s; median out-of-range KL raw / ema / bema "
        + " / ".join(f"{np.median([r[f'{w}_out_kl'] for r in done]):.4g}" for w in WEIGHTS)
    )
  rows.sort(key=lambda r: r["run"])
  for r in rows:
    r["in_range_history"] = histories[r["run"]]

  with open(os.path.join(workdir, "runs.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(CSV_COLUMNS)
    for r in rows:
      w.writerow([_csv_value(r[c]) for c in CSV_COLUMNS])
  with open(os.path.join(workdir, "runs.json"), "w") as f:
    json.dump(dict(sizes=sizes, train_max_size=l_train, runs=rows), f, indent=1)

  rng = np.random.default_rng(12345)
  boot = int(sw.bootstrap)
  ok = [r for r in rows if not r["diverged"]]
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
      convergence=dict(
          check_every=stream.k,
          patience=int(sw.patience),
          rel_tol=float(sw.rel_tol),
          min_steps=int(sw.min_steps),
          n_plateau=sum(r["plateau_step"] is not None for r in rows),
          steps_min=min(steps_trained),
          steps_max=max(steps_trained),
      ),
  )
  summary.update(analyse(rows, rng, boot))
  summary["plateaued"] = analyse([r for r in rows if r["plateau_step"] is not None], rng, boot)
  summary["findings"] = findings(summary)
  summary["plots"] = make_plots(rows, sizes, l_train, os.path.join(workdir, "plots"), histories)
  summary["wall_time_s"] = time.time() - t_start
  summary["load_end"] = round(os.getloadavg()[0], 2)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  write_markdown(os.path.join(workdir, "summary.md"), summary)
  log(
      f"sweep: done in {summary['wall_time_s']:.0f} s; wrote runs.csv, runs.json, summary.json, summary.md, "
      f"plots/ to {workdir}"
  )
  for line in summary["findings"]:
    log("  " + line)
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
