"""Language modelling on the text pipeline: the EMA-only LM, the trace aggregator or the GPT-2 baseline.

config.model.kind selects the model ('ema_lm', 'aggregator' or 'gpt'); the other config.model fields are
the model's config (EMALMConfig / AggregatorConfig / GPTConfig) and config.model.preset names a preset
they override. The vocabulary comes from the tokenizer (config.data.tokenizer). config.model.dtype='bfloat16' computes in bfloat16
with float32 parameters, float32 logits and a float32 loss.

Evaluation (the same code in the training loop and in eval.py) is exact over each split: the sum of
masked negative log-likelihoods over every target token once, so perplexity = exp(nll / tokens) and
bits per byte = nll / (ln 2 * UTF-8 bytes); perplexity per GPT-2 token = exp(nll / GPT-2 tokens of the same
text) sets a byte-level model beside a GPT-2-tokenized result (it is the perplexity when the tokenizer is
GPT-2's). It runs for each source in config.task.eval_sources (the
training source's eval split is 'validation'; others are named data configs) at each context length in
config.task.eval_lengths.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ema_jax import models
from ema_jax.data import text as text_lib
from ema_jax.data import tokenizer as tokenizer_lib
from ema_jax.tasks.base import EvalContext, Task

MODEL_KINDS = models.MODEL_KINDS


class LMTask(Task):

  def __init__(self, config: ml_collections.ConfigDict, workdir: Optional[str] = None):
    super().__init__(config, workdir)
    self._tokenizer = None
    self._eval_fn = {}
    self._eval_batches = {}

  # ------------------------------------------------------------------------------------------ config

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = tokenizer_lib.get_tokenizer(self.config.data.tokenizer)
    return self._tokenizer

  def model_config(self):
    m = self.config.model
    defaults = {"context_len": self.config.task.seq_len} if m.kind == "gpt" else None
    return models.make_config(m, defaults, vocab_size=self.tokenizer.vocab_size)

  def validate(self) -> None:
    t = self.config.task
    if not isinstance(t.seq_len, int) or t.seq_len < 1:
      raise ValueError(f"config.task.seq_len={t.seq_len!r}: expected a positive integer.")
    lengths = list(t.eval_lengths or [t.seq_len])
    if any((not isinstance(n, int)) or n < 1 for n in lengths):
      raise ValueError(f"config.task.eval_lengths={lengths!r}: expected positive integers.")
    if not isinstance(t.eval_batch_size, int) or t.eval_batch_size < 1:
      raise ValueError(f"config.task.eval_batch_size={t.eval_batch_size!r}: expected a positive integer.")
    text_lib.parse_data_config(self.config.data)
    for name, overrides in (t.eval_sources or {}).items():
      text_lib.parse_data_config(self._source_config(name))
    cfg = self.model_config()  # validates the model fields
    if self.config.model.kind == "gpt" and max(lengths + [t.seq_len]) > cfg.context_len:
      raise ValueError(
          f"config.task.seq_len/eval_lengths up to {max(lengths + [t.seq_len])} exceed the GPT's "
          f"context_len={cfg.context_len}; raise config.model.context_len or shorten them."
      )

  def _source_config(self, name):
    data = ml_collections.ConfigDict(self.config.data.to_dict())
    if name != "validation":
      for k, v in self.config.task.eval_sources[name].items():
        data[k] = v
    return data

  # ------------------------------------------------------------------------------------------ task API

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return models.sequence_model(self.config.model.kind).model_cls(self.model_config(), rngs=rngs)

  def train_iterator(self, process_index: int, process_count: int):
    c = self.config
    return text_lib.make_train_iterator(
        c.data, self.tokenizer, c.task.seq_len, c.batch_size, c.seed, process_index, process_count
    )

  def loss(self, model, batch: Mapping[str, jax.Array], *, rngs: Optional[nnx.Rngs], train: bool):
    nll_sum, n_tokens = token_nll(model, batch, rngs=rngs, train=train)
    loss = nll_sum / jnp.maximum(n_tokens, 1.0)
    return loss, {"perplexity": jnp.exp(loss), "bits_per_token": loss / math.log(2.0)}

  def seq_len(self) -> Optional[int]:
    return int(self.config.task.seq_len)

  def tokens_per_example(self) -> int:
    return self.config.task.seq_len

  def flops_per_token(self) -> Optional[float]:
    module = models.sequence_model(self.config.model.kind).module
    return module.flops_per_token(self.model_config(), self.config.task.seq_len)

  # ------------------------------------------------------------------------------------------ eval

  def _batches(self, source: str, length: int, ctx: EvalContext):
    """In-loop evaluations read data.eval_max_tokens target tokens (0 = all); the final evaluation and
    eval.py read data.eval_max_tokens_final (default 0: every token of the split)."""
    key = (source, length, ctx.final)
    if key not in self._eval_batches:
      t = self.config.task
      data_cfg = self._source_config(source)
      self._eval_batches[key] = text_lib.make_eval_batches(
          data_cfg,
          self.tokenizer,
          length,
          t.eval_batch_size,
          max_tokens=text_lib.parse_data_config(data_cfg).eval_max_tokens_final if ctx.final else None,
          process_index=ctx.process_index,
          process_count=ctx.process_count,
      )
    return self._eval_batches[key]

  def evaluate(self, model: nnx.Module, ctx: EvalContext) -> Dict[str, Any]:
    graphdef, state = nnx.split(model)
    if graphdef not in self._eval_fn:
      self._eval_fn[graphdef] = jax.jit(
          lambda state, batch: token_nll(nnx.merge(graphdef, state), batch, rngs=None, train=False)
      )
    fn = self._eval_fn[graphdef]
    t = self.config.task
    sources = ["validation"] + [s for s in (t.eval_sources or {})]
    table, out = [], {}
    for source in sources:
      for length in t.eval_lengths or [t.seq_len]:
        batches = self._batches(source, length, ctx)
        nll = 0.0
        for b in batches:
          s, _ = fn(state, ctx.put_batch(b))
          nll += float(s)
        ppl = math.exp(nll / batches.num_tokens)
        bpb = nll / (math.log(2.0) * max(batches.num_bytes, 1))
        ppl_gpt2 = math.exp(nll / max(batches.num_gpt2_tokens, 1))
        table.append(
            dict(
                source=source,
                length=length,
                tokens=batches.num_tokens,
                bytes=batches.num_bytes,
                nll=nll,
                loss=nll / batches.num_tokens,
                perplexity=ppl,
                bits_per_byte=bpb,
                gpt2_tokens=batches.num_gpt2_tokens,
                perplexity_per_gpt2_token=ppl_gpt2,
            )
        )
        if length == (t.eval_lengths or [t.seq_len])[0]:
          out[f"{source}/loss"] = nll / batches.num_tokens
          out[f"{source}/perplexity"] = ppl
          out[f"{source}/bits_per_byte"] = bpb
          out[f"{source}/perplexity_per_gpt2_token"] = ppl_gpt2
    out["table"] = table
    return out

  def summarize(self, results: Dict[str, Dict[str, Any]], step: int, workdir: Optional[str]) -> str:
    lines = [
        f"LM evaluation at step {step} ({self.config.model.kind}, tokenizer {self.config.data.tokenizer})",
        f"{'weights':<8}{'source':<14}{'length':>7}{'tokens':>10}{'loss':>9}{'perplexity':>12}{'bits/byte':>10}{'ppl/GPT-2 tok':>15}",
    ]
    for name, res in results.items():
      for row in res["table"]:
        lines.append(
            f"{name:<8}{row['source']:<14}{row['length']:>7}{row['tokens']:>10}{row['loss']:>9.4f}"
            f"{row['perplexity']:>12.2f}{row['bits_per_byte']:>10.4f}"
            f"{row['perplexity_per_gpt2_token']:>15.2f}"
        )
    return "\n".join(lines)


def token_nll(model, batch, *, rngs, train):
  """(sum of masked token NLL in float32, number of target tokens)."""
  logits_BTV = model(
      batch["inputs"],
      resets_BT=batch["resets"],
      segment_ids_BT=batch["segment_ids"],
      deterministic=not train,
      rngs=rngs,
  )
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), batch["targets"])
  mask_BT = batch["mask"].astype(jnp.float32)
  return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)


TASK = LMTask
