"""The EMA LM against the GPT as far as a 2-core CPU goes: learning curves on ../shared/data/wikipedia.

Run one model (experiments/lm_scale.py runs both and writes results/lm_scale/):
  python train.py --config configs/lm_scale.py:ema --workdir W     (or :gpt; add ',byte' for the byte
                                                                     tokenizer, ',tiny' for the tests)

Both models have 3.15M non-embedding parameters (ema: width 256, 4 blocks; gpt: width 256, 4 layers,
4 heads), context T = 512 tokens, batch 16, AdamW at lr 3e-3 (the tiny presets' rate) held constant after
100 warmup steps, so that a run can be extended (raise --config.steps and rerun: it resumes) without
changing the part of the curve already measured. The EMA LM keeps the paper's block (alphas 0.5, 0.1,
0.02, linear predictor, top-k FFN with 6% of units active) with ffn_hidden 640 (2.5 D, the paper's 3 D
less) so that its non-embedding parameters match the GPT's to 0.3%. No weight averaging (the paper's LM
result is the trained weights); every evaluation reads every token of the Wikipedia validation file and
of the C4 sample, and reports perplexity per GPT-2 token beside bits/byte.

Tokenizer: GPT-2's (the paper's) by default. Measured with `python -m experiments.lm_scale
--measure-tokenizers` (results/lm_scale/tokenizer_choice.json, 2026-12-06, 2 cores): one AdamW step of
16 x 512 tokens reads 4.56 bytes of Wikipedia per GPT-2 token against 1 per byte token, and that outweighs
its 50,257-wide head: 5,445 against 4,730 bytes of text per second for the EMA LM, 4,946 against 3,466
for the GPT. Its context of 512 tokens also holds 2,300 bytes of text (512 with bytes), and the traces'
rates (0.5, 0.1, 0.02 per token) keep the paper's timescales in words.
"""

import ml_collections

from configs import lm_common

WIDTH = 256
EMA_BLOCKS, EMA_FFN_HIDDEN = 4, 640
GPT_LAYERS, GPT_HEADS = 4, 4
SEQ_LEN = 512


def get_config(arg=None):
  parts = [p.strip() for p in (arg or "ema").split(",") if p.strip()]
  bad = [p for p in parts if p not in ("ema", "gpt", "byte", "tiny")]
  kinds = [p for p in parts if p in ("ema", "gpt")]
  if bad or len(kinds) > 1:
    raise ValueError(
        f"configs/lm_scale.py: argument {arg!r}; accepted: a model (ema or gpt), optionally 'byte' "
        "(the byte tokenizer instead of GPT-2's) and 'tiny' (the tests' sizes), comma-separated."
    )
  kind = kinds[0] if kinds else "ema"
  tiny = "tiny" in parts
  width, seq_len = (32, 64) if tiny else (WIDTH, SEQ_LEN)
  c = lm_common.base_config("ema_lm" if kind == "ema" else "gpt")
  if kind == "ema":
    size = dict(kind="ema_lm", num_blocks=1 if tiny else EMA_BLOCKS, ffn_hidden=2 * width if tiny else EMA_FFN_HIDDEN)
  else:
    size = dict(kind="gpt", num_layers=1 if tiny else GPT_LAYERS, num_heads=GPT_HEADS, context_len=seq_len)
  c.model = ml_collections.ConfigDict(dict(preset="tiny", width=width, **size))
  c.data.tokenizer = "byte" if "byte" in parts else "gpt2"
  c.data.source = "files"
  c.data.path = lm_common.WIKI
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.eval_max_tokens = 0  # every evaluation, in-loop too, reads every token
  c.task.seq_len = seq_len
  c.task.eval_batch_size = 32
  c.task.eval_sources = ml_collections.ConfigDict(
      {
          "c4_sample": dict(
              source="files", path=lm_common.C4_SAMPLE, eval_path=lm_common.C4_SAMPLE, eval_split="validation"
          )
      }
  )
  c.batch_size = 16
  c.steps = 600
  c.log_every = 25
  c.eval_every = 0
  # Every evaluation reads all 600k GPT-2 tokens of the two files (about 7 min on one core of this CPU), so
  # they are few and roughly log-spaced; the final step is always evaluated too.
  c.eval_steps = [25, 75, 150, 300, 600, 1200]
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.optim.lr = 3e-3
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.weight_ema.kind = "none"
  if tiny:
    c.batch_size, c.steps, c.eval_steps, c.checkpoint_every, c.log_every = 4, 6, [3], 3, 2
    c.optim.warmup_steps = 2
    c.data.tokenizer = "byte"
    c.data.eval_max_documents = 3
  return c
