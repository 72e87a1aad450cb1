"""Flax NNX layers."""

from ema_jax.nn.selective_layer import SelectiveTraces
from ema_jax.nn.trace_layer import EMATraces
from ema_jax.nn.window_attention import WindowAttention

__all__ = ["EMATraces", "SelectiveTraces", "WindowAttention"]
