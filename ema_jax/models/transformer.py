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
from ema_jax.models import presets

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
      self.head = nnx.Linear(
          cfg.width,
          cfg.vocab_size,
          use_bias=False,
          dtype=dt,
          kernel_init=nnx.initializers.normal(cfg.init_std),
          preferred_element_type=jnp.float32,
          rngs=rngs,
      )
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
    if self.norm_out is not None:
      x_BTD = self.norm_out(x_BTD)
    if cfg.tie_embeddings:
      dt = cfg.compute_dtype
      return jnp.einsum(
          "btd,vd->btv", x_BTD.astype(dt), self.embed.embedding[...].astype(dt), preferred_element_type=jnp.float32
      )
    return self.head(x_BTD).astype(jnp.float32)


def param_count(config: GPTConfig) -> int:
  """Number of trainable parameters (tied embeddings counted once), from shapes only: no allocation."""
  abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


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
