"""experiments/lm_scale.py: the power-law fit against known curves, the config's matched parameter counts,
and (slow) the whole command at the tests' size: both runs, the report, a resume that extends them."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
import jax

from experiments import lm_scale
from ema_jax.tasks.base import get_task
from helpers import REPO, load_config


@pytest.mark.parametrize("offset,scale,exponent", [(0.0, 40.0, 0.3), (1.1, 25.0, 0.25), (0.7, 9.0, 0.12)])
def test_power_law_fit_recovers_a_known_curve(offset, scale, exponent):
  x = np.geomspace(1e6, 3e7, 9)
  y = offset + scale * x ** (-exponent)
  f = lm_scale.fit_power_law(x, y)
  assert f["exponent"] == pytest.approx(exponent, rel=0.03)
  assert f["offset"] == pytest.approx(offset, abs=0.02 * (1 + offset))
  # Its prediction beyond the data follows the curve it was fitted to.
  x_far = 3e8
  pred = f["offset"] + f["scale"] * x_far ** (-f["exponent"])
  assert pred == pytest.approx(offset + scale * x_far ** (-exponent), rel=0.02)
  assert lm_scale.fit_power_law(x[:3], y[:3]) is None
  if offset == 0.0:  # the two-parameter fit recovers a pure power law exactly
    pure = lm_scale.fit_power_law(x, y, offset=False)
    assert pure["offset"] == 0.0 and pure["exponent"] == pytest.approx(exponent, rel=1e-9)
    assert lm_scale.fit_power_law(x[:2], y[:2], offset=False) is None


def non_embedding_params(config_arg):
  task = get_task(load_config("lm_scale", config_arg), None)
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  total = embedding = 0
  for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    n = math.prod(x.shape)
    total += n
    if "embed" in jax.tree_util.keystr(path) or "positions" in jax.tree_util.keystr(path):
      embedding += n
  return total - embedding


def test_models_have_matched_non_embedding_parameters():
  ema, gpt = non_embedding_params("ema"), non_embedding_params("gpt")
  assert abs(ema - gpt) / gpt < 0.005
  assert 2e6 < gpt < 5e6
  cfg = load_config("lm_scale", "gpt")
  assert cfg.data.tokenizer == "gpt2" and cfg.task.seq_len >= 512 and cfg.optim.schedule == "constant"
  assert load_config("lm_scale", "ema,byte").data.tokenizer == "byte"
  with pytest.raises(ValueError, match="accepted"):
    load_config("lm_scale", "ema,gpt")


@pytest.mark.slow
def test_whole_command_at_test_size_and_its_extension(tmp_path):
  wd, results = tmp_path / "runs", tmp_path / "results"
  cmd = [sys.executable, "-m", "experiments.lm_scale", "--workdir", str(wd), "--results", str(results)]
  cmd += ["--config-suffix", ",tiny", "--sequential"]
  subprocess.run(cmd + ["--steps", "6"], cwd=REPO, check=True, capture_output=True, text=True, timeout=1800)
  out = json.load(open(results / "curves.json"))
  for model in ("ema", "gpt"):
    pts = out["runs"][model]["points"]
    assert [p["step"] for p in pts] == [3, 6]
    for p in pts:
      assert p["text_bytes"] == pytest.approx(p["tokens"] * out["text"]["bytes_per_byte_token"])
      for source in ("validation", "c4_sample"):
        assert 0 < p[f"{source}/bits_per_byte"] < 9
        assert p[f"{source}/perplexity_per_gpt2_token"] > 1
  assert [r["step"] for r in out["ema_over_gpt"]] == [3, 6]
  assert os.path.getsize(results / "curves.png") > 1000
  rows = list(csv.DictReader(open(results / "curves.csv")))
  assert len(rows) == 4
  # Extending: the same command with more steps resumes both runs; the measured points stay as they were.
  subprocess.run(cmd + ["--steps", "8"], cwd=REPO, check=True, capture_output=True, text=True, timeout=1800)
  again = json.load(open(results / "curves.json"))
  for model in ("ema", "gpt"):
    pts = again["runs"][model]["points"]
    assert [p["step"] for p in pts] == [3, 6, 8]
    before = out["runs"][model]["points"]
    for i in range(2):
      for key in ("validation/bits_per_byte", "c4_sample/perplexity_per_gpt2_token", "text_bytes"):
        assert pts[i][key] == before[i][key]
