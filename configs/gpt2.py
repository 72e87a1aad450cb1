"""GPT-2 style decoder baseline, trained by the same trainer on the same data as configs/ema_lm.py.

Presets (python train.py --config configs/gpt2.py:PRESET --workdir W):
  tiny       byte tokenizer, built-in text, width 128, 2 layers, 4 heads, T = 256 (CPU minutes).
  wiki_tiny  the tiny model on ../shared/data/wikipedia, evaluated on its validation file and on
             ../shared/data/c4_sample (evaluation only).
  124m       GPT-2 small (124.4M parameters) on C4 through tensorflow-datasets, T = 1024, bfloat16.

Result it got (results/lm/README.md has the command; 2026-11-22, 2-core CPU shared with other jobs, the
data pipeline of that date): wiki_tiny with --config.steps=1000, raw weights, per-byte perplexity 6.794 on
the Wikipedia validation file and 7.817 on the C4 sample (8004 and 12515 per GPT-2 token of the same text);
the 124m preset has 124,439,808 parameters.
"""

import dataclasses

import ml_collections

from ema_jax.models import transformer
from configs import lm_common


def model_fields(preset: str, **overrides):
  fields = dataclasses.asdict(transformer.preset(preset, **overrides))
  fields.pop("vocab_size")  # from the tokenizer
  return dict(kind="gpt", **fields)


def get_config(arg=None):
  preset = arg or "tiny"
  c = lm_common.base_config("gpt")
  if preset in ("tiny", "wiki_tiny"):
    c.model = ml_collections.ConfigDict(model_fields("tiny", context_len=256))
    return lm_common.apply_tiny_preset(c, wiki=preset == "wiki_tiny")
  if preset == "124m":
    c.model = ml_collections.ConfigDict(model_fields("124m", dtype="bfloat16"))
    return lm_common.apply_c4_preset(c, lr=6e-4)
  raise ValueError(f"configs/gpt2.py: unknown preset {preset!r}; accepted: tiny, wiki_tiny, 124m.")
