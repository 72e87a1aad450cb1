"""Single-layer, attention-only transformer for the set-complement task ("Learning What's Missing", 2025).

Input: a padded row of s set tokens (ids 0..N-1, PAD_ID = N after them). The model appends a QUERY token
(id N + 1), embeds everything with one table of N + 2 rows, and runs ONE multi-head attention layer in
which only the query attends (to the s set tokens and to itself; padding is masked out). Since there is
one layer and only the query is read out, the other positions' outputs would be dead computation, so only
the query row is computed: O(L) per example, identical to running full self-attention and reading the
query row.

    h = e_query + W_o Attn(q = W_q n(e_query), k, v = W_k n(x), W_v n(x))     logits = W_u h + b_u

n is LayerNorm with norm='pre', the identity with norm='none' (no MLP, no final norm: the paper's model).
norm='post' (GPT-1 style) leaves the attention inputs as they are and normalises the residual sum
instead: logits = W_u LN(h) + b_u.
The residual carries the query embedding into the readout, as the residual stream of a standard block
would; it gives the readout an input-independent "all tokens equally likely" baseline that attention
only has to displace for the tokens present.

Positions: 'none' (default) makes the model a function of the set: permuting the set tokens or changing
the padding leaves the logits unchanged. 'learned' adds a learned vector per slot to the set tokens (slot
i of the row) and to the query (slot s, as if it followed the set directly), a table of N rows. Slots
beyond the longest training set are never trained, so with 'learned' generalisation to longer sets is
tied to untrained position vectors: an ablation, not the paper's setting.

Dropout (rate `dropout`, at the sites in `dropout_on`): 'embedding' on every embedded input (the set
tokens and the query, hence also on the residual), 'attention' on the attention weights after the
softmax, 'output' on the attention output before the residual add. Rates may be passed per call as traced
scalars (dropout_rates=...), or, with traced_dropout=True, held in the model's state (a DropoutRates
variable, one rate per site in DROPOUT_SITES order, 0 where unused): then they are data, not constants of
the compiled program, and jax.vmap over model states trains runs with different rates and placements in one
program (experiments/set_complement_sweep.py). A rate of 0 is exactly the identity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

DROPOUT_SITES = ("attention", "embedding", "output")
NORMS = ("none", "pre", "post")  # no LayerNorm, on the attention inputs, on the residual sum
POSITIONS = ("none", "learned")


def parse_dropout_on(value) -> Tuple[str, ...]:
  """A tuple of sites from a sequence or a comma-separated string ('' or 'none' for no site)."""
  if value is None:
    return ()
  if isinstance(value, str):
    value = [] if value.strip().lower() in ("", "none") else value.split(",")
  return tuple(str(v).strip() for v in value)


def common_checks(cfg) -> list:
  """(ok, field, expected) checks shared by the set-complement model configs (this file, set_decoder.py)."""
  return [
      (isinstance(cfg.num_tokens, int) and cfg.num_tokens >= 2, "num_tokens", "an integer >= 2"),
      (isinstance(cfg.embed_dim, int) and cfg.embed_dim >= 1, "embed_dim", "a positive integer"),
      (isinstance(cfg.value_dim, int) and cfg.value_dim >= 1, "value_dim", "a positive integer"),
      (
          isinstance(cfg.num_heads, int)
          and cfg.num_heads >= 1
          and cfg.embed_dim % cfg.num_heads == 0
          and cfg.value_dim % cfg.num_heads == 0,
          "num_heads",
          f"a positive common divisor of embed_dim={cfg.embed_dim} and value_dim={cfg.value_dim}",
      ),
      (0.0 <= cfg.dropout < 1.0, "dropout", "a rate in [0, 1)"),
      (all(s in DROPOUT_SITES for s in cfg.dropout_on), "dropout_on", f"a subset of {DROPOUT_SITES}"),
  ]


@dataclasses.dataclass(frozen=True)
class SetTransformerConfig:
  num_tokens: int  # N set tokens; the vocabulary adds PAD and QUERY
  embed_dim: int = 64  # D: embeddings, queries/keys, residual
  value_dim: int = 64  # total value width over all heads
  num_heads: int = 1  # H, divides embed_dim and value_dim
  norm: str = "none"
  positions: str = "none"
  dropout: float = 0.0
  dropout_on: Tuple[str, ...] = ("attention",)
  traced_dropout: bool = False  # rates in a DropoutRates variable instead of constants

  def __post_init__(self):
    object.__setattr__(self, "dropout_on", parse_dropout_on(self.dropout_on))
    checks = common_checks(self) + [
        (self.norm in NORMS, "norm", f"one of {NORMS}"),
        (self.positions in POSITIONS, "positions", f"one of {POSITIONS}"),
        (isinstance(self.traced_dropout, bool), "traced_dropout", "a bool"),
    ]
    for ok, name, expected in checks:
      if not ok:
        raise ValueError(f"SetTransformerConfig: `{name}`={getattr(self, name)!r}; expected {expected}.")

  @property
  def pad_id(self) -> int:
    return self.num_tokens

  @property
  def query_id(self) -> int:
    return self.num_tokens + 1


class DropoutRates(nnx.Variable):
  """Dropout rate per site [len(DROPOUT_SITES)], model state that is not trained."""


def dropout(x, rate, key, active: bool):
  """Inverted dropout whose rate may be a traced scalar (rate 0 is the identity)."""
  if not active:
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  keep_mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(keep_mask, x / keep, 0.0).astype(x.dtype)


def base_key(rngs):
  if rngs is None:
    raise ValueError(
        "SetTransformer: deterministic=False with dropout > 0 needs `rngs` (an nnx.Rngs with a "
        "'dropout' or 'default' stream, or a PRNG key)."
    )
  if isinstance(rngs, nnx.Rngs):
    return rngs.dropout()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  return rngs


class SetTransformer(nnx.Module):
  """tokens [B, L] (set tokens then PAD) and mask [B, L] -> float32 logits [B, N] over the set tokens."""

  def __init__(self, config: SetTransformerConfig, *, rngs: nnx.Rngs):
    cfg = self.config = config
    d, dv, n = cfg.embed_dim, cfg.value_dim, cfg.num_tokens
    self.embed = nnx.Embed(n + 2, d, rngs=rngs)
    self.positions = (
        nnx.Embed(n, d, embedding_init=nnx.initializers.normal(0.02), rngs=rngs) if cfg.positions == "learned" else None
    )
    self.norm = nnx.LayerNorm(d, rngs=rngs) if cfg.norm in ("pre", "post") else None
    self.query = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.key = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.value = nnx.Linear(d, dv, use_bias=False, rngs=rngs)
    self.attn_out = nnx.Linear(dv, d, use_bias=False, rngs=rngs)
    self.readout = nnx.Linear(d, n, rngs=rngs)
    self.dropout_rates = (
        DropoutRates(jnp.asarray([cfg.dropout if s in cfg.dropout_on else 0.0 for s in DROPOUT_SITES], jnp.float32))
        if cfg.traced_dropout
        else None
    )

  def __call__(
      self,
      tokens_BL,
      mask_BL,
      *,
      deterministic: bool = True,
      rngs=None,
      dropout_rates: Optional[Mapping[str, jax.Array]] = None,
      return_attention: bool = False,
  ):
    """dropout_rates: {site: rate} overriding config.dropout / dropout_on and the state's DropoutRates (rates
    may be traced). return_attention: return the query's attention weights [B, H, L + 1] instead."""
    cfg = self.config
    tokens_BL = jnp.asarray(tokens_BL)
    if tokens_BL.ndim != 2 or not jnp.issubdtype(tokens_BL.dtype, jnp.integer):
      raise ValueError(
          f"SetTransformer: `tokens_BL` has shape {tokens_BL.shape} and dtype {tokens_BL.dtype}; "
          "expected integer token ids [B, L]."
      )
    b, length = tokens_BL.shape
    if length > cfg.num_tokens - 1 and cfg.positions == "learned":
      raise ValueError(
          f"SetTransformer: rows of length {length} exceed the {cfg.num_tokens - 1} set slots of "
          "positions='learned'; pad to at most num_tokens - 1."
      )
    if dropout_rates is None and self.dropout_rates is not None:
      rates = self.dropout_rates.value
      dropout_rates = {s: rates[i] for i, s in enumerate(DROPOUT_SITES)}
    elif dropout_rates is None:
      dropout_rates = {s: cfg.dropout for s in cfg.dropout_on} if cfg.dropout > 0 else {}
    active = {s: (not deterministic) and s in dropout_rates for s in DROPOUT_SITES}
    key = base_key(rngs) if any(active.values()) else None
    site_key = lambda s: jax.random.fold_in(key, DROPOUT_SITES.index(s)) if active[s] else None
    drop = lambda s, x: dropout(x, dropout_rates.get(s, 0.0), site_key(s), active[s])

    # The query is appended after the padding; only the mask, not the order, tells attention what is there.
    mask_BS = jnp.concatenate([jnp.asarray(mask_BL).astype(bool), jnp.ones((b, 1), bool)], axis=1)
    tokens_BS = jnp.concatenate([tokens_BL, jnp.full((b, 1), cfg.query_id, tokens_BL.dtype)], axis=1)
    x_BSD = self.embed(tokens_BS)
    if self.positions is not None:
      sizes_B = mask_BS[:, :-1].sum(axis=1)
      slots_BS = jnp.concatenate([jnp.broadcast_to(jnp.arange(length), (b, length)), sizes_B[:, None]], axis=1)
      x_BSD = x_BSD + self.positions(jnp.minimum(slots_BS, cfg.num_tokens - 1))
    x_BSD = drop("embedding", x_BSD)
    xq_BD = x_BSD[:, -1]
    n_BSD = self.norm(x_BSD) if cfg.norm == "pre" else x_BSD

    h = cfg.num_heads
    q_BHK = self.query(n_BSD[:, -1]).reshape(b, h, -1)
    k_BSHK = self.key(n_BSD).reshape(b, length + 1, h, -1)
    v_BSHV = self.value(n_BSD).reshape(b, length + 1, h, -1)
    scores_BHS = jnp.einsum("bhk,bshk->bhs", q_BHK, k_BSHK) / math.sqrt(q_BHK.shape[-1])
    # A finite fill keeps the softmax NaN-free; the query itself is always unmasked.
    scores_BHS = jnp.where(mask_BS[:, None, :], scores_BHS, jnp.finfo(scores_BHS.dtype).min)
    probs_BHS = jax.nn.softmax(scores_BHS, axis=-1)
    if return_attention:
      return probs_BHS
    weights_BHS = drop("attention", probs_BHS)
    o_BHV = jnp.einsum("bhs,bshv->bhv", weights_BHS, v_BSHV)
    o_BD = drop("output", self.attn_out(o_BHV.reshape(b, -1)))
    h_BD = xq_BD + o_BD
    if cfg.norm == "post":
      h_BD = self.norm(h_BD)
    return self.readout(h_BD).astype(jnp.float32)

  def last_attention(self, tokens_BL, mask_BL):
    """Attention weights [B, H, L + 1] of the query over the set tokens and itself (the last entry): what
    the prediction reads. Zero on padding."""
    return self(tokens_BL, mask_BL, deterministic=True, return_attention=True)


def param_count(config: SetTransformerConfig) -> int:
  abstract = nnx.eval_shape(lambda: SetTransformer(config, rngs=nnx.Rngs(0)))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def flops_per_example(config: SetTransformerConfig, length: int) -> float:
  """Training FLOPs (forward + backward = 3 x forward) for one padded row of `length` set tokens.

  Forward multiply-adds: key and value projections of L + 1 inputs (D (D + Dv) each), the query
  projection (D^2), scores and weighted sum ((L + 1)(D + Dv)), output projection (Dv D), readout (D N).
  """
  d, dv, n, s = config.embed_dim, config.value_dim, config.num_tokens, length + 1
  macs = s * d * (d + dv) + d * d + s * (d + dv) + dv * d + d * n
  return 6.0 * macs
