"""Damaged and mismatched checkpoints on the real set-complement task (in-process runs).

An unreadable step is moved aside (never deleted) and the run resumes from the newest readable one and
finishes with the metrics and evaluation of an uninterrupted run; a checkpoint of another config is
refused before the workdir changes; a damaged data position is a clear error. Flipped bytes, which orbax
restores without an error, fail the per-array checksums (the checksum itself: tests/test_checksums.py).
Every test here trains for real: the slow set.
"""

import json
import os
import shutil

import pytest

import fault_configs as fc
from experiments import fault_drill
from ema_jax import checkpoint as ckpt_lib
from ema_jax import checksums
from ema_jax import errors, trainer
from test_cli import assert_one_line_error, script

pytestmark = pytest.mark.slow  # damaged checkpoints, each a real training run and restore (minutes): the slow set

CFG = "configs/set_complement.py"


def sc_config(**extra):
  return fc.config(CFG, **{**fc.SET_COMPLEMENT, **extra})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("reference"))
  trainer.train(sc_config(), wd)
  return wd


# The drill's damage, so the tests and the drill break checkpoints the same way.
truncate_array_file = fault_drill.truncate_arrays
delete_metadata = fault_drill.delete_metadata
half_written = fault_drill.half_written
flip_bytes = fault_drill.flip_bytes
snapshot = fault_drill.snapshot


@pytest.mark.parametrize("damage", [truncate_array_file, delete_metadata, half_written])
@pytest.mark.parametrize("where", ["newest", "newest_and_older"])
def test_unreadable_step_is_set_aside_and_the_run_finishes_identically(reference, tmp_path, damage, where, capsys):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  os.remove(os.path.join(wd, "eval_40.json"))  # as if the run had stopped at its last checkpoint
  damaged = [40] if where == "newest" else [40, 30]
  for step in damaged:
    damage(os.path.join(wd, "checkpoints", str(step)))
  capsys.readouterr()
  trainer.train(sc_config(), wd)
  out = capsys.readouterr().out
  warnings = [l for l in out.splitlines() if "moved it aside" in l]
  assert len(warnings) == len(damaged), out
  assert f"start step {min(damaged) - 10}" in out
  names = os.listdir(os.path.join(wd, "checkpoints"))
  for step in damaged:
    assert len([n for n in names if n.startswith(f"{step}.unreadable-")]) == 1, names
  assert sorted(int(n) for n in names if n.isdigit()) == [10, 20, 30, 40]  # saved again when reached
  assert fc.read_metrics(wd) == fc.read_metrics(reference)
  assert fc.read_eval(wd, 40) == fc.read_eval(reference, 40)
  # A rerun now finds the run finished: nothing is trained, written or moved.
  before = snapshot(wd)
  trainer.train(sc_config(), wd)
  assert "this run is finished" in capsys.readouterr().out
  assert snapshot(wd) == before


@pytest.mark.parametrize(
    "field,value", [("model.embed_dim", 32), ("optim.lr", 1e-3), ("seed", 1), ("task.train_max_size", 3)]
)
def test_checkpoint_of_another_config_is_refused_before_anything_is_written(reference, tmp_path, field, value):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  before = snapshot(wd)
  with pytest.raises(errors.ConfigMismatchError) as info:
    trainer.train(sc_config(**{field: value}), wd)
  message = str(info.value)
  assert field in message and "new workdir" in message and "nothing was changed" in message
  assert snapshot(wd) == before


def test_allow_config_change_resumes_a_non_structural_change(reference, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  with pytest.raises(errors.ConfigMismatchError, match="allow_config_change"):
    trainer.train(sc_config(**{"optim.lr": 1e-3, "steps": 50}), wd)
  result = trainer.train(sc_config(**{"optim.lr": 1e-3, "steps": 50}), wd, allow_config_change=True)
  assert result["status"] == "done" and max(fc.read_metrics(wd)) == 50
  # A structural change stays refused even when allowed.
  with pytest.raises(errors.ConfigMismatchError, match="structure"):
    trainer.train(sc_config(**{"model.embed_dim": 32, "steps": 60}), wd, allow_config_change=True)


def test_safe_changes_resume(reference, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  trainer.train(
      sc_config(steps=48, log_every=3, eval_every=24, checkpoint_every=8, **{"task.eval_examples": 32, "mesh.data": 1}),
      wd,
  )
  assert max(fc.read_metrics(wd)) == 48


@pytest.mark.parametrize(
    "edit,match",
    [
        ({}, "no data position"),
        ({"step": -3}, "not a step-counter position"),
        ({"step": 7}, "batch 7"),
        ({"position": 40}, "not a step-counter position"),
    ],
)
def test_damaged_data_position_is_an_error(reference, tmp_path, edit, match):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  os.remove(os.path.join(wd, "eval_40.json"))
  with open(os.path.join(wd, "checkpoints", "40", "data", "metadata"), "w") as f:
    json.dump(edit, f)
  with pytest.raises(errors.DataStateError, match=match):
    trainer.train(sc_config(), wd)


def test_records_of_another_config_without_checkpoints_are_refused(tmp_path):
  wd = str(tmp_path / "wd")
  trainer.train(sc_config(checkpoint_every=0), wd)  # a run that keeps no checkpoint
  before = snapshot(wd)
  with pytest.raises(errors.ConfigMismatchError, match="config.json"):
    trainer.train(sc_config(checkpoint_every=0, seed=3), wd)
  assert snapshot(wd) == before


@pytest.fixture(scope="module")
def wide_reference(tmp_path_factory):
  """A run whose arrays exceed orbax's 1 KiB inline limit, so they sit in data files without a crc."""
  wd = str(tmp_path_factory.mktemp("wide"))
  trainer.train(sc_config(**WIDE), wd)
  return wd


WIDE = {"model.embed_dim": 32, "model.value_dim": 32}


def test_flipped_bytes_are_set_aside_and_the_run_finishes_identically(wide_reference, tmp_path, capsys):
  wd = str(tmp_path / "wd")
  shutil.copytree(wide_reference, wd)
  os.remove(os.path.join(wd, "eval_40.json"))
  flip_bytes(os.path.join(wd, "checkpoints", "40"))
  capsys.readouterr()
  trainer.train(sc_config(**WIDE), wd)
  out = capsys.readouterr().out
  warnings = [l for l in out.splitlines() if "moved it aside" in l]
  assert len(warnings) == 1 and "step 40 fails its checksums" in warnings[0], out
  assert "start step 30" in out
  names = os.listdir(os.path.join(wd, "checkpoints"))
  assert len([n for n in names if n.startswith("40.unreadable-")]) == 1, names
  assert fc.read_metrics(wd) == fc.read_metrics(wide_reference)
  assert fc.read_eval(wd, 40) == fc.read_eval(wide_reference, 40)


def test_checkpoint_without_checksums_restores_and_an_edited_one_is_named(wide_reference, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(wide_reference, wd)
  setup = trainer.build(sc_config(**WIDE))
  ckpt = ckpt_lib.Checkpointer(wd, async_save=False)
  state, _, _ = ckpt.restore(40, setup.abstract_state)
  sums = ckpt.read_json(40, "checksums")
  assert sums == checksums.state_checksums(state) and "params/embed/embedding/value" in sums
  # A checkpoint written before checksums existed restores, unverified.
  shutil.rmtree(os.path.join(wd, "checkpoints", "40", "checksums"))
  assert checksums.state_checksums(ckpt.restore(40, setup.abstract_state)[0]) == sums
  # One changed value is named, with its step.
  edited = {**ckpt.read_json(30, "checksums"), "step": "0" * 16}
  with open(os.path.join(wd, "checkpoints", "30", "checksums", "metadata"), "w") as f:
    json.dump(edited, f)
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match=r"step 30 fails its checksums .* in step$"):
    ckpt.restore(30, setup.abstract_state)


def test_eval_of_a_flipped_checkpoint_is_one_line_and_writes_nothing(wide_reference, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(wide_reference, wd)
  flip_bytes(os.path.join(wd, "checkpoints", "40"))
  before = snapshot(wd)
  error = assert_one_line_error(script("eval.py", "--workdir", wd), "checkpoint", "step 40 fails its checksums")
  assert "checkpoints/40: " in error and "/value" in error  # the step and the first damaged array
  assert snapshot(wd) == before  # no eval JSON, nothing moved: eval.py only reads
