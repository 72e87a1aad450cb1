"""experiments/norm_compare.py: paired post - pre differences and their verdicts on made-up results."""

import numpy as np
import pytest

from experiments import norm_compare


def fake(kl_out, mass_out):
  regions = {}
  for g in ("in_range", "out_of_range"):
    regions.update({f"{g}/legal_mass": mass_out, f"{g}/top1_legal": 0.9, f"{g}/kl": kl_out})
  return {"raw": dict(regions), "ema": dict(regions)}


def test_paired_differences_and_verdicts(tmp_path):
  runs = {
      "pre": {0: fake(1.0, 0.5), 1: fake(1.2, 0.6), 2: fake(0.9, 0.55)},
      "post": {0: fake(0.8, 0.5), 1: fake(1.0, 0.61), 2: fake(0.7, 0.54)},
  }
  res = norm_compare.compare("othello", runs)
  assert res["seeds"] == [0, 1, 2] and res["weights"] == ["raw", "ema"]
  kl = res["paired"]["post-pre/raw/out_of_range/kl"]
  assert kl["mean"] == pytest.approx(-0.2) and kl["verdict"] == "post better"  # lower KL every seed
  mass = res["paired"]["post-pre/raw/out_of_range/legal_mass"]
  assert mass["ci"][0] < 0 < mass["ci"][1] and mass["verdict"] == "not resolved"
  assert res["means"]["post/raw/out_of_range/kl"] == pytest.approx(np.mean([0.8, 1.0, 0.7]))
  summary = dict(command="c", date="d", machine="m", load_start=0, load_end=0, wall_s=1.0, tasks={"othello": res})
  norm_compare.write_markdown(str(tmp_path / "s.md"), summary)
  md = (tmp_path / "s.md").read_text()
  assert "| post-pre | raw | out_of_range | kl | -0.2" in md and "post better" in md
