"""Orbax checkpoints: the whole train state, the data iterator's position and the config, saved
asynchronously; restored onto an abstract target that carries the *current* mesh's shardings.

A step directory is only visible to orbax once its save has finished (orbax writes to a temporary
directory and renames it on commit), so a run killed mid-save leaves no half checkpoint behind. A
checkpoint that is present but unreadable (truncated or garbled files) is reported and skipped in favour
of the next older one; it is never loaded silently.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
  pass


class Checkpointer:
  """Keeps the last `keep` checkpoints under <workdir>/checkpoints/<step>/{state,data,config}."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"config.keep_checkpoints={keep!r}: expected an integer >= 1.")
    # Local folders or buckets (gs://...): orbax reads and writes both through etils.epath.
    self.directory = (os.path.join(workdir, "checkpoints") if "://" in workdir
                      else os.path.abspath(os.path.join(workdir, "checkpoints")))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Optional[Dict[str, Any]], config: Dict[str, Any]) -> None:
    """Starts an async save; device arrays are copied to host before this returns, so the caller may
    donate `state` to the next step right away."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(config))
    self.manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
    """Restores one step onto `abstract_state` (jax.ShapeDtypeStruct leaves with shardings)."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore())
    try:
      out = self.manager.restore(step, args=args)
    except Exception as e:  # orbax raises many kinds for unreadable files
      raise CorruptCheckpointError(
          f"checkpoint {os.path.join(self.directory, str(step))} could not be read: {type(e).__name__}: "
          f"{str(e)[:500]}") from e
    _check_finite_structure(out.state, abstract_state, step, self.directory)
    return out.state, dict(out.data or {}), dict(out.config or {})

  def restore_latest(self, abstract_state: Any):
    """(step, state, data_state, config) from the newest readable checkpoint, or None if there is none.

    Unreadable checkpoints are reported (logged as errors) and skipped.
    """
    for step in reversed(self.all_steps()):
      try:
        state, data, config = self.restore(step, abstract_state)
        return step, state, data, config
      except CorruptCheckpointError as e:
        log.error("%s -- skipping it and trying an older checkpoint.", e)
        print(f"ERROR: {e} -- skipping it and trying an older checkpoint.", flush=True)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_finite_structure(state, abstract_state, step, directory):
  got = jax.tree.structure(state)
  want = jax.tree.structure(abstract_state)
  if got != want:
    raise CorruptCheckpointError(f"checkpoint {directory}/{step} has a different state structure than this run.")
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)):
    if a.shape != b.shape:
      raise CorruptCheckpointError(f"checkpoint {directory}/{step}: array of shape {a.shape} where this run "
                                   f"expects {b.shape}.")


def read_config(workdir: str, step: Optional[int] = None) -> Dict[str, Any]:
  """The config JSON saved with a checkpoint (the latest by default), without restoring arrays."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoints in {directory}: train first (python train.py --workdir {workdir}).")
  steps = sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {directory}.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"--step={step}: no checkpoint for it in {directory}; available: {steps}.")
  files = [f for f in (directory / str(step) / "config").iterdir() if f.is_file()]
  if not files:
    raise CorruptCheckpointError(f"checkpoint {directory}/{step} has no saved config.")
  try:
    return json.loads(files[0].read_text())
  except json.JSONDecodeError as e:
    raise CorruptCheckpointError(f"checkpoint {directory}/{step}: config is not valid JSON ({e}).") from e
