"""One process of a multi-process toy training run (driven by tests/test_multihost.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ema_jax import distributed  # noqa: E402

distributed.initialize()  # from EMA_JAX_* environment variables; a no-op for one process

import toy_task  # noqa: E402
from ema_jax import trainer  # noqa: E402


def main():
  workdir, steps = sys.argv[1], int(sys.argv[2])
  sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
  cfg = toy_task.get_config(steps=steps)
  cfg.optim.schedule = "constant"  # so a run stopped at step k and continued matches a longer run
  cfg.optim.warmup_steps = 0
  cfg.checkpoint_every = 5
  cfg.task.sleep = sleep
  trainer.train(cfg, workdir)


if __name__ == "__main__":
  main()
