"""Multi-head softmax attention (NNX) and the masks that keep it causal and inside one document.

One layer serves the GPT baseline (causal self-attention), the EMA LM's attention predictors (a query
per position over K trace vectors, or over the past trace stacks) and single-layer probes. Any number
of leading batch axes is allowed: queries [..., S, Dq], keys/values [..., T, Dkv].

Numerics: projections run in the compute dtype; scores accumulate in float32 and the softmax is
float32; the weights are cast back to the compute dtype for the value sum.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

_DEFAULT_INIT = nnx.initializers.lecun_normal()


def segment_ids_from_resets(resets_BT) -> jax.Array:
  """Document index per token: cumulative count of resets, int32 [B, T]."""
  return jnp.cumsum(resets_BT.astype(jnp.int32), axis=1)


def resets_from_segment_ids(segment_ids_BT) -> jax.Array:
  """True where the segment id changes from the previous token (never at t = 0): bool [B, T]."""
  change_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
  return jnp.concatenate([jnp.zeros_like(change_BT[:, :1]), change_BT], axis=1)


def resolve_documents(shape_BT, resets_BT=None, segment_ids_BT=None, *, where: str = "model"):
  """Checks the document-boundary inputs and fills in whichever one is missing from the other.

  Returns (resets_BT bool or None, segment_ids_BT int32 or None); both None when neither was given.
  """
  if resets_BT is not None:
    resets_BT = jnp.asarray(resets_BT)
    if resets_BT.shape != tuple(shape_BT) or resets_BT.dtype != jnp.bool_:
      raise ValueError(
          f"{where}: `resets_BT` has shape {resets_BT.shape} and dtype {resets_BT.dtype}; "
          f"expected bool {tuple(shape_BT)} ([B, T], True where a document starts)."
      )
  if segment_ids_BT is not None:
    segment_ids_BT = jnp.asarray(segment_ids_BT)
    if segment_ids_BT.shape != tuple(shape_BT) or not jnp.issubdtype(segment_ids_BT.dtype, jnp.integer):
      raise ValueError(
          f"{where}: `segment_ids_BT` has shape {segment_ids_BT.shape} and dtype "
          f"{segment_ids_BT.dtype}; expected integers {tuple(shape_BT)} ([B, T], one id per document)."
      )
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)
  if resets_BT is None and segment_ids_BT is not None:
    resets_BT = resets_from_segment_ids(segment_ids_BT)
  if segment_ids_BT is None and resets_BT is not None:
    segment_ids_BT = segment_ids_from_resets(resets_BT)
  return resets_BT, segment_ids_BT


def dropout_rngs(rngs, active: bool, *, where: str = "model"):
  """What a model passes to its dropout layers: None when dropout is off, else an nnx.Rngs.

  rngs may be an nnx.Rngs (its 'dropout' stream, or 'default', is used and advanced), an RngStream,
  or a PRNG key (wrapped in a fresh nnx.Rngs, so every dropout site still draws its own key).
  """
  if not active:
    return None
  if rngs is None:
    raise ValueError(
        f"{where}: deterministic=False with dropout > 0 needs `rngs` (an nnx.Rngs with a "
        f"'dropout' stream, or a PRNG key); pass deterministic=True for evaluation."
    )
  if isinstance(rngs, (nnx.Rngs, nnx.RngStream)):
    return rngs
  return nnx.Rngs(dropout=rngs)


def causal_mask(length: int, *, include_self: bool = True) -> jax.Array:
  """bool [1, 1, T, T]: query t may see key s iff s <= t (s < t with include_self=False)."""
  idx = jnp.arange(length)
  allowed_TS = idx[None, :] <= idx[:, None] if include_self else idx[None, :] < idx[:, None]
  return allowed_TS[None, None]


def causal_segment_mask(length: int, segment_ids_BT=None, *, include_self: bool = True) -> jax.Array:
  """bool [B or 1, 1, T, T]: causal, and (when segment ids are given) within the same document."""
  mask_11TT = causal_mask(length, include_self=include_self)
  if segment_ids_BT is None:
    return mask_11TT
  same_B1TT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  return mask_11TT & same_B1TT


class MultiHeadAttention(nnx.Module):
  """Softmax attention with H heads: y = W_o concat_h softmax(q_h k_h^T / sqrt(d_qk) + mask) v_h.

  qk_features (default: q_features) and v_features (default: qk_features) are the totals over heads
  and must be divisible by num_heads; out_features defaults to q_features. Dropout, when rate > 0,
  acts on the attention weights.
  """

  def __init__(
      self,
      num_heads: int,
      q_features: int,
      kv_features: Optional[int] = None,
      *,
      qk_features: Optional[int] = None,
      v_features: Optional[int] = None,
      out_features: Optional[int] = None,
      use_bias: bool = True,
      dropout: float = 0.0,
      dtype=None,
      kernel_init=_DEFAULT_INIT,
      out_kernel_init=None,
      rngs: nnx.Rngs,
  ):
    kv_features = q_features if kv_features is None else kv_features
    qk_features = q_features if qk_features is None else qk_features
    v_features = qk_features if v_features is None else v_features
    out_features = q_features if out_features is None else out_features
    for name, value in (
        ("num_heads", num_heads),
        ("q_features", q_features),
        ("kv_features", kv_features),
        ("qk_features", qk_features),
        ("v_features", v_features),
        ("out_features", out_features),
    ):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"MultiHeadAttention: `{name}`={value!r}; expected a positive integer.")
    for name, value in (("qk_features", qk_features), ("v_features", v_features)):
      if value % num_heads:
        raise ValueError(
            f"MultiHeadAttention: `{name}`={value} is not divisible by num_heads={num_heads}; "
            f"pick a multiple of {num_heads}."
        )
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"MultiHeadAttention: `dropout`={dropout!r}; expected a rate in [0, 1).")
    self.num_heads = num_heads
    self.head_qk = qk_features // num_heads
    self.head_v = v_features // num_heads
    self.dtype = dtype
    out_kernel_init = kernel_init if out_kernel_init is None else out_kernel_init
    linear = dict(use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.query = nnx.Linear(q_features, qk_features, kernel_init=kernel_init, **linear)
    self.key = nnx.Linear(kv_features, qk_features, kernel_init=kernel_init, **linear)
    self.value = nnx.Linear(kv_features, v_features, kernel_init=kernel_init, **linear)
    self.out = nnx.Linear(v_features, out_features, kernel_init=out_kernel_init, **linear)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_q, x_kv=None, *, mask=None, bias=None, deterministic: bool = True, rngs=None):
    """x_q [..., S, Dq], x_kv [..., T, Dkv] (default x_q) -> [..., S, out_features].

    mask: bool, broadcastable to [..., H, S, T]; True where query s may attend to key t. A query with
    no allowed key gets zero weights (its output is the output bias), never NaN.
    bias: float, broadcastable to [..., H, S, T]; added to the scores before the softmax (e.g. a learned
    relative-position bias).
    rngs: nnx.Rngs / RngStream / key for the attention dropout (needed only when it is active).
    """
    x_kv = x_q if x_kv is None else x_kv
    lead = x_q.shape[:-2]
    q_SHd = self.query(x_q).reshape(*lead, x_q.shape[-2], self.num_heads, self.head_qk)
    k_THd = self.key(x_kv).reshape(*x_kv.shape[:-2], x_kv.shape[-2], self.num_heads, self.head_qk)
    v_THd = self.value(x_kv).reshape(*x_kv.shape[:-2], x_kv.shape[-2], self.num_heads, self.head_v)
    q_SHd = q_SHd * jnp.asarray(self.head_qk**-0.5, q_SHd.dtype)
    scores_HST = jnp.einsum("...shd,...thd->...hst", q_SHd, k_THd, preferred_element_type=jnp.float32)
    if bias is not None:
      scores_HST = scores_HST + bias.astype(jnp.float32)
    if mask is not None:
      scores_HST = jnp.where(mask, scores_HST, jnp.finfo(jnp.float32).min)
    weights_HST = jax.nn.softmax(scores_HST, axis=-1)
    if mask is not None:
      # A row with every key masked would be uniform over masked keys; zero it instead.
      weights_HST = jnp.where(mask, weights_HST, 0.0)
    weights_HST = self.dropout(weights_HST, deterministic=deterministic, rngs=rngs)
    weights_HST = weights_HST.astype(v_THd.dtype)
    y_SHd = jnp.einsum("...hst,...thd->...shd", weights_HST, v_THd)
    return self.out(y_SHd.reshape(*lead, x_q.shape[-2], self.num_heads * self.head_v))
