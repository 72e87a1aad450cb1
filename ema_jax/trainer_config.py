"""The trainer's part of every experiment config; configs/*.py start from default_config().

Kept apart from trainer.py so that a config file loads without the training machinery (orbax, flax).
"""

from __future__ import annotations

import ml_collections

from ema_jax import errors, optim


def default_config() -> ml_collections.ConfigDict:
  """Trainer fields with their defaults; a config sets `task` and `model` and overrides what it needs."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # initialisation and dropout keys; the data order where the task is seeded by it
  c.steps = 1000  # optimizer steps to train to (safe to raise when resuming)
  c.batch_size = 64  # global batch over all processes; a multiple of the mesh's data x fsdp
  c.log_every = 100  # a metrics.jsonl / TensorBoard row every n steps (means over those steps)
  c.eval_every = 0  # in-loop evaluation every n steps; 0 = only the final one, which always runs
  c.eval_steps = []  # also evaluate at these steps (e.g. log-spaced points of a learning curve)
  # In-loop evaluations run in a background thread on a copy of the weights while training goes on (runs
  # on one device only; the same results; the final evaluation always blocks). False: training waits.
  c.eval_in_background = True
  c.checkpoint_every = 0  # an orbax checkpoint every n steps and at the end; 0 = no checkpoints
  # Also a checkpoint at the first step after this many seconds since the last one (0 = off): bounds the
  # work an unannounced kill loses on preemptible machines. Decided identically on every process.
  c.checkpoint_every_seconds = 0.0
  c.keep_checkpoints = 2  # newest checkpoints kept; older ones are deleted by orbax
  c.optim = optim.default_optim_config()  # AdamW, warmup then decay, global-norm clipping (optim.py)
  c.weight_ema = optim.default_weight_ema_config("ema")  # averaged weights evaluated beside the raw ones
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, seq=1))  # device mesh; one size may be -1
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """The trainer fields; raises ValueError naming the field, its value and what would work."""
  errors.need_int(config, "steps", 1)
  errors.need_int(config, "batch_size", 1)
  errors.need_int(config, "log_every", 1)
  errors.need_int(config, "eval_every", 0)
  eval_steps = config.get("eval_steps", [])
  if not isinstance(eval_steps, (list, tuple)) or not all(errors.is_int(s) and s >= 1 for s in eval_steps):
    errors.config_error("eval_steps", eval_steps, "a list of steps >= 1, e.g. [50, 100, 200] ([] = none)")
  if not isinstance(config.get("eval_in_background", True), bool):
    errors.config_error("eval_in_background", config.eval_in_background, "True or False")
  errors.need_int(config, "checkpoint_every", 0)
  errors.need_int(config, "keep_checkpoints", 1)
  seconds = config.get("checkpoint_every_seconds", 0.0)
  if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
    errors.config_error("checkpoint_every_seconds", seconds, "a number of seconds >= 0 (0 = off), e.g. 600")
  errors.need_int(config, "seed", 0)
  optim.validate_optim(config.optim, config.steps)
  optim.validate_weight_ema(config.weight_ema)
