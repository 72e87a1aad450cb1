"""Trains one experiment:

  python train.py --config configs/X.py[:preset] --workdir W [--config.a.b=v ...] [--allow_config_change]
                  [--verbose]

Rerunning the same command resumes from W's newest checkpoint; SIGTERM saves and exits 0.
"""

import ema_jax.preemption  # first, and light (no JAX): a SIGTERM during the slow start-up is kept as a flag

ema_jax.preemption.install()

import ema_jax.host_memory  # noqa: E402  (then, once, this command again with huge pages for big buffers)

ema_jax.host_memory.reexec(sigterm_seen=ema_jax.preemption.requested())

from absl import flags  # noqa: E402  (after the SIGTERM handler, on purpose)
from ml_collections import config_flags  # noqa: E402

from ema_jax import cli, preemption  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':preset' (required).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, metrics and eval results go here (required). " "Rerunning resumes."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume even where the saved config differs in fields that keep the "
    "state's structure (e.g. the learning rate); a new workdir is the other way forward.",
)
_COORD = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for a multi-process run " "(not needed on Cloud TPU pods or SLURM)."
)
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def main(argv):
  del argv
  from ema_jax import workdir_lock  # no JAX: every process of a run stops here at once

  workdir_lock.check_writable(_WORKDIR.value)
  from ema_jax import distributed, launch, trainer  # after flag parsing, so --help and flag errors are fast

  distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
  try:
    result = launch.run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except trainer.NonFiniteError:
    raise SystemExit(3)  # the trainer has printed why; the last good checkpoint is kept
  status = result.get("status") if isinstance(result, dict) else None
  if status == "preempted" or preemption.requested():
    raise SystemExit(0)


if __name__ == "__main__":
  cli.run(main, required=("config", "workdir"))
