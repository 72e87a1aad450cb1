"""EMA-only language model ("EMA Is Not All You Need", 2026).

Presets (python train.py --config configs/ema_lm.py:PRESET --workdir W):
  tiny       byte tokenizer, the built-in text (Python standard-library docstrings, no download),
             width 128, 2 blocks, T = 256: trains in minutes on a CPU.
  wiki_tiny  the tiny model on ../shared/data/wikipedia (train files), evaluated on its validation file
             and on ../shared/data/c4_sample (evaluation only).
  130m       GPT-2 tokenizer, C4 through tensorflow-datasets (c4/en:3.1.0 under --config.data.data_dir),
             width 768, 12 blocks, T = 1024, bfloat16 compute: 130.7M parameters with the linear predictor.
Predictor: --config.model.predictor=linear|attention|attention_history.

Result it got (results/lm/README.md has the commands; 2026-11-22, 2-core CPU shared with other jobs, the
data pipeline of that date, which shuffled windows in a buffer where rows are now per-document streams):
wiki_tiny with --config.steps=1000 (4.1M training bytes), raw weights, per-byte perplexity on the Wikipedia
validation file / the C4 sample: linear predictor 5.506 / 6.484, attention 5.427 / 6.425, attention over the
history 5.479 / 6.472; per GPT-2 token of the same text (beside the paper's 260): 2985 / 5309, 2790 /
5092 and 2919 / 5263 (results/lm/small_scale.md); the 130m preset has 130,703,616 parameters (linear) and needs an accelerator.
"""

import dataclasses

import ml_collections

from ema_jax.models import ema_lm
from configs import lm_common


def model_fields(preset: str, **overrides):
  fields = dataclasses.asdict(ema_lm.preset(preset, **overrides))
  fields.pop("vocab_size")  # from the tokenizer
  fields["alphas"] = list(fields["alphas"])
  return dict(kind="ema_lm", **fields)


def get_config(arg=None):
  preset = arg or "tiny"
  c = lm_common.base_config("ema_lm")
  if preset in ("tiny", "wiki_tiny"):
    c.model = ml_collections.ConfigDict(model_fields("tiny"))
    return lm_common.apply_tiny_preset(c, wiki=preset == "wiki_tiny")
  if preset == "130m":
    c.model = ml_collections.ConfigDict(model_fields("130m", dtype="bfloat16"))
    return lm_common.apply_c4_preset(c, lr=1e-3)
  raise ValueError(f"configs/ema_lm.py: unknown preset {preset!r}; accepted: tiny, wiki_tiny, 130m.")
