"""Trace aggregator LM (ema_jax/models/aggregator.py): a minimal reading of the "aggregator" of "EMA Is
Not All You Need" (2026), whose design the paper does not spell out; the model's docstring says what is built and why.

Presets (python train.py --config configs/aggregator.py:PRESET --workdir W):
  tiny       byte tokenizer, the built-in text (no download), width 128, MLP hidden 512, T = 256.
  wiki_tiny  the tiny model on ../shared/data/wikipedia (train files), evaluated on its validation file
             and on ../shared/data/c4_sample (evaluation only): the data, tokenizer, T, batch, steps and
             learning rate of configs/ema_lm.py:wiki_tiny (lm_common.apply_tiny_preset), so the two compare
             at equal budget.

The comparison run (results/aggregator/README.md has the EMA LM beside it):
  python train.py --config configs/aggregator.py:wiki_tiny --workdir /work/runs/aggregator_wiki \\
    --config.steps=1000 --config.eval_every=0 --config.checkpoint_every=1000
Result it got (2026-11-29, 2-core CPU shared with other jobs, 5.3 min of training): 362,496 parameters;
per-byte perplexity / bits per byte on the Wikipedia validation file 6.414 / 2.681 (raw weights), 6.335 /
2.664 (weight EMA); on the C4 sample 7.504 / 2.909 (raw). Per GPT-2 token of the same text (to set beside
the paper's 729): 6110 on Wikipedia, 10380 on the C4 sample (raw). The EMA LM (linear predictor) at the same
budget: 5.474 / 2.453 (raw) on Wikipedia, 2906 per GPT-2 token.
"""

import dataclasses

import ml_collections

from ema_jax.models import aggregator
from configs import lm_common


def model_fields(preset: str, **overrides):
  fields = dataclasses.asdict(aggregator.preset(preset, **overrides))
  fields.pop("vocab_size")  # from the tokenizer
  fields["alphas"] = list(fields["alphas"])
  return dict(kind="aggregator", **fields)


def get_config(arg=None):
  preset = arg or "tiny"
  c = lm_common.base_config("aggregator")
  if preset in ("tiny", "wiki_tiny"):
    c.model = ml_collections.ConfigDict(model_fields("tiny"))
    return lm_common.apply_tiny_preset(c, wiki=preset == "wiki_tiny")
  raise ValueError(f"configs/aggregator.py: unknown preset {preset!r}; accepted: tiny, wiki_tiny.")
