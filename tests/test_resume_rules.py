"""What a rerun may change, and records that a crash tore, on the real set-complement task (in-process).

- `steps` below the newest checkpoint is refused with the workdir unchanged (it used to relabel the
  newest weights' evaluation as the lower step's).
- Every kind of field that --allow_config_change accepts takes effect from the resumed step: the
  optimizer's (rebuilt from the config), the weight average's decay (data in the state, reset from the
  config), the weight average's python settings (BEMA's burn-in), and the model's dropout, as a constant
  of the program and as traced model state. Fields that define the data or random streams are refused.
- A torn row of metrics.jsonl is reported and, for an evaluation row, rebuilt from its eval JSON, on a
  resume and on the rerun of a finished run.
- checkpoint_every_seconds saves at steps that checkpoint_every does not, and the run's records equal an
  uninterrupted run's.
- A run with no checkpoint left but old metrics says that they are being replaced.
"""

import os
import shutil

import jax
import numpy as np
import pytest

import fault_configs as fc
from experiments import fault_drill
from ema_jax import checkpoint as ckpt_lib
from ema_jax import errors, trainer, workdir as workdir_lib

pytestmark = pytest.mark.slow  # resume rules, each trains, stops and resumes for real (minutes): the slow set

CFG = "configs/set_complement.py"
snapshot = fault_drill.snapshot


def sc_config(**extra):
  return fc.config(CFG, **{**fc.SET_COMPLEMENT, **extra})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("reference"))
  trainer.train(sc_config(), wd)
  return wd


@pytest.fixture(scope="module")
def half(reference, tmp_path_factory):
  """The reference run as if it had stopped right after checkpoint 20."""
  wd = str(tmp_path_factory.mktemp("half") / "wd")
  stop_at(reference, wd, 20)
  return wd


def stop_at(src, wd, step):
  shutil.copytree(src, wd)
  for name in os.listdir(os.path.join(wd, "checkpoints")):
    if int(name) > step:
      shutil.rmtree(os.path.join(wd, "checkpoints", name))
  for name in os.listdir(wd):
    if name.startswith("eval_") and int(name[5:].split(".")[0]) > step:
      os.remove(os.path.join(wd, name))
  workdir_lib.write_metrics(wd, [r for r in workdir_lib.read_metrics(wd) if r["step"] <= step])


def copy(src, tmp_path, name="wd"):
  wd = str(tmp_path / name)
  shutil.copytree(src, wd)
  return wd


def restored_state(wd, config, step):
  setup = trainer.build(config)
  state, _, _ = ckpt_lib.Checkpointer(wd).restore(step, setup.abstract_state)
  return state


def test_steps_below_the_newest_checkpoint_is_refused(reference, tmp_path):
  wd = copy(reference, tmp_path)
  before = snapshot(wd)
  with pytest.raises(errors.UserError) as info:
    trainer.train(sc_config(steps=30), wd)
  message = str(info.value)
  assert "config.steps=30" in message and "step 40" in message and "nothing was changed" in message
  assert snapshot(wd) == before


def rows_after(wd, step):
  return {s: r for s, r in fc.read_metrics(wd).items() if s > step}


def rows_upto(wd, step):
  return {s: r for s, r in fc.read_metrics(wd).items() if s <= step}


def test_changed_learning_rate_takes_effect(reference, half, tmp_path):
  wd = copy(half, tmp_path)
  trainer.train(sc_config(**{"optim.lr": 1e-3}), wd, allow_config_change=True)
  assert rows_upto(wd, 20) == rows_upto(reference, 20)
  after = rows_after(wd, 20)
  ref_after = rows_after(reference, 20)
  train_steps = [s for s in after if "lr" in after[s] and s > 21]  # row 21 averages steps 19-21
  assert train_steps
  for s in train_steps:  # the same schedule scaled from a peak of 3e-3 to 1e-3
    assert after[s]["lr"] == pytest.approx(ref_after[s]["lr"] / 3, rel=1e-5)
    assert after[s]["loss"] != ref_after[s]["loss"]


def test_changed_ema_decay_takes_effect(reference, half, tmp_path):
  wd = copy(half, tmp_path)
  config = sc_config(**{"weight_ema.decay": 0.99})
  trainer.train(config, wd, allow_config_change=True)
  state = restored_state(wd, config, 40)
  assert float(state["ema"]["ema"].decay) == pytest.approx(0.99)
  got, want = fc.read_eval(wd, 40), fc.read_eval(reference, 40)
  assert got["raw"] == want["raw"] and got["bema"] == want["bema"]  # only the EMA changed
  assert got["ema"] != want["ema"]


def test_changed_bema_burn_in_takes_effect(reference, half, tmp_path):
  wd = copy(half, tmp_path)
  trainer.train(sc_config(**{"weight_ema.burn_in": 30}), wd, allow_config_change=True)
  got, want = fc.read_eval(wd, 40), fc.read_eval(reference, 40)
  assert got["raw"] == want["raw"] and got["ema"] == want["ema"]
  assert got["bema"] != want["bema"]


@pytest.mark.parametrize("traced", [False, True])
def test_changed_dropout_takes_effect(tmp_path, traced):
  base = dict(**{"model.traced_dropout": traced})
  unchanged = str(tmp_path / "unchanged")
  trainer.train(sc_config(**base), unchanged)
  changed = str(tmp_path / "changed")
  stop_at(unchanged, changed, 20)
  config = sc_config(**base, **{"model.dropout": 0.3})
  trainer.train(config, changed, allow_config_change=True)
  assert rows_upto(changed, 20) == rows_upto(unchanged, 20)
  a, b = rows_after(changed, 20), rows_after(unchanged, 20)
  assert all(a[s]["loss"] != b[s]["loss"] for s in a if "loss" in a[s])
  if traced:  # the rate is model state: the resumed run's state holds the new one
    rates = jax.tree.leaves(restored_state(changed, config, 40)["other"])
    assert np.allclose(np.asarray(rates[0]), [0.3, 0.0, 0.0])


@pytest.mark.parametrize("field,value", [("seed", 1), ("batch_size", 16), ("task.train_max_size", 3)])
def test_fields_of_the_data_and_random_streams_are_refused_even_when_allowed(half, tmp_path, field, value):
  wd = copy(half, tmp_path)
  before = snapshot(wd)
  with pytest.raises(errors.ConfigMismatchError) as info:
    trainer.train(sc_config(**{field: value}), wd, allow_config_change=True)
  assert field in str(info.value) and "cannot change on a resume" in str(info.value)
  assert snapshot(wd) == before


def tear_last_line(wd):
  path = os.path.join(wd, workdir_lib.METRICS_FILE)
  with open(path) as f:
    lines = f.readlines()
  last = lines[-1]
  with open(path, "w") as f:
    f.writelines(lines[:-1] + [last[: len(last) // 2]])
  return last


def test_torn_eval_row_at_the_resume_step_is_rebuilt(reference, tmp_path, capsys):
  wd = copy(reference, tmp_path)
  # As if the run had stopped at step 20 right after its eval there: the last row is step 20's eval row.
  for step in (30, 40):
    shutil.rmtree(os.path.join(wd, "checkpoints", str(step)))
  os.remove(os.path.join(wd, "eval_40.json"))
  rows = workdir_lib.read_metrics(wd)
  cut = max(i for i, r in enumerate(rows) if r["step"] == 20 and any(k.startswith("eval/") for k in r))
  workdir_lib.write_metrics(wd, rows[: cut + 1])
  tear_last_line(wd)
  capsys.readouterr()
  trainer.train(sc_config(), wd)
  out = capsys.readouterr().out
  warnings = [l for l in out.splitlines() if "is torn" in l]
  assert len(warnings) == 1 and "rebuilt" in warnings[0] and "eval_20.json" in warnings[0], out
  assert fc.read_metrics(wd) == fc.read_metrics(reference)


def test_torn_last_row_of_a_finished_run_is_repaired_on_rerun(reference, tmp_path, capsys):
  wd = copy(reference, tmp_path)
  tear_last_line(wd)  # the final eval row
  capsys.readouterr()
  trainer.train(sc_config(), wd)
  out = capsys.readouterr().out
  assert "this run is finished" in out and "rebuilt" in out
  assert fc.read_metrics(wd) == fc.read_metrics(reference)


def test_torn_train_row_is_reported_and_logged_again(reference, tmp_path, capsys):
  wd = copy(reference, tmp_path)
  for step in (30, 40):
    shutil.rmtree(os.path.join(wd, "checkpoints", str(step)))
  os.remove(os.path.join(wd, "eval_40.json"))
  rows = workdir_lib.read_metrics(wd)
  cut = max(i for i, r in enumerate(rows) if r["step"] == 24)  # a train row past checkpoint 20
  workdir_lib.write_metrics(wd, rows[: cut + 1])
  tear_last_line(wd)
  capsys.readouterr()
  trainer.train(sc_config(), wd)
  out = capsys.readouterr().out
  assert len([l for l in out.splitlines() if "is torn" in l and "dropped" in l]) == 1, out
  assert fc.read_metrics(wd) == fc.read_metrics(reference)


def test_checkpoint_every_seconds(reference, tmp_path):
  wd = str(tmp_path / "wd")
  # A step takes milliseconds: an interval of 0 s would save at every step; 1e-9 s saves whenever a step
  # has passed since the last save, so every step is a time-based save, decided inside the step.
  trainer.train(sc_config(checkpoint_every=1000, keep_checkpoints=100, checkpoint_every_seconds=1e-9), wd)
  steps = ckpt_lib.Checkpointer(wd).all_steps()
  assert len(steps) > 10 and steps[-1] == 40, steps
  assert any(s % 10 for s in steps)
  assert fc.read_metrics(wd) == fc.read_metrics(reference)
  assert fc.read_eval(wd, 40) == fc.read_eval(reference, 40)
  # A resume from one of them (the newest two removed) finishes identically.
  for s in steps[-2:]:
    shutil.rmtree(os.path.join(wd, "checkpoints", str(s)))
  os.remove(os.path.join(wd, "eval_40.json"))
  trainer.train(sc_config(checkpoint_every=1000, keep_checkpoints=100, checkpoint_every_seconds=1e-9), wd)
  assert fc.read_metrics(wd) == fc.read_metrics(reference)


def test_checkpoint_every_seconds_is_validated():
  with pytest.raises(ValueError, match="checkpoint_every_seconds"):
    trainer.validate_config(sc_config(checkpoint_every_seconds=-1.0))


def test_old_metrics_without_checkpoints_are_replaced_with_a_warning(reference, tmp_path, capsys):
  wd = copy(reference, tmp_path)
  shutil.rmtree(os.path.join(wd, "checkpoints"))
  capsys.readouterr()
  trainer.train(sc_config(), wd)
  out = capsys.readouterr().out
  assert len([l for l in out.splitlines() if "is being replaced" in l]) == 1, out
  assert fc.read_metrics(wd) == fc.read_metrics(reference)


def test_which_fields_may_change_on_a_resume():
  from ema_jax import resume

  for field in ("optim.lr", "optim.b2", "weight_ema.decay", "weight_ema.burn_in", "model.dropout"):
    assert resume.changeable(field), field
  for field in ("seed", "batch_size", "task.train_max_size", "data.path", "model.init_std"):
    assert not resume.changeable(field), field


def test_non_finite_loss_right_after_a_restore_names_the_checkpoint(half, tmp_path):
  wd = copy(half, tmp_path)
  with pytest.raises(trainer.NonFiniteError) as info:
    trainer.train(sc_config(**{"optim.lr": 1e30}), wd, allow_config_change=True)
  message = str(info.value)
  assert "resumed from the checkpoint of step 20" in message and os.path.join("checkpoints", "20") in message
  assert ckpt_lib.Checkpointer(wd).all_steps() == [10, 20]  # nothing non-finite was saved
