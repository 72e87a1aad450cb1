"""Text generation from a language model that has `prefill` and `decode_step` (EMALM, GPT).

A batch of prompts of different lengths is right-padded to [B, T] with its lengths [B]: `prefill` reads
the padded batch in one parallel pass and takes each row's state after its own last token, so padding
never reaches a row's continuation (the GPT keeps its absolute positions: row b continues at position
lengths[b], as if alone). The loop over new tokens is one jax.lax.scan inside one jit: compiled once per
(model, batch, prompt length, number of new tokens), with the sampling settings as traced arguments, so
changing the temperature, top-k, top-p or seed never recompiles and no token goes back to the host.

Sampling (`sample`): logits / temperature, then top-k (keep the k largest; 0 = off), then top-p (nucleus,
Holtzman et al. 2020: keep the smallest set of most likely tokens whose probability reaches p; 1 = off),
then a categorical draw; temperature 0 is greedy (argmax), whatever top-k and top-p say.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def check_settings(temperature: float, top_k: int, top_p: float) -> None:
  """ValueErrors for sampling settings that cannot work, before anything is compiled."""
  if not temperature >= 0:
    raise ValueError(f"`temperature`={temperature!r}; expected >= 0 (0 is greedy decoding, 1 the model's own).")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"`top_k`={top_k!r}; expected an integer >= 0 (0 keeps every token).")
  if not 0 < top_p <= 1:
    raise ValueError(f"`top_p`={top_p!r}; expected a probability in (0, 1] (1 keeps every token).")


def sample(logits_BV, key, temperature, top_k, top_p):
  """One token per row from float logits [B, V]: int32 [B]. The settings may be traced scalars."""
  logits_BV = logits_BV.astype(jnp.float32)
  v = logits_BV.shape[-1]
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  temperature = jnp.asarray(temperature, jnp.float32)
  scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)  # descending
  top_k = jnp.asarray(top_k, jnp.int32)
  kth_B1 = jnp.take(sorted_BV, jnp.clip(top_k - 1, 0, v - 1), axis=-1)[:, None]
  scaled_BV = jnp.where((top_k > 0) & (scaled_BV < kth_B1), neg_inf, scaled_BV)
  # Nucleus: a sorted token is kept when the mass before it is below p (the most likely one always is);
  # the cut-off is the smallest kept logit. Computed on the top-k-filtered distribution.
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  top_p = jnp.asarray(top_p, jnp.float32)
  kept_BV = before_BV < top_p
  cutoff_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  scaled_BV = jnp.where((top_p < 1.0) & (scaled_BV < cutoff_B1), neg_inf, scaled_BV)
  sampled_B = jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled_B, greedy_B)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0):
  """Right-pads token lists to (int32 [B, T], lengths int32 [B]); every prompt needs >= 1 token."""
  if not prompts:
    raise ValueError("pad_prompts: no prompts; give at least one.")
  lengths = [len(p) for p in prompts]
  if min(lengths) < 1:
    raise ValueError(
        f"pad_prompts: prompt {lengths.index(0)} has no tokens; every prompt needs at least one (e.g. the "
        f"end-of-document id that opens a document)."
    )
  tokens_BT = np.full((len(prompts), max(lengths)), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens_BT[i, : len(p)] = np.asarray(p, np.int32)
  return tokens_BT, np.asarray(lengths, np.int32)


def position_limit(model) -> Optional[int]:
  """Longest sequence (prompt + new tokens) the model can read: the GPT's context_len, else None."""
  return getattr(model.config, "context_len", None)


@functools.lru_cache(maxsize=32)
def _generate_fn(graphdef, max_new_tokens: int, max_len: Optional[int], eod_id: Optional[int], stop_at_eod: bool):
  """The jitted generation program for one model structure and number of new tokens."""

  def run(state, tokens_BT, lengths_B, key, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    b, t = tokens_BT.shape
    resets_BT = None if eod_id is None else tokens_BT == eod_id
    cache, logits_BTV = model.prefill(tokens_BT, resets_BT=resets_BT, lengths_B=lengths_B, max_len=max_len)
    logits_BV = jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]

    def body(carry, i):
      cache, logits_BV, done_B = carry
      token_B = sample(logits_BV, jax.random.fold_in(key, i), temperature, top_k, top_p)
      reset_B = None
      if eod_id is not None:
        if stop_at_eod:
          token_B = jnp.where(done_B, eod_id, token_B)
          done_B = done_B | (token_B == eod_id)
        reset_B = token_B == eod_id
      cache, logits_BV = model.decode_step(cache, token_B, reset_B=reset_B)
      return (cache, logits_BV, done_B), token_B

    done_B = jnp.zeros((b,), bool)
    _, tokens_NB = jax.lax.scan(body, (cache, logits_BV, done_B), jnp.arange(max_new_tokens))
    return tokens_NB.T

  return jax.jit(run)


def generate(
    model,
    tokens_BT,
    lengths_B=None,
    *,
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eod_id: Optional[int] = None,
    stop_at_eod: bool = True,
) -> np.ndarray:
  """New tokens int32 [B, max_new_tokens] after right-padded prompts tokens_BT [B, T] of lengths_B.

  eod_id: the end-of-document id; it marks document starts (resets) in the prompts and in the new tokens,
  as in training, and with stop_at_eod a row that produced it continues with eod_id only.
  """
  check_settings(temperature, top_k, top_p)
  tokens_BT = np.asarray(tokens_BT, np.int32)
  if tokens_BT.ndim != 2 or tokens_BT.shape[1] < 1:
    raise ValueError(f"generate: prompts of shape {tokens_BT.shape}; expected token ids [B, T] with T >= 1.")
  b, t = tokens_BT.shape
  lengths_B = np.full((b,), t, np.int32) if lengths_B is None else np.asarray(lengths_B, np.int32)
  if lengths_B.shape != (b,) or lengths_B.min() < 1 or lengths_B.max() > t:
    raise ValueError(f"generate: `lengths_B`={lengths_B.tolist()}; expected {b} lengths in [1, {t}].")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"generate: `max_new_tokens`={max_new_tokens!r}; expected a positive integer.")
  limit = position_limit(model)
  max_len = t + max_new_tokens  # the GPT's KV cache and the EMA LM's 'attention_history' cache size
  if limit is not None:
    if t + max_new_tokens > limit:
      raise ValueError(
          f"generate: a prompt of {t} tokens plus max_new_tokens={max_new_tokens} is {t + max_new_tokens} "
          f"tokens, past the GPT's context_len={limit} (it has no positions beyond); ask for at most "
          f"{max(limit - t, 0)} new tokens or shorten the prompt. The EMA LM has no such limit."
      )
  graphdef, state = nnx.split(model)
  fn = _generate_fn(graphdef, max_new_tokens, max_len, eod_id, bool(stop_at_eod))
  out_BN = fn(
      state,
      jnp.asarray(tokens_BT),
      jnp.asarray(lengths_B),
      jax.random.key(seed),
      jnp.float32(temperature),
      jnp.int32(top_k),
      jnp.float32(top_p),
  )
  return np.asarray(out_BN)


def continuation_text(tokenizer, new_tokens: Sequence[int]) -> str:
  """Decoded text of new tokens, cut at the first end-of-document id."""
  ids = [int(i) for i in new_tokens]
  if tokenizer.eod_id in ids:
    ids = ids[: ids.index(tokenizer.eod_id)]
  return tokenizer.decode(ids)


def generate_text(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, **settings) -> list:
  """Continuations (text) of text prompts, each read as a document: [end-of-document id] + its tokens,
  as the training stream has them (ema_jax/data/text/packing.py). settings: generate's keywords."""
  ids = [[tokenizer.eod_id] + list(tokenizer.encode(p)) for p in prompts]
  tokens_BT, lengths_B = pad_prompts(ids, pad_id=tokenizer.eod_id)
  new_BN = generate(model, tokens_BT, lengths_B, max_new_tokens=max_new_tokens, eod_id=tokenizer.eod_id, **settings)
  return [continuation_text(tokenizer, row) for row in new_BN]
