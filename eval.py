"""Evaluates a checkpoint without retraining.

  python eval.py --workdir W [--step N] [--weights raw,ema] [--lengths 8,16,32] [--config.task.x=v]

Restores onto the devices of this machine (any mesh), writes W/eval_<step>.json and prints a table.
"""

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_WEIGHTS = flags.DEFINE_string("weights", "all", "Comma-separated: raw, ema (or bema, the run's weight "
                               "EMA), or all.")
_LENGTHS = flags.DEFINE_string("lengths", None, "Comma-separated lengths for the task's length sweep "
                               "(set sizes, context lengths or positions; sets config.task.eval_lengths).")
_MESH = flags.DEFINE_string("mesh", "data=-1", "Mesh for evaluation, e.g. data=-1 or data=2,fsdp=2.")
_OVERRIDE = flags.DEFINE_multi_string("set", [], "Config overrides key=value (e.g. task.eval_examples=512).")


def main(argv):
  del argv
  from ema_jax import evaluation
  evaluation.run(_WORKDIR.value, step=_STEP.value, weights=_WEIGHTS.value, lengths=_LENGTHS.value,
                 mesh=_MESH.value, overrides=_OVERRIDE.value)


if __name__ == "__main__":
  app.run(main)
