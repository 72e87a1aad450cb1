"""Label-free Hebbian role model: update rule by hand, features against a NumPy loop, end to end."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ema_jax.data import grammar as g
from ema_jax import role_metrics
from ema_jax.models import hebbian as H


def test_competitive_update_matches_hand_computation():
  units = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  x = jnp.array(
      [
          [0.8, 0.6, 0.0],  # scores (0.8, 0.6): unit 0 wins
          [0.0, 0.6, 0.8],  # (0.0, 0.6): unit 1
          [0.6, 0.0, 0.8],  # (0.6, 0.0): unit 0
          [0.0, 1.0, 0.0],
      ]
  )  # padding: must change nothing
  valid = jnp.array([True, True, True, False])
  new_units, usage, win = H.competitive_update(units, jnp.array([0.5, 0.5]), x, valid, 0.5, usage_rate=0.1)
  assert np.asarray(win)[:3, 0].tolist() == [0, 1, 0]
  # unit 0: mean of won inputs (0.7, 0.3, 0.4); w + 0.5 (mean - w) = (0.85, 0.15, 0.2), then unit length.
  n0 = math.sqrt(0.85**2 + 0.15**2 + 0.2**2)
  # unit 1: mean (0, 0.6, 0.8); (0, 0.8, 0.4), then unit length.
  n1 = math.sqrt(0.8**2 + 0.4**2)
  np.testing.assert_allclose(new_units, [[0.85 / n0, 0.15 / n0, 0.2 / n0], [0.0, 0.8 / n1, 0.4 / n1]], rtol=1e-6)
  # usage: 0.9 * 0.5 + 0.1 * share of wins (2/3, 1/3) over the 3 valid tokens.
  np.testing.assert_allclose(usage, [0.45 + 0.1 * 2 / 3, 0.45 + 0.1 / 3], rtol=1e-6)


def test_conscience_and_k_winners():
  units = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  x = jnp.array([[0.8, 0.6, 0.0]])
  valid = jnp.array([True])
  # Unit 0 has won 90% of the time: its score 0.8 - 0.2 (2 * 0.9 - 1) = 0.64 < 0.6 + 0.2 * 0.8 = 0.76.
  _, _, win = H.competitive_update(units, jnp.array([0.9, 0.1]), x, valid, 0.5, conscience=0.2)
  assert int(win[0, 0]) == 1
  _, _, win = H.competitive_update(units, jnp.array([0.9, 0.1]), x, valid, 0.5, conscience=0.0)
  assert int(win[0, 0]) == 0
  # k = 2: both units move halfway to x.
  new_units, usage, _ = H.competitive_update(units, jnp.array([0.5, 0.5]), x, valid, 0.5, winners=2, usage_rate=1.0)
  for u in range(2):
    moved = 0.5 * np.asarray(units[u]) + 0.5 * np.array([0.8, 0.6, 0.0])
    np.testing.assert_allclose(new_units[u], moved / np.linalg.norm(moved), rtol=1e-6)
  np.testing.assert_allclose(usage, [0.5, 0.5], rtol=1e-6)


def _unit64(v):
  n = np.linalg.norm(v)
  return v / n if n > 0 else v


def test_input_features_match_numpy_loop():
  cfg = H.HebbianConfig(vocab_size=7, code_dim=4, codes="random", alphas=(0.5, 0.1), code_weight=0.7, trace_weight=1.3)
  tokens = np.array([[3, 1, 4, 1, 5, 0], [2, 6, 0, 0, 0, 0]], np.int32)
  mask = tokens != 0
  codes = np.asarray(H.make_codes(cfg, tokens, mask), np.float64)
  got = np.asarray(H.input_features(jnp.asarray(codes, jnp.float32), tokens, mask, cfg))
  for b in range(2):
    n = int(mask[b].sum())
    xs = [codes[t] for t in tokens[b, :n]]
    fwd = {a: [] for a in cfg.alphas}
    bwd = {a: [None] * n for a in cfg.alphas}
    for a in cfg.alphas:
      h = np.zeros(4)
      for t in range(n):  # context strictly before t
        fwd[a].append(h.copy())
        h = (1 - a) * h + a * xs[t]
      h = np.zeros(4)
      for t in reversed(range(n)):  # context strictly after t
        bwd[a][t] = h.copy()
        h = (1 - a) * h + a * xs[t]
    for t in range(6):
      if t >= n:
        np.testing.assert_array_equal(got[b, t], 0.0)
        continue
      blocks = (
          [0.7 * _unit64(xs[t])]
          + [1.3 * _unit64(fwd[a][t]) for a in cfg.alphas]
          + [1.3 * _unit64(bwd[a][t]) for a in cfg.alphas]
      )
      np.testing.assert_allclose(got[b, t], _unit64(np.concatenate(blocks)), atol=2e-6)


def test_context_codes_sum_neighbours():
  cfg = H.HebbianConfig(vocab_size=6, code_dim=8, codes="context", identity_weight=0.5)
  tokens = np.array([[1, 2, 3], [4, 2, 0]], np.int32)
  codes = np.asarray(H.make_codes(cfg, tokens, tokens != 0), np.float64)
  assert codes.shape == (6, 24)
  rand = codes[:, :8] / 0.5
  np.testing.assert_allclose(np.linalg.norm(rand, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(codes[2, 8:16], _unit64(rand[1] + rand[4]), atol=1e-6)  # left of word 2
  np.testing.assert_allclose(codes[1, 16:], rand[2], atol=1e-6)  # right of word 1
  np.testing.assert_allclose(codes[3, 8:16], rand[2], atol=1e-6)  # left of word 3
  np.testing.assert_array_equal(codes[5, 8:], 0.0)  # never seen


def test_evaluate_by_hand():
  names = ("OTHER", "VERB", "AGENT", "PATIENT")
  gold = np.array([[0, 2, 1, 3, -1], [0, 2, 1, 0, 3]])
  pred = np.array([[0, 2, 1, 2, -1], [0, 3, 1, 0, 3]])
  depth = np.array([[0, 0, 0, 0, -1], [0, 0, 1, 1, 1]])
  res = role_metrics.evaluate(pred, gold, depth, gold >= 0, names)
  assert res["accuracy"] == pytest.approx(7 / 9)
  assert res["argument_accuracy"] == pytest.approx(2 / 4)
  assert res["per_role"] == pytest.approx({"OTHER": 1.0, "VERB": 1.0, "AGENT": 0.5, "PATIENT": 0.5})
  assert res["per_depth"] == pytest.approx({0: 4 / 6, 1: 1.0})
  assert res["per_depth_arguments"] == pytest.approx({0: 1 / 3, 1: 1.0})
  assert res["count"] == 9 and res["count_per_depth"] == {0: 6, 1: 3}


def test_config_and_input_validation():
  with pytest.raises(ValueError, match="HebbianConfig.codes='onehot'"):
    H.HebbianConfig(vocab_size=5, codes="onehot")
  with pytest.raises(ValueError, match="HebbianConfig.alphas"):
    H.HebbianConfig(vocab_size=5, alphas=(0.5, 1.5))
  with pytest.raises(ValueError, match="HebbianConfig.winners"):
    H.HebbianConfig(vocab_size=5, num_units=4, winners=5)
  cfg = H.HebbianConfig(vocab_size=5, num_units=4)
  with pytest.raises(ValueError, match=r"outside \[0, vocab_size=5\)"):
    H.fit(cfg, np.array([[1, 7]]), np.array([[True, True]]))


@pytest.fixture(scope="module")
def tiny_run():
  data = g.make_splits(600, 200, 50, seed=0, max_len=24)
  cfg = H.HebbianConfig(vocab_size=len(g.VOCAB), code_dim=16, num_units=64, epochs=2, batch_size=32)
  fitted = H.fit_readouts(cfg, data["train"], probe_steps=200)
  held, train = data["heldout"], data["train"]
  score = lambda pred: role_metrics.evaluate(pred, held.roles, held.depth, held.mask, held.role_names)
  results = {"heldout": {r: score(p) for r, p in H.predict(fitted, cfg, held.tokens, held.mask).items()}}
  results["heldout"]["majority"] = score(role_metrics.majority_predictions(train.roles, train.mask, held.mask))
  return data, cfg, results


def test_end_to_end_readouts_beat_majority_on_heldout(tiny_run):
  data, _, results = tiny_run
  held = results["heldout"]
  majority = held["majority"]["accuracy"]
  assert 0.4 < majority < 0.6
  assert held["unit_readout"]["accuracy"] > majority + 0.25
  assert held["linear_probe"]["accuracy"] > majority + 0.25
  # Among argument tokens, always answering the commonest argument role (AGENT) gets about half.
  gold = data["heldout"].roles[data["heldout"].mask]
  args = gold[gold >= g.AGENT]
  assert held["unit_readout"]["argument_accuracy"] > np.bincount(args).max() / len(args) + 0.1


def test_fit_is_deterministic_and_label_free(tiny_run):
  data, cfg, _ = tiny_run
  train = data["train"]
  small = train.tokens[:200], train.mask[:200]
  a, b = H.fit(cfg, *small), H.fit(cfg, *small)
  np.testing.assert_array_equal(a.units_UF, b.units_UF)
  np.testing.assert_allclose(np.linalg.norm(a.units_UF, axis=1), 1.0, rtol=1e-5)
  win = H.winning_units(a, cfg, *small)
  assert np.all(win[~small[1]] == -1) and np.all(win[small[1]] >= 0)
  roles_u = H.fit_unit_roles(a, cfg, *small, train.roles[:200], len(g.ROLE_NAMES))
  pred = H.assign(a, cfg, roles_u, *small)
  np.testing.assert_array_equal(pred[small[1]], roles_u[win[small[1]]])
  feats = H.features(a, cfg, *small)
  assert feats.shape == (200, 24, 64)
  np.testing.assert_allclose(feats[small[1]].sum(-1), 1.0, rtol=1e-4)


@pytest.mark.parametrize("backward", [False, True])
def test_forward_only_features_are_causal(backward):
  """backward=False (what a streaming reader has): the features at t, and the role read out there, do
  not depend on the tokens after t, whether those are replaced or cut off. backward=True does read them."""
  data = g.make_splits(200, 20, 20, seed=1, max_len=24)
  cfg = H.HebbianConfig(vocab_size=len(g.VOCAB), code_dim=8, num_units=16, epochs=1, batch_size=32, backward=backward)
  train = data["train"]
  params = H.fit(cfg, train.tokens, train.mask)
  roles_u = H.fit_unit_roles(params, cfg, train.tokens, train.mask, train.roles, len(g.ROLE_NAMES))
  tokens, mask = data["heldout"].tokens, data["heldout"].mask
  # Each sentence keeps its first half (position t_b and before) and loses or changes the rest.
  t_B1 = mask.sum(1, keepdims=True) // 2 - 1
  pos_T = np.arange(tokens.shape[1])
  keep = pos_T <= t_B1
  later = mask & ~keep
  assert keep.sum(1).min() >= 1 and later.sum(1).min() >= 1
  rng = np.random.default_rng(0)
  replaced = np.where(later, rng.integers(1, len(g.VOCAB), tokens.shape), tokens).astype(tokens.dtype)
  cut = np.where(keep, tokens, 0).astype(tokens.dtype)
  ref_x = np.asarray(H.input_features(params.codes_VC, tokens, mask, cfg))[keep]
  ref_f = H.features(params, cfg, tokens, mask)[keep]
  ref_r = H.assign(params, cfg, roles_u, tokens, mask)[keep]
  for other_tokens, other_mask in ((replaced, mask), (cut, keep)):
    x = np.asarray(H.input_features(params.codes_VC, other_tokens, other_mask, cfg))[keep]
    f = H.features(params, cfg, other_tokens, other_mask)[keep]
    r = H.assign(params, cfg, roles_u, other_tokens, other_mask)[keep]
    if backward:
      assert np.abs(x - ref_x).max() > 1e-2
    else:
      np.testing.assert_allclose(x, ref_x, atol=1e-6)
      np.testing.assert_allclose(f, ref_f, atol=1e-5)
      np.testing.assert_array_equal(r, ref_r)
