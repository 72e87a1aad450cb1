"""What train.py runs: one entry for every kind of task.

A gradient task (ema_jax.tasks.base.Task) trains through the one training loop, ema_jax.trainer.train; a
task trained by a local, label-free rule (LocalLearningTask: the Hebbian role model) runs its own fit and
evaluation (LocalLearningTask.run) under the same workdir lock and writes the same metrics.jsonl and
eval_<step>.json, so eval tools read both alike.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import ml_collections

from ema_jax import distributed, preemption, workdir_lock
from ema_jax.tasks.base import LocalLearningTask, get_task


def run(config: ml_collections.ConfigDict, workdir: Optional[str], allow_config_change: bool = False) -> Dict[str, Any]:
  """Trains (or fits) config's task into workdir; returns the final metrics."""
  task = get_task(config)
  if not isinstance(task, LocalLearningTask):
    from ema_jax import trainer

    return trainer.train(config, workdir, allow_config_change=allow_config_change)
  preemption.install()
  distributed.initialize_from_env()
  task.validate()
  with workdir_lock.held(workdir):
    return task.run(workdir)
