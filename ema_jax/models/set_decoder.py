"""The set-complement paper's model: a single-layer, attention-only, decoder-only transformer.

"Learning What's Missing: Attention Dispersion and EMA Stabilization in Length Generalization"
(Zsámboki et al., arXiv 2510.08341; model definition in its problem setup) studies single-layer,
attention-only, single-head, decoder-only transformers whose next-token logits for t = (t_1..t_s) are

    f(t) = B[t_s] + sum_i a(t_s, t_i) D[t_i],     B = E U,   D = E W_V W_O U,

with E the token embedding (v x d), U the unembedding and a(t_s, .) the attention of the last token
over the sequence, itself included; the abstract names softmax as what compresses the logit
displacements. Choices and where they come from:
  - no positional embedding: f depends on the tokens only (the formula), so the logits of a prefix are
    a function of its set and its last token;
  - no bias terms and no LayerNorm: B and D are bare products of weight matrices (the formula);
  - one head by default ("single-head"); num_heads > 1 sums heads, an option of ours;
  - the scores E[t_s] W_Q (E[t_i] W_K)^T / sqrt(d_head): the formula gives the attention only through
    a; the 1/sqrt(d) scale is the standard transformer's and only reparametrises W_Q W_K.
  - ours, not the paper's (its experimental section could not be read here): training every prefix
    at once with the mean complement cross-entropy, the vocabulary, widths and schedule of
    configs/set_complement.py.
The residual stream carries E[t_s] to the unembedding, which is the direct path B[t_s].

Every prefix of a set is a set, so one causal pass gives the logits of all s prefixes at once: __call__
returns logits [B, L, N] at every position (position i reads t_1..t_i); `last_logits` reads position s.

Token layout as in ema_jax/data/set_complement.py: set tokens 0..N-1, then PAD (id N). Padding follows
the set, so causality alone keeps it out of every valid position; there is no query token.

Dropout (rate `dropout` at the sites in `dropout_on`, the query model's sites): 'embedding' on the
embedded tokens, 'attention' on the weights after the softmax, 'output' on the attention output. Rates
are constants of the compiled program, or, with traced_dropout=True, held in the model's state (a
DropoutRates variable, one rate per site, 0 = the identity) so that the sweep's vmapped runs differ in data
only (experiments/set_complement_sweep.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from ema_jax.models.set_transformer import (
    DROPOUT_SITES,
    DropoutRates,
    base_key,
    common_checks,
    dropout,
    parse_dropout_on,
)


@dataclasses.dataclass(frozen=True)
class SetDecoderConfig:
  num_tokens: int  # N set tokens; the vocabulary adds PAD
  embed_dim: int = 64  # D: embeddings, queries/keys, residual
  value_dim: int = 64  # total value width over all heads
  num_heads: int = 1  # H; the paper's model has one head
  dropout: float = 0.0
  dropout_on: Tuple[str, ...] = ("attention",)
  traced_dropout: bool = False  # rates in a DropoutRates variable instead of constants

  def __post_init__(self):
    object.__setattr__(self, "dropout_on", parse_dropout_on(self.dropout_on))
    checks = common_checks(self) + [(isinstance(self.traced_dropout, bool), "traced_dropout", "a bool")]
    for ok, name, expected in checks:
      if not ok:
        raise ValueError(f"SetDecoderConfig: `{name}`={getattr(self, name)!r}; expected {expected}.")

  @property
  def pad_id(self) -> int:
    return self.num_tokens


class SetDecoder(nnx.Module):
  """tokens [B, L] (set tokens then PAD), mask [B, L] -> float32 next-token logits [B, L, N] per prefix."""

  def __init__(self, config: SetDecoderConfig, *, rngs: nnx.Rngs):
    cfg = self.config = config
    d, dv, n = cfg.embed_dim, cfg.value_dim, cfg.num_tokens
    self.embed = nnx.Embed(n + 1, d, rngs=rngs)  # E (plus the PAD row, never read at a valid position)
    self.query = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.key = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.value = nnx.Linear(d, dv, use_bias=False, rngs=rngs)
    self.attn_out = nnx.Linear(dv, d, use_bias=False, rngs=rngs)
    self.unembed = nnx.Linear(d, n, use_bias=False, rngs=rngs)  # U
    self.dropout_rates = (
        DropoutRates(jnp.asarray([cfg.dropout if s in cfg.dropout_on else 0.0 for s in DROPOUT_SITES], jnp.float32))
        if cfg.traced_dropout
        else None
    )

  def __call__(self, tokens_BL, mask_BL=None, *, deterministic: bool = True, rngs=None):
    """Logits at every position; rows of position i >= the set size read padding and mean nothing."""
    return self._forward(tokens_BL, deterministic=deterministic, rngs=rngs)[0]

  @staticmethod
  def _checked(tokens_BL):
    tokens_BL = jnp.asarray(tokens_BL)
    if tokens_BL.ndim != 2 or not jnp.issubdtype(tokens_BL.dtype, jnp.integer):
      raise ValueError(
          f"SetDecoder: `tokens_BL` has shape {tokens_BL.shape} and dtype {tokens_BL.dtype}; "
          "expected integer token ids [B, L]."
      )
    return tokens_BL

  def _forward(self, tokens_BL, *, deterministic: bool = True, rngs=None):
    """(logits [B, L, N], attention weights [B, H, L, L] after the softmax, before dropout)."""
    cfg = self.config
    tokens_BL = self._checked(tokens_BL)
    b, length = tokens_BL.shape
    if self.dropout_rates is not None:
      rates = {s: self.dropout_rates.value[i] for i, s in enumerate(DROPOUT_SITES)}
    else:
      rates = {s: cfg.dropout for s in cfg.dropout_on} if cfg.dropout > 0 else {}
    active = {s: (not deterministic) and s in rates for s in DROPOUT_SITES}
    key = base_key(rngs) if any(active.values()) else None
    site_key = lambda s: jax.random.fold_in(key, DROPOUT_SITES.index(s)) if active[s] else None
    drop = lambda s, x: dropout(x, rates.get(s, 0.0), site_key(s), active[s])

    x_BLD = drop("embedding", self.embed(tokens_BL))
    h = cfg.num_heads
    q_BLHK = self.query(x_BLD).reshape(b, length, h, -1)
    k_BLHK = self.key(x_BLD).reshape(b, length, h, -1)
    v_BLHV = self.value(x_BLD).reshape(b, length, h, -1)
    scores_BHLL = jnp.einsum("bqhk,bshk->bhqs", q_BLHK, k_BLHK) / math.sqrt(q_BLHK.shape[-1])
    # Causal, the diagonal included: position i attends to t_1..t_i. A finite fill keeps rows NaN-free.
    causal_LL = jnp.tril(jnp.ones((length, length), bool))
    scores_BHLL = jnp.where(causal_LL, scores_BHLL, jnp.finfo(scores_BHLL.dtype).min)
    probs_BHLL = jax.nn.softmax(scores_BHLL, axis=-1)
    weights_BHLL = drop("attention", probs_BHLL)
    o_BLHV = jnp.einsum("bhqs,bshv->bqhv", weights_BHLL, v_BLHV)
    o_BLD = drop("output", self.attn_out(o_BLHV.reshape(b, length, -1)))
    return self.unembed(x_BLD + o_BLD).astype(jnp.float32), probs_BHLL

  def last_forward(self, tokens_BL, mask_BL):
    """(logits [B, N], attention weights [B, H, L]) at the last set token of each row (position size - 1),
    deterministic. Only that position's query is computed (keys and values at every position, the
    query, weighted sum, output projection and unembedding at one): about a quarter of the full forward's
    work at L = 63. On XLA:CPU these are the same bits as the full forward's row at that position for
    every size 1..63 at L = 63, the evaluation's shape (tests/models/test_set_decoder.py), so evaluations
    did not change with it; at other L they can differ in the last bits (at L = 2 they do)."""
    cfg = self.config
    tokens_BL = self._checked(tokens_BL)
    b, length = tokens_BL.shape
    last_B = jnp.maximum(jnp.asarray(mask_BL).astype(jnp.int32).sum(axis=1) - 1, 0)
    x_BLD = self.embed(tokens_BL)
    x_BD = jnp.take_along_axis(x_BLD, last_B[:, None, None], axis=1)[:, 0]
    h = cfg.num_heads
    q_BHK = self.query(x_BD).reshape(b, h, -1)
    k_BLHK = self.key(x_BLD).reshape(b, length, h, -1)
    v_BLHV = self.value(x_BLD).reshape(b, length, h, -1)
    scores_BHL = jnp.einsum("bhk,bshk->bhs", q_BHK, k_BLHK) / math.sqrt(q_BHK.shape[-1])
    causal_BHL = jnp.arange(length)[None, None, :] <= last_B[:, None, None]  # t_1..t_size, as _forward's
    scores_BHL = jnp.where(causal_BHL, scores_BHL, jnp.finfo(scores_BHL.dtype).min)
    probs_BHL = jax.nn.softmax(scores_BHL, axis=-1)
    o_BHV = jnp.einsum("bhs,bshv->bhv", probs_BHL, v_BLHV)
    o_BD = self.attn_out(o_BHV.reshape(b, -1))
    return self.unembed(x_BD + o_BD).astype(jnp.float32), probs_BHL

  def last_logits(self, tokens_BL, mask_BL, *, deterministic: bool = True, rngs=None, full_forward: bool = False):
    """Logits [B, N] at the last set token of each row (position size - 1): the prediction for the set.
    last_forward's, or the full forward's row with dropout active (deterministic=False, as in training)
    or full_forward=True."""
    if deterministic and not full_forward:
      return self.last_forward(tokens_BL, mask_BL)[0]
    logits_BLN = self(tokens_BL, mask_BL, deterministic=deterministic, rngs=rngs)
    last_B = jnp.maximum(jnp.asarray(mask_BL).astype(jnp.int32).sum(axis=1) - 1, 0)
    return jnp.take_along_axis(logits_BLN, last_B[:, None, None], axis=1)[:, 0]

  def last_attention(self, tokens_BL, mask_BL, *, full_forward: bool = False):
    """Attention weights [B, H, L] of the last set token over the set (itself included): what the
    prediction for the whole set reads. Zero past the set. last_forward's, or with full_forward=True the
    full forward's row."""
    if not full_forward:
      return self.last_forward(tokens_BL, mask_BL)[1]
    _, probs_BHLL = self._forward(tokens_BL, deterministic=True)
    last_B = jnp.maximum(jnp.asarray(mask_BL).astype(jnp.int32).sum(axis=1) - 1, 0)
    return jnp.take_along_axis(probs_BHLL, last_B[:, None, None, None], axis=2)[:, :, 0]


def prefix_present(tokens_BL, mask_BL, num_tokens: int):
  """Multi-hot [B, L, N] (float32) of the tokens in each prefix t_1..t_i (the set of position i)."""
  onehot_BLN = (tokens_BL[..., None] == jnp.arange(num_tokens)) & (jnp.asarray(mask_BL)[..., None] > 0)
  return (jnp.cumsum(onehot_BLN.astype(jnp.int32), axis=1) > 0).astype(jnp.float32)


def param_count(config: SetDecoderConfig) -> int:
  abstract = nnx.eval_shape(lambda: SetDecoder(config, rngs=nnx.Rngs(0)))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def flops_per_example(config: SetDecoderConfig, length: int) -> float:
  """Training FLOPs (forward + backward = 3 x forward) for one padded row of `length` tokens.

  Forward multiply-adds per position: query, key, value projections (D (2 D + Dv)), output projection
  (Dv D), unembedding (D N); and the full L x L scores and weighted sums (L^2 (D + Dv)).
  """
  d, dv, n, s = config.embed_dim, config.value_dim, config.num_tokens, length
  macs = s * (d * (2 * d + dv) + dv * d + d * n) + s * s * (d + dv)
  return 6.0 * macs
