"""The contract between one experiment (a Task) and the generic trainer.

A Task owns data, model, loss and evaluation metrics for one experiment; the trainer owns the mesh, the
jitted step, optimizer, weight EMA, checkpoints and logging, and never imports a specific model.

Batches are dicts of NumPy arrays holding this process's rows of the global batch (leading axis =
global_batch // process_count). The trainer turns them into global jax.Arrays sharded over the mesh.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from flax import nnx

from ema_jax.errors import DataStateError, is_int

Batch = Dict[str, np.ndarray]
Metrics = Dict[str, jax.Array]


class BatchIterator(abc.ABC):
  """An endless iterator of process-local batches whose position can be saved and restored exactly."""

  @abc.abstractmethod
  def __next__(self) -> Batch:
    ...

  def __iter__(self):
    return self

  @abc.abstractmethod
  def get_state(self) -> Dict[str, Any]:
    """A JSON-serialisable position."""

  @abc.abstractmethod
  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a position that merge_states produced (the whole run's position, all processes)."""

  @staticmethod
  def merge_states(states: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The whole run's position from every process's get_state(), in process order. The default
    suits iterators whose position is already global (e.g. a step counter): all parts must agree."""
    first = dict(states[0])
    for i, s in enumerate(states[1:], 1):
      if dict(s) != first:
        raise RuntimeError(
            f"data positions differ between process 0 ({str(first)[:200]}) and process {i} "
            f"({str(dict(s))[:200]}): this iterator's position is not global; give it a "
            f"merge_states."
        )
    return first


class StepBatchIterator(BatchIterator):
  """A BatchIterator whose whole position is its step counter (batches are a pure function of it)."""

  step: int = 0

  def get_state(self) -> Dict[str, Any]:
    return {"step": int(self.step)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    step = state.get("step") if isinstance(state, Mapping) else None
    if not is_int(step) or step < 0 or set(state) != {"step"}:
      raise DataStateError(
          f"saved data position {str(state)[:200]!r} is not a step-counter position "
          f"{{'step': n >= 0}}; the checkpoint's data/metadata was damaged or edited. "
          f"Resume from another checkpoint or train in a new workdir."
      )
    self.step = int(step)


@dataclass
class EvalContext:
  """What a task's evaluation needs from the trainer."""

  put_batch: Callable[[Batch], Dict[str, jax.Array]]  # process-local numpy -> global sharded arrays
  process_index: int
  process_count: int
  workdir: Optional[str]
  final: bool = False  # the run's final evaluation or eval.py (a task may evaluate more there, e.g. whole splits)


class Task(abc.ABC):
  """Data + model + loss + eval metrics for one experiment, built from the full config."""

  # The config.task field that eval.py --lengths sets (set sizes, context lengths, positions...).
  EVAL_LENGTHS_FIELD = "eval_lengths"

  def __init__(self, config: ml_collections.ConfigDict, workdir: Optional[str] = None):
    self.config = config
    # The run's workdir (None for runs without one), for tasks that cache generated data beside their
    # checkpoints.
    self.workdir = workdir

  def validate(self) -> None:
    """Raises ValueError naming the field, its value and what would work; runs before any compilation."""

  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    ...

  @abc.abstractmethod
  def train_iterator(self, process_index: int, process_count: int) -> BatchIterator:
    ...

  @abc.abstractmethod
  def loss(
      self, model: nnx.Module, batch: Mapping[str, jax.Array], *, rngs: Optional[nnx.Rngs], train: bool
  ) -> Tuple[jax.Array, Metrics]:
    """Scalar loss (float32) and scalar metrics; pure and jittable."""

  def evaluate(self, model: nnx.Module, ctx: EvalContext) -> Dict[str, Any]:
    """Host-side evaluation of one set of weights; returns JSON-serialisable results.

    Scalars at the top level are logged as metrics; anything else (tables) goes into the eval JSON. In-loop
    evaluations of a one-device run go in a background thread beside training (trainer.BackgroundEval): no
    state that training uses may be touched here; one evaluation runs at a time.
    """
    return {}

  def summarize(self, results: Dict[str, Dict[str, Any]], step: int, workdir: Optional[str]) -> str:
    """Human-readable table of {weights_name: evaluate(...)} results; may also write plots."""
    return ""

  def tokens_per_example(self) -> int:
    """For throughput: tokens (or items) per example of a training batch."""
    return 1

  def seq_len(self) -> Optional[int]:
    """Length of the time axis (axis 1) of the training batch's arrays, which a `seq` mesh axis splits;
    None when the batches have no such axis."""
    return None

  def flops_per_token(self) -> Optional[float]:
    """Training FLOPs per token (forward + backward) for MFU, or None if unknown."""
    return None


class LocalLearningTask(abc.ABC):
  """An experiment trained by a local (non-gradient) learning rule, e.g. the Hebbian role model.

  ema_jax.launch.run (what train.py calls) hands such a task the workdir under the workdir lock and lets it
  run; trainer.train, the gradient loop, refuses it. It must write metrics.jsonl and eval_<step>.json the
  way the trainer does, so eval tools read both alike.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def validate(self) -> None:
    """Raises ValueError naming the field, its value and what would work."""

  @abc.abstractmethod
  def run(self, workdir: Optional[str]) -> Dict[str, Any]:
    """Trains, evaluates and writes results; returns the final metrics."""


def task_class(config: ml_collections.ConfigDict):
  """The TASK class of ema_jax.tasks.<config.task.name> (or of a dotted module path), not built."""
  name = config.task.name
  for module_name in (f"ema_jax.tasks.{name}", name):
    try:
      module = importlib.import_module(module_name)
      break
    except ModuleNotFoundError as e:
      if e.name != module_name:
        raise
  else:
    raise ValueError(
        f"config.task.name={name!r}: no module ema_jax.tasks.{name} (tasks live in "
        f"ema_jax/tasks/<name>.py) and no importable module {name!r}."
    )
  return module.TASK


def get_task(config: ml_collections.ConfigDict, workdir: Optional[str] = None):
  """Builds the config's task (see task_class); `workdir` is the run's, if it has one."""
  cls = task_class(config)
  if issubclass(cls, Task):
    return cls(config, workdir)
  return cls(config)
