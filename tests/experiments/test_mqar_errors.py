"""experiments.mqar_errors.error_report against counts made by hand on MQAR rows."""

import numpy as np

from ema_jax.data import probes as pdata
from experiments.mqar_errors import error_report


def test_error_report_counts_confusions_and_other_errors():
  pairs, t = 4, 32
  batch = pdata.mqar_batch(3, 0, 16, pairs, t, 64)
  pred = np.where(batch["answer_mask"] > 0, batch["targets"], 0)
  rows, pos = np.nonzero(batch["answer_mask"] > 0)
  # Row 0's first query answers with pair 1's value (a confusion); row 1's first with a token that is no
  # value of its row (filler 0).
  r0 = pos[rows == 0][0]
  queried = np.nonzero(batch["inputs"][0, 0 : 2 * pairs : 2] == batch["inputs"][0, r0])[0][0]
  other = (queried + 1) % pairs
  pred[0, r0] = batch["inputs"][0, 2 * other + 1]
  r1 = pos[rows == 1][0]
  pred[1, r1] = 0
  rep = error_report(pred, batch, pairs)
  assert rep["answers"] == 16 * pairs
  assert rep["wrong"] == 2 and rep["wrong_is_another_pairs_value"] == 1
  assert abs(rep["accuracy"] - (16 * pairs - 2) / (16 * pairs)) < 1e-12
  by_pair = {b["lo"]: b for b in rep["by_pair_index"]}
  assert sum(b["n"] for b in rep["by_pair_index"]) == 16 * pairs
  assert by_pair[queried]["accuracy"] < 1.0
  assert sum(b["n"] for b in rep["by_query_position"]) == 16 * pairs
