"""Flax NNX layer for multi-timescale EMA traces, fixed or learned write rates."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ema_jax import traces
from ema_jax.traces import seq_parallel

LEARN_MODES = ("none", "per_timescale", "per_channel")


class EMATraces(nnx.Module):
  """x [B, T, D] -> traces h [B, T, K, D] at K write rates.

  learn='none' keeps the rates fixed (the papers' 0.5, 0.1, 0.02). 'per_timescale' learns one rate per
  timescale, 'per_channel' one per timescale and channel. Learned rates live in log space as
  log(1 - alpha) = -softplus(raw), so the decay 1 - alpha stays in (0, 1) and alpha inside (0, 1).
  """

  def __init__(
      self,
      features: int,
      alphas: Sequence[float] = traces.PAPER_ALPHAS,
      *,
      learn: str = "none",
      bias_correction: bool = False,
      method: str = "auto",
  ):
    if learn not in LEARN_MODES:
      raise ValueError(f"EMATraces: `learn`={learn!r}; accepted: {', '.join(LEARN_MODES)}.")
    if not isinstance(features, int) or features < 1:
      raise ValueError(f"EMATraces: `features`={features!r}; expected a positive integer.")
    traces.parse_method(method, traces.ema_methods(), "EMATraces")
    init = np.asarray(traces.check_alphas(alphas), np.float64)
    if learn != "none" and (init >= 1).any():
      raise ValueError(f"EMATraces: learned write rates must start inside (0, 1); got alphas={init.tolist()}.")
    self.features = features
    self.num_timescales = int(init.shape[0])
    self.learn = learn
    self.bias_correction = bias_correction
    self.method = method
    if learn == "none":
      self.fixed_alphas = tuple(float(a) for a in init)
    else:
      # softplus(raw) = -log(1 - alpha)  =>  raw = log(expm1(-log(1 - alpha)))
      raw = np.log(np.expm1(-np.log1p(-init)))
      if learn == "per_channel":
        raw = np.repeat(raw[:, None], features, axis=1)
      self.raw_decay = nnx.Param(jnp.asarray(raw, jnp.float32))

  def alphas(self) -> jax.Array:
    """Write rates as [K] or [K, D] float32."""
    if self.learn == "none":
      return jnp.asarray(self.fixed_alphas, jnp.float32)
    return -jnp.expm1(-jax.nn.softplus(self.raw_decay[...]))

  def __call__(self, x_BTD, *, resets_BT=None, state: Optional[traces.TraceState] = None):
    """Returns (h_BTKD, final TraceState) over a whole sequence."""
    if state is None:
      # Under a mesh with seq > 1 (jax.set_mesh) this runs sequence-parallel.
      h_BTKD, h_last = seq_parallel.auto_traces(
          x_BTD, self.alphas(), resets_BT, bias_correction=self.bias_correction, method=self.method
      )
      counts = traces.token_counts(resets_BT, x_BTD.shape[0], x_BTD.shape[1])[:, -1]
      return h_BTKD, traces.TraceState(h_last, counts)
    h_BTKD, h_last = traces.ema_traces(
        x_BTD,
        self.alphas(),
        state.h,
        resets=resets_BT,
        bias_correction=self.bias_correction,
        method=self.method,
        start_count=state.count,
    )
    start = state.count
    counts = traces.token_counts(resets_BT, x_BTD.shape[0], x_BTD.shape[1], start)[:, -1]
    return h_BTKD, traces.TraceState(h_last, counts)

  def init_state(self, batch: int) -> traces.TraceState:
    return traces.init_state(batch, self.num_timescales, self.features)

  def step(self, state: traces.TraceState, x_BD, *, reset_B=None):
    """One token for decoding: returns (new state, h_BKD); agrees with __call__ token by token."""
    return traces.ema_step(state, x_BD, self.alphas(), reset=reset_B, bias_correction=self.bias_correction)
