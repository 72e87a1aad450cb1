"""The temperature fit against a brute-force grid, and its closed form on a case that has one."""

import numpy as np
import pytest

from ema_jax import temperature


def brute_force(logits, target, mask=None):
  """The grid minimum of the cross-entropy over log-spaced temperatures, computed directly."""
  grid = np.exp(np.linspace(np.log(1e-2), np.log(1e2), 20001))
  z = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
  t = target.reshape(-1, target.shape[-1]).astype(np.float64)
  w = np.ones(len(z)) if mask is None else mask.reshape(-1).astype(np.float64)
  best, best_t = np.inf, None
  for T in grid[::50]:  # a coarse pass, then a fine one around its best
    s = z / T
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    ce = ((lse - (t * s).sum(-1)) * w).sum() / w.sum()
    if ce < best:
      best, best_t = ce, T
  i = np.searchsorted(grid, best_t)
  for T in grid[max(i - 60, 0) : i + 60]:
    s = z / T
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    ce = ((lse - (t * s).sum(-1)) * w).sum() / w.sum()
    if ce < best:
      best, best_t = ce, T
  return best_t, best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_matches_a_brute_force_grid(seed):
  rng = np.random.default_rng(seed)
  rows, v = 64, 12
  valid = rng.random((rows, v)) < 0.6
  valid[:, 0] = True
  # Informative but mis-scaled logits: the optimum is an interior temperature.
  logits = (2.0 * valid + rng.normal(size=(rows, v))) * rng.uniform(0.3, 4.0)
  target = valid / valid.sum(-1, keepdims=True)  # uniform over the valid tokens, as in set complement
  mask = (rng.random(rows) < 0.8).astype(float)
  t_fit = temperature.fit_temperature(logits, target, mask)
  t_grid, ce_grid = brute_force(logits, target, mask)
  ce_fit = temperature.cross_entropy(logits, target, t_fit, mask)
  assert ce_fit <= ce_grid + 1e-9
  assert t_fit == pytest.approx(t_grid, rel=2e-3)


def test_known_optimum():
  # Two tokens, logits (a, 0), target (q, 1 - q): the optimum makes softmax(a / T) = q, T = a / logit(q).
  a, q = 3.0, 0.8
  t_fit = temperature.fit_temperature(np.array([[a, 0.0]]), np.array([[q, 1 - q]]))
  assert t_fit == pytest.approx(a / np.log(q / (1 - q)), rel=1e-8)


def test_scaled_logits_give_scaled_temperatures():
  rng = np.random.default_rng(3)
  target = rng.dirichlet(np.ones(8), size=32)
  logits = 2.0 * np.log(target) + rng.normal(size=(32, 8))
  t1 = temperature.fit_temperature(logits, target)
  t3 = temperature.fit_temperature(3.0 * logits, target)
  assert t3 == pytest.approx(3.0 * t1, rel=1e-6)


def test_uninformative_logits_go_to_the_bound():
  rng = np.random.default_rng(4)
  logits, target = rng.normal(size=(256, 6)), np.full((256, 6), 1 / 6)
  assert temperature.fit_temperature(logits, target) == 1.0 / temperature.BETA_RANGE[0]


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="one shape"):
    temperature.fit_temperature(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="mask"):
    temperature.fit_temperature(np.zeros((2, 3)), np.ones((2, 3)) / 3, mask=np.zeros(2))
