"""OthelloGPT length generalisation ("Learning What's Missing", 2025): does weight EMA help beyond L_train?

Run:
  python train.py --config configs/othello.py --workdir /tmp/othello
  python train.py --config configs/othello.py:default,dropout,bema --workdir /tmp/othello_d_bema
  python eval.py --workdir /tmp/othello [--weights raw,ema] [--lengths 1,10,20,40,59]
  python -m experiments.othello_compare --workdir /tmp/othello_compare   (seeds x dropout x {ema, bema})

Result it got (2026-11-22, 2-core x86_64 CPU shared with other jobs, load average 6-10; 112-167 s per
run): default preset, seeds 0,1,2, dropout 0, mean over seeds (results/othello/summary.md):
  raw   in-range legal mass 0.652, top-1 legal 0.893, KL 0.676; out of range 0.286, 0.454, 2.342
  ema   in-range legal mass 0.648, top-1 legal 0.898, KL 0.671; out of range 0.284, 0.457, 2.319
  bema  in-range legal mass 0.720, top-1 legal 0.895, KL 0.752; out of range 0.301, 0.426, 2.976
The preset is undertrained (the optimum is mass 1, KL 0). Paired EMA - raw differences are at most 0.01
on mass and top-1 and 0.034 on KL, small against the seed spread out of range (sd of raw KL 0.08).

The argument after ':' is a preset optionally followed by options, comma-separated:
  default  the CPU preset: GPT with 2 layers, 4 heads, width 128 (~0.4M parameters), context 59,
           post-norm (GPT-1 style, the paper's OthelloGPT: x <- LN(x + Attn(x)), x <- LN(x + MLP(x)));
           20,000 games (5% validation), trained on the first 20 moves (positions 1..20, out of range
           21..59), 1000 steps of batch 64 (~3.4 epochs of the training windows) at lr 2e-3, cosine
           to 10%; weight EMA decay 0.99 (a window of ~100 steps, a tenth of the run). Scaled down so
           the 12-run comparison fits ~30 minutes on a loaded 2-core CPU (experiments/othello_compare.py).
  paper    the paper's model size: 8 layers, 8 heads, width 512, context 59; 200,000 games, train_len 30,
           20k steps of batch 256 (an accelerator run; exact values of the paper not reproduced).
  tiny     for tests: 1 layer, width 32, 400 games, train_len 8, 80 steps at lr 1e-2.
Options: dropout (model.dropout = 0.1) | nodropout (0.0, the default) | ema (debiased weight EMA, the
default) | bema (BEMA, Block and Zhang 2025). The trainer keeps one averaging kind per run and evaluates
raw and averaged weights of that same run.
Norm options: postnorm (model.norm_position = 'post', GPT-1 style, the default of every preset) | prenorm
('pre': GPT-2 style blocks and a final LayerNorm). The results above were measured with pre-norm blocks,
before this option existed: 'default,prenorm' reproduces that model.
"""

import ml_collections

from ema_jax import optim, trainer_config

PRESETS = ("default", "paper", "tiny")
OPTIONS = ("dropout", "nodropout", "prenorm", "postnorm", "ema", "bema")


def get_config(arg=None):
  parts = [p.strip() for p in (arg or "default").split(",") if p.strip()]
  preset = parts[0] if parts and parts[0] in PRESETS else "default"
  options = parts[1:] if parts and parts[0] in PRESETS else parts
  if preset not in PRESETS or any(o not in OPTIONS for o in options):
    raise ValueError(
        f"configs/othello.py: argument {arg!r}; expected a preset ({', '.join(PRESETS)}) "
        f"optionally followed by options ({', '.join(OPTIONS)}), e.g. 'default,dropout,bema'."
    )
  c = trainer_config.default_config()  # seed, steps, batch, cadences, optim, weight_ema, mesh
  c.steps = 1000
  c.batch_size = 64
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.weight_ema.decay = 0.99
  c.task = ml_collections.ConfigDict(
      dict(
          name="othello",
          num_games=20000,  # training + validation games, random legal play
          val_fraction=0.05,  # the last 5% are validation games
          data_seed=0,  # seeds the game generator (shared by all training seeds)
          data_dir=ml_collections.FieldReference(None, field_type=str),  # None = <workdir>/othello_data
          train_len=20,  # L_train: moves fed in training; positions 1..L_train are trained
          eval_games=1000,  # validation games scored at every position
          eval_batch_size=250,
          eval_lengths=ml_collections.FieldReference(None, field_type=list),  # positions; None = 1..59
      )
  )
  c.model = ml_collections.ConfigDict(
      dict(num_layers=2, num_heads=4, width=128, mlp_ratio=4, context_len=59, dropout=0.0, dtype="float32")
  )
  c.model.norm_position = "post"  # GPT-1 style, the paper's OthelloGPT (every preset)

  if preset == "paper":
    c.steps = 20000
    c.batch_size = 256
    c.log_every = 200
    c.eval_every = 2000
    c.checkpoint_every = 2000
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 500
    c.weight_ema.decay = 0.999
    c.task.num_games = 200000
    c.task.train_len = 30
    c.task.eval_games = 2000
    c.model.update(num_layers=8, num_heads=8, width=512)
  elif preset == "tiny":
    c.steps = 80
    c.batch_size = 16
    c.log_every = 10
    c.eval_every = 40
    c.checkpoint_every = 40
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 5
    c.weight_ema.decay = 0.9
    c.task.num_games = 400
    c.task.val_fraction = 0.1
    c.task.train_len = 8
    c.task.eval_games = 40
    c.task.eval_batch_size = 20
    c.model.update(num_layers=1, num_heads=2, width=32)

  for o in options:
    if o in ("dropout", "nodropout"):
      c.model.dropout = 0.1 if o == "dropout" else 0.0
    elif o in ("prenorm", "postnorm"):
      c.model.norm_position = "pre" if o == "prenorm" else "post"
    else:
      decay = c.weight_ema.decay
      c.weight_ema = optim.default_weight_ema_config(o)
      c.weight_ema.decay = decay
  return c
