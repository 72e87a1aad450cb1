"""Feed-forward layers (NNX): the dense GELU MLP of GPT-2 and the top-k sparse FFN of the EMA LM."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ema_jax.nn import cpu_topk

_DEFAULT_INIT = nnx.initializers.lecun_normal()

ACTIVATIONS = {
    "gelu": lambda a: jax.nn.gelu(a, approximate=True),  # GPT-2's tanh approximation
    "gelu_exact": lambda a: jax.nn.gelu(a, approximate=False),
    "relu": jax.nn.relu,
    "identity": lambda a: a,
}


def _activation(name: str, where: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"{where}: `activation`={name!r}; accepted: {', '.join(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def topk_mask(a_NH, k: int) -> jax.Array:
  """bool mask with exactly k True entries along the last axis: the k largest values (ties by index).

  Built from jax.lax.top_k's indices rather than a threshold, so ties (common in bfloat16) still give
  exactly k. The mask carries no gradient. On one CPU device a compiled kernel builds the same mask
  bit for bit, a few times faster than XLA:CPU's TopK (ema_jax/nn/cpu_topk.py).
  """
  a_NH = jax.lax.stop_gradient(a_NH)
  if cpu_topk.applies(a_NH):
    return cpu_topk.topk_mask(a_NH, k)
  _, idx_Nk = jax.lax.top_k(a_NH, k)
  mask_NH = jnp.zeros(a_NH.shape, jnp.bool_)
  return jnp.put_along_axis(mask_NH, idx_Nk, True, axis=-1, inplace=False)


class MLP(nnx.Module):
  """Dense two-layer FFN: W_2 act(W_1 x + b_1) + b_2 (GPT-2: hidden 4 D, tanh-GELU)."""

  def __init__(
      self,
      in_features: int,
      hidden: int,
      out_features: Optional[int] = None,
      *,
      activation: str = "gelu",
      dtype=None,
      kernel_init=_DEFAULT_INIT,
      out_kernel_init=None,
      rngs: nnx.Rngs,
  ):
    self.activation = activation
    _activation(activation, "MLP")
    out_features = in_features if out_features is None else out_features
    out_kernel_init = kernel_init if out_kernel_init is None else out_kernel_init
    self.up = nnx.Linear(in_features, hidden, dtype=dtype, kernel_init=kernel_init, rngs=rngs)
    self.down = nnx.Linear(hidden, out_features, dtype=dtype, kernel_init=out_kernel_init, rngs=rngs)

  def __call__(self, x_ND):
    return self.down(_activation(self.activation, "MLP")(self.up(x_ND)))


class TopKFFN(nnx.Module):
  """Sparse FFN: all H pre-activations a = W_1 x + b_1 are computed, only the k largest per token are
  kept (act applied to them), the other H - k are zeroed, then y = W_2 h + b_2.

  Gradients: the selection mask is a constant of the forward pass (like ReLU's gate), so gradients
  reach W_1, b_1 and W_2 only through the k kept units of each token; an unselected unit gets no
  gradient from that token (no straight-through estimate).
  """

  def __init__(
      self,
      in_features: int,
      hidden: int,
      k: int,
      out_features: Optional[int] = None,
      *,
      activation: str = "relu",
      dtype=None,
      kernel_init=_DEFAULT_INIT,
      out_kernel_init=None,
      rngs: nnx.Rngs,
  ):
    if not isinstance(k, int) or not 1 <= k <= hidden:
      raise ValueError(f"TopKFFN: `k`={k!r}; expected an integer in [1, hidden={hidden}].")
    _activation(activation, "TopKFFN")
    self.k = k
    self.activation = activation
    out_features = in_features if out_features is None else out_features
    out_kernel_init = kernel_init if out_kernel_init is None else out_kernel_init
    self.up = nnx.Linear(in_features, hidden, dtype=dtype, kernel_init=kernel_init, rngs=rngs)
    self.down = nnx.Linear(hidden, out_features, dtype=dtype, kernel_init=out_kernel_init, rngs=rngs)

  def hidden(self, x_ND):
    """(sparse hidden activations [..., H], bool mask [..., H] with exactly k True per token)."""
    a_NH = self.up(x_ND)
    mask_NH = topk_mask(a_NH, self.k)
    h_NH = jnp.where(mask_NH, _activation(self.activation, "TopKFFN")(a_NH), 0)
    return h_NH.astype(a_NH.dtype), mask_NH

  def __call__(self, x_ND):
    h_NH, _ = self.hidden(x_ND)
    return self.down(h_NH)
