"""The EMA LM's configuration: EMALMConfig (validated on construction), the named presets and the FLOP count.
The model itself is ema_jax/models/ema_lm.py, whose docstring says where each choice comes from."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ema_jax.models import presets
from ema_jax.nn.ffn import ACTIVATIONS
from ema_jax.nn.trace_layer import LEARN_MODES

TRACE_KINDS = ("fixed", "selective")

PREDICTORS = ("linear", "attention", "attention_history")
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class EMALMConfig:
  """Hyperparameters of EMALM. Parameters are always float32; `dtype` is the compute dtype."""

  vocab_size: int
  width: int = 768  # D
  num_blocks: int = 12
  alphas: tuple = (0.5, 0.1, 0.02)  # K write rates
  ffn_hidden: int = 2304
  ffn_active_fraction: float = 0.06  # k = round(fraction * ffn_hidden) units kept per token
  ffn_activation: str = "relu"  # applied to the k kept pre-activations
  predictor: str = "linear"
  heads: int = 12  # attention predictors only
  dropout: float = 0.0
  dtype: str = "float32"
  tie_embeddings: bool = True
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  trace_learn: str = "none"  # EMATraces' learn mode: fixed or learned write rates
  trace_kind: str = "fixed"  # fixed (EMATraces) | selective (SelectiveTraces: rates computed from the input)
  trace_method: str = "auto"  # scan method of the traces
  window: int = 0  # W > 0: the two-memory hybrid (causal attention over the last W tokens in every block)
  init_std: float = 0.02  # token embedding (and the untied head)

  def __post_init__(self):
    object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
    d = self.width
    checks = [
        (isinstance(self.vocab_size, int) and self.vocab_size >= 2, "vocab_size", "an integer >= 2"),
        (isinstance(d, int) and d >= 1, "width", "a positive integer"),
        (isinstance(self.num_blocks, int) and self.num_blocks >= 1, "num_blocks", "a positive integer"),
        (
            len(self.alphas) >= 1 and all(0.0 < a <= 1.0 for a in self.alphas),
            "alphas",
            "a non-empty tuple of write rates in (0, 1], e.g. (0.5, 0.1, 0.02)",
        ),
        (isinstance(self.ffn_hidden, int) and self.ffn_hidden >= 1, "ffn_hidden", "a positive integer"),
        (
            0.0 < self.ffn_active_fraction <= 1.0 and 1 <= round(self.ffn_active_fraction * self.ffn_hidden),
            "ffn_active_fraction",
            "a fraction in (0, 1] with round(fraction * ffn_hidden) >= 1",
        ),
        (self.ffn_activation in ACTIVATIONS, "ffn_activation", f"one of {tuple(ACTIVATIONS)}"),
        (self.predictor in PREDICTORS, "predictor", f"one of {PREDICTORS}"),
        (
            isinstance(self.heads, int) and self.heads >= 1 and d % self.heads == 0,
            "heads",
            f"a positive divisor of width={d}",
        ),
        (0.0 <= self.dropout < 1.0, "dropout", "a rate in [0, 1)"),
        (self.dtype in DTYPES, "dtype", f"one of {DTYPES}"),
        (self.norm in NORMS, "norm", f"one of {NORMS}"),
        (self.norm_eps > 0, "norm_eps", "a positive number"),
        (self.trace_learn in LEARN_MODES, "trace_learn", f"one of {LEARN_MODES}"),
        (self.trace_kind in TRACE_KINDS, "trace_kind", f"one of {TRACE_KINDS}"),
        (
            self.trace_kind == "fixed" or self.trace_learn == "none",
            "trace_learn",
            "'none' with trace_kind='selective' (its rates are computed from the input)",
        ),
        (
            self.trace_kind == "fixed" or all(a < 1.0 for a in self.alphas),
            "alphas",
            "write rates inside (0, 1) with trace_kind='selective' (they start its sigmoid rates)",
        ),
        (self.init_std > 0, "init_std", "a positive number"),
        (
            isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 0,
            "window",
            "0 (no local attention) or a positive window length W in tokens",
        ),
    ]
    for ok, name, expected in checks:
      if not ok:
        raise ValueError(f"EMALMConfig: `{name}`={getattr(self, name)!r}; expected {expected}.")

  @property
  def num_timescales(self) -> int:
    return len(self.alphas)

  @property
  def ffn_k(self) -> int:
    return int(round(self.ffn_active_fraction * self.ffn_hidden))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


# 130m: 130,703,616 parameters with the linear predictor (tied embeddings 38.6M + 12 blocks of 7.67M);
# 151,992,576 with 'attention' and 180,276,480 with 'attention_history', whose projections read K D-wide
# inputs. k = 138 of 2304 FFN units per token.
PRESETS = {
    "130m": dict(vocab_size=50257, width=768, num_blocks=12, ffn_hidden=2304, heads=12),
    "tiny": dict(vocab_size=257, width=128, num_blocks=2, ffn_hidden=512, heads=4),
}


def preset(name: str, **overrides) -> EMALMConfig:
  """EMALMConfig of a named preset ('130m', 'tiny') with any field overridden."""
  return presets.from_preset(PRESETS, EMALMConfig, name, "ema_lm.preset", **overrides)


def flops_per_token(config: EMALMConfig, seq_len: int, *, sparse_ffn: bool = False) -> float:
  """Training FLOPs (forward + backward) per token: 6 x (multiply-adds per token), as for 6N.

  Multiply-adds per token, with D width, K timescales, H_f = ffn_hidden, V vocabulary, T = seq_len:
    per block   predictor  linear: K D^2
                           attention: K D^2 (query) + 2 K D^2 (keys, values of K vectors) + D^2 (out)
                                      + 2 K D (scores and weighted sum over K keys)
                           attention_history: 3 K D^2 (query, keys, values) + D^2 (out)
                                      + 2 T D (scores and weighted sum over all T keys, as computed)
                mix        (K + 1) D^2
                rates      K D^2 with trace_kind='selective' (the write-rate projection)
                window     4 D^2 (query, key, value, out) + 2 min(W, T) D (scores and weighted sum over
                           the window) with window=W > 0; the masked dense form computes 2 T D instead
                FFN        2 D H_f as computed (dense, the zeros included); with sparse_ffn=True
                           D H_f + k D, what a kernel that skips the zeros would need
    head        D V        (the embedding lookup is free)
  Elementwise work (traces, norms, softmax, top-k) is left out, as in 6N.
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"flops_per_token: `seq_len`={seq_len!r}; expected a positive integer.")
  d, k = config.width, config.num_timescales
  if config.predictor == "linear":
    predictor = k * d * d
  elif config.predictor == "attention":
    predictor = 3 * k * d * d + d * d + 2 * k * d
  else:
    predictor = 3 * k * d * d + d * d + 2 * seq_len * d
  mix = (k + 1) * d * d + (k * d * d if config.trace_kind == "selective" else 0)
  if config.window:
    mix += 4 * d * d + 2 * min(config.window, seq_len) * d
  ffn = d * config.ffn_hidden + (config.ffn_k * d if sparse_ffn else config.ffn_hidden * d)
  macs = config.num_blocks * (predictor + mix + ffn) + d * config.vocab_size
  return 6.0 * macs
