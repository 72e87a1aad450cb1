"""What configs/ema_lm.py and configs/gpt2.py share: the LM config skeleton and its data presets.

The paths of the team's offline data (../shared/data, relative to the repository root where train.py
runs) are named here, in a config, never inside the library.
"""

import ml_collections

from ema_jax import trainer_config
from ema_jax.data import text as text_lib

WIKI = "../shared/data/wikipedia/{split}*.jsonl"  # train-00..04 and validation JSON lines
C4_SAMPLE = "../shared/data/c4_sample/c4_demo.jsonl"  # 300 C4 documents: evaluation only


def base_config(model_kind: str) -> ml_collections.ConfigDict:
  """The LM config before a preset: trainer fields, data (text_lib.default_data_config) and task."""
  c = trainer_config.default_config()
  c.steps = 1000
  c.batch_size = 16
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1  # decoupled, on matrices only (optim._decay_mask)
  c.weight_ema.decay = 0.999
  c.data = text_lib.default_data_config()  # source, tokenizer, paths, splits: fields documented there
  c.task = ml_collections.ConfigDict(
      dict(
          name="lm",
          seq_len=256,  # T: tokens per training row (windows of T + 1)
          eval_lengths=[],  # context lengths to evaluate at; [] = seq_len only
          eval_batch_size=16,  # rows per evaluation batch (a multiple of the process count)
          eval_sources=ml_collections.ConfigDict(),  # name -> data config of extra evaluation-only sources
      )
  )
  # kind selects the model; preset names its size; the other fields override the model dataclass
  # (EMALMConfig in ema_jax/models/ema_lm.py, GPTConfig in ema_jax/models/transformer.py).
  c.model = ml_collections.ConfigDict(dict(kind=model_kind, preset="tiny"))
  return c


def apply_tiny_preset(c: ml_collections.ConfigDict, wiki: bool = False) -> ml_collections.ConfigDict:
  """CPU-sized training (byte tokenizer, T = 256) on the built-in text, or on the shared Wikipedia files
  evaluated also on the shared C4 sample (evaluation only) when wiki=True."""
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
  if wiki:
    c.data.source = "files"
    c.data.path = WIKI
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.steps = 2000
    c.eval_every = 1000
    c.checkpoint_every = 500
    c.task.eval_sources = ml_collections.ConfigDict(
        {"c4_sample": dict(source="files", path=C4_SAMPLE, eval_path=C4_SAMPLE, eval_split="validation")}
    )
  return c


def apply_c4_preset(c: ml_collections.ConfigDict, lr: float) -> ml_collections.ConfigDict:
  """The paper-scale setting: GPT-2 tokenizer, C4 (c4/en:3.1.0) through TFDS, T = 1024, batch 256."""
  c.data.tokenizer = "gpt2"
  c.data.source = "tfds"
  c.data.tfds_name = "c4/en:3.1.0"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  # In-loop evaluations read the first 2M validation tokens; the final one (and eval.py) every token of the
  # split (data.eval_max_tokens_final = 0; set it to cap that too).
  c.data.eval_max_tokens = 2_000_000
  c.task.seq_len = 1024
  c.task.eval_batch_size = 64
  c.batch_size = 256
  c.steps = 100_000
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint_every = 2000
  c.optim.lr = lr
  c.optim.warmup_steps = 2000
  c.weight_ema.decay = 0.9999
  return c
