"""What the sequence models (EMA LM, aggregator, GPT) share: the output head and the parameter count.

The head is tied to the token embedding by default (GPT-2; the EMA paper's LM reads its predictions out
the same way), computed in the model's compute dtype with float32 accumulation and float32 logits; an
untied head is a bias-free Linear initialised N(0, init_std).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def untied_head(cfg, *, rngs: nnx.Rngs):
  """The untied output head D -> V of a config with width, vocab_size, init_std and compute_dtype; None
  when cfg.tie_embeddings (the head is then the embedding's transpose, see `logits`)."""
  if cfg.tie_embeddings:
    return None
  return nnx.Linear(
      cfg.width,
      cfg.vocab_size,
      use_bias=False,
      dtype=cfg.compute_dtype,
      kernel_init=nnx.initializers.normal(cfg.init_std),
      preferred_element_type=jnp.float32,
      rngs=rngs,
  )


def logits(cfg, embed: nnx.Embed, head, x_BTD):
  """float32 logits [B, T, V] of the final features x_BTD: x E^T when tied, else head(x)."""
  if cfg.tie_embeddings:
    dt = cfg.compute_dtype
    return jnp.einsum(
        "btd,vd->btv", x_BTD.astype(dt), embed.embedding[...].astype(dt), preferred_element_type=jnp.float32
    )
  return head(x_BTD).astype(jnp.float32)


def param_count(build: Callable[[], nnx.Module]) -> int:
  """Trainable parameters of the model `build()` makes (tied embeddings counted once), from shapes only."""
  abstract = nnx.eval_shape(build)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))
