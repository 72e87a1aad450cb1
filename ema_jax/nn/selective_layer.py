"""Flax NNX layer for selective (input-dependent) multi-timescale traces."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ema_jax import traces
from ema_jax.traces import seq_parallel


class SelectiveTraces(nnx.Module):
  """x [B, T, D] -> traces h [B, T, K, D] with write rates computed from the input:

      r_t,k = sigmoid(W_k x_t + b_k)  (per timescale k and channel),  h_t,k = (1 - r_t,k) h_t-1,k + r_t,k x_t.

  W starts at zero and b at logit(alpha_k), so at initialisation the rates are exactly the fixed ones
  (0.5, 0.1, 0.02 by default) and the layer equals EMATraces with those rates; training moves W away from
  zero (the gradient of the rates w.r.t. W is sigmoid' x_t, not zero). Paper A's closing claim is that only
  such learned, input-dependent selection can keep what fixed traces lose; this layer is that option
  (EMALMConfig.trace_kind = 'selective'). The scan is traces.selective_traces (float32 state).
  Under a mesh with a `seq` axis > 1 the scan runs sequence-parallel (seq_parallel.seq_parallel_selective_traces).
  """

  def __init__(
      self,
      features: int,
      alphas: Sequence[float] = traces.PAPER_ALPHAS,
      *,
      method: str = "auto",
      rngs: nnx.Rngs,
  ):
    if not isinstance(features, int) or features < 1:
      raise ValueError(f"SelectiveTraces: `features`={features!r}; expected a positive integer.")
    traces.parse_method(method, traces.selective_methods(), "SelectiveTraces")
    init = np.asarray(traces.check_alphas(alphas), np.float64)
    if (init >= 1).any():
      raise ValueError(f"SelectiveTraces: write rates must start inside (0, 1); got alphas={init.tolist()}.")
    self.features = features
    self.num_timescales = int(init.shape[0])
    self.method = method
    k, d = self.num_timescales, features
    bias = np.repeat(np.log(init / (1.0 - init))[:, None], d, axis=1).reshape(-1)  # logit(alpha), [K * D]
    self.rate = nnx.Linear(
        d,
        k * d,
        kernel_init=nnx.initializers.zeros_init(),
        bias_init=lambda *_: jnp.asarray(bias, jnp.float32),
        rngs=rngs,
    )

  def rates(self, x_BTD) -> jax.Array:
    """Write rates [..., K, D] float32 for inputs [..., D]."""
    logits = self.rate(x_BTD.astype(jnp.float32))
    return jax.nn.sigmoid(logits.reshape(x_BTD.shape[:-1] + (self.num_timescales, self.features)))

  def __call__(self, x_BTD, *, resets_BT=None, state: Optional[traces.TraceState] = None):
    """Returns (h_BTKD, final TraceState) over a whole sequence (TraceState.count: tokens since a reset)."""
    if state is None:
      # Under a mesh with seq > 1 (jax.set_mesh) this runs sequence-parallel.
      h_BTKD, h_last = seq_parallel.auto_selective_traces(x_BTD, self.rates(x_BTD), resets_BT, method=self.method)
    else:
      h_BTKD, h_last = traces.selective_traces(x_BTD, self.rates(x_BTD), state.h, resets=resets_BT, method=self.method)
    start = None if state is None else state.count
    counts = traces.token_counts(resets_BT, x_BTD.shape[0], x_BTD.shape[1], start)[:, -1]
    return h_BTKD, traces.TraceState(h_last, counts)

  def init_state(self, batch: int) -> traces.TraceState:
    return traces.init_state(batch, self.num_timescales, self.features)

  def step(self, state: traces.TraceState, x_BD, *, reset_B=None):
    """One token for decoding: returns (new state, h_BKD); agrees with __call__ token by token."""
    h, out = traces.selective_step(state.h, x_BD, self.rates(x_BD), reset=reset_B)
    count = state.count + 1 if reset_B is None else jnp.where(reset_B, 1, state.count + 1)
    return traces.TraceState(h, count), out
