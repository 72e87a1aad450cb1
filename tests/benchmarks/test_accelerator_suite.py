"""benchmarks.accelerator_suite: --smoke runs every part end to end on CPU (in a subprocess, so the suite
never rots; slow set: `pytest -m slow`), the JSON holds every part with numbers measured in that run; the
peak table's matching, the per-backend 'auto' tables and how parts run in pieces (default set)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from benchmarks import accelerator_suite as suite
from ema_jax import traces
from ema_jax.traces import native, scan
from helpers import REPO

ROOT = Path(REPO)
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("acc")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.accelerator_suite", "--smoke", "--out", str(out)]
      + ["--train-workdirs", str(out / "train")],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return out, json.loads((out / "suite.json").read_text()), proc.stdout


@pytest.mark.slow
def test_smoke_writes_every_part(smoke):
  out, report, stdout = smoke
  meta = report["meta"]
  assert meta["backend"] == "cpu" and meta["smoke"] is True
  assert meta["date"] and len(meta["loadavg_start"]) == 3 and len(meta["loadavg_end"]) == 3
  assert set(meta["part_seconds"]) == {"devices", "traces", "lm_step", "decode", "train", "sweep"}
  assert (out / "suite.md").exists() and "Accelerator suite" in (out / "suite.md").read_text()
  # The auto tables are recorded, each entry with its note.
  assert meta["auto_table"]["scan"]["cpu"][0] == "sequential"
  assert meta["auto_table"]["traces_constant_rates"]["cpu"][0] == "native"
  assert "auto picks" in stdout


@pytest.mark.slow
def test_smoke_decode(smoke):
  _, report, _ = smoke
  rows = report["decode"]["rows"]
  assert {r["model"] for r in rows} == {"ema_lm", "gpt"} and all(r["tokens_per_s"] > 0 for r in rows)
  ema = {r["state_bytes_per_sequence"] for r in rows if r["model"] == "ema_lm"}
  gpt = sorted((r["context"], r["state_bytes_per_sequence"]) for r in rows if r["model"] == "gpt")
  assert len(ema) == 1 and gpt[0][1] < gpt[-1][1]  # constant state against a growing cache


@pytest.mark.slow
def test_smoke_devices_and_traces(smoke):
  _, report, _ = smoke
  dev = report["devices"]
  assert dev["device_kind"] and dev["devices"] and dev["peaks"] is None  # a CPU has no published peak here
  assert dev["measured_copy_bytes_per_s"] > 0 and dev["measured_bf16_matmul_flops"] > 0
  tr = report["traces"]
  assert {b["rates"] for b in tr["best"]} == {"shared", "per_channel"}
  methods = {r["method"] for r in tr["rows"]}
  assert {"sequential", "associative", "auto", "textbook", "copy"} <= methods
  assert any(m.startswith("fused/") for m in methods) and any(m.startswith("chunked/") for m in methods)
  assert any(m.startswith("blocked/") for m in methods)
  for r in tr["rows"]:
    assert r["fwd_ms"] > 0 and r["train_ms"] > 0 and r["fwd_fraction_of_peak_bw"] is None
  for b in tr["best"]:
    names = {r["method"] for r in tr["rows"] if r["shape"] == b["shape"] and r["rates"] == b["rates"]}
    assert b["fastest_fwd"] in names and b["fastest_train"] in names and b["auto_picks"] in names
    assert isinstance(b["auto_fastest_train"], bool)
  assert "native" in methods
  # What CPU's auto picks, through the tables: the kernel on one device (else blocked), shared and per channel.
  picks = {b["rates"]: b["auto_picks"] for b in tr["best"]}
  assert all(p == "native" or p.startswith("blocked/") for p in picks.values())


@pytest.mark.slow
def test_smoke_lm_step(smoke):
  _, report, _ = smoke
  lm = report["lm_step"]
  assert {(r["model"], r["T"]) for r in lm["rows"]} == {(m, t) for m in ("ema_lm", "gpt") for t in (32, 64)}
  for r in lm["rows"]:
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["flops_per_token"] > 0
    assert (r["mfu_sparse"] is not None) == (r["model"] == "ema_lm")
    assert r["compiled_step_bytes"] is None or r["compiled_step_bytes"] > 0
  assert "measured" in lm["peak_note"]


@pytest.mark.slow
def test_smoke_train(smoke):
  _, report, _ = smoke
  tr = report["train"]
  if not (DATA / "wikipedia" / "validation.jsonl").exists():
    assert "skipped" in tr
    pytest.skip(f"no shared data at {DATA}: the train part reports itself skipped")
  assert [r["model"] for r in tr["rows"]] == ["ema_lm", "gpt"]
  for r in tr["rows"]:
    assert r["status"] == "done" and r["steps"] >= 4
    for source in ("validation", "c4_sample"):
      ppl = r["eval"][f"eval/raw/{source}/perplexity"]
      assert math.isfinite(ppl) and 1 < ppl < 257  # byte tokenizer: below the uniform guess


@pytest.mark.slow
def test_smoke_sweep(smoke):
  _, report, _ = smoke
  s = report["sweep"]
  assert s["runs"] == 3 and s["steps"] == 12
  assert s["vmapped_s"] > 0 and s["one_by_one_s"] > 0 and s["speedup"] > 0
  assert s["max_abs_loss_diff"] < 1e-4  # vmapped runs train exactly as the same runs one by one


@pytest.mark.parametrize(
    "kind, name",
    [
        ("NVIDIA H200", "NVIDIA H200 SXM"),
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB SXM"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("NVIDIA L40S", "NVIDIA L40S"),
        ("TPU v4", "TPU v4"),
        ("TPU v5 lite", "TPU v5e"),
        ("TPU v5", "TPU v5p"),
        ("TPU v6 lite", "TPU v6e (Trillium)"),
    ],
)
def test_peak_table_matches_device_kinds(kind, name):
  p = suite.lookup_peaks(kind)
  assert p["name"] == name and p["hbm_bytes_per_s"] > 1e11 and p["bf16_dense_flops"] > 1e13 and p["source"]


def test_unknown_device_has_no_peak_and_bad_parts_fail():
  assert suite.lookup_peaks("cpu") is None and suite.lookup_peaks("Some New Chip") is None
  with pytest.raises(ValueError, match="--parts"):
    suite.main(["--parts", "devices,nope"])


def test_auto_tables_keep_cpu_choice_and_name_every_backend():
  assert scan.auto_method(2048, "cpu") is scan.ScanMethod.SEQUENTIAL
  assert scan.auto_method(2048, "gpu") is scan.ScanMethod.CHUNKED
  assert scan.auto_method(2048, "metal") is scan.DEFAULT_AUTO[0]
  assert scan.auto_method(2, "gpu") is scan.ScanMethod.SEQUENTIAL
  cpu_pick = scan.ScanMethod.NATIVE if native.applies(jnp.float32) else scan.ScanMethod.BLOCKED
  assert traces.auto_method(2048, True, "cpu") is cpu_pick
  assert traces.auto_method(2048, False, "cpu") is cpu_pick
  assert traces.auto_method(2048, True, "tpu") is scan.ScanMethod.CHUNKED
  for table in (scan.AUTO_METHODS, traces.AUTO_CONSTANT_RATES):
    assert {"cpu", "gpu", "tpu"} <= set(table)
    for _, note in table.values():
      assert note.startswith(("measured", "unmeasured"))


def test_full_size_configs_build_without_compiling():
  """What the device run trains, checked here without a step: the 130m / 124m Wikipedia configs (GPT-2
  tokenizer, T = 1024) validate and build their abstract state; FLOPs are counted at both lengths."""
  if not (DATA / "wikipedia" / "validation.jsonl").exists():
    pytest.skip(f"no shared data at {DATA}")
  from ema_jax import trainer

  args = suite.argparse.Namespace(smoke=False, lm_tokens=16384)
  for kind, params in (("ema_lm", 130_000_000), ("gpt", 124_000_000)):
    c = suite.wiki_config(kind, args, str(DATA))
    assert c.data.tokenizer == "gpt2" and c.task.seq_len == 1024 and c.batch_size == 16
    setup = trainer.build(c)
    n = sum(math.prod(x.shape) for x in suite.jax.tree.leaves(setup.abstract_state["params"]))
    assert params < n < params * 1.02
  for t in (1024, 4096):
    (_, _, ema_cfg, f_ema, f_sparse), (_, _, gpt_cfg, f_gpt, _) = suite._models(False, t, 50257)
    assert gpt_cfg.context_len == t and str(ema_cfg.dtype) == "bfloat16"
    assert 0 < f_sparse < f_ema and f_gpt > 6 * 124e6


def test_keep_earlier_parts_of_the_same_device_kind_only(tmp_path):
  """Parts a run skipped (--parts) are kept from an earlier suite.json of the same device kind, each with
  its own run record; a different device kind's parts are never mixed in (no benchmark runs here)."""
  earlier = dict(
      meta=dict(device_kind="chip", smoke=True),
      sweep=dict(runs=2, steps=4, speedup=1.5, run=dict(date="2026-01-01")),
      devices=dict(device_kind="chip", run=dict(date="2026-01-01")),
  )
  path = tmp_path / "suite.json"
  path.write_text(json.dumps(earlier))
  report = dict(meta=dict(device_kind="chip", smoke=True), devices=dict(run=dict(date="2026-02-02")))
  suite.keep_earlier_parts(report, str(path))
  assert report["sweep"]["speedup"] == 1.5 and report["devices"]["run"]["date"] == "2026-02-02"
  assert report["meta"]["parts_kept_from_earlier_runs"] == {"sweep": "2026-01-01"}
  for meta in (dict(device_kind="another chip", smoke=True), dict(device_kind="chip", smoke=False)):
    report = dict(meta=meta)
    suite.keep_earlier_parts(report, str(path))
    assert "sweep" not in report and report["meta"]["parts_kept_from_earlier_runs"] == {}
  report = dict(meta=dict(device_kind="chip", smoke=True))
  suite.keep_earlier_parts(report, str(tmp_path / "none.json"))  # no earlier suite: nothing kept
  assert set(report) == {"meta"}


@pytest.mark.slow
def test_parts_run_in_pieces_keep_earlier_parts(tmp_path):
  """--parts into an --out that holds an earlier suite.json of the same device kind keeps its other parts,
  each with its own run record; a different device kind's parts are never mixed in."""
  kind = suite.jax.devices()[0].device_kind
  earlier = dict(
      meta=dict(device_kind=kind, smoke=True),
      sweep=dict(
          runs=2, steps=4, dims="8x8", vmapped_s=1.0, one_by_one_s=1.5, speedup=1.5, run=dict(date="2026-01-01")
      ),
  )
  (tmp_path / "suite.json").write_text(json.dumps(earlier))
  report = suite.main(["--smoke", "--parts", "devices", "--out", str(tmp_path)])
  assert report["sweep"]["speedup"] == 1.5 and report["devices"]["run"]["date"] == report["meta"]["date"]
  assert report["meta"]["parts_kept_from_earlier_runs"] == {"sweep": "2026-01-01"}
  earlier["meta"]["device_kind"] = "another chip"
  (tmp_path / "suite.json").write_text(json.dumps(earlier))
  report = suite.main(["--smoke", "--parts", "devices", "--out", str(tmp_path)])
  assert "sweep" not in report and report["meta"]["parts_kept_from_earlier_runs"] == {}


def test_smoke_without_out_writes_to_a_new_temporary_folder(monkeypatch, tmp_path, capsys):
  """--smoke without --out never writes into results/ (a committed suite): a fresh temporary folder, printed.
  No part runs (--parts ''), so this is quick."""
  monkeypatch.setattr(suite.tempfile, "tempdir", str(tmp_path))
  report = suite.main(["--smoke", "--parts", ""])
  written = list(tmp_path.glob("accelerator_suite_smoke_*/suite.json"))
  assert len(written) == 1 and json.loads(written[0].read_text())["meta"]["date"] == report["meta"]["date"]
  assert f"writing to {written[0].parent}" in capsys.readouterr().out
  assert report["meta"]["command"] == "python -m benchmarks.accelerator_suite --smoke --parts ''"
