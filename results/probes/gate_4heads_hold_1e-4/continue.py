"""The command of this folder: resume the 4-head GPT's 10000-step MQAR run (gate_4heads_10000_steps, whose
cosine ended at lr 1e-4) at a constant 1e-4, steps raised to 30000 (evaluations every 2500 steps).

  python results/probes/gate_4heads_hold_1e-4/continue.py W/recall_gpt_s0     (from the repository root)

W/recall_gpt_s0 is the workdir of `python -m experiments.probes --workdir W --seeds 0 --probes recall
--models gpt` as run on 2026-12-06, when the GPT had 4 heads and BUDGETS["recall"] was 10000 steps.
"""

import sys

import ml_collections

sys.path.insert(0, ".")
from ema_jax import launch  # noqa: E402
from experiments.probes import make_config  # noqa: E402

c = make_config("recall", "gpt", 64, seed=0, window=16, steps=10000)
c.model = ml_collections.ConfigDict(dict(kind="gpt", preset="tiny", width=64))  # the preset's 4 heads, as then
c.steps = 30000
c.checkpoint_every = 5000
c.eval_steps = [12500, 15000, 17500, 20000, 22500, 25000, 27500]
c.optim.schedule = "constant"
c.optim.lr = 1e-4
print(launch.run(c, sys.argv[1], allow_config_change=True))
