"""OthelloGPT length generalisation ("Learning What's Missing", 2025): does weight EMA help beyond L_train?

Run:
  python train.py --config configs/othello.py --workdir /tmp/othello
  python train.py --config configs/othello.py:default,dropout --workdir /tmp/othello_d
  python eval.py --workdir /tmp/othello [--weights raw,ema,bema] [--lengths 1,10,20,40,59]
  python -m experiments.othello_compare --workdir /tmp/othello_compare   (seeds x dropout, one run each)
  python -m experiments.othello_compare --config configs/othello.py:cpu_hour --workdir /tmp/othello_hour \
      --seeds 0,1,2 --dropouts 0 --results results/othello   (the ~1 hour CPU comparison)
  python train.py --config configs/othello.py:rules --workdir /tmp/othello_rules   (the longest CPU run)

Results it got (2-core x86_64 CPU shared with other runs; results/othello/summary.md,
results/norm_position/summary.md):
  rules (2026-12-06, 14000 steps, 5148 s at load 6-16): in-range legal mass 0.840 (0.618 at step 1000, 0.770
    at 6000), out of range 0.346. That is short of the >= 0.95 a model needs to know the rules, so there is no
    EMA/BEMA verdict on OthelloGPT. A fitted extrapolation (not a measurement) puts 0.95 at ~60k-80k steps
    (log-linear) to ~0.4M-2M steps (power law).
  cpu_hour (2026-11-29, post-norm, 3 seeds, 4406 s): in-range legal mass 0.756, so the model had not learned
    the rules. Its EMA/BEMA differences (out-of-range KL EMA - raw -0.039, BEMA - raw +0.223) are WITHDRAWN
    as a verdict (results/othello/cpu_hour_2026-11-29/).
  default (3 seeds): post-norm out-of-range KL 2.97 against 2.34 with 'prenorm' (the small model trains worse
    post-norm in 1000 steps); the prenorm numbers equal those measured on 2026-11-22 with one average per run
    (results/othello/prenorm_default_2026-11-22/).

The argument after ':' is a preset optionally followed by options, comma-separated:
  default  the CPU preset: GPT with 2 layers, 4 heads, width 128 (~0.4M parameters), context 59,
           post-norm (GPT-1 style, the paper's OthelloGPT: x <- LN(x + Attn(x)), x <- LN(x + MLP(x)));
           20,000 games (5% validation), trained on the first 20 moves (positions 1..20, out of range
           21..59), 1000 steps of batch 64 (~3.4 epochs of the training windows) at lr 2e-3, cosine
           to 10%; weight EMA decay 0.99 (a window of ~100 steps, a tenth of the run) and BEMA with
           burn-in 200 (theta_0 taken at step 200, a fifth of the run: our choice, the paper's tau is not
           known). ~0.1 s per step on a 2-core CPU shared with another job (load ~3).
  cpu_hour the largest comparison a 2-core CPU runs in about an hour (3 seeds, dropout 0, one run per
           seed): 4 layers, 8 heads, width 256 (~3.2M parameters), post-norm; 40,000 games, train_len 20,
           2000 steps of batch 64 (~3.4 epochs, as default) at lr 1e-3 (between default's 2e-3 at width
           128 and paper's 5e-4 at width 512; not tuned), warmup 200; EMA decay 0.995 (~200 steps, a
           tenth of the run), BEMA burn-in 400 (a fifth, our choice). Measured 0.53 s per step with EMA
           and BEMA (2026-11-29, load average 3-5 with other jobs): ~19 min per seed with its evaluation.
  rules    the longest CPU run, an attempt to learn the rules (in-range legal mass >= 0.95): the post-norm
           GPT at 4 layers x width 128, 4 heads (0.8M parameters). Probes on 2026-12-06 chose it because
           cpu_hour's 4 x 256 ran at ~600 tokens/s on the loaded CPU (~3000 steps in 100 minutes), while 4 x 128
           learned faster per step than 2 x 128 at ~20% fewer tokens/s. It uses 200,000 games (4.7 epochs, not ~23
           on 40k), 14,000 steps of batch 64 at lr 3e-3 (1.5e-3 learned equally fast, 6e-3 at 2 layers learned
           slower), warmup 200 and cosine to 10%, EMA decay 0.999 (~1000 steps, a fourteenth of the run) and
           BEMA burn-in 3200 (our choice). It reached 0.840 (results/othello/summary.md).
  paper    the paper's model size: 8 layers, 8 heads, width 512, context 59; 200,000 games, train_len 30,
           20k steps of batch 256 (an accelerator run; exact values of the paper not reproduced); BEMA
           burn-in 2000 (our choice).
  tiny     for tests: 1 layer, width 32, 400 games, train_len 8, 80 steps at lr 1e-2, BEMA burn-in 20.
Every preset keeps both averages side by side (weight_ema.kind = 'ema,bema'): the trainer evaluates the raw
weights and each average of that same run, so EMA - raw and BEMA - raw are paired on one trajectory.
Options: dropout (model.dropout = 0.1) | nodropout (0.0, the default) | ema (debiased weight EMA alone) |
bema (BEMA alone, Block and Zhang 2025, arXiv 2508.00180); ema and bema keep the preset's decay and burn-in.
Norm options: postnorm (model.norm_position = 'post', GPT-1 style, the default of every preset) | prenorm
('pre': GPT-2 style blocks and a final LayerNorm), the model of the result above.
"""

import ml_collections

from ema_jax import optim, trainer_config

PRESETS = ("default", "cpu_hour", "rules", "paper", "tiny")
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
  c.weight_ema.kind = "ema,bema"  # both averages of the same trajectory, evaluated beside the raw weights
  c.weight_ema.decay = 0.99
  c.weight_ema.burn_in = 200  # BEMA's tau: a fifth of the run (our choice; the paper's tau is not known)
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

  if preset == "cpu_hour":
    c.steps = 2000
    c.log_every = 100
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.weight_ema.decay = 0.995
    c.weight_ema.burn_in = 400
    c.task.num_games = 40000
    c.model.update(num_layers=4, num_heads=8, width=256)
  elif preset == "rules":
    c.steps = 14000
    c.log_every = 100
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 200
    c.weight_ema.decay = 0.999
    c.weight_ema.burn_in = 3200
    c.task.num_games = 200000
    c.model.update(num_layers=4, num_heads=4, width=128)
  elif preset == "paper":
    c.steps = 20000
    c.batch_size = 256
    c.log_every = 200
    c.eval_every = 2000
    c.checkpoint_every = 2000
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 500
    c.weight_ema.decay = 0.999
    c.weight_ema.burn_in = 2000
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
    c.weight_ema.burn_in = 20
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
      burn_in = c.weight_ema.burn_in
      c.weight_ema = optim.default_weight_ema_config(o)
      c.weight_ema.update(decay=decay, burn_in=burn_in)
  return c
