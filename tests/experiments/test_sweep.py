"""The set-complement sweep (experiments/set_complement_sweep*.py): the trainer's step vmapped over runs
equals independent single runs; the per-run temperature equals ema_jax.temperature's fit; a tiny sweep end
to end."""

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

from ema_jax import optim, temperature
from ema_jax.data import set_complement as data
from ema_jax.tasks.set_complement import SetComplementTask
from experiments import set_complement_sweep as sweep
from experiments import set_complement_sweep_training as training
from experiments.set_complement_sweep_report import csv_columns
from helpers import REPO

ROOT = Path(REPO)


def sweep_config():
  spec = importlib.util.spec_from_file_location("sc_config", ROOT / "configs" / "set_complement.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("sweep")
  c.steps, c.batch_size = 12, 16
  c.optim.warmup_steps = 2
  c.task.num_tokens, c.task.train_max_size, c.task.eval_examples = 8, 3, 8
  c.sweep.dims = ["8x8"]
  c.sweep.bema_burn_in = [0, 4]
  c.sweep.chunk_steps = 6
  c.sweep.bootstrap = 200
  return c


def reference_run(config, run, steps, burn_ins):
  """One run trained the plain way: the model's own dropout config (constant rates at the run's sites),
  AdamW at the run's lr, WeightEMA and a BEMA per burn-in; keys as the trainer splits config.seed
  (parameters, dropout). Returns (losses, params, EMA weights, {tau: BEMA weights})."""
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
  wema, bemas = optim.WeightEMA(run["ema_decay"]), [optim.BEMA(burn_in=t) for t in burn_ins]
  opt, ema, bema_state = tx.init(params), wema.init(params), [b.init(params) for b in bemas]
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
    bema_state = [b.update(st, params, i + 1) for b, st in zip(bemas, bema_state)]
    return params, opt, wema.update(ema, params, i + 1), bema_state, loss

  for i in range(steps):
    params, opt, ema, bema_state, loss = step(params, opt, ema, bema_state, next(it), i)
    losses.append(float(loss))
  bema_values = {t: b.value(st, params) for t, b, st in zip(burn_ins, bemas, bema_state)}
  return np.asarray(losses), params, wema.value(ema, params), bema_values


@pytest.mark.slow
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
        lr=lr,
        dropout=rate,
        dropout_on=p,
        **{f"drop_{s}": rate if s in p.split(",") else 0.0 for s in ("attention", "embedding", "output")},
    )
  programs = sweep.GroupPrograms(c, 8, 8, 1, [0, 4])
  assert programs.names == ["raw", "ema", "bema_0", "bema_4"]
  state, losses, _ = sweep.train_group(programs, runs, sweep.training_chunks(c, 6))
  averaged = programs.averaged(state)
  assert losses.shape == (12, 3)
  for j, run in enumerate(runs):
    ref_losses, ref_params, ref_ema, ref_bema = reference_run(c, run, 12, (0, 4))
    np.testing.assert_allclose(losses[:, j], ref_losses, rtol=2e-5, atol=1e-6)
    pairs = [(state["params"], ref_params), (averaged["ema"], ref_ema)]
    pairs += [(averaged[f"bema_{t}"], ref_bema[t]) for t in (0, 4)]
    for got, want in pairs:
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a)[j], np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_stop_at_plateau_keeps_each_runs_state_at_its_plateau():
  # With stop_at_plateau, a run that plateaued early is read at that step (it trains no further) while
  # the others go on; the vmapped batch shrinks to them. Its state equals the same run trained alone to
  # its plateau step.
  c = sweep_config()
  c.steps, c.sweep.min_steps, c.sweep.patience, c.sweep.rel_tol = 36, 12, 1, 0.02
  runs = sweep.sample_runs(c.sweep, 3)
  for r, lr in zip(runs, (1e-7, 3e-2, 1e-2)):  # the first cannot improve: it plateaus at min_steps
    r.update(embed_dim=8, value_dim=8, lr=lr)
  chunks = sweep.training_chunks(c, 6)
  check = [data.eval_batch(99, s, 8, num_tokens=8, length=3) for s in (1, 2, 3)]
  programs = sweep.GroupPrograms(c, 8, 8, 1, [0, 4])
  state, losses, info = sweep.train_group(programs, runs, chunks, check, c.sweep, stop_at_plateau=True)
  assert info["steps_trained"] == [p if p is not None else info["steps"] for p in info["plateau_step"]]
  assert info["plateau_step"][0] == 12 and max(info["steps_trained"]) > 12
  for j, run in enumerate(runs):
    k = info["steps_trained"][j]
    assert np.all(np.isnan(losses[k:, j])) and np.all(np.isfinite(losses[:k, j]))
    alone, _, _ = sweep.train_group(programs, [run], chunks[: k // 6])
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(alone["params"])):
      np.testing.assert_allclose(np.asarray(a)[j], np.asarray(b)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sweep_temperature_equals_the_reference_fit():
  # The sweep's per-run temperatures (a float32 bisection vmapped over runs, on device) against
  # ema_jax.temperature.fit_temperature (float64 NumPy) on the same check-set logits, for every weights.
  c = sweep_config()
  runs = sweep.sample_runs(c.sweep, 3)
  for r, lr in zip(runs, (1e-3, 1e-2, 3e-2)):
    r.update(embed_dim=8, value_dim=8, lr=lr)
  programs = sweep.GroupPrograms(c, 8, 8, 1, [0, 4])
  state, _, _ = sweep.train_group(programs, runs, sweep.training_chunks(c, 6))
  check = [data.eval_batch(1235, s, 16, num_tokens=8, length=3) for s in (1, 2, 3)]
  temps = sweep.fit_temperatures(programs, state, check)
  batch = training.stack_check_batches(check)
  averaged = programs.averaged(state)
  for name in programs.names:
    params = programs.weights(state, name, averaged)
    logits, target = programs.check_logits(params, state["other"], batch["tokens"], batch["mask"])
    for j in range(3):
      want = temperature.fit_temperature(np.asarray(logits[j]), np.asarray(target[j]))
      assert temps[name][j] == pytest.approx(want, rel=1e-4), (name, j)
  # A case with a known optimum: logits (a, 0), targets (q, 1 - q) -> T = a / logit(q); and the bounds.
  a, q = 3.0, 0.8
  z = np.array([[a, 0.0]], np.float32)
  t_known = float(training.fit_temperature_device(z, np.array([[q, 1 - q]], np.float32)))
  assert t_known == pytest.approx(a / np.log(q / (1 - q)), rel=1e-5)
  flat = float(training.fit_temperature_device(np.zeros((2, 3), np.float32), np.full((2, 3), 1 / 3, np.float32)))
  assert flat == pytest.approx(1.0 / temperature.BETA_RANGE[0], rel=1e-6)


def test_sampling_is_deterministic_and_in_range():
  c = sweep_config().sweep
  a, b = sweep.sample_runs(c, 40), sweep.sample_runs(c, 40)
  assert a == b
  for r in a:
    assert c.lr[0] <= r["lr"] <= c.lr[1] and 0 <= r["dropout"] <= c.dropout[1]
    assert c.ema_decay[0] <= r["ema_decay"] <= c.ema_decay[1]
    assert sum(r[f"drop_{s}"] > 0 for s in ("attention", "embedding", "output")) == (1 if r["dropout"] > 0 else 0)
    assert (r["dropout"] > 0) == (r["dropout_on"] != "")
  # One placement per run, balanced: 40 runs over ('', attention, embedding, output) -> 10 each.
  counts = {p: sum(r["dropout_on"] == p for r in a) for p in ("", "attention", "embedding", "output")}
  assert counts == {"": 10, "attention": 10, "embedding": 10, "output": 10}
  groups = sweep.group_runs(a)
  assert sum(len(g) for g in groups.values()) == 40
  assert all(len({(r["embed_dim"], r["value_dim"]) for r in g}) == 1 for g in groups.values())


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
  # No run at all (a sweep where none plateaued): "too few", not a crash on an empty design matrix.
  assert sweep.ols([], np.zeros(0), ["a", "b"]) == dict(n=0, error="0 runs for 1 coefficients: too few")


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
  c = sweep_config()
  c.steps, c.sweep.min_steps, c.sweep.patience, c.sweep.bema_burn_in = 60, 12, 2, [0, 6]
  summary = sweep.run_sweep(c, str(tmp_path), runs=8, log=lambda *a: None)
  weights = ["raw", "ema", "bema_0", "bema_6"]
  assert summary["weights"] == weights
  with open(tmp_path / "runs.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 8 and list(rows[0]) == csv_columns(weights)
  for col in (
      "lr",
      "dropout",
      "dropout_on",
      "ema_decay",
      "plateau_step",
      "steps_trained",
      "raw_in_kl",
      "raw_out_kl",
      "raw_out_t_kl",
      "raw_temperature",
      "ema_out_kl",
      "bema_6_out_t_kl",
      "bema_0_temperature",
      "raw_out_attn_dispersion",
      "bema_0_out_invalid_mass",
  ):
    assert col in rows[0]
  assert all(math.isfinite(float(r[f"{w}_out_{m}"])) for r in rows for w in weights for m in ("kl", "t_kl"))
  assert all(12 <= int(r["steps_trained"]) <= 60 for r in rows)
  runs = json.loads((tmp_path / "runs.json").read_text())
  assert runs["sizes"] == list(range(1, 8)) and len(runs["runs"]) == 8
  assert len(runs["runs"][0]["raw_per_size"]["attn_dispersion"]) == 7
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["n_runs"] == 8 and set(on_disk) >= {"averaging", "sharpening", "dropout", "findings", "claims"}
  assert set(on_disk["averaging"]) == {"ema", "bema_0", "bema_6"}
  # Every averaging and dropout comparison holds both readings.
  for w in ("ema", "bema_0"):
    e = on_disk["averaging"][w]["out_of_range/log_kl"]
    assert "t_ci" in e["as_is"] and "t_ci" in e["temperature_controlled"]
  for site in ("attention", "embedding", "output"):
    e = on_disk["dropout"]["sites"][site]
    assert e["n"] == 2
    assert "ci" in e["out_of_range/as_is/slope"] and "ci" in e["out_of_range/temperature_controlled/slope"]
  assert all("as_is" in cl and "temperature_controlled" in cl for cl in on_disk["claims"])
  md = (tmp_path / "summary.md").read_text()
  assert "temperature-controlled" in md and "sharpening only" in md and "BEMA does not use the sampled EMA decay" in md
  again = sweep.reanalyse(str(tmp_path), log=lambda *a: None)  # from runs.json alone: the same analysis
  assert again["claims"] == summary["claims"] and again["command"] == summary["command"]
  assert again["plateaued"]["n_runs"] == sum(r["plateau_step"] is not None for r in runs["runs"])
  # Run 1 again alone with a higher cap, merged back: its row is replaced, the others stay.
  c.steps = 96
  more = sweep.run_sweep(c, str(tmp_path / "more"), runs=8, log=lambda *a: None, only_runs=[1])
  assert more["n_runs"] == 1
  merged = sweep.reanalyse(str(tmp_path), log=lambda *a: None, merge_from=str(tmp_path / "more"))
  new_rows = json.loads((tmp_path / "runs.json").read_text())["runs"]
  assert [r["run"] for r in new_rows] == list(range(8)) and new_rows[0] == runs["runs"][0]
  assert new_rows[1] == json.loads((tmp_path / "more" / "runs.json").read_text())["runs"][0]
  assert merged["continuations"][0]["runs"] == [1] and "retrained" in (tmp_path / "summary.md").read_text()
  with pytest.raises(ValueError, match="only_runs"):
    sweep.run_sweep(c, str(tmp_path / "bad"), runs=8, log=lambda *a: None, only_runs=[9])
  plots = os.listdir(tmp_path / "plots")
  assert len(plots) == 5 and all(os.path.getsize(tmp_path / "plots" / p) < 1_000_000 for p in plots)


def test_plateau_check():
  assert not sweep.plateau_check([1.0, 0.5], patience=2, rel_tol=0.05)  # too short to tell
  assert sweep.plateau_check([1.0, 0.5, 0.49, 0.495], patience=2, rel_tol=0.05)  # < 5% better than 0.5
  assert not sweep.plateau_check([1.0, 0.5, 0.49, 0.3], patience=2, rel_tol=0.05)
  assert not sweep.plateau_check([1.0, float("nan"), 0.9, 0.9], patience=2, rel_tol=0.05)
