"""The set-complement sweep's search space: validation, sampling of runs, the names of the weights each run
keeps, and the compiled groups (experiments/set_complement_sweep.py)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ema_jax.models.set_transformer import DROPOUT_SITES, parse_dropout_on
from ema_jax.tasks import set_complement as sc


def bema_name(tau: int) -> str:
  """The average of a BEMA with burn-in tau (ema_jax/optim.py 'bema_<tau>' kinds)."""
  return f"bema_{int(tau)}"


def average_names(burn_ins: Sequence[int]) -> List[str]:
  """The averages every run keeps: the debiased EMA and one BEMA per burn-in of the grid."""
  return ["ema"] + [bema_name(t) for t in burn_ins]


def weight_names(burn_ins: Sequence[int]) -> List[str]:
  """Every set of weights a run is evaluated with: raw, then its averages."""
  return ["raw"] + average_names(burn_ins)


def canonical_sites(value) -> str:
  sites = parse_dropout_on(value)
  return ",".join(s for s in DROPOUT_SITES if s in sites)


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
      raise ValueError(f"config.sweep.dims entry {d!r}: expected positive widths divisible by num_heads={s.num_heads}.")
  lo, hi = s.lr
  if not 0 < lo <= hi:
    raise ValueError(f"config.sweep.lr={s.lr!r}: expected 0 < low <= high.")
  lo, hi = s.dropout
  if not 0 <= lo <= hi < 1:
    raise ValueError(f"config.sweep.dropout={s.dropout!r}: expected 0 <= low <= high < 1 (placement '' is no dropout).")
  if not len(s.dropout_on):
    raise ValueError("config.sweep.dropout_on=[]: expected placements, e.g. ['', 'attention', 'embedding', 'output'].")
  for p in s.dropout_on:
    if not all(x in DROPOUT_SITES for x in parse_dropout_on(p)):
      raise ValueError(
          f"config.sweep.dropout_on entry {p!r}: expected '' (no dropout) or a comma-separated subset of "
          f"{DROPOUT_SITES}."
      )
  lo, hi = s.ema_decay
  if not 0 < lo <= hi < 1:
    raise ValueError(f"config.sweep.ema_decay={s.ema_decay!r}: expected 0 < low <= high < 1.")
  taus = list(s.bema_burn_in)
  if not taus or len(set(taus)) != len(taus):
    raise ValueError(f"config.sweep.bema_burn_in={taus!r}: expected distinct burn-ins, e.g. [0, 1000].")
  for tau in taus:
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
  """The sampled hyperparameters of every run (deterministic in sweep.sample_seed).

  Placements are balanced: run i takes placement perm[i] mod P of sweep.dropout_on ('' = no dropout), so
  every placement gets runs / P runs (+-1), each with one rate; the other values are independent draws."""
  rng = np.random.default_rng(sweep.sample_seed)
  placements = [canonical_sites(p) for p in sweep.dropout_on]
  order = rng.permutation(runs) % len(placements)
  out = []
  for i in range(runs):
    e, v = (int(x) for x in str(sweep.dims[rng.integers(len(sweep.dims))]).lower().split("x"))
    lr = float(math.exp(rng.uniform(math.log(sweep.lr[0]), math.log(sweep.lr[1]))))
    sites = placements[order[i]]
    rate = float(rng.uniform(*sweep.dropout)) if sites else 0.0
    one_minus = math.exp(rng.uniform(math.log(1 - sweep.ema_decay[1]), math.log(1 - sweep.ema_decay[0])))
    seed = int(rng.integers(2**31 - 1))
    run = dict(
        run=i,
        seed=seed,
        embed_dim=e,
        value_dim=v,
        num_heads=int(sweep.num_heads),
        lr=lr,
        dropout=rate,
        dropout_on=sites,
        ema_decay=float(1.0 - one_minus),
    )
    for s in DROPOUT_SITES:
      run[f"drop_{s}"] = rate if s in sites.split(",") else 0.0
    out.append(run)
  return out


def group_key(run) -> str:
  return f"d{run['embed_dim']}v{run['value_dim']}h{run['num_heads']}"


def group_runs(runs: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
  """Runs by what fixes the compiled program (dims and heads; everything else is data in the state)."""
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
