"""Sliding-window causal attention with a learned relative-position bias, and its constant-size decoding cache."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ema_jax.nn.attention import MultiHeadAttention, causal_segment_mask


class WindowAttention(nnx.Module):
  """Causal softmax attention over the last W tokens of the document: the two-memory hybrid's exact, local
  memory (EMALMConfig.window; the traces keep the compressed far past).

  Query t attends to keys s with t - W < s <= t in t's document, plus a learned bias per head and
  offset t - s (relative positions: the EMA LM has no position embedding, and a relative bias keeps the
  block free of any length limit). Keys and values are projections of the block input u. Decoding keeps
  the last W inputs u (not their keys and values: half the bytes, for 2 W D^2 extra multiply-adds per
  token), so the hybrid's state per sequence is W D + K D numbers per block whatever the context length.
  """

  def __init__(
      self,
      features: int,
      num_heads: int,
      window: int,
      *,
      dropout: float = 0.0,
      dtype=None,
      out_kernel_init=None,
      rngs: nnx.Rngs,
  ):
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
      raise ValueError(f"WindowAttention: `window`={window!r}; expected a positive number of tokens.")
    self.window = window
    self.attention = MultiHeadAttention(
        num_heads, features, dropout=dropout, dtype=dtype, out_kernel_init=out_kernel_init, rngs=rngs
    )
    self.offset_bias = nnx.Param(jnp.zeros((num_heads, window), jnp.float32))

  def __call__(self, u_BTD, *, segment_ids_BT=None, deterministic: bool = True, rngs=None):
    t = u_BTD.shape[1]
    idx = jnp.arange(t)
    offsets_TT = idx[:, None] - idx[None, :]
    mask_B1TT = causal_segment_mask(t, segment_ids_BT) & (offsets_TT < self.window)[None, None]
    bias_HTT = self.offset_bias[...][:, jnp.clip(offsets_TT, 0, self.window - 1)]
    return self.attention(u_BTD, mask=mask_B1TT, bias=bias_HTT[None], deterministic=deterministic, rngs=rngs)

  def init_cache(self, batch: int, dtype) -> dict:
    w, d = self.window, self.attention.query.in_features
    return dict(
        inputs=jnp.zeros((batch, w, d), dtype),  # u of the last W tokens, slot s % W holds token s
        pos=jnp.full((batch, w), -1, jnp.int32),  # position of the token in each slot (-1: empty)
    )

  def step(self, cache: dict, u_BD, t_B, start_B):
    """One token at position t_B of a document that started at start_B: (new cache, output [B, D])."""
    b = u_BD.shape[0]
    slot_B = t_B % self.window
    rows = jnp.arange(b)
    inputs = cache["inputs"].at[rows, slot_B].set(u_BD.astype(cache["inputs"].dtype))
    pos = cache["pos"].at[rows, slot_B].set(t_B)
    offsets_BW = t_B[:, None] - pos
    valid_BW = (pos >= 0) & (pos >= start_B[:, None]) & (offsets_BW >= 0) & (offsets_BW < self.window)
    bias_BH1W = jnp.moveaxis(self.offset_bias[...][:, jnp.clip(offsets_BW, 0, self.window - 1)], 0, 1)[:, :, None]
    y_B1D = self.attention(u_BD[:, None], inputs, mask=valid_BW[:, None, None, :], bias=bias_BH1W)
    return dict(inputs=inputs, pos=pos), y_B1D[:, 0]
