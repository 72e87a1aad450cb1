"""EMA-only language model ("EMA Is Not All You Need", 2026).

Presets (python train.py --config configs/ema_lm.py:PRESET --workdir W):
  tiny       byte tokenizer, the built-in text (Python standard-library docstrings, no download),
             width 128, 2 blocks, T = 256: trains in minutes on a CPU.
  wiki_tiny  the tiny model on ../shared/data/wikipedia (train files), evaluated on its validation file
             and on ../shared/data/c4_sample (evaluation only).
  130m       GPT-2 tokenizer, C4 through tensorflow-datasets (c4/en:3.1.0 under --config.data.data_dir),
             width 768, 12 blocks, T = 1024, bfloat16 compute: 130.7M parameters with the linear predictor.
Predictor: --config.model.predictor=linear|attention|attention_history.

Measured results are in README.md ("Language models"), each with its command, machine and date.
"""

import dataclasses

import ml_collections

from ema_jax.models import ema_lm
from ema_jax.tasks import lm

WIKI = "../shared/data/wikipedia/{split}*.jsonl"
C4_SAMPLE = "../shared/data/c4_sample/c4_demo.jsonl"


def model_fields(preset: str, **overrides):
  fields = dataclasses.asdict(ema_lm.preset(preset, **overrides))
  fields.pop("vocab_size")  # from the tokenizer
  fields["alphas"] = list(fields["alphas"])
  return dict(kind="ema_lm", **fields)


def get_config(arg=None):
  preset = arg or "tiny"
  c = lm.base_config("ema_lm")
  if preset in ("tiny", "wiki_tiny"):
    c.model = ml_collections.ConfigDict(model_fields("tiny"))
    c.data.tokenizer = "byte"
    c.task.seq_len = 256
    c.batch_size = 16
    c.steps = 600
    c.log_every = 50
    c.eval_every = 300
    c.checkpoint_every = 300
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.weight_ema.decay = 0.99
    if preset == "wiki_tiny":
      c.data.source = "files"
      c.data.path = WIKI
      c.data.train_split = "train"
      c.data.eval_split = "validation"
      c.steps = 2000
      c.eval_every = 1000
      c.checkpoint_every = 500
      c.task.eval_sources = ml_collections.ConfigDict(
          {"c4_sample": dict(source="files", path=C4_SAMPLE, eval_path=C4_SAMPLE, eval_split="validation")})
  elif preset == "130m":
    c.model = ml_collections.ConfigDict(model_fields("130m", dtype="bfloat16"))
    c.data.tokenizer = "gpt2"
    c.data.source = "tfds"
    c.data.tfds_name = "c4/en:3.1.0"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.eval_max_tokens = 2_000_000
    c.task.seq_len = 1024
    c.task.eval_batch_size = 64
    c.batch_size = 256
    c.steps = 100_000
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2000
    c.weight_ema.decay = 0.9999
  else:
    raise ValueError(f"configs/ema_lm.py: unknown preset {preset!r}; accepted: tiny, wiki_tiny, 130m.")
  return c
