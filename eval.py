"""Evaluates a checkpoint without retraining:

  python eval.py --workdir W [--step N] [--weights raw,ema] [--lengths 8,16,32] [--set task.x=v ...]
                 [--mesh data=-1] [--output_dir D] [--verbose]

Restores onto the devices of this machine (any mesh), prints a table, then writes
W/eval/eval_<step>.json (eval_<step>_<weights>_<lengths>.json for a subset) and plots in W/eval/plots/:
beside the training run's own W/eval_<step>.json and W/plots/, never over them.
"""

import ema_jax.host_memory  # first, no JAX: this command again, once, with huge pages for big buffers

ema_jax.host_memory.reexec()

from absl import flags  # noqa: E402

from ema_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (required).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_WEIGHTS = flags.DEFINE_string(
    "weights", "all", "Comma-separated subset of raw and the run's averages (ema, bema), or all."
)
_LENGTHS = flags.DEFINE_string(
    "lengths",
    None,
    "Comma-separated lengths for the task's length sweep "
    "(set sizes, context lengths or positions; sets config.task.eval_lengths).",
)
_MESH = flags.DEFINE_string("mesh", "data=-1", "Mesh for evaluation, e.g. data=-1 or data=2,fsdp=2.")
_OVERRIDE = flags.DEFINE_multi_string(
    "set", [], "Override a field of the saved config, key=value " "(repeatable), e.g. --set task.eval_examples=512."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the JSON and plots go (default: W/eval).")


def main(argv):
  del argv
  from ema_jax import evaluation  # after flag parsing, so --help and flag errors are fast

  evaluation.run(
      _WORKDIR.value,
      step=_STEP.value,
      weights=_WEIGHTS.value,
      lengths=_LENGTHS.value,
      mesh=_MESH.value,
      overrides=_OVERRIDE.value,
      output_dir=_OUTPUT_DIR.value,
  )


if __name__ == "__main__":
  cli.run(main, required=("workdir",))
