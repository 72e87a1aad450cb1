"""experiments/probes.py: regions of the trained range, the GPT's MQAR check and the table from rows alone
(fast); end to end at tiny sizes: equal-parameter widths, the grid, its table and plots (slow)."""

import json
import os

import pytest

from experiments import probes


def _row(model, size, acc, seed=0, probe="recall", weights="raw"):
  return dict(
      probe=probe,
      model=model,
      seed=seed,
      weights=weights,
      size=size,
      train_sizes=[4, 8],
      token_accuracy=acc,
      sequence_accuracy=acc / 2,
      steps=10,
      batch_size=4,
      lr=1e-3,
  )


def test_regions_are_relative_to_the_trained_range():
  rows = [_row("gpt", s, a) for s, a in ((2, 0.5), (4, 1.0), (6, 0.9), (8, 0.8), (16, 0.1), (32, 0.0))]
  table = probes.summarize(rows, {}, ["recall"], ["gpt"])
  assert table["recall/gpt/shorter/token_accuracy"]["mean"] == 0.5
  assert table["recall/gpt/within/token_accuracy"]["mean"] == pytest.approx(0.9)  # 4, 6 and 8
  assert table["recall/gpt/beyond/token_accuracy"]["mean"] == pytest.approx(0.05)


def test_the_gpt_mqar_check_uses_the_worst_seed_at_each_trained_size():
  rows = [_row("gpt", 4, 1.0), _row("gpt", 8, 0.995), _row("gpt", 16, 0.2)]  # 16 is beyond: not checked
  rows += [_row("gpt", 4, 1.0, seed=1), _row("gpt", 8, 0.999, seed=1), _row("ema3", 8, 0.1)]
  rows += [_row("gpt", 8, 0.5, weights="ema")]  # the raw weights are the ones checked
  g = probes.gate(rows)
  assert g["passed"] and g["worst"] == 0.995 and set(g["per_trained_size"]) == {"4", "8"}
  assert g["per_trained_size"]["8"]["mean"] == pytest.approx(0.997)
  assert not probes.gate(rows + [_row("gpt", 4, 0.98, seed=2)])["passed"]
  assert probes.gate([_row("ema3", 4, 1.0)])["passed"] is None


def test_averaging_is_paired_by_seed_with_a_t_interval():
  """EMA minus raw per seed (means over the region's sizes), then mean and 95% t-interval over seeds,
  recomputed here by hand; a seed missing one set of weights is left out."""
  rows = []
  for seed, (raw, ema) in enumerate(((0.5, 0.6), (0.7, 0.75), (0.4, 0.6))):
    for size in (4, 8):
      rows.append(dict(_row("gpt", size, raw, seed=seed), answer_ce=1.0, t_answer_ce=0.9))
      rows.append(dict(_row("gpt", size, ema, seed=seed, weights="ema"), answer_ce=1.2, t_answer_ce=0.8))
  rows.append(_row("gpt", 4, 0.0, seed=3))  # raw only: no pair
  avg = probes.averaging(rows, ["recall"], ["gpt"])
  r = avg["recall/gpt/within/token_accuracy"]
  d = [0.1, 0.05, 0.2]
  mean, se = sum(d) / 3, (sum((x - sum(d) / 3) ** 2 for x in d) / 2) ** 0.5 / 3**0.5
  assert r["n"] == 3 and r["mean"] == pytest.approx(mean) and r["reading"] == "as-is = at T"
  assert r["ci"] == pytest.approx([mean - 4.302652729911275 * se, mean + 4.302652729911275 * se])
  assert avg["recall/gpt/within/answer_ce"]["mean"] == pytest.approx(0.2)
  assert avg["recall/gpt/within/t_answer_ce"]["mean"] == pytest.approx(-0.1)
  assert "recall/gpt/beyond/token_accuracy" not in avg  # no size beyond the range


def test_reanalyse_writes_the_table_and_the_check_from_rows(tmp_path):
  rows = [_row(m, s, a) for m in ("ema3", "gpt") for s, a in ((4, 1.0), (8, 0.99), (16, 0.3))]
  info = {
      m: dict(width={"recall": 8}, params={"recall": 100}, state_bytes={str(t): 64 for t in probes.CONTEXTS})
      for m in ("ema3", "gpt")
  }
  summary = dict(
      command="test", date="today", machine="cpu", load_start=1.0, load_end=1.0, wall_s=60.0, seeds=[0],
      models=info, runs=rows,
  )  # fmt: skip
  with open(tmp_path / "summary.json", "w") as f:
    json.dump(summary, f)
  out = probes.reanalyse(str(tmp_path), command="again")
  assert out["gate"]["passed"] and out["wall_s"] == 60.0
  table = open(tmp_path / "table.md").read()
  assert "Harness check **passed**" in table and "| recall | within |" in table and "| recall | beyond |" in table
  assert "| recall | shorter |" not in table  # no size below the range was evaluated
  assert os.path.getsize(tmp_path / "curves.png") > 0
  assert not os.path.exists(tmp_path / "dial.png")  # no filtering runs: nothing to put on the dial


@pytest.mark.slow
def test_tiny_grid_writes_table_plots_and_state_sizes(tmp_path):
  out = str(tmp_path / "results")
  summary = probes.run(["recall"], ["ema3", "gpt"], [0], str(tmp_path / "runs"), out, window=4, tiny=True)
  for name in ("summary.json", "table.md", "curves.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  info = summary["models"]
  # Widths are matched on parameters: the GPT's count is the closest one to the EMA LM's on the width grid.
  target = info["ema3"]["params"]["recall"]
  gpt_width = info["gpt"]["width"]["recall"]
  counts = {
      w: probes.param_count(probes.make_config("recall", "gpt", w, seed=0, window=4, tiny=True))
      for w in (gpt_width - 4, gpt_width, gpt_width + 4)
      if w > 0
  }
  assert min(counts, key=lambda w: abs(counts[w] - target)) == gpt_width
  # The EMA LM's decoding state is constant in the context length; the GPT's cache grows linearly.
  ema_state = list(info["ema3"]["state_bytes"].values())
  gpt_state = list(info["gpt"]["state_bytes"].values())
  assert len(set(ema_state)) == 1 and gpt_state == sorted(gpt_state) and 60 * gpt_state[0] < gpt_state[-1]
  rows = json.load(open(os.path.join(out, "summary.json")))["runs"]
  assert {(r["model"], r["weights"]) for r in rows} == {(m, w) for m in ("ema3", "gpt") for w in ("raw", "ema")}
  assert all(0.0 <= r["token_accuracy"] <= 1.0 for r in rows)
  table = open(os.path.join(out, "table.md")).read()
  assert "| recall | within |" in table and "| recall | beyond |" in table and "Harness check" in table
  assert "recall/gpt/within/token_accuracy" in summary["table"] and summary["gate"]["passed"] is not None
  # --reanalyse rewrites the tables and plots from summary.json alone, keeping what was measured.
  os.remove(os.path.join(out, "table.md"))
  again = probes.reanalyse(out, command="test")
  assert again["table"] == summary["table"] and again["wall_s"] == summary["wall_s"]
  assert os.path.getsize(os.path.join(out, "table.md")) > 0
