"""Flax NNX layers."""

from ema_jax.nn.trace_layer import EMATraces

__all__ = ["EMATraces"]
