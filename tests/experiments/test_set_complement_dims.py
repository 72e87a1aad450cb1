"""experiments/set_complement_dims.py on a tiny grid: outputs, the solved rule and the smallest-dims table."""

import json

import pytest

from experiments import set_complement_dims as dims


@pytest.mark.slow  # ~100 s; the selection rule below stays in the default run
def test_tiny_grid_end_to_end(tmp_path):
  c = dims.base_config(n=6, s=2, steps=40, batch=16)
  c.sweep.min_steps, c.sweep.chunk_steps, c.task.eval_examples = 20, 20, 8
  grid = dims.run_grid(c, 1e-2, [2, 6], [1, 6], [0, 1], kl_solved=10.0, log=lambda *a: None)
  assert len(grid["rows"]) == 2 * 2 * 2 and grid["sizes"] == [1, 2, 3, 4, 5]
  meta = dict(
      command="test",
      date="d",
      machine="m",
      load_start=0,
      load_end=0,
      wall_s=1.0,
      num_tokens=6,
      train_max_size=2,
      seeds=[0, 1],
      steps=40,
      lr=1e-2,
      batch_size=16,
      kl_solved=10.0,
  )
  summary = dims.write_outputs(str(tmp_path), grid, [2, 6], [1, 6], meta)
  # A threshold every model meets: the smallest solving dims are the grid's smallest.
  assert summary["smallest"]["min_embed_dim_for_value_dim"] == {1: 2, 6: 2}
  md = (tmp_path / "summary.md").read_text()
  assert "| d \\ dv | 1 | 6 |" in md and "Smallest embedding dim" in md
  assert (tmp_path / "plots" / "dims_kl.png").stat().st_size < 1_000_000
  assert len(json.loads((tmp_path / "summary.json").read_text())["rows"]) == 8


def test_smallest_solving_needs_every_seed():
  rows = [
      dict(embed_dim=2, value_dim=1, solved=True),
      dict(embed_dim=2, value_dim=1, solved=False),
      dict(embed_dim=4, value_dim=1, solved=True),
      dict(embed_dim=4, value_dim=1, solved=True),
  ]
  best = dims.smallest_solving(rows, [2, 4], [1])
  assert best["min_embed_dim_for_value_dim"] == {1: 4} and best["min_value_dim_for_embed_dim"] == {2: None, 4: 1}
