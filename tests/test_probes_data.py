"""Probe generators (ema_jax/data/probes.py): answers recomputed independently, determinism, bad input."""

import numpy as np
import pytest

from ema_jax.data import probes

V = probes.Vocab(symbols=10)


def test_copy():
  b = probes.copy_batch(0, 3, batch=4, length=5, vocab=V)
  assert b["inputs"].shape == b["targets"].shape == b["answer_mask"].shape == (4, 10)
  full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
  np.testing.assert_array_equal(full[:, :5], full[:, 6:])
  assert (full[:, 5] == V.sep).all()
  np.testing.assert_array_equal(b["answer_mask"][0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])  # targets 6..10


def test_recall_answers_are_the_values_of_the_queried_keys():
  b = probes.recall_batch(1, 0, batch=3, pairs=4, queries=3, vocab=V)
  full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
  for row, mask in zip(full, b["answer_mask"]):
    table = {int(row[2 * i]): int(row[2 * i + 1]) for i in range(4)}
    assert len(table) == 4 and row[8] == V.sep
    answers = [int(row[t + 1]) for t in np.nonzero(mask)[0]]
    queried = [int(row[t]) for t in np.nonzero(mask)[0]]
    assert answers == [table[k] for k in queried] and len(answers) == 3
    assert all(row[t - 1] == V.query for t in np.nonzero(mask)[0])


def test_selective_copy_outputs_the_content_in_order():
  b = probes.selective_copy_batch(2, 0, batch=3, length=4, span=12, vocab=V)
  full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
  for row in full:
    content = [int(t) for t in row[:12] if t != V.noise]
    assert content == [int(t) for t in row[13:]] and row[12] == V.sep
  assert b["answer_mask"].sum() == 3 * 4


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


def test_deterministic_in_seed_and_step():
  a, b, c = (probes.copy_batch(0, s, 2, 6, V) for s in (7, 7, 8))
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
        (lambda: probes.recall_batch(0, 0, 1, 11, 1, V), "pairs"),
        (lambda: probes.selective_copy_batch(0, 0, 1, 5, 4, V), "span"),
        (lambda: probes.filtering_batch(0, 0, 1, 8, V, noise=1.0), "noise"),
    ],
)
def test_bad_arguments(call, field):
  with pytest.raises(ValueError, match=field):
    call()
