"""The Othello task: target / legal-set alignment, metrics against hand computation, a short training run
that beats chance, eval.py-style restore reproducing the in-loop numbers, and config validation."""

import importlib.util
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ema_jax import evaluation, trainer
from ema_jax.data import othello as data
from ema_jax.tasks import othello as task_lib
from ema_jax.tasks.base import EvalContext
from helpers import REPO


def get_config(arg="tiny"):
  spec = importlib.util.spec_from_file_location("othello_config", os.path.join(REPO, "configs", "othello.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("othello_data"))


def tiny_config(data_dir, **task):
  c = get_config("tiny")
  c.task.data_dir = data_dir
  c.task.update(task)
  return c


# ------------------------------------------------------------------------------------- alignment


def test_batches_align_targets_with_legal_sets(data_dir):
  """Input position t holds move t+1; its target is move t+2, legal after moves 1..t+1 (mask row t)."""
  c = tiny_config(data_dir)
  task = task_lib.OthelloTask(c)
  train, _ = task.games()
  it = task.train_iterator(0, 1)
  batch = next(it)
  L = c.task.train_len
  assert batch["inputs"].shape == batch["targets"].shape == (c.batch_size, L)
  assert batch["inputs"].dtype == np.int32
  tokens = train.tokens()
  # Find each row's game, then check the window and the next-move targets against the full game.
  for inputs, targets in zip(batch["inputs"], batch["targets"]):
    g = int(np.flatnonzero((tokens[:, :L] == inputs).all(1) & (tokens[:, 1 : L + 1] == targets).all(1))[0])
    moves = train.moves[g]
    legal = data.legal_move_masks(moves[None])[0]
    for t in range(L):
      if targets[t] == 0:
        assert moves[t + 1] == data.PAD_MOVE and not legal[t].any()
        continue
      assert data.TOKEN_TO_SQUARE[targets[t]] == moves[t + 1]
      # The target is one of the moves legal after moves[:t+1] (the position the model has seen).
      assert legal[t, targets[t]]
      assert sorted(data.SQUARE_TO_TOKEN[data.legal_moves(moves[: t + 1])]) == list(np.flatnonzero(legal[t]))


def test_iterator_resumes_exactly_and_covers_an_epoch(data_dir):
  c = tiny_config(data_dir)
  task = task_lib.OthelloTask(c)
  a = task.train_iterator(0, 1)
  seen = [next(a) for _ in range(a.batches_per_epoch + 3)]
  b = task.train_iterator(0, 1)
  b.set_state({"step": 5})
  for k in range(5, len(seen)):
    got = next(b)
    np.testing.assert_array_equal(got["inputs"], seen[k]["inputs"])
  # Two processes split each global batch into halves that together equal the one-process batch.
  p0, p1 = task.train_iterator(0, 2), task.train_iterator(1, 2)
  halves = np.concatenate([next(p0)["inputs"], next(p1)["inputs"]])
  np.testing.assert_array_equal(halves, seen[0]["inputs"])


def test_eval_positions_score_the_legal_set_after_p_moves(data_dir):
  """A model that puts all its mass on the true legal set at index p - 1 scores mass 1, KL 0, top-1 1."""
  c = tiny_config(data_dir, eval_games=10, eval_batch_size=4)
  task = task_lib.OthelloTask(c)

  ctx = EvalContext(
      put_batch=lambda b: {k: jnp.asarray(v) for k, v in b.items()}, process_index=0, process_count=1, workdir=None
  )
  batches = task._local_eval_batches(ctx)
  _, val = task.games()
  legal_ref = data.legal_move_masks(val.moves[:10])
  rows = np.concatenate([b["legal"] for b in batches])
  np.testing.assert_array_equal(rows[:10], legal_ref[:, : task_lib.MAX_POSITION])
  assert not rows[10:].any()  # padding rows are never scored
  for b in batches:
    logits = np.where(b["legal"], 0.0, -1e9).astype(np.float32)
    m = task_lib.legal_move_metrics(jnp.asarray(logits), jnp.asarray(b["legal"]))
    valid = b["legal"].any(-1)
    np.testing.assert_allclose(np.asarray(m["legal_mass"])[valid], 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["kl"])[valid], 0.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(m["top1_legal"])[valid], 1.0)


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computation():
  p = np.array([0.5, 0.3, 0.15, 0.05])
  legal = np.array([False, True, True, False])  # the most likely token is illegal
  m = task_lib.legal_move_metrics(jnp.log(jnp.asarray(p))[None, None], jnp.asarray(legal)[None, None])
  assert float(m["legal_mass"][0, 0]) == pytest.approx(0.45, rel=1e-6)
  assert float(m["top1_legal"][0, 0]) == 0.0
  # KL(U || p) with U = (0, 1/2, 1/2, 0): 1/2 log(0.5/0.3) + 1/2 log(0.5/0.15).
  kl = 0.5 * math.log(0.5 / 0.3) + 0.5 * math.log(0.5 / 0.15)
  assert float(m["kl"][0, 0]) == pytest.approx(kl, rel=1e-5)
  # Uniform over the legal set: mass 1, KL 0, top-1 legal; one legal move: KL = -log p.
  q = np.array([0.0, 0.5, 0.5, 0.0]) + 1e-12
  m = task_lib.legal_move_metrics(jnp.log(jnp.asarray(q / q.sum()))[None, None], jnp.asarray(legal)[None, None])
  assert float(m["legal_mass"][0, 0]) == pytest.approx(1.0, abs=1e-6)
  assert float(m["kl"][0, 0]) == pytest.approx(0.0, abs=1e-5)
  assert float(m["top1_legal"][0, 0]) == 1.0
  one = np.array([False, False, False, True])
  m = task_lib.legal_move_metrics(jnp.log(jnp.asarray(p))[None, None], jnp.asarray(one)[None, None])
  assert float(m["kl"][0, 0]) == pytest.approx(-math.log(0.05), rel=1e-5)


def test_next_move_loss_masks_padding():
  logits = jnp.log(jnp.asarray([[[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]]]))
  targets = jnp.asarray([[1, 2, 0]])
  expected = -(math.log(0.6) + math.log(0.6)) / 2
  assert float(task_lib.next_move_loss(logits, targets)) == pytest.approx(expected, rel=1e-5)


def test_region_means_split_at_train_len():
  per = {"legal_mass": [1.0, 0.5, 0.2, 0.1], "top1_legal": [1, 1, 0, 0], "kl": [0.0, 1.0, 2.0, 4.0]}
  out = task_lib.region_means([1, 2, 3, 4], per, train_len=2)
  assert out["in_range/legal_mass"] == pytest.approx(0.75)
  assert out["out_of_range/kl"] == pytest.approx(3.0)
  assert out["out_of_range/top1_legal"] == 0.0


# ------------------------------------------------------------------------- training and restore


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  wd = str(tmp_path_factory.mktemp("othello_run"))
  c = tiny_config(data_dir)
  final = trainer.train(c, wd)
  return wd, c, final


@pytest.mark.slow
def test_training_beats_chance_and_writes_tables_and_plots(trained):
  wd, c, final = trained
  assert final["status"] == "done"
  with open(os.path.join(wd, f"eval_{c.steps}.json")) as f:
    saved = json.load(f)
  results = saved["results"]
  assert set(results) == {"raw", "ema", "bema"}  # every preset keeps both averages of the one trajectory
  raw = results["raw"]
  pp = raw["per_position"]
  assert pp["position"] == list(range(1, task_lib.MAX_POSITION + 1))
  chance_in = np.mean([m for p, m in zip(pp["position"], pp["chance_mass"]) if p <= c.task.train_len])
  assert raw["in_range/legal_mass"] > chance_in + 0.1, (raw["in_range/legal_mass"], chance_in)
  assert "trained positions 1..8" in saved["table"] and "mass:ema" in saved["table"]
  for m in task_lib.METRICS:
    path = os.path.join(wd, "plots", f"othello_{m}.png")
    assert os.path.exists(path) and os.path.getsize(path) < 1_000_000


def test_restore_reproduces_in_loop_numbers(trained):
  wd, c, _ = trained
  with open(os.path.join(wd, f"eval_{c.steps}.json")) as f:
    in_loop = json.load(f)["results"]
  results = evaluation.run(wd, step=c.steps)
  assert set(results) == {"raw", "ema", "bema"}
  for name in results:
    for key in ("in_range/legal_mass", "out_of_range/kl", "in_range/top1_legal"):
      assert results[name][key] == pytest.approx(in_loop[name][key], rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(results[name]["per_position"]["kl"], in_loop[name]["per_position"]["kl"], rtol=1e-6)
  some = evaluation.run(wd, step=c.steps, weights="raw", lengths="3,8,9,40")
  assert some["raw"]["per_position"]["position"] == [3, 8, 9, 40]
  assert some["raw"]["in_range/legal_mass"] == pytest.approx(
      np.mean([in_loop["raw"]["per_position"]["legal_mass"][p - 1] for p in (3, 8)]), rel=1e-6
  )


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("task.train_len", 0, r"config\.task\.train_len=0"),
        ("task.train_len", 60, r"config\.task\.train_len=60"),
        ("task.num_games", 1, r"config\.task\.num_games=1"),
        ("task.val_fraction", 1.0, r"config\.task\.val_fraction=1\.0"),
        ("task.val_fraction", 0.0001, r"config\.task\.val_fraction"),
        ("task.eval_games", 1000, r"config\.task\.eval_games=1000"),
        ("task.eval_lengths", [0, 5], r"config\.task\.eval_lengths"),
        ("task.eval_lengths", [5, 5], r"config\.task\.eval_lengths"),
        ("model.num_heads", 3, r"config\.model\.num_heads=3"),
        ("model.context_len", 20, r"config\.model\.context_len=20"),
        ("model.dropout", 1.0, r"config\.model\.dropout"),
        ("batch_size", 10_000, r"config\.batch_size=10000"),
    ],
)
def test_bad_config_fails_before_compilation(data_dir, field, value, match):
  c = tiny_config(data_dir)
  node = c
  parts = field.split(".")
  for p in parts[:-1]:
    node = node[p]
  node[parts[-1]] = value
  with pytest.raises(ValueError, match=match):
    trainer.build(c)


def test_config_presets_and_options():
  c = get_config("default,dropout,bema")
  assert c.model.dropout == 0.1 and c.weight_ema.kind == "bema" and c.weight_ema.burn_in == 200
  assert get_config("paper").model.width == 512 and get_config("paper").model.num_layers == 8
  assert get_config("bema").weight_ema.kind == "bema"
  ema = get_config("tiny,ema").weight_ema
  assert ema.kind == "ema" and ema.decay == 0.9 and ema.burn_in == 20
  # Every preset keeps EMA and BEMA side by side, BEMA's burn-in inside the run.
  for arg, burn_in in (("default", 200), ("cpu_hour", 400), ("rules", 3200), ("paper", 2000), ("tiny", 20)):
    c = get_config(arg)
    assert c.weight_ema.kind == "ema,bema" and c.weight_ema.burn_in == burn_in < c.steps
    assert c.model.norm_position == "post"
    task_lib.validate_config(c)
  with pytest.raises(ValueError, match="preset"):
    get_config("huge")


# ------------------------------------------------------------------------------------- comparison driver


@pytest.mark.slow
def test_compare_pairs_raw_ema_and_bema_of_one_run_per_seed(tmp_path, data_dir):
  from experiments import othello_compare

  c = tiny_config(data_dir)
  c.steps = 30
  c.task.eval_games = 20
  logged = []
  summary = othello_compare.compare(
      c,
      str(tmp_path / "w"),
      seeds=[0, 1],
      dropouts=[0.0],
      results=str(tmp_path / "r"),
      command="cmd x",
      log=logged.append,
  )
  assert logged == ["== s0_d0: training 30 steps, averages ema,bema", "== s1_d0: training 30 steps, averages ema,bema"]
  entry = summary["0"]["metrics"]["out_of_range/kl"]
  assert set(entry["values"]) == {"raw", "ema", "bema", "raw@T", "ema@T", "bema@T"}
  assert set(entry["paired"]) == {"ema", "bema"}
  for k in ("ema", "bema"):
    p = entry["paired"][k]
    assert p["seeds"] == 2 and p["ci95"][0] <= p["mean"] <= p["ci95"][1]
  # Temperature control: raw@T against raw (sharpening only), each average at its T against raw at its T.
  assert {k: p["base"] for k, p in entry["tempered"].items()} == {"raw@T": "raw", "ema@T": "raw@T", "bema@T": "raw@T"}
  assert set(summary["0"]["temperature"]) == {"raw", "ema", "bema"}
  assert all(t["min"] > 0 for t in summary["0"]["temperature"].values())
  md = (tmp_path / "r" / "summary.md").read_text()
  assert "Command: `cmd x`" in md and "post-norm" in md and "load average" in md and "CPU cores" in md
  assert "Δ ema - raw [95% CI], better" in md and "Δ bema - raw [95% CI], better" in md
  rows = [l for l in md.splitlines() if l.startswith("| out | kl |")]
  assert len(rows) == 1 and rows[0].count("±") == 3  # raw, ema, bema
  rows = [l for l in md.splitlines() if l.startswith("| out | kl@T |")]
  assert len(rows) == 1 and rows[0].count("±") == 3 and "Δ raw@T - raw (sharpening only)" in md
  csv_text = (tmp_path / "r" / "runs.csv").read_text()
  assert csv_text.count("\ns0_d0,") == 3 and ",bema," in csv_text and ",temperature," in csv_text
  assert (tmp_path / "r" / "plots" / "othello_compare_deltas.png").exists()
  # Rerunning reuses the finished runs; a config with other averages than the runs' is refused.
  logged.clear()
  othello_compare.compare(c, str(tmp_path / "w"), seeds=[0, 1], dropouts=[0.0], plots=False, log=logged.append)
  assert logged == []
  c.weight_ema.kind = "none"
  with pytest.raises(ValueError, match="at least one average"):
    othello_compare.compare(c, str(tmp_path / "w"), seeds=[0], dropouts=[0.0], plots=False)
