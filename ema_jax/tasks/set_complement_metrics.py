"""Set-complement metrics, their in/out-of-range means, tables and plots (used by the task, eval.py and the
experiments). See ema_jax/tasks/set_complement.py for what each metric means."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from ema_jax import length_report
from ema_jax.data import set_complement as data

BASE_METRICS = ("kl", "tv", "invalid_mass", "precision", "logit_gap", "top1_valid")
TEMPERED = tuple(f"t_{m}" for m in BASE_METRICS)  # the same at the fitted temperature
ATTENTION = ("attn_entropy", "attn_dispersion")
METRICS = BASE_METRICS + TEMPERED + ATTENTION
METRIC_LABELS_BASE = {
    "kl": "KL(target || p)",
    "tv": "total variation",
    "invalid_mass": "invalid mass",
    "precision": "precision (min/max valid p)",
    "logit_gap": "logit gap (valid - invalid)",
    "top1_valid": "top-1 valid rate",
}
METRIC_LABELS = {
    **METRIC_LABELS_BASE,
    **{f"t_{k}": f"{v} at fitted T" for k, v in METRIC_LABELS_BASE.items()},
    "attn_entropy": "attention entropy (nats)",
    "attn_dispersion": "attention dispersion (entropy / log s)",
}
LOG_SCALE = ("kl", "tv", "invalid_mass", "t_kl", "t_tv", "t_invalid_mass")


# ------------------------------------------------------------------------------------------------ metrics


def complement_metrics(logits_BN: jax.Array, present_BN: jax.Array) -> Dict[str, jax.Array]:
  """Per-example metrics [B] of logits against the uniform target over the absent tokens (float32).

  Every row must have at least one absent token (set size < N).
  """
  logits_BN = logits_BN.astype(jnp.float32)
  present_BN = present_BN.astype(jnp.float32)
  valid_BN = 1.0 - present_BN
  n_valid_B = valid_BN.sum(-1)
  n_present_B = present_BN.sum(-1)
  logp_BN = jax.nn.log_softmax(logits_BN, axis=-1)
  p_BN = jnp.exp(logp_BN)
  ce_B = -(valid_BN * logp_BN).sum(-1) / n_valid_B
  kl_B = ce_B - jnp.log(n_valid_B)
  invalid_B = (p_BN * present_BN).sum(-1)
  tv_B = 0.5 * ((valid_BN * jnp.abs(1.0 / n_valid_B[:, None] - p_BN)).sum(-1) + invalid_B)
  big = jnp.finfo(jnp.float32).max
  # The probability ratio is exp(logit difference): no underflow for very peaked outputs.
  vmax_B = jnp.max(jnp.where(valid_BN > 0, logits_BN, -big), -1)
  vmin_B = jnp.min(jnp.where(valid_BN > 0, logits_BN, big), -1)
  precision_B = jnp.exp(vmin_B - vmax_B)
  mean_valid_B = (valid_BN * logits_BN).sum(-1) / n_valid_B
  mean_invalid_B = (present_BN * logits_BN).sum(-1) / jnp.maximum(n_present_B, 1.0)
  gap_B = jnp.where(n_present_B > 0, mean_valid_B - mean_invalid_B, jnp.nan)
  top_B = jnp.argmax(logits_BN, -1)
  top1_B = jnp.take_along_axis(valid_BN, top_B[:, None], axis=-1)[:, 0]
  return {
      "ce": ce_B,
      "kl": kl_B,
      "tv": tv_B,
      "invalid_mass": invalid_B,
      "precision": precision_B,
      "logit_gap": gap_B,
      "top1_valid": top1_B,
  }


def batch_present(batch: Mapping[str, jax.Array], num_tokens: int) -> jax.Array:
  return data.present_tokens(batch["tokens"], batch["mask"], num_tokens, xp=jnp)


def range_summary(
    sizes: Sequence[int], per_size: Mapping[str, Sequence[float]], train_max_size: int
) -> Dict[str, float]:
  """In-range (s <= L_train) and out-of-range means of every metric (length_report.range_means)."""
  return length_report.range_means(sizes, per_size, train_max_size, [m for m in METRICS if m in per_size])


# --------------------------------------------------------------------------------------- tables and plots


_SHORT = {
    "kl": "KL",
    "invalid_mass": "inv",
    "precision": "prec",
    "logit_gap": "gap",
    "tv": "TV",
    "top1_valid": "top1",
    "t_kl": "KL@T",
    "attn_dispersion": "disp",
}
TABLE_METRICS = ("kl", "t_kl", "invalid_mass", "precision", "attn_dispersion")
PLOT_METRICS = BASE_METRICS + ("t_kl", "attn_dispersion")


def format_temperature_control(results, kinds) -> str:
  """Out-of-range KL as-is and at each weights' fitted temperature: raw at its own T is the
  "sharpening only" control an averaging effect must beat."""
  lines = ["temperature control (T fitted on the in-range check set): out-of-range KL as-is / at T"]
  for k in kinds:
    r = results[k]
    if "out_of_range/t_kl" in r:
      lines.append(f"  {k:<6} {r['out_of_range/kl']:.4g} / {r['out_of_range/t_kl']:.4g}  (T = {r['temperature']:.3g})")
  return "\n".join(lines)


def format_table(
    results, kinds, train_max_size: int, step: int, metrics=("kl", "invalid_mass", "precision", "logit_gap")
) -> str:
  return length_report.format_table(
      results,
      kinds,
      per_key="per_size",
      length_key="size",
      train_len=train_max_size,
      metrics=metrics,
      short=_SHORT,
      title=f"set complement, step {step} (training sizes <= {train_max_size}; '*' = beyond)",
      length_header="size",
      fmt=lambda v: f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}",
      max_rows=24,
      margin=2,
  )


def plot_per_size(
    results,
    kinds,
    train_max_size: int,
    out_dir: str,
    step: Optional[int] = None,
    metrics=METRICS,
    prefix: str = "set_complement",
) -> list:
  """One PNG per metric against set size, training range shaded, one line per weights kind."""
  return length_report.plot_per_length(
      results,
      kinds,
      per_key="per_size",
      length_key="size",
      train_len=train_max_size,
      metrics=metrics,
      labels=METRIC_LABELS,
      log_scale=LOG_SCALE,
      out_dir=out_dir,
      prefix=prefix,
      xlabel="set size s",
      shade_label="training sizes",
      step=step,
  )
