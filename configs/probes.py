"""Copy / recall / selective-copy / filtering probes (ema_jax/tasks/probes.py): what a model's context keeps.

Run:
  python train.py --config configs/probes.py --workdir /tmp/probe_copy                  (copy, EMA LM)
  python train.py --config configs/probes.py:recall,gpt --workdir /tmp/probe_recall_gpt
  python eval.py --workdir /tmp/probe_copy --lengths 8,16,32,64

The argument after ':' is a probe (copy, recall, selective_copy, filtering; default copy) optionally
followed by a model (ema_lm: the EMA LM with the paper's fixed traces, the default; selective: the EMA LM with
selective traces; hybrid: fixed traces plus attention over the last 16 tokens; gpt; aggregator),
comma-separated, plus 'tiny' for tests. The models are the LM task's
tiny presets (width 128, 2 blocks) over the probe vocabulary (16 symbols + 6 specials). Training sizes and
evaluation sizes per probe are below; evaluation at 2x and 4x the training size measures length
generalisation. These are CPU-scale defaults of ours (2000 steps of batch 32). The five-model comparison at
equal parameters (experiments/probes.py) is in results/probes/.
"""

import ml_collections

from ema_jax import trainer_config

PROBES = ("copy", "recall", "selective_copy", "filtering")
MODELS = ("ema_lm", "selective", "hybrid", "gpt", "aggregator")
SIZES = {  # probe: (train_size, eval_sizes)
    "copy": (16, [8, 16, 32, 64]),
    "recall": (4, [2, 4, 8, 16]),
    "selective_copy": (8, [4, 8, 16, 32]),
    "filtering": (64, [32, 64, 128, 256]),
}


def get_config(arg=None):
  parts = [p.strip() for p in (arg or "copy").split(",") if p.strip()]
  probe = next((p for p in parts if p in PROBES), "copy")
  model = next((p for p in parts if p in MODELS), "ema_lm")
  bad = [p for p in parts if p not in PROBES + MODELS + ("tiny",)]
  if bad:
    raise ValueError(
        f"configs/probes.py: argument {arg!r}; accepted: a probe ({', '.join(PROBES)}), a model "
        f"({', '.join(MODELS)}) and 'tiny', comma-separated."
    )
  c = trainer_config.default_config()
  c.steps = 2000
  c.batch_size = 32
  c.log_every = 100
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.weight_ema.decay = 0.99
  train, evals = SIZES[probe]
  c.task = ml_collections.ConfigDict(
      dict(
          name="probes",
          probe=probe,
          symbols=16,
          train_size=train,
          eval_sizes=evals,
          queries=4,  # recall: queries per sequence
          span_factor=4,  # selective copy: span = span_factor x length
          noise=0.5,  # filtering: probability of a NOISE token
          eval_seed=1234,
          eval_batch_size=64,
          eval_batches=4,
      )
  )
  if model == "gpt":
    c.model = ml_collections.ConfigDict(dict(kind="gpt", preset="tiny"))
  elif model == "aggregator":
    c.model = ml_collections.ConfigDict(dict(kind="aggregator", width=128))
  else:
    c.model = ml_collections.ConfigDict(dict(kind="ema_lm", preset="tiny"))
    if model == "selective":
      c.model.trace_kind = "selective"
    elif model == "hybrid":
      c.model.window = 16  # experiments/probes.py's hybrid: attention over the last 16 tokens + fixed traces
  if "tiny" in parts:
    c.steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 30, 8, 10, 0, 30
    c.optim.warmup_steps = 5
    c.task.symbols, c.task.eval_batch_size, c.task.eval_batches = 8, 8, 1
    c.task.train_size, c.task.eval_sizes = (train // 4 or 1), [train // 4 or 1, train // 2 or 2]
    if model in ("ema_lm", "selective", "hybrid"):
      c.model.update(width=16, ffn_hidden=32, heads=2)
    elif model == "gpt":
      c.model.update(width=16, num_heads=2)
    else:
      c.model.update(width=16, hidden=32)
  return c
