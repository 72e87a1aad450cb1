"""Orbax checkpoints: the train state, the data position, the loop's host state and the config.

Layout: <workdir>/checkpoints/<step>/{state, data, loop, config, checksums}. `state` is the sharded
train state (orbax StandardSave, written asynchronously); `data` is the data iterator's *global*
position (merged over processes, so any process layout can restore it); `loop` is the trainer's host
state (the running averages of the current log window); `config` the run's config as JSON; `checksums`
maps each array's path to a 64-bit checksum of its bits (state_checksums).

Why our own checksums: orbax 0.12.8 writes arrays as zarr3 with codecs hard-coded in
tensorstore_utils._build_zarr3_metadata (crc32c on each shard's *index* only, none on the chunk data)
and offers no option to add one, and only OCDBT's B-tree nodes (which hold arrays under 1 KiB inline)
carry a crc32c. Bytes flipped inside a larger array's data therefore restore silently as other numbers.

Guarantees (tested in tests/test_checkpoint_faults.py and tests/test_multihost.py):
- Every array's bits are verified on restore (restore_state, so training resume and eval.py alike):
  the checksum recorded at save is recomputed on the restored arrays, on device, and a mismatch is an
  unreadable step (below), named with the first differing arrays. The checksum is a wrapped uint32 sum
  over the array's 32-bit words of murmur3-mixed (word, flat index), with two seeds: exact on any mesh
  or process count (integer addition is order-free), sure to change when any one word changes (the
  mix is a bijection of the word), and two changed words cancel with odds ~2**-64. Checkpoints from
  before checksums (no `checksums` item) restore unverified.
- A checkpoint that is present but unreadable (truncated or missing files, a half-written step, a
  checksum mismatch) is renamed `<step>.unreadable-<time>` with a one-line warning and the next older
  one is tried; nothing is deleted, and the renamed step can be saved again when the run reaches it.
- A checkpoint saved with a different config is refused before anything in the workdir is written,
  listing the differing fields (config_differences); fields that are safe to change on resume
  (SAFE_TO_CHANGE) are ignored. With allow_config_change, other differences are accepted as long as the
  saved state has exactly this run's structure (names, shapes, dtypes).
- Restoring always targets abstract arrays that carry the *current* mesh's shardings, so a run resumes
  on another mesh or process count.
- With several processes, every decision (readable or not, refused or not) is taken from what all
  processes saw, so they never diverge; only process 0 renames.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ema_jax import checksums, errors, write_errors

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "loop", "config", "checksums")
# Config fields that may change between a run and its resume: cadence, length, mesh and evaluation.
# Everything else (model, data, batch, seed, optimizer, task) changes the state or the data stream.
SAFE_TO_CHANGE = (
    "steps",
    "log_every",
    "eval_every",
    "eval_steps",
    "checkpoint_every",
    "checkpoint_every_seconds",
    "keep_checkpoints",
    "mesh",
)


class CorruptCheckpointError(errors.UserError):
  """A checkpoint step that cannot be read."""


CheckpointWriteError = write_errors.CheckpointWriteError
is_disk_full = errors.is_disk_full
write_error_message = write_errors.message


def _is_safe(path: str) -> bool:
  top = path.split(".")[0]
  leaf = path.split(".")[-1]
  return top in SAFE_TO_CHANGE or leaf.startswith("eval")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def config_differences(saved: Dict[str, Any], now: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
  """[(field, saved value, new value)] for fields that differ and are not safe to change on resume."""
  a, b = _flatten(saved), _flatten(now)
  missing = object()
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, missing), b.get(k, missing)
    if va != vb and not _is_safe(k):
      out.append((k, "(absent)" if va is missing else va, "(absent)" if vb is missing else vb))
  return out


def _all_processes(ok: bool) -> bool:
  """True only if `ok` holds on every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  got = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
  return bool(np.all(np.asarray(got)))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


_path_name = checksums.path_name


def _state_differences(meta_tree: Any, abstract_state: Any) -> List[str]:
  """Names, shapes and dtypes of the saved state against this run's abstract state."""
  saved = {_path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(meta_tree)[0]}
  want = {_path_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  diffs = []
  for k in sorted(set(saved) | set(want)):
    if k not in saved:
      diffs.append(f"{k}: not in the checkpoint")
    elif k not in want:
      diffs.append(f"{k}: in the checkpoint but not in this run's state")
    else:
      s, w = saved[k], want[k]
      if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
        continue  # typed PRNG keys are stored as their raw uint32 data
      if tuple(getattr(s, "shape", ())) != tuple(w.shape) or np.dtype(getattr(s, "dtype", w.dtype)) != np.dtype(
          w.dtype
      ):
        diffs.append(
            f"{k}: saved {getattr(s, 'dtype', '?')}{list(getattr(s, 'shape', []))}, " f"now {w.dtype}{list(w.shape)}"
        )
  return diffs


class Checkpointer:
  """Keeps the last `keep` checkpoints under <workdir>/checkpoints/<step>/.

  Nothing is created on disk until the first save: reading and refusing happen first.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"config.keep_checkpoints={keep!r}: expected an integer >= 1.")
    # Local folders or buckets (gs://...): orbax reads and writes both through etils.epath.
    self.directory = (
        os.path.join(workdir, "checkpoints")
        if "://" in workdir
        else os.path.abspath(os.path.join(workdir, "checkpoints"))
    )
    self.keep, self.async_save = keep, async_save
    self._manager = None
    self._saving: Optional[int] = None

  # --------------------------------------------------------------------------------------------- reading

  def all_steps(self) -> List[int]:
    """Every step directory present (complete or not), oldest first."""
    d = epath.Path(self.directory)
    if not d.is_dir():
      return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())

  def step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def read_json(self, step: int, item: str) -> Dict[str, Any]:
    path = self.step_dir(step) / item / "metadata"
    try:
      value = json.loads(path.read_text())
    except FileNotFoundError as e:
      raise CorruptCheckpointError(f"checkpoint {self.step_dir(step)}: {item}/metadata is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
      raise CorruptCheckpointError(
          f"checkpoint {self.step_dir(step)}: {item}/metadata is unreadable " f"({type(e).__name__}: {str(e)[:200]})"
      ) from e
    if not isinstance(value, dict):
      raise CorruptCheckpointError(f"checkpoint {self.step_dir(step)}: {item}/metadata is not a JSON object")
    return value

  def _check_complete(self, step: int) -> None:
    d = self.step_dir(step)
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt"):
      if not (d / name).exists():
        raise CorruptCheckpointError(f"checkpoint {d}: {name} is missing (a half-written or damaged step)")

  def state_differences(self, step: int, abstract_state: Any) -> List[str]:
    try:
      with _quiet_absl():
        meta = ocp.StandardCheckpointer().metadata(self.step_dir(step) / "state")
      tree = getattr(meta, "item_metadata", meta)
      tree = getattr(tree, "tree", tree)
    except Exception as e:  # orbax raises many kinds for unreadable files
      raise CorruptCheckpointError(
          f"checkpoint {self.step_dir(step)}: state metadata unreadable " f"({type(e).__name__}: {str(e)[:200]})"
      ) from e
    if not jax.tree.leaves(tree):  # a garbled _METADATA reads as an empty tree
      raise CorruptCheckpointError(f"checkpoint {self.step_dir(step)}: state metadata lists no arrays")
    return _state_differences(tree, abstract_state)

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """The train state of `step`, placed on the shardings that `abstract_state` carries."""
    try:
      with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(self.step_dir(step) / "state", abstract_state)
      jax.block_until_ready(state)
    except Exception as e:  # orbax / tensorstore raise many kinds for unreadable files
      cause = _read_cause(e)
      raise CorruptCheckpointError(
          f"checkpoint {self.step_dir(step)}: arrays unreadable " f"({type(cause).__name__}: {_first_line(cause)})"
      ) from e
    self._verify(step, state)
    return state

  def _verify(self, step: int, state: Any) -> None:
    """CorruptCheckpointError where the restored arrays' checksums differ from those saved with them."""
    now = checksums.state_checksums(state)  # first: a collective, so every process must reach it
    if not (self.step_dir(step) / "checksums").exists():
      return  # saved before checkpoints carried checksums: nothing to verify against
    saved = self.read_json(step, "checksums")
    bad = [k for k, v in now.items() if saved.get(k) != v]
    if bad:
      more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
      raise CorruptCheckpointError(
          f"checkpoint {self.step_dir(step)}: step {step} fails its checksums (the bytes on disk changed "
          f"after they were written) in {', '.join(bad[:3])}{more}"
      )

  def read_config(self, step: int) -> Dict[str, Any]:
    return self.read_json(step, "config")

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
    """(state, data_state, config) of one step, for eval.py; CorruptCheckpointError if unreadable."""
    self._check_complete(step)
    config = self.read_config(step)
    diffs = self.state_differences(step, abstract_state)
    if diffs:
      raise errors.ConfigMismatchError(
          f"checkpoint {self.step_dir(step)} does not match the model its " f"config builds: {'; '.join(diffs[:5])}"
      )
    return self.restore_state(step, abstract_state), self.read_json(step, "data"), config

  # ------------------------------------------------------------------------------------ restore policy

  def set_aside(self, step: int, reason: str) -> Optional[str]:
    """Renames an unreadable step out of the way (process 0), so it is kept but never read again."""
    new = None
    if jax.process_index() == 0:
      src = self.step_dir(step)
      new = epath.Path(self.directory) / f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
      n = 1
      while new.exists():
        new = epath.Path(f"{new}.{n}")
        n += 1
      if src.exists():
        src.rename(new)
      print(f"WARNING: {reason}; moved it aside to {new} and trying an older checkpoint.", flush=True)
    _barrier(f"ema_jax_set_aside_{step}")
    return None if new is None else str(new)

  def restore_latest(
      self, abstract_state: Any, config: Dict[str, Any], allow_config_change: bool = False
  ) -> Optional[Tuple[int, Any, Dict[str, Any], Dict[str, Any]]]:
    """(step, state, data_state, loop_state) of the newest readable checkpoint, or None.

    Raises ConfigMismatchError (before anything is written) for a checkpoint of another config.
    """
    for step in reversed(self.all_steps()):
      saved_config, problem = None, None
      try:
        self._check_complete(step)
        saved_config = self.read_config(step)
        data_state = self.read_json(step, "data")
        loop_state = self.read_json(step, "loop") if (self.step_dir(step) / "loop").exists() else {}
      except CorruptCheckpointError as e:
        problem = str(e)
      if not _all_processes(problem is None):
        self.set_aside(step, problem or f"checkpoint {self.step_dir(step)} is unreadable on another process")
        continue
      self._check_config(step, saved_config, config, abstract_state, allow_config_change)
      problem = None
      try:
        state = self.restore_state(step, abstract_state)
      except CorruptCheckpointError as e:
        problem, state = str(e), None
      if not _all_processes(problem is None):
        self.set_aside(step, problem or f"checkpoint {self.step_dir(step)} is unreadable on another process")
        continue
      return step, state, data_state, loop_state
    return None

  def _check_config(self, step, saved, now, abstract_state, allow_config_change):
    diffs = config_differences(saved, now)
    try:
      structure = self.state_differences(step, abstract_state)
    except CorruptCheckpointError:
      structure = []  # unreadable metadata: the array restore reports it and sets the step aside
    if not diffs and not structure:
      return
    lines = [f"  {k}: saved {a!r}, now {b!r}" for k, a, b in diffs[:20]]
    if len(diffs) > 20:
      lines.append(f"  ... and {len(diffs) - 20} more")
    workdir = os.path.dirname(self.directory)
    if structure:
      detail = "\n".join(lines + [f"  state {s}" for s in structure[:10]])
      raise errors.ConfigMismatchError(
          f"{workdir} holds checkpoints (step {step}) of a run whose state has another structure; nothing "
          f"was changed in it. Differences:\n{detail}\nTrain this config in a new workdir (--workdir), or "
          f"rerun with the saved config to resume that run."
      )
    if allow_config_change:
      print(
          f"WARNING: resuming step {step} with a changed config (--allow_config_change):\n" + "\n".join(lines),
          flush=True,
      )
      return
    raise errors.ConfigMismatchError(
        f"{workdir} holds checkpoints (step {step}) of a run with another config; nothing was changed in "
        "it. Differing fields:\n" + "\n".join(lines) + "\nEither train in a new workdir (--workdir), or "
        "resume with these changes on purpose with --allow_config_change (allowed only where the state "
        "keeps its structure)."
    )

  # ---------------------------------------------------------------------------------------------- saving

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self.keep, create=True, enable_async_checkpointing=self.async_save
      )
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    return self._manager

  def save(
      self, step: int, state: Any, data_state: Dict[str, Any], loop_state: Dict[str, Any], config: Dict[str, Any]
  ) -> None:
    """Starts an async save; device arrays are copied to host before this returns, so the caller may
    donate `state` to the next step right away (the checksums are on the host too). Every process
    calls it."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        loop=ocp.args.JsonSave(loop_state),
        config=ocp.args.JsonSave(config),
        checksums=ocp.args.JsonSave(checksums.state_checksums(state)),
    )
    self._saving = step  # the newest save started (the one a background failure belongs to)
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      if errors.root_os_error(e) is None:
        raise
      self._write_failed(e, step)

  def check_saved(self) -> None:
    """Raises CheckpointWriteError if a background save has failed (a cheap check, every step)."""
    if self._manager is None:
      return
    try:
      self._manager.check_for_errors()
    except Exception as e:  # orbax re-raises whatever its commit thread met
      self._write_failed(e, self._saving)

  def _write_failed(self, e: BaseException, step: Optional[int] = None):
    manager, self._manager = self._manager, None
    if manager is not None:
      try:
        manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # the save has failed already; its own error is the one to report
    raise CheckpointWriteError(write_error_message(self.directory, e, step, self.all_steps())) from e

  def close(self) -> None:
    if self._manager is not None:
      try:
        self._manager.wait_until_finished()
        self._manager.check_for_errors()
      except Exception as e:  # pylint: disable=broad-except
        self._write_failed(e, self._saving)
      self._manager.close()
      self._manager = None


class _quiet_absl:
  """Orbax warns through absl about files it does not need (e.g. per-item _CHECKPOINT_METADATA)."""

  def __enter__(self):
    self._logger = logging.getLogger("absl")
    self._level = self._logger.level
    self._logger.setLevel(max(self._level, logging.ERROR))

  def __exit__(self, *exc):
    self._logger.setLevel(self._level)


def _read_cause(e: BaseException) -> BaseException:
  """The tensorstore error under orbax's "Encountered error while reading array index ... TensorStore
  details: <spec dump>" wrapper, which names the file and the byte range that could not be read."""
  if str(e).startswith("Encountered error while reading array index") and e.__cause__ is not None:
    return e.__cause__
  return e


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


def read_config(workdir: str, step: Optional[int] = None) -> Dict[str, Any]:
  """The config JSON saved with a checkpoint (the newest by default), without restoring arrays."""
  ckpt = Checkpointer(workdir, keep=1)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(
        f"no checkpoints in {ckpt.directory}: train first " f"(python train.py --config ... --workdir {workdir})."
    )
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"--step={step}: no checkpoint for it in {ckpt.directory}; available: {steps}.")
  return ckpt.read_config(step)
