"""Grammatical role assignment with the label-free Hebbian model (ema_jax/models/hebbian.py).

Same data, splits and metrics as the BiGRU task (ema_jax/tasks/roles.py). The model learns from the
training sentences' words alone; role labels of the training sentences enter only afterwards, to fit
the two readouts on the frozen model:
  unit_readout   each unit's majority role on the training tokens it wins (readout (a) of hebbian.py)
  linear_probe   logistic regression on the frozen soft unit activations (readout (b))
Evaluation sentences are never used for fitting anything.

run(workdir) writes, like the gradient trainer: metrics.jsonl (one row at step = number of Hebbian
minibatch updates, with eval/<readout>/<split>/<metric> scalars and timings) and eval_<step>.json
({"step", "results": {readout: evaluate-style dict}, "table", "wall_seconds"}); it prints the table.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import ml_collections
import numpy as np

from ema_jax import metrics as metrics_lib
from ema_jax import workdir as workdir_lib
from ema_jax.models import hebbian
from ema_jax.tasks import roles
from ema_jax.tasks.base import LocalLearningTask

READOUTS = hebbian.READOUTS


def hebbian_config(config: ml_collections.ConfigDict, vocab_size: int) -> hebbian.HebbianConfig:
  """HebbianConfig from config.model (its field names), vocab_size from the data, seed = config.seed."""
  m = config.model.to_dict()
  unknown = sorted(set(m) - {f for f in hebbian.HebbianConfig.__dataclass_fields__})
  if unknown:
    raise ValueError(
        f"config.model has fields {unknown} that HebbianConfig does not know; accepted: "
        f"{sorted(f for f in hebbian.HebbianConfig.__dataclass_fields__ if f not in ('vocab_size', 'seed'))}."
    )
  m = {k: tuple(v) if isinstance(v, list) else v for k, v in m.items()}
  return hebbian.HebbianConfig(vocab_size=vocab_size, seed=int(config.seed), **m)


class RolesHebbianTask(LocalLearningTask):

  def validate(self) -> None:
    roles.validate_task_config(self.config)
    if not (isinstance(self.config.task.probe_steps, int) and self.config.task.probe_steps >= 1):
      roles._fail("task.probe_steps", self.config.task.probe_steps, "a positive integer")
    if "seed" in self.config.model or "vocab_size" in self.config.model:
      raise ValueError(
          "config.model.seed / vocab_size: not settable here; the seed is config.seed and the "
          "vocabulary size comes from the data."
      )
    hebbian_config(self.config, 2)  # field names and values, before any data is read

  def run(self, workdir: Optional[str]) -> Dict[str, Any]:
    t0 = time.perf_counter()
    t = self.config.task
    splits = roles.load_data(t, int(self.config.seed))
    train = splits["train"]
    cfg = hebbian_config(self.config, len(train.vocab))
    timing = {"data_seconds": time.perf_counter() - t0}
    print(
        f"ema_jax: task roles_hebbian ({t.source}), {len(train)} training sentences, vocabulary "
        f"{cfg.vocab_size}, {cfg.num_units} units, input size {cfg.input_size}",
        flush=True,
    )

    t1 = time.perf_counter()  # label-free fit, then the readouts on training labels (fit_readouts)
    fitted = hebbian.fit_readouts(cfg, train, probe_steps=int(t.probe_steps), verbose=True)
    params = fitted.params
    timing["fit_seconds"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    details = {r: {} for r in READOUTS}
    majority = {}
    for name in roles.eval_splits(t):
      d = splits[name]
      preds = hebbian.predict(fitted, cfg, d.tokens, d.mask)
      for r in READOUTS:
        details[r][name] = roles.role_metrics(preds[r], d, int(t.deep_depth))
      majority[name] = roles.majority_accuracy(train, d)
    timing["eval_seconds"] = time.perf_counter() - t1

    results = {r: roles.split_results(details[r], majority) for r in READOUTS}
    used = np.bincount(
        hebbian.winning_units(params, cfg, train.tokens, train.mask)[train.mask], minlength=cfg.num_units
    )
    info = {
        "source": t.source,
        "seed": int(self.config.seed),
        "sentences": {k: len(v) for k, v in splits.items()},
        "units_used": int((used > 0).sum()),
        "num_units": cfg.num_units,
        "hebbian_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    for r in READOUTS:
      results[r]["info"] = info
    step = cfg.epochs * -(-len(train) // cfg.batch_size)
    wall = time.perf_counter() - t0
    table = roles.format_table(results, f"roles (Hebbian, {t.source}), {step} Hebbian updates")
    print(table, flush=True)

    scalars = {
        f"eval/{r}/{k}": v
        for r, res in results.items()
        for k, v in res.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    scalars.update(timing, wall_seconds=wall)
    if workdir is not None:
      os.makedirs(workdir, exist_ok=True)
      # A rerun starts over (no resume for a label-free pass): its one metrics row replaces the old ones.
      workdir_lib.write_metrics(workdir, [dict(step=step, **{k: metrics_lib.to_scalar(v) for k, v in scalars.items()})])
      workdir_lib.write_eval(
          workdir, step, results, table, wall_seconds=wall, config=json.loads(self.config.to_json_best_effort())
      )
    scalars["status"] = "done"
    return scalars


TASK = RolesHebbianTask
