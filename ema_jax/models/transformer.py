"""GPT-2 style decoder-only transformer (Radford et al. 2019), the baseline of the EMA LM.

Learned absolute positions over the window (0 .. T-1, not restarted per packed document), causal
multi-head attention that also stays inside each packed document (segment ids), tanh-GELU MLP of 4 D and
the output head tied to the token embedding. Where the LayerNorms sit is `norm_position`:

  'pre'   GPT-2 (the default): x <- x + Attn(LN(x)), x <- x + MLP(LN(x)), and a final LayerNorm
          (norm_out) before the head, since the residual stream itself is never normalised.
  'post'  GPT-1 (Radford et al. 2018; the OthelloGPT of "Learning What's Missing", arXiv 2510.08341):
          x <- LN(x + Attn(x)), x <- LN(x + MLP(x)). No final LayerNorm: the last block's output is
          already normalised, and GPT-1 has none; the model has no norm_out (one LayerNorm fewer).
 Initialisation as GPT-2: N(0, 0.02) weights, N(0, 0.01) positions, zero biases,
and the two projections into the residual stream of each block N(0, 0.02 / sqrt(2 L)).

Dropout (config.dropout; GPT-2 used 0.1, the presets use 0.0 for single-epoch pre-training): on the
embeddings, on the attention weights, and on the attention and MLP outputs before the residual adds.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ema_jax.nn.attention import MultiHeadAttention, causal_segment_mask, dropout_rngs, resolve_documents
from ema_jax.nn.ffn import MLP
from ema_jax.models import lm_head, presets

DTYPES = ("float32", "bfloat16")
NORM_POSITIONS = ("pre", "post")  # LayerNorm on each sublayer's input (GPT-2) or on the residual sum (GPT-1)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Hyperparameters of GPT. Parameters are always float32; `dtype` is the compute dtype."""

  vocab_size: int = 50257
  context_len: int = 1024  # number of learned positions: the longest window
  num_layers: int = 12
  num_heads: int = 12
  width: int = 768  # D
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: str = "float32"
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  init_std: float = 0.02
  norm_position: str = "pre"  # one of NORM_POSITIONS

  def __post_init__(self):
    checks = [
        (isinstance(self.vocab_size, int) and self.vocab_size >= 2, "vocab_size", "an integer >= 2"),
        (isinstance(self.context_len, int) and self.context_len >= 1, "context_len", "a positive integer"),
        (isinstance(self.num_layers, int) and self.num_layers >= 1, "num_layers", "a positive integer"),
        (isinstance(self.width, int) and self.width >= 1, "width", "a positive integer"),
        (
            isinstance(self.num_heads, int) and self.num_heads >= 1 and self.width % self.num_heads == 0,
            "num_heads",
            f"a positive divisor of width={self.width}",
        ),
        (isinstance(self.mlp_ratio, int) and self.mlp_ratio >= 1, "mlp_ratio", "a positive integer"),
        (0.0 <= self.dropout < 1.0, "dropout", "a rate in [0, 1)"),
        (self.dtype in DTYPES, "dtype", f"one of {DTYPES}"),
        (self.norm_eps > 0, "norm_eps", "a positive number"),
        (self.init_std > 0, "init_std", "a positive number"),
        (self.norm_position in NORM_POSITIONS, "norm_position", "'pre' (GPT-2) or 'post' (GPT-1)"),
    ]
    for ok, name, expected in checks:
      if not ok:
        raise ValueError(f"GPTConfig: `{name}`={getattr(self, name)!r}; expected {expected}.")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


# 124m: 124,439,808 parameters, GPT-2 small exactly (tied embeddings, 1024 positions).
PRESETS = {
    "124m": dict(vocab_size=50257, context_len=1024, num_layers=12, num_heads=12, width=768),
    "tiny": dict(vocab_size=257, context_len=256, num_layers=2, num_heads=4, width=128),
}


def preset(name: str, **overrides) -> GPTConfig:
  """GPTConfig of a named preset ('124m', 'tiny') with any field overridden."""
  return presets.from_preset(PRESETS, GPTConfig, name, "transformer.preset", **overrides)


class GPTBlock(nnx.Module):
  """Transformer block, pre-norm (GPT-2) or post-norm (GPT-1) after config.norm_position."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    d, dt = cfg.width, cfg.compute_dtype
    init = nnx.initializers.normal(cfg.init_std)
    out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    self.norm_attn = nnx.LayerNorm(d, epsilon=cfg.norm_eps, dtype=dt, rngs=rngs)
    self.attention = MultiHeadAttention(
        cfg.num_heads, d, dropout=cfg.dropout, dtype=dt, kernel_init=init, out_kernel_init=out_init, rngs=rngs
    )
    self.norm_mlp = nnx.LayerNorm(d, epsilon=cfg.norm_eps, dtype=dt, rngs=rngs)
    self.mlp = MLP(
        d, cfg.mlp_ratio * d, activation="gelu", dtype=dt, kernel_init=init, out_kernel_init=out_init, rngs=rngs
    )
    self.dropout = nnx.Dropout(cfg.dropout)
    self.post_norm = cfg.norm_position == "post"

  def __call__(self, x_BTD, *, mask_B1TT, deterministic: bool = True, rngs=None):
    if self.post_norm:
      a_BTD = self.attention(x_BTD, mask=mask_B1TT, deterministic=deterministic, rngs=rngs)
      x_BTD = self.norm_attn(x_BTD + self.dropout(a_BTD, deterministic=deterministic, rngs=rngs))
      m_BTD = self.mlp(x_BTD)
      return self.norm_mlp(x_BTD + self.dropout(m_BTD, deterministic=deterministic, rngs=rngs))
    a_BTD = self.attention(self.norm_attn(x_BTD), mask=mask_B1TT, deterministic=deterministic, rngs=rngs)
    x_BTD = x_BTD + self.dropout(a_BTD, deterministic=deterministic, rngs=rngs)
    x_BTD = x_BTD + self.dropout(self.mlp(self.norm_mlp(x_BTD)), deterministic=deterministic, rngs=rngs)
    return x_BTD


class GPT(nnx.Module):
  """Token ids [B, T] -> float32 logits [B, T, V], T <= context_len."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    dt = cfg.compute_dtype
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.width, dtype=dt, embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs
    )
    self.positions = nnx.Embed(
        cfg.context_len, cfg.width, dtype=dt, embedding_init=nnx.initializers.normal(0.01), rngs=rngs
    )
    self.blocks = nnx.List([GPTBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    # Post-norm blocks end in a LayerNorm already (GPT-1 has no final one): no norm_out then.
    self.norm_out = (
        nnx.LayerNorm(cfg.width, epsilon=cfg.norm_eps, dtype=dt, rngs=rngs) if cfg.norm_position == "pre" else None
    )
    if not cfg.tie_embeddings:
      self.head = lm_head.untied_head(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, inputs_BT, *, resets_BT=None, segment_ids_BT=None, deterministic: bool = True, rngs=None):
    """inputs_BT int [B, T]; segment_ids_BT int [B, T] and/or resets_BT bool [B, T] keep attention
    inside each packed document (either is derived from the other). rngs: nnx.Rngs or a PRNG key,
    needed when deterministic=False and dropout > 0. Returns float32 logits [B, T, V]."""
    cfg = self.config
    inputs_BT = jnp.asarray(inputs_BT)
    if inputs_BT.ndim != 2 or not jnp.issubdtype(inputs_BT.dtype, jnp.integer):
      raise ValueError(
          f"GPT: `inputs_BT` has shape {inputs_BT.shape} and dtype {inputs_BT.dtype}; "
          f"expected integer token ids [B, T]."
      )
    t = inputs_BT.shape[1]
    if t > cfg.context_len:
      raise ValueError(
          f"GPT: sequence length {t} exceeds `context_len`={cfg.context_len}; "
          f"use windows of at most {cfg.context_len} tokens or a larger context_len."
      )
    _, segment_ids_BT = resolve_documents(inputs_BT.shape, resets_BT, segment_ids_BT, where="GPT")
    mask_B1TT = causal_segment_mask(t, segment_ids_BT)
    rngs = dropout_rngs(rngs, not deterministic and cfg.dropout > 0, where="GPT")
    x_BTD = self.embed(inputs_BT) + self.positions(jnp.arange(t))[None]
    x_BTD = self.dropout(x_BTD, deterministic=deterministic, rngs=rngs)
    for block in self.blocks:
      x_BTD = block(x_BTD, mask_B1TT=mask_B1TT, deterministic=deterministic, rngs=rngs)
    return self._head(x_BTD)

  # ------------------------------------------------------------------------------------------ decoding

  def init_cache(self, batch: int, max_len: int = None) -> dict:
    """KV cache of `batch` sequences at position 0, room for max_len (default context_len) positions.

    Per block the keys and values of every past position [B, max_len, H, d] in the compute dtype, slot s
    holding position s: the GPT's state grows with the context, 2 L max_len D numbers per sequence.
    """
    cfg = self.config
    max_len = cfg.context_len if max_len is None else max_len
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 1 <= max_len <= cfg.context_len:
      raise ValueError(
          f"GPT.init_cache: `max_len`={max_len!r}; expected an integer in [1, context_len={cfg.context_len}]: "
          f"the GPT has learned positions 0..{cfg.context_len - 1} only."
      )
    if not isinstance(batch, int) or batch < 1:
      raise ValueError(f"GPT.init_cache: `batch`={batch!r}; expected a positive integer.")
    att = self.blocks[0].attention
    zeros = lambda d: jnp.zeros((batch, max_len, att.num_heads, d), cfg.compute_dtype)
    return dict(
        blocks=[dict(k=zeros(att.head_qk), v=zeros(att.head_v)) for _ in self.blocks],
        t=jnp.zeros((batch,), jnp.int32),  # position of the next token (absolute, as in __call__)
        start=jnp.zeros((batch,), jnp.int32),  # position where the current document started
    )

  def decode_step(self, cache: dict, token_B, *, reset_B=None):
    """One token per sequence: (new cache, float32 logits [B, V] for the next token), deterministic.

    Feeding tokens 0..T-1 one by one gives the logits of __call__ on [B, T] at every position: positions
    continue across a reset (reset_B True where a token starts a document, as resets_BT), attention sees
    only the current document. Past the cache's max_len there is no position to give a token: with a
    concrete cache that is a ValueError; under jit (no host check per token) such rows get NaN logits.
    """
    token_B = jnp.asarray(token_B)
    b = token_B.shape[0]
    max_len = cache["blocks"][0]["k"].shape[1]
    t_B = cache["t"]
    if not isinstance(t_B, jax.core.Tracer) and int(jnp.max(t_B)) >= max_len:
      raise ValueError(
          f"GPT.decode_step: position {int(jnp.max(t_B))} is past the cache's max_len={max_len} "
          f"(context_len={self.config.context_len}): the GPT has no position beyond its context. Decode at "
          f"most {max_len} tokens per sequence, or start again from a shorter window of the text."
      )
    reset_B = jnp.zeros((b,), bool) if reset_B is None else jnp.asarray(reset_B, bool)
    start_B = jnp.where(reset_B, t_B, cache["start"])
    pos_B = jnp.minimum(t_B, max_len - 1)
    x_B1D = self.embed(token_B[:, None]) + self.positions(pos_B[:, None])
    s_S = jnp.arange(max_len)
    mask_B11S = ((s_S[None] <= t_B[:, None]) & (s_S[None] >= start_B[:, None]))[:, None, None, :]
    rows = jnp.arange(b)
    blocks = []
    for block, c in zip(self.blocks, cache["blocks"]):
      att = block.attention
      attn_in_B1D = x_B1D if block.post_norm else block.norm_attn(x_B1D)
      k_B1Hd = att.key(attn_in_B1D).reshape(b, 1, att.num_heads, att.head_qk)
      v_B1Hd = att.value(attn_in_B1D).reshape(b, 1, att.num_heads, att.head_v)
      c = dict(k=c["k"].at[rows, pos_B].set(k_B1Hd[:, 0]), v=c["v"].at[rows, pos_B].set(v_B1Hd[:, 0]))
      blocks.append(c)
      a_B1D = _attend(att, attn_in_B1D, c["k"], c["v"], mask_B11S)
      if block.post_norm:
        x_B1D = block.norm_attn(x_B1D + a_B1D)
        x_B1D = block.norm_mlp(x_B1D + block.mlp(x_B1D))
      else:
        x_B1D = x_B1D + a_B1D
        x_B1D = x_B1D + block.mlp(block.norm_mlp(x_B1D))
    logits_BV = self._head(x_B1D)[:, 0]
    logits_BV = jnp.where((t_B >= max_len)[:, None], jnp.nan, logits_BV)
    return dict(blocks=blocks, t=t_B + 1, start=start_B), logits_BV

  def prefill(self, inputs_BT, *, resets_BT=None, lengths_B=None, max_len: int = None):
    """A prompt in one parallel pass: (cache, float32 logits [B, T, V]), deterministic.

    The logits are __call__'s; the cache (room for max_len positions, default context_len) is the one
    decode_step would hold after the tokens one by one. lengths_B int [B] (default T): row b's prompt is
    inputs_BT[b, :lengths_B[b]], right-padded; decoding continues at its own position lengths_B[b]
    (causal attention keeps the padding away from a row's real tokens, and in decoding its keys are
    masked until overwritten).
    """
    cfg = self.config
    inputs_BT = jnp.asarray(inputs_BT)
    b, t = inputs_BT.shape
    cache = self.init_cache(b, max_len)
    max_len = cache["blocks"][0]["k"].shape[1]
    if t > max_len:
      raise ValueError(
          f"GPT.prefill: a prompt of {t} tokens does not fit the cache's max_len={max_len} "
          f"(context_len={cfg.context_len}); shorten the prompt to at most {max_len} tokens."
      )
    resets_BT, segment_ids_BT = resolve_documents(inputs_BT.shape, resets_BT, None, where="GPT.prefill")
    lengths_B = jnp.full((b,), t, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
    mask_B1TT = causal_segment_mask(t, segment_ids_BT)
    x_BTD = self.embed(inputs_BT) + self.positions(jnp.arange(t))[None]
    blocks = []
    for block, c in zip(self.blocks, cache["blocks"]):
      att = block.attention
      attn_in_BTD = x_BTD if block.post_norm else block.norm_attn(x_BTD)
      k_BTHd = att.key(attn_in_BTD).reshape(b, t, att.num_heads, att.head_qk)
      v_BTHd = att.value(attn_in_BTD).reshape(b, t, att.num_heads, att.head_v)
      blocks.append(dict(k=c["k"].at[:, :t].set(k_BTHd), v=c["v"].at[:, :t].set(v_BTHd)))
      x_BTD = block(x_BTD, mask_B1TT=mask_B1TT)
    logits_BTV = self._head(x_BTD)
    return dict(blocks=blocks, t=lengths_B, start=document_start(resets_BT, lengths_B, t)), logits_BTV

  def _head(self, x_BTD):
    """Final norm (pre-norm models) and the output head: float32 logits [B, T, V]."""
    cfg = self.config
    if self.norm_out is not None:
      x_BTD = self.norm_out(x_BTD)
    return lm_head.logits(cfg, self.embed, getattr(self, "head", None), x_BTD)


def document_start(resets_BT, lengths_B, t: int):
  """Position where the document of each row's last prompt token (lengths_B - 1) started: int32 [B]."""
  if resets_BT is None:
    return jnp.zeros(lengths_B.shape, jnp.int32)
  idx_T = jnp.arange(t, dtype=jnp.int32)
  start_BT = jax.lax.cummax(jnp.where(resets_BT, idx_T[None], 0), axis=1)
  return jnp.take_along_axis(start_BT, jnp.clip(lengths_B - 1, 0, t - 1)[:, None], axis=1)[:, 0]


def _attend(att: MultiHeadAttention, x_BSD, k_BTHd, v_BTHd, mask_B1ST):
  """MultiHeadAttention.__call__ with the keys and values read from a cache (the same numerics)."""
  b, s = x_BSD.shape[:2]
  q_BSHd = att.query(x_BSD).reshape(b, s, att.num_heads, att.head_qk)
  q_BSHd = q_BSHd * jnp.asarray(att.head_qk**-0.5, q_BSHd.dtype)
  scores_BHST = jnp.einsum("bshd,bthd->bhst", q_BSHd, k_BTHd, preferred_element_type=jnp.float32)
  scores_BHST = jnp.where(mask_B1ST, scores_BHST, jnp.finfo(jnp.float32).min)
  weights_BHST = jnp.where(mask_B1ST, jax.nn.softmax(scores_BHST, axis=-1), 0.0).astype(v_BTHd.dtype)
  y_BSHd = jnp.einsum("bhst,bthd->bshd", weights_BHST, v_BTHd)
  return att.out(y_BSHd.reshape(b, s, att.num_heads * att.head_v))


def param_count(config: GPTConfig) -> int:
  """Number of trainable parameters (tied embeddings counted once), from shapes only: no allocation."""
  return lm_head.param_count(lambda: GPT(config, rngs=nnx.Rngs(0)))


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token, the PaLM-paper count 6 N + 12 L T D:

  N = L (4 D^2 + 2 m D^2) + D V multiply-adds per token (attention projections, MLP of m D, head; the
  embedding and position lookups are free) and 12 L T D for the scores and the weighted sum over all T
  keys, as computed (the causal mask is applied to a dense T x T score matrix). Elementwise work left out.
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"flops_per_token: `seq_len`={seq_len!r}; expected a positive integer.")
  d, n_layers = config.width, config.num_layers
  matmul = n_layers * (4 * d * d + 2 * config.mlp_ratio * d * d) + d * config.vocab_size
  return 6.0 * matmul + 12.0 * n_layers * seq_len * d
