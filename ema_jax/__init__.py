"""ema_jax: what fixed exponential-moving-average context can and cannot represent, in JAX/Flax."""

__version__ = "0.1.0"
