"""One scalar logit temperature, fitted on held-out in-range data: the control every length verdict needs.

A change of the weights (an average, dropout) that only rescales the logits looks like a length effect
when it sharpens or flattens the output; a single temperature T fitted on in-range data, applied to all
sizes, removes that reading. A verdict that survives it is about something a temperature cannot do
(e.g. where attention goes), which is the set-complement paper's mechanism (attention dispersion).

The fit minimises the mean cross-entropy of softmax(logits / T) against target distributions (e.g. uniform
over the valid tokens). As a function of the inverse temperature beta = 1/T the cross-entropy is convex
(log-sum-exp of beta z is convex in beta, the target term linear): its derivative, the mean of
E_softmax(beta z)[z] - E_target[z], increases with beta, so bisection on its sign finds the minimum;
Newton steps (second derivative: the mean variance of z under softmax(beta z)) polish it. All in float64.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

BETA_RANGE = (1e-3, 1e3)  # the inverse temperatures searched: T from 1e-3 to 1e3


def _moments(beta: float, z: np.ndarray, target: np.ndarray, w: np.ndarray) -> Tuple[float, float, float]:
  """(cross-entropy, its first and second derivative in beta), weighted means over rows."""
  s = beta * z
  m = s.max(-1, keepdims=True)
  e = np.exp(s - m)
  total = e.sum(-1, keepdims=True)
  p = e / total
  lse = (m + np.log(total))[:, 0]
  ez_p = (p * z).sum(-1)
  ez_t = (target * z).sum(-1)
  var = (p * z * z).sum(-1) - ez_p**2
  ce = lse - beta * ez_t
  mean = lambda v: float((w * v).sum() / w.sum())
  return mean(ce), mean(ez_p - ez_t), mean(np.maximum(var, 0.0))


def fit_temperature(logits, target_probs, mask: Optional[np.ndarray] = None, tol: float = 1e-10) -> float:
  """The temperature T > 0 minimising the mean cross-entropy of softmax(logits / T) against target_probs.

  logits, target_probs: [..., V] (rows are flattened; targets sum to 1); mask: [...] row weights (0 drops a
  row). Returns a value within BETA_RANGE's inverse; an optimum beyond it returns the bound.
  """
  z = np.asarray(logits, np.float64)
  t = np.asarray(target_probs, np.float64)
  if z.shape != t.shape or z.ndim < 1:
    raise ValueError(f"fit_temperature: logits {z.shape} and target_probs {t.shape} must have one shape [..., V].")
  z, t = z.reshape(-1, z.shape[-1]), t.reshape(-1, t.shape[-1])
  w = np.ones(z.shape[0]) if mask is None else np.asarray(mask, np.float64).reshape(-1)
  if w.shape[0] != z.shape[0] or not w.sum() > 0:
    raise ValueError(f"fit_temperature: mask of {w.shape[0]} rows (sum {w.sum()}) for {z.shape[0]} rows of logits.")
  keep = w > 0
  z, t, w = z[keep], t[keep], w[keep]
  return fit(lambda beta: _moments(beta, z, t, w), tol)


def fit(moments: Callable[[float], Tuple[float, float, float]], tol: float = 1e-10) -> float:
  """The temperature minimising a convex cross-entropy given `moments(beta) -> (ce, d ce/d beta,
  d2 ce/d beta2)`; the callable may run on device (e.g. a jitted reduction over a global batch, so that
  every process gets the same temperature)."""
  grad = lambda log_beta: float(moments(float(np.exp(log_beta)))[1])
  lo, hi = np.log(BETA_RANGE[0]), np.log(BETA_RANGE[1])
  if grad(lo) >= 0:
    return 1.0 / BETA_RANGE[0]
  if grad(hi) <= 0:
    return 1.0 / BETA_RANGE[1]
  while hi - lo > 1e-6:  # bisection on log beta: the derivative's sign
    mid = 0.5 * (lo + hi)
    if grad(mid) > 0:
      hi = mid
    else:
      lo = mid
  beta = float(np.exp(0.5 * (lo + hi)))
  for _ in range(20):  # Newton in beta, kept inside the bracket
    _, g, h = (float(v) for v in moments(beta))
    if h <= 0:
      break
    new = min(max(beta - g / h, float(np.exp(lo))), float(np.exp(hi)))
    done = abs(new - beta) <= tol * beta
    beta = new
    if done:
      break
  return float(1.0 / beta)


def cross_entropy(logits, target_probs, temperature: float = 1.0, mask: Optional[np.ndarray] = None) -> float:
  """Mean cross-entropy of softmax(logits / temperature) against target_probs (float64)."""
  z = np.asarray(logits, np.float64)
  t = np.asarray(target_probs, np.float64)
  z, t = z.reshape(-1, z.shape[-1]), t.reshape(-1, t.shape[-1])
  w = np.ones(z.shape[0]) if mask is None else np.asarray(mask, np.float64).reshape(-1)
  return _moments(1.0 / temperature, z, t, w)[0]
