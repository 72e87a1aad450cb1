"""Trains one experiment: python train.py --config configs/X.py[:preset] --workdir W [--config.a.b=v ...]."""

import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/set_complement.py", "Experiment config file, optionally with ':preset'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and eval results go here "
                               "(default: workdirs/<config name>[_<preset>]). Rerunning resumes.")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process run "
                             "(not needed on Cloud TPU pods or SLURM).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def default_workdir(config_arg: str) -> str:
  path, _, preset = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + (f"_{preset}" if preset else "")
  return os.path.join("workdirs", name)


def main(argv):
  del argv
  from ema_jax import distributed, trainer  # after flag parsing, so --help is fast
  distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  try:
    result = trainer.train(_CONFIG.value, workdir)
  except trainer.NonFiniteError:
    raise SystemExit(3)
  if result.get("status") == "preempted":
    raise SystemExit(0)


if __name__ == "__main__":
  app.run(main)
