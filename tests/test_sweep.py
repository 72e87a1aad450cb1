"""The set-complement sweep (experiments/set_complement_sweep.py): the trainer's step vmapped over runs
equals independent single runs; a tiny sweep end to end."""

import csv
import importlib.util
import json
import math
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from ema_jax import optim
from ema_jax.tasks.set_complement import SetComplementTask
from experiments import set_complement_sweep as sweep

ROOT = Path(__file__).resolve().parents[1]


def sweep_config():
  spec = importlib.util.spec_from_file_location("sc_config", ROOT / "configs" / "set_complement.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("sweep")
  c.steps, c.batch_size = 12, 16
  c.optim.warmup_steps = 2
  c.task.num_tokens, c.task.train_max_size, c.task.eval_examples = 8, 3, 8
  c.sweep.dims = ["8x8"]
  c.sweep.chunk_steps = 6
  c.sweep.bootstrap = 200
  return c


def reference_run(config, run, steps):
  """One run trained the plain way: the model's own dropout config (constant rates at the run's sites),
  AdamW at the run's lr, WeightEMA and BEMA; keys as the trainer splits config.seed (parameters, dropout)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.update(
      embed_dim=run["embed_dim"],
      value_dim=run["value_dim"],
      num_heads=run["num_heads"],
      dropout=run["dropout"],
      dropout_on=run["dropout_on"],
  )
  task = SetComplementTask(c)
  params_key, dropout_key = jax.random.split(jax.random.key(run["seed"]))
  model = task.build_model(nnx.Rngs(params=params_key))
  graphdef, params = nnx.split(model)
  c.optim.lr = run["lr"]
  tx, _ = optim.make_optimizer(c.optim, c.steps)
  wema, bema = optim.WeightEMA(run["ema_decay"]), optim.BEMA(burn_in=run["bema_burn_in"])
  opt, ema, bema_state = tx.init(params), wema.init(params), bema.init(params)
  it = task.train_iterator(0, 1)
  losses = []

  @jax.jit
  def step(params, opt, ema, bema_state, batch, i):
    def lf(p):
      rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_key, i))
      return task.loss(nnx.merge(graphdef, p), batch, rngs=rngs, train=True)[0]

    loss, g = jax.value_and_grad(lf)(params)
    u, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, u)
    return params, opt, wema.update(ema, params, i + 1), bema.update(bema_state, params, i + 1), loss

  for i in range(steps):
    params, opt, ema, bema_state, loss = step(params, opt, ema, bema_state, next(it), i)
    losses.append(float(loss))
  return np.asarray(losses), params, wema.value(ema, params), bema.value(bema_state, params)


def test_vmapped_training_equals_single_runs():
  c = sweep_config()
  runs = sweep.sample_runs(c.sweep, 3)
  placements = ["attention", "embedding,output", ""]
  for r, p, lr, rate, decay in zip(runs, placements, [1e-3, 3e-3, 2e-2], [0.3, 0.2, 0.0], [0.9, 0.95, 0.99]):
    r.update(
        embed_dim=8,
        value_dim=8,
        num_heads=1,
        ema_decay=decay,
        bema_burn_in=4,
        lr=lr,
        dropout=rate,
        dropout_on=p,
        **{f"drop_{s}": rate if s in p.split(",") else 0.0 for s in ("attention", "embedding", "output")},
    )
  programs = sweep.GroupPrograms(c, 8, 8, 1, 4)
  state, losses, _ = sweep.train_group(programs, runs, sweep.training_chunks(c, 6))
  averaged = programs.averaged(state)
  assert losses.shape == (12, 3)
  for j, run in enumerate(runs):
    ref_losses, ref_params, ref_ema, ref_bema = reference_run(c, run, 12)
    np.testing.assert_allclose(losses[:, j], ref_losses, rtol=2e-5, atol=1e-6)
    for got, want in ((state["params"], ref_params), (averaged["ema"], ref_ema), (averaged["bema"], ref_bema)):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a)[j], np.asarray(b), rtol=1e-4, atol=1e-5)


def test_sampling_is_deterministic_and_in_range():
  c = sweep_config().sweep
  a, b = sweep.sample_runs(c, 40), sweep.sample_runs(c, 40)
  assert a == b
  for r in a:
    assert c.lr[0] <= r["lr"] <= c.lr[1] and 0 <= r["dropout"] <= c.dropout[1]
    assert r["bema_burn_in"] in c.bema_burn_in
    assert c.ema_decay[0] <= r["ema_decay"] <= c.ema_decay[1]
    assert sum(r[f"drop_{s}"] > 0 for s in ("attention", "embedding", "output")) == (
        len(r["dropout_on"].split(",")) if r["dropout"] > 0 else 0
    )
  groups = sweep.group_runs(a)
  assert sum(len(g) for g in groups.values()) == 40
  assert all(len({(r["embed_dim"], r["bema_burn_in"]) for r in g}) == 1 for g in groups.values())


def test_statistics_against_closed_forms():
  rng = np.random.default_rng(0)
  res = sweep.mean_ci(np.array([1.0, 2.0, 3.0, 4.0]), rng, 500)
  se = np.std([1, 2, 3, 4], ddof=1) / 2
  assert res["mean"] == 2.5 and res["se"] == pytest.approx(se)
  assert res["t_ci"] == pytest.approx([2.5 - 3.182446 * se, 2.5 + 3.182446 * se], rel=1e-5)
  assert 1.0 <= res["bootstrap_ci"][0] <= res["bootstrap_ci"][1] <= 4.0
  X = rng.normal(size=(50, 2))
  y = 1.0 + 2.0 * X[:, 0] - 0.5 * X[:, 1] + 1e-3 * rng.normal(size=50)
  fit = sweep.ols(np.concatenate([X, np.ones((50, 1)), X[:, :1]], 1), y, ["a", "b", "constant", "copy_of_a"])
  assert set(fit["coef"]) == {"intercept", "a", "b"}  # constant and duplicate columns are dropped
  assert fit["coef"]["a"]["estimate"] == pytest.approx(2.0, abs=1e-2)
  lo, hi = fit["coef"]["b"]["ci"]
  assert lo < -0.5 < hi and fit["r2"] > 0.999


def test_tiny_sweep_end_to_end(tmp_path):
  c = sweep_config()
  c.steps, c.sweep.min_steps, c.sweep.patience, c.sweep.bema_burn_in = 60, 12, 2, [0, 6]
  summary = sweep.run_sweep(c, str(tmp_path), runs=4, log=lambda *a: None)
  with open(tmp_path / "runs.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4 and list(rows[0]) == sweep.CSV_COLUMNS
  for col in (
      "lr",
      "dropout",
      "dropout_on",
      "ema_decay",
      "bema_burn_in",
      "plateau_step",
      "steps_trained",
      "raw_in_kl",
      "raw_out_kl",
      "ema_in_kl",
      "ema_out_kl",
      "bema_out_kl",
      "raw_out_precision",
      "bema_out_invalid_mass",
  ):
    assert col in rows[0]
  assert all(math.isfinite(float(r[f"{w}_out_kl"])) for r in rows for w in ("raw", "ema", "bema"))
  assert all(12 <= int(r["steps_trained"]) <= 60 for r in rows)
  runs = json.loads((tmp_path / "runs.json").read_text())
  assert runs["sizes"] == list(range(1, 8)) and len(runs["runs"]) == 4
  assert len(runs["runs"][0]["raw_per_size"]["kl"]) == 7
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["n_runs"] == 4 and set(on_disk) >= {"paired", "regression", "dropout_split", "findings", "claims"}
  assert set(on_disk["paired"]) == {"ema", "bema"} and summary["n_runs"] == 4
  assert len(runs["runs"][0]["in_range_history"]["in_kl"]) == len(runs["runs"][0]["in_range_history"]["steps"])
  md = (tmp_path / "summary.md").read_text()
  assert "averaged - raw" in md and "## The paper's claims" in md
  again = sweep.reanalyse(str(tmp_path), log=lambda *a: None)  # from runs.json alone: the same analysis
  assert again["claims"] == summary["claims"] and again["command"] == summary["command"]
  assert again["plateaued"]["n_runs"] == sum(r["plateau_step"] is not None for r in runs["runs"])
  # Run 1 again alone with a higher cap, merged back: its row is replaced, the others stay.
  c.steps = 96
  more = sweep.run_sweep(c, str(tmp_path / "more"), runs=4, log=lambda *a: None, only_runs=[1])
  assert more["n_runs"] == 1
  merged = sweep.reanalyse(str(tmp_path), log=lambda *a: None, merge_from=str(tmp_path / "more"))
  new_rows = json.loads((tmp_path / "runs.json").read_text())["runs"]
  assert [r["run"] for r in new_rows] == [0, 1, 2, 3] and new_rows[0] == runs["runs"][0]
  assert new_rows[1] == json.loads((tmp_path / "more" / "runs.json").read_text())["runs"][0]
  assert merged["continuations"][0]["runs"] == [1] and "retrained" in (tmp_path / "summary.md").read_text()
  with pytest.raises(ValueError, match="only_runs"):
    sweep.run_sweep(c, str(tmp_path / "bad"), runs=4, log=lambda *a: None, only_runs=[7])
  plots = os.listdir(tmp_path / "plots")
  assert len(plots) == 4 and all(os.path.getsize(tmp_path / "plots" / p) < 1_000_000 for p in plots)


def test_plateau_check():
  assert not sweep.plateau_check([1.0, 0.5], patience=2, rel_tol=0.05)  # too short to tell
  assert sweep.plateau_check([1.0, 0.5, 0.49, 0.495], patience=2, rel_tol=0.05)  # < 5% better than 0.5
  assert not sweep.plateau_check([1.0, 0.5, 0.49, 0.3], patience=2, rel_tol=0.05)
  assert not sweep.plateau_check([1.0, float("nan"), 0.9, 0.9], patience=2, rel_tol=0.05)
