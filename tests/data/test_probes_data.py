"""Probe generators (ema_jax/data/probes.py): properties recomputed independently, determinism, bad input."""

import numpy as np
import pytest
from scipy import stats  # a dependency of jax

from ema_jax.data import probes

V = probes.Vocab(symbols=10)


def _mqar_rows(b, pairs):
  """Per row, from the inputs alone: {key: value} of the prefix and [(position, key)] of the queries."""
  out = []
  for x in b["inputs"]:
    table = {int(x[2 * i]): int(x[2 * i + 1]) for i in range(pairs)}
    queries = [(t, int(x[t])) for t in range(2 * pairs, len(x)) if x[t] != 0]
    out.append((table, queries))
  return out


def test_mqar_layout_vocabulary_halves_and_answers():
  pairs, seq_len, vocab = 6, 48, 40
  b = probes.mqar_batch(3, 1, batch=50, pairs=pairs, seq_len=seq_len, vocab_size=vocab)
  assert b["inputs"].shape == b["targets"].shape == b["answer_mask"].shape == (50, seq_len)
  for x, y, m, (table, queries) in zip(b["inputs"], b["targets"], b["answer_mask"], _mqar_rows(b, pairs)):
    keys, values = list(x[0 : 2 * pairs : 2]), list(x[1 : 2 * pairs : 2])
    # Keys and values from disjoint halves (token 0 is filler), distinct within the example.
    assert all(1 <= k < vocab // 2 for k in keys) and all(vocab // 2 <= v < vocab for v in values)
    assert len(set(keys)) == pairs and len(set(values)) == pairs and len(table) == pairs
    # After the prefix: every key once, bare (filler around it, no value ever shown), at an even offset.
    assert sorted(k for _, k in queries) == sorted(keys)
    assert all((t - 2 * pairs) % 2 == 0 for t, _ in queries)
    assert all(x[t + 1] == 0 for t, _ in queries if t + 1 < seq_len)
    assert not set(int(v) for v in x[2 * pairs :]) & set(values)
    # Answers exactly at the query keys, each the value paired with that key; nothing else is scored.
    assert sorted(np.nonzero(m)[0].tolist()) == sorted(t for t, _ in queries)
    assert all(y[t] == table[k] for t, k in queries)


def _chi2_pvalue(counts, probs):
  expected = probs * counts.sum()
  assert expected.min() >= 5  # the chi-square approximation holds
  return stats.chisquare(counts, expected).pvalue


def test_mqar_gaps_follow_the_power_law():
  """Query slots s (the key sits 2 s tokens after the prefix) against P(s) ~ (s + 1)^(a - 1), fixed seeds."""
  a, space = 0.01, 16
  law = np.arange(1, space + 1) ** (a - 1.0)
  law /= law.sum()
  # One query per row: its slot is a draw from the law itself.
  b = probes.mqar_batch(0, 0, batch=20000, pairs=1, seq_len=2 + 2 * space, vocab_size=64, power_a=a)
  slots = [(t - 2) // 2 for _, q in _mqar_rows(b, 1) for t, _ in q]
  counts = np.bincount(slots, minlength=space)
  assert _chi2_pvalue(counts, law) > 1e-3
  assert _chi2_pvalue(counts, np.full(space, 1 / space)) < 1e-12  # the test can tell it from uniform gaps
  # Four queries per row: distinct slots drawn in key order by successive sampling without replacement
  # (Zoology's np.random.choice(replace=False, p=law)); the first key's slot is again a draw from the law,
  # and the slots of all keys match that reference sampler's, key by key (a two-sample test).
  pairs, rows = 4, 8000
  b = probes.mqar_batch(1, 0, batch=rows, pairs=pairs, seq_len=2 * pairs + 2 * space, vocab_size=64, power_a=a)
  got = np.zeros((pairs, space), int)
  for x, (table, queries) in zip(b["inputs"], _mqar_rows(b, pairs)):
    order = {k: i for i, k in enumerate(x[0 : 2 * pairs : 2])}
    assert len({t for t, _ in queries}) == pairs
    for t, k in queries:
      got[order[k], (t - 2 * pairs) // 2] += 1
  assert _chi2_pvalue(got[0], law) > 1e-3
  rng = np.random.default_rng(5)
  ref = np.zeros_like(got)
  for _ in range(rows):
    ref[np.arange(pairs), rng.choice(space, size=pairs, replace=False, p=law)] += 1
  for i in range(pairs):
    assert stats.chi2_contingency(np.stack([got[i], ref[i]])).pvalue > 1e-3, i


def test_mqar_power_one_is_uniform():
  np.testing.assert_allclose(probes.mqar_power_law(7, 1.0), np.full(7, 1 / 7))


def test_selective_copy_as_in_mamba():
  length, tokens, vocab = 40, 6, 16
  b = probes.selective_copy_batch(2, 0, batch=30, length=length, tokens=tokens, vocab_size=vocab)
  region = length - tokens
  assert b["inputs"].shape == (30, length)
  first = []
  for x, y, m in zip(b["inputs"], b["targets"], b["answer_mask"]):
    data = [int(t) for t in x[:region] if t != 0]
    # Data tokens from 1..V-2 among noise (0), then one marker (V-1) per data token.
    assert len(data) == tokens and all(1 <= t <= vocab - 2 for t in data)
    assert (x[region:] == vocab - 1).all() and (x[:region] != vocab - 1).all()
    # The answers: the data tokens in order, at the markers and only there.
    np.testing.assert_array_equal(y[region:], data)
    np.testing.assert_array_equal(np.nonzero(m)[0], np.arange(region, length))
    first.append(int(np.nonzero(x[:region])[0][0]))
  assert len(set(first)) > 5  # positions vary from row to row


def test_selective_copy_positions_are_uniform():
  """Every position of the region holds a data token with probability M / (T - M)."""
  length, tokens = 24, 4
  b = probes.selective_copy_batch(7, 0, batch=6000, length=length, tokens=tokens, vocab_size=16)
  counts = (b["inputs"][:, : length - tokens] != 0).sum(0)
  law = np.full(length - tokens, 1 / (length - tokens))
  assert _chi2_pvalue(counts, law) > 1e-3


def test_copy():
  b = probes.copy_batch(0, 3, batch=4, length=5, vocab=V)
  assert b["inputs"].shape == b["targets"].shape == b["answer_mask"].shape == (4, 10)
  full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
  np.testing.assert_array_equal(full[:, :5], full[:, 6:])
  assert (full[:, 5] == V.sep).all()
  np.testing.assert_array_equal(b["answer_mask"][0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])  # targets 6..10


def test_recall_toy_answers_are_the_values_of_the_queried_keys():
  b = probes.recall_toy_batch(1, 0, batch=3, pairs=4, queries=3, vocab=V)
  full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
  for row, mask in zip(full, b["answer_mask"]):
    table = {int(row[2 * i]): int(row[2 * i + 1]) for i in range(4)}
    assert len(table) == 4 and row[8] == V.sep
    answers = [int(row[t + 1]) for t in np.nonzero(mask)[0]]
    queried = [int(row[t]) for t in np.nonzero(mask)[0]]
    assert answers == [table[k] for k in queried] and len(answers) == 3
    assert all(row[t - 1] == V.query for t in np.nonzero(mask)[0])


def test_filtering_target_is_the_running_majority():
  b = probes.filtering_batch(3, 0, batch=5, span=40, vocab=V, noise=0.3)
  for x, y in zip(b["inputs"], b["targets"]):
    a = bb = 0
    last = V.class_a
    for t in range(40):
      a += x[t] == V.class_a
      bb += x[t] == V.class_b
      last = x[t] if x[t] != V.noise else last
      assert y[t] == (V.class_a if a > bb else V.class_b if bb > a else last)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: probes.copy_batch(0, s, 2, 6, V),
        lambda s: probes.mqar_batch(0, s, 2, 4, 32, 64),
        lambda s: probes.selective_copy_batch(0, s, 2, 16, 4),
    ],
)
def test_deterministic_in_seed_and_step(make):
  a, b, c = (make(s) for s in (7, 7, 8))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_accuracy():
  b = probes.copy_batch(0, 0, 2, 3, V)
  perfect = probes.accuracy(b["targets"], b)
  assert perfect == dict(token_accuracy=1.0, sequence_accuracy=1.0)
  wrong = b["targets"].copy()
  wrong[0, -1] = (wrong[0, -1] + 1) % V.symbols
  assert probes.accuracy(wrong, b) == dict(token_accuracy=5 / 6, sequence_accuracy=0.5)


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda: probes.copy_batch(0, 0, 1, 0, V), "length"),
        (lambda: probes.recall_toy_batch(0, 0, 1, 11, 1, V), "pairs"),
        (lambda: probes.mqar_batch(0, 0, 1, 32, 256, 64), "pairs"),  # keys from [1, 32): 31 at most
        (lambda: probes.mqar_batch(0, 0, 1, 8, 31, 64), "seq_len"),
        (lambda: probes.mqar_batch(0, 0, 1, 2, 16, 64, power_a=0.0), "power_a"),
        (lambda: probes.selective_copy_batch(0, 0, 1, 7, 4), "length"),
        (lambda: probes.filtering_batch(0, 0, 1, 8, V, noise=1.0), "noise"),
    ],
)
def test_bad_arguments(call, field):
  with pytest.raises(ValueError, match=field):
    call()
