"""Exporting a trained LM to safetensors + model.json and loading it back, bit for bit; eval.py's GPT
length check; the EMA LM evaluated past its training length."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax import evaluation, export, trainer
from ema_jax.models import transformer
from helpers import REPO, load_config, short


@pytest.fixture(scope="module")
def ema_workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("ema_lm"))
  cfg = short(load_config("ema_lm", "tiny"), steps=3)
  cfg.model.window = 4  # the hybrid: every parameter kind of the EMA LM
  trainer.train(cfg, wd)
  return wd


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_round_trip_is_bit_exact(ema_workdir, tmp_path, weights):
  out = str(tmp_path / "model.safetensors")
  path, meta = export.export(ema_workdir, out, weights=weights)
  assert meta == str(tmp_path / "model.json") and os.path.exists(meta)
  restored, info = export.restore_model(ema_workdir, weights=weights)
  loaded, loaded_info = export.load_exported(path)
  assert loaded_info == json.loads(json.dumps(info))
  assert info["model_kind"] == "ema_lm" and info["tokenizer"]["name"] == "byte" and info["step"] == 3
  want, got = export.flat_params(restored), export.flat_params(loaded)
  assert sorted(want) == sorted(got) and len(want) > 10
  for name in want:
    assert got[name].dtype == np.float32 and np.array_equal(got[name], want[name]), name
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, size=(2, 40)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(restored(tokens)))


def test_raw_and_ema_exports_differ(ema_workdir, tmp_path):
  raw = export.flat_params(export.load_exported(export.export(ema_workdir, str(tmp_path / "r.safetensors"))[0])[0])
  ema = export.flat_params(
      export.load_exported(export.export(ema_workdir, str(tmp_path / "e.safetensors"), weights="ema")[0])[0]
  )
  assert any(not np.array_equal(raw[k], ema[k]) for k in raw)


def test_gpt_round_trip_without_a_trainer(tmp_path):
  cfg = transformer.GPTConfig(vocab_size=257, context_len=32, num_layers=2, num_heads=2, width=16, tie_embeddings=False)
  model = transformer.GPT(cfg, rngs=nnx.Rngs(3))
  info = dict(
      format=export.FORMAT,
      task="lm",
      model_kind="gpt",
      model_config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
      tokenizer=dict(name="byte", vocab_size=257, eod_id=256),
      step=0,
      weights="raw",
      config={},
  )
  path, _ = export.save(model, info, str(tmp_path / "gpt.safetensors"))
  loaded, _ = export.load_exported(path)
  for name, arr in export.flat_params(model).items():
    assert np.array_equal(export.flat_params(loaded)[name], arr), name
  tokens = jnp.arange(20, dtype=jnp.int32)[None]
  np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))


def test_missing_and_corrupt_files_say_so(ema_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*python -m ema_jax.export"):
    export.load_exported(str(tmp_path / "nothing.safetensors"))
  path, meta = export.export(ema_workdir, str(tmp_path / "m.safetensors"))
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])  # truncated
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    export.load_exported(path)
  with open(path, "wb") as f:
    f.write(b"\xff" * 64)  # garbage header
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    export.load_exported(path)
  os.remove(meta)
  with pytest.raises(FileNotFoundError, match="model config beside"):
    export.load_exported(path)
  with pytest.raises(ValueError, match="ending in .safetensors"):
    export.export(ema_workdir, str(tmp_path / "m.bin"))


@pytest.mark.slow
def test_export_cli(ema_workdir, tmp_path):
  out = str(tmp_path / "cli.safetensors")
  run = lambda *a: subprocess.run(
      [sys.executable, "-m", "ema_jax.export", "--workdir", ema_workdir, *a], cwd=REPO, capture_output=True, text=True
  )
  done = run("--out", out, "--weights", "ema", "--step", "3")
  assert done.returncode == 0, done.stderr
  assert os.path.exists(out) and os.path.exists(str(tmp_path / "cli.json"))
  bad = run("--out", out, "--step", "7")
  assert bad.returncode == 2 and "--step=7" in bad.stderr and "available steps: 3" in bad.stderr
  # Without --out: inside the workdir, with the umask's mode (not safetensors' private 0600).
  old = os.umask(0o022)
  try:
    default = run("--weights", "ema")
  finally:
    os.umask(old)
  assert default.returncode == 0, default.stderr
  path = os.path.join(ema_workdir, "export", "step_3_ema.safetensors")
  assert os.path.exists(path) and os.stat(path).st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_exported_model_evaluates_as_its_checkpoint(ema_workdir, tmp_path):
  path, _ = export.export(ema_workdir, str(tmp_path / "m.safetensors"))
  from_export = export.evaluate_exported(path, lengths=[64, 256])  # 4x the training length: no limit
  from_ckpt = evaluation.run(ema_workdir, weights="raw", lengths="64,256", output_dir=str(tmp_path / "eval"))["raw"]
  for a, b in zip(from_export["table"], from_ckpt["table"]):
    assert a["length"] == b["length"] and a["tokens"] == b["tokens"]
    assert np.isfinite(a["loss"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.slow
def test_eval_lengths_beyond_gpt_context_fail_clearly(tmp_path):
  wd = str(tmp_path / "gpt")
  cfg = short(load_config("gpt2", "tiny"), steps=2)
  trainer.train(cfg, wd)
  with pytest.raises(ValueError, match=r"--lengths=32,128: length 128 exceeds this GPT's context_len=64.*--lengths 32"):
    evaluation.run(wd, lengths="32,128")
