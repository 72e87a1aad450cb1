"""Supervised bidirectional GRU tagger: the baseline the label-free Hebbian role model is compared with.

    tokens -> embedding -> [BiGRU layer] x num_layers -> linear -> role logits per token

Each BiGRU layer runs one GRU left to right and one right to left over the sentence and concatenates
their states (2 * hidden per token). The GRU cell is written out here (the cuDNN / PyTorch variant,
reset gate applied after the recurrent matmul):
    r = sigmoid(W_r x + U_r h + b_r),  z = sigmoid(W_z x + U_z h + b_z)
    n = tanh(W_n x + b_n + r * (U_n h + c_n)),  h' = (1 - z) * n + z * h
The input projections W x of all time steps are one matmul before the scan; only U h is sequential.

Padding: at a padded position the state is carried through unchanged (h' = h), the identity step of
the recurrence. Padding sits after the sentence, so the forward GRU has finished the sentence before
it and the backward GRU starts from its zero state at the last real token: outputs at real tokens do
not depend on the padding at all (tests/tasks/test_roles.py checks this).

Regularization: dropout on the embeddings, between layers and before the output layer, and word
dropout (a training token is replaced by `unk_id` with probability word_dropout), which also trains
the embedding that words unseen in training are mapped to.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class BiGRUConfig:
  vocab_size: int  # V: rows of the embedding table (unk_id included)
  num_roles: int  # R
  unk_id: int  # word dropout replaces tokens by this id
  embed_dim: int = 128
  hidden: int = 128  # per direction; a layer outputs 2 * hidden
  num_layers: int = 2
  dropout: float = 0.2
  word_dropout: float = 0.1

  def __post_init__(self):
    checks = [
        (self.vocab_size >= 1, "vocab_size", "an integer >= 1"),
        (self.num_roles >= 2, "num_roles", "an integer >= 2"),
        (0 <= self.unk_id < self.vocab_size, "unk_id", f"an id in [0, vocab_size={self.vocab_size})"),
        (self.embed_dim >= 1, "embed_dim", "an integer >= 1"),
        (self.hidden >= 1, "hidden", "an integer >= 1"),
        (self.num_layers >= 1, "num_layers", "an integer >= 1"),
        (0.0 <= self.dropout < 1.0, "dropout", "a rate in [0, 1)"),
        (0.0 <= self.word_dropout < 1.0, "word_dropout", "a rate in [0, 1)"),
    ]
    for ok, field, want in checks:
      if not ok:
        raise ValueError(f"BiGRUConfig.{field}={getattr(self, field)!r}: expected {want}")


class GRU(nnx.Module):
  """One direction of a GRU layer over [B, T, D_in] with a padding mask; returns states [B, T, H]."""

  def __init__(self, in_features: int, hidden: int, *, reverse: bool, rngs: nnx.Rngs):
    self.hidden, self.reverse = hidden, reverse
    self.inp = nnx.Linear(in_features, 3 * hidden, rngs=rngs)
    self.rec = nnx.Linear(hidden, 3 * hidden, kernel_init=nnx.initializers.orthogonal(), rngs=rngs)

  def __call__(self, x_BTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
    gx_TB3H = jnp.swapaxes(self.inp(x_BTD), 0, 1)
    mask_TB1 = jnp.swapaxes(mask_BT, 0, 1)[..., None]
    u_H3H, c_3H = self.rec.kernel[...], self.rec.bias[...]
    H = self.hidden

    def step(h_BH, inputs):
      gx_B3H, m_B1 = inputs
      gh_B3H = h_BH @ u_H3H + c_3H
      r_BH = jax.nn.sigmoid(gx_B3H[:, :H] + gh_B3H[:, :H])
      z_BH = jax.nn.sigmoid(gx_B3H[:, H : 2 * H] + gh_B3H[:, H : 2 * H])
      n_BH = jnp.tanh(gx_B3H[:, 2 * H :] + r_BH * gh_B3H[:, 2 * H :])
      new_BH = (1.0 - z_BH) * n_BH + z_BH * h_BH
      h_BH = jnp.where(m_B1, new_BH, h_BH)  # identity step at padding
      return h_BH, h_BH

    h0_BH = jnp.zeros((x_BTD.shape[0], H), gx_TB3H.dtype)
    _, h_TBH = jax.lax.scan(step, h0_BH, (gx_TB3H, mask_TB1), reverse=self.reverse)
    return jnp.swapaxes(h_TBH, 0, 1)


class BiGRULayer(nnx.Module):

  def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
    self.fwd = GRU(in_features, hidden, reverse=False, rngs=rngs)
    self.bwd = GRU(in_features, hidden, reverse=True, rngs=rngs)

  def __call__(self, x_BTD, mask_BT):
    return jnp.concatenate([self.fwd(x_BTD, mask_BT), self.bwd(x_BTD, mask_BT)], axis=-1)


class BiGRUTagger(nnx.Module):
  """Role logits [B, T, R] for tokens [B, T] int32 and mask [B, T] bool (logits at padding are junk)."""

  def __init__(self, cfg: BiGRUConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim, rngs=rngs)
    dims = [cfg.embed_dim] + [2 * cfg.hidden] * cfg.num_layers
    self.layers = nnx.List([BiGRULayer(dims[i], cfg.hidden, rngs=rngs) for i in range(cfg.num_layers)])
    self.drop = nnx.Dropout(cfg.dropout)
    self.out = nnx.Linear(2 * cfg.hidden, cfg.num_roles, rngs=rngs)

  def __call__(
      self, tokens_BT: jax.Array, mask_BT: jax.Array, *, deterministic: bool = True, rngs: Optional[nnx.Rngs] = None
  ) -> jax.Array:
    mask_BT = mask_BT.astype(bool)
    if not deterministic and self.cfg.word_dropout > 0:
      drop_BT = jax.random.bernoulli(rngs.dropout(), self.cfg.word_dropout, tokens_BT.shape)
      tokens_BT = jnp.where(drop_BT & mask_BT, self.cfg.unk_id, tokens_BT)
    x_BTD = self.drop(self.embed(tokens_BT), deterministic=deterministic, rngs=rngs)
    for layer in self.layers:
      x_BTD = self.drop(layer(x_BTD, mask_BT), deterministic=deterministic, rngs=rngs)
    return self.out(x_BTD)


def param_count(cfg: BiGRUConfig) -> int:
  """Trainable parameters, by formula (tests check it against the initialised model)."""
  gru = lambda d_in: 3 * cfg.hidden * (d_in + cfg.hidden + 2)
  dims = [cfg.embed_dim] + [2 * cfg.hidden] * cfg.num_layers
  return (
      cfg.vocab_size * cfg.embed_dim
      + sum(2 * gru(dims[i]) for i in range(cfg.num_layers))
      + (2 * cfg.hidden + 1) * cfg.num_roles
  )


def flops_per_token(cfg: BiGRUConfig) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward matmul FLOPs; embeddings are lookups)."""
  dims = [cfg.embed_dim] + [2 * cfg.hidden] * cfg.num_layers
  fwd = sum(2 * 2 * 3 * cfg.hidden * (dims[i] + cfg.hidden) for i in range(cfg.num_layers))
  fwd += 2 * 2 * cfg.hidden * cfg.num_roles
  return 3.0 * fwd
