"""experiments/probes.py end to end at tiny sizes: equal-parameter widths, the grid, its table and plots."""

import json
import os

from experiments import probes


def test_tiny_grid_writes_table_plots_and_state_sizes(tmp_path):
  out = str(tmp_path / "results")
  summary = probes.run(["recall"], ["ema3", "gpt"], [0], str(tmp_path / "runs"), out, window=4, tiny=True)
  for name in ("summary.json", "table.md", "curves.png", "dial.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  info = summary["models"]
  # Widths are matched on parameters: the GPT's count is the closest one to the EMA LM's on the width grid.
  target = info["ema3"]["params"]["recall"]
  gpt_width = info["gpt"]["width"]
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
  assert "| recall | trained |" in table and "| recall | beyond |" in table
  assert "recall/gpt/trained/token_accuracy" in summary["table"]
  # --reanalyse rewrites the tables and plots from summary.json alone, keeping what was measured.
  os.remove(os.path.join(out, "table.md"))
  again = probes.reanalyse(out, command="test")
  assert again["table"] == summary["table"] and again["wall_s"] == summary["wall_s"]
  assert os.path.getsize(os.path.join(out, "table.md")) > 0
