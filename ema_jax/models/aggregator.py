"""Trace aggregator LM: the multi-timescale EMA traces of the token embeddings, aggregated once, read out.

OUR design, not the paper's. "EMA Is Not All You Need" (arXiv 2604.08556) reports a Wikipedia perplexity
of 729 for an "aggregator" built on the fixed traces (write rates 0.5, 0.1, 0.02), but only its abstract
could be read offline, so its layers, sizes and tokenizer are unknown. This is the minimal model of that
name we could define: the only temporal context is the fixed traces, with no stacking and none of the EMA
LM's prediction / error / sparse-FFN machinery (ema_lm.py), so it measures what the traces alone carry.

    x_t    = Embed(token_t)                               width D (dropout on it in training)
    h_t,k  = (1 - alpha_k) h_t-1,k + alpha_k x_t          K fixed traces (ema_jax EMATraces, as ema_lm's
                                                          blocks use them); zero before t = 0 and before
                                                          every document start (resets_BT)
    z_t    = LayerNorm([x_t; h_t,1; ...; h_t,K])          (K + 1) D features
    y_t    = W_2 GELU(W_1 z_t + b_1) + b_2                one MLP, (K + 1) D -> hidden -> D
    logits = norm_out(y_t) E^T                            tied to the embedding E by default (ema_lm's)

Where each choice comes from: the rates and the trace recurrence are the paper's (its abstract, and the
EMA LM we built from it); aggregating by concatenation and one linear map follows the EMA LM's context mix
([e; h_1..h_K], (K + 1) D -> D); the LayerNorm, GELU MLP, final norm and tied head are GPT-2 defaults. The
traces of position t include x_t (unlike the EMA LM's past-only traces): this model predicts token t + 1,
so the current token is legitimate context and carries most of a byte-level model's information.

Causality: h_t,k sums x_s for s <= t only, and every other operation is per position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ema_jax.models import lm_head, presets
from ema_jax.nn.attention import dropout_rngs, resolve_documents
from ema_jax.nn.ffn import ACTIVATIONS
from ema_jax.nn.trace_layer import EMATraces

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class AggregatorConfig:
  """Hyperparameters of Aggregator. Parameters are always float32; `dtype` is the compute dtype."""

  vocab_size: int
  width: int = 128  # D
  alphas: tuple = (0.5, 0.1, 0.02)  # K fixed write rates
  hidden: int = 512  # MLP hidden units
  dropout: float = 0.0  # on the embeddings and on the MLP output
  dtype: str = "float32"
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  trace_method: str = "auto"  # scan method of the traces
  init_std: float = 0.02  # token embedding (and the untied head)

  def __post_init__(self):
    try:
      object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
      alphas_ok = len(self.alphas) >= 1 and all(0.0 < a <= 1.0 for a in self.alphas)
    except (TypeError, ValueError):
      alphas_ok = False
    checks = [
        (isinstance(self.vocab_size, int) and self.vocab_size >= 2, "vocab_size", "an integer >= 2"),
        (isinstance(self.width, int) and self.width >= 1, "width", "a positive integer"),
        (alphas_ok, "alphas", "a non-empty tuple of write rates in (0, 1], e.g. (0.5, 0.1, 0.02)"),
        (isinstance(self.hidden, int) and self.hidden >= 1, "hidden", "a positive integer"),
        (0.0 <= self.dropout < 1.0, "dropout", "a rate in [0, 1)"),
        (self.dtype in DTYPES, "dtype", f"one of {DTYPES}"),
        (self.norm_eps > 0, "norm_eps", "a positive number"),
        (self.init_std > 0, "init_std", "a positive number"),
    ]
    for ok, name, expected in checks:
      if not ok:
        raise ValueError(f"AggregatorConfig: `{name}`={getattr(self, name)!r}; expected {expected}.")

  @property
  def num_timescales(self) -> int:
    return len(self.alphas)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


# tiny: 362,496 parameters at vocab 257 (embedding 32.9K, MLP 262.7K + 65.7K, norms 1.3K).
PRESETS = {"tiny": dict(vocab_size=257, width=128, hidden=512)}


def preset(name: str, **overrides) -> AggregatorConfig:
  """AggregatorConfig of a named preset ('tiny') with any field overridden."""
  return presets.from_preset(PRESETS, AggregatorConfig, name, "aggregator.preset", **overrides)


class Aggregator(nnx.Module):
  """Token ids [B, T] -> float32 logits [B, T, V]; see the module docstring."""

  def __init__(self, config: AggregatorConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    d, k, dt = cfg.width, cfg.num_timescales, cfg.compute_dtype
    self.embed = nnx.Embed(cfg.vocab_size, d, dtype=dt, embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    # EMATraces validates its rates with NumPy; keep that concrete under nnx.eval_shape or a jitted init.
    with jax.ensure_compile_time_eval():
      self.traces = EMATraces(d, cfg.alphas, learn="none", method=cfg.trace_method)
    self.norm_in = nnx.LayerNorm((k + 1) * d, epsilon=cfg.norm_eps, dtype=dt, rngs=rngs)
    self.mlp_in = nnx.Linear((k + 1) * d, cfg.hidden, dtype=dt, rngs=rngs)
    self.mlp_out = nnx.Linear(cfg.hidden, d, dtype=dt, rngs=rngs)
    self.norm_out = nnx.LayerNorm(d, epsilon=cfg.norm_eps, dtype=dt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = lm_head.untied_head(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, inputs_BT, *, resets_BT=None, segment_ids_BT=None, deterministic: bool = True, rngs=None):
    """inputs_BT int [B, T]; resets_BT bool [B, T] (True: inputs[t] starts a document) and/or
    segment_ids_BT int [B, T] (either is derived from the other; only the resets are used). rngs: nnx.Rngs
    or a PRNG key, needed when deterministic=False and dropout > 0. Returns float32 logits [B, T, V]."""
    cfg = self.config
    inputs_BT = jnp.asarray(inputs_BT)
    if inputs_BT.ndim != 2 or not jnp.issubdtype(inputs_BT.dtype, jnp.integer):
      raise ValueError(
          f"Aggregator: `inputs_BT` has shape {inputs_BT.shape} and dtype {inputs_BT.dtype}; "
          f"expected integer token ids [B, T]."
      )
    resets_BT, _ = resolve_documents(inputs_BT.shape, resets_BT, segment_ids_BT, where="Aggregator")
    rngs = dropout_rngs(rngs, not deterministic and cfg.dropout > 0, where="Aggregator")
    x_BTD = self.dropout(self.embed(inputs_BT), deterministic=deterministic, rngs=rngs)
    h_BTKD, _ = self.traces(x_BTD, resets_BT=resets_BT)
    b, t, d = x_BTD.shape
    z_BTF = jnp.concatenate([x_BTD, h_BTKD.reshape(b, t, -1).astype(x_BTD.dtype)], axis=-1)
    y_BTD = self.mlp_out(ACTIVATIONS["gelu"](self.mlp_in(self.norm_in(z_BTF))))
    y_BTD = self.norm_out(self.dropout(y_BTD, deterministic=deterministic, rngs=rngs))
    return lm_head.logits(cfg, self.embed, getattr(self, "head", None), y_BTD)


def param_count(config: AggregatorConfig) -> int:
  """Number of trainable parameters (tied embeddings counted once), from shapes only: no allocation."""
  return lm_head.param_count(lambda: Aggregator(config, rngs=nnx.Rngs(0)))


def flops_per_token(config: AggregatorConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token: 6 x (multiply-adds per token), as for 6N.

  Multiply-adds per token, with D width, K timescales, H = hidden, V vocabulary: the MLP (K + 1) D H + H D
  and the head D V. The traces, norms, GELU and the embedding lookup (elementwise or free) are left out;
  seq_len does not matter (no attention), it is taken for the LM task's common signature.
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"flops_per_token: `seq_len`={seq_len!r}; expected a positive integer.")
  d, k, hid = config.width, config.num_timescales, config.hidden
  return 6.0 * ((k + 1) * d * hid + hid * d + d * config.vocab_size)
