"""The benchmarks run end to end at tiny shapes (scan_bench: selective and default modes; lm_bench: MFU).

Each runs a benchmark in a subprocess (minutes on a loaded machine): the slow set, `pytest -m slow`."""

import json
import subprocess
import sys

import pytest
from helpers import REPO

ROOT = REPO
pytestmark = pytest.mark.slow


def test_selective_rows(tmp_path):
  out = tmp_path / "sel.json"
  cmd = [sys.executable, "-m", "benchmarks.scan_bench", "--selective", "--shapes", "2x32x8x3", "--repeats", "1"]
  subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
  data = json.load(open(out))
  methods = {r["method"] for r in data["rows"]}
  assert {"selective/sequential", "selective/unrolled", "selective/auto", "fixed/auto", "copy"} <= methods
  fixed = next(r for r in data["rows"] if r["method"] == "fixed/auto")
  assert fixed["fwd_vs_fixed"] == 1.0 and fixed["train_vs_fixed"] == 1.0
  for r in data["rows"]:
    assert r["fwd_ms"] > 0 and r["train_ms"] > 0 and r["fwd_ms_range"][0] <= r["fwd_ms"] <= r["fwd_ms_range"][1]
  assert data["meta"]["loadavg_before"] and "random order" in data["meta"]["timing"]


def test_default_rows_time_a_training_loss(tmp_path):
  out = tmp_path / "fixed.json"
  cmd = [sys.executable, "-m", "benchmarks.scan_bench", "--shapes", "2x32x8x3", "--repeats", "1", "--chunks", "16"]
  subprocess.run(
      cmd + ["--fused-chunks", "8", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600
  )
  data = json.load(open(out))
  methods = {r["method"] for r in data["rows"]}
  assert {"blocked/4", "blocked/8", "fused/8", "sequential", "associative", "chunked/16", "auto", "textbook"} <= methods
  assert "mean(h^2)" in data["meta"]["fwd_bwd"]
  assert sum(r["best_fwd"] for r in data["rows"]) == 1 and sum(r["best_fwd_bwd"] for r in data["rows"]) == 1


def test_lm_bench_reports_mfu(tmp_path):
  out = tmp_path / "lm.json"
  cmd = [sys.executable, "-m", "benchmarks.lm_bench", "--lengths", "32", "--tokens", "64", "--width", "16"]
  cmd += ["--profile", "32", "--topk-ab"]
  subprocess.run(cmd + ["--repeats", "1", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
  data = json.load(open(out))
  row = data["rows"][0]
  assert data["meta"]["matmul_peak_flops"] > 0
  assert 0 < row["ema_mfu_sparse"] < row["ema_mfu"] and row["gpt_mfu"] > 0
  assert row["ema_topk"] in ("cpu kernel", "xla") and row["ema_xla_topk_mfu"] > 0
  assert row["ema_minor_faults_per_step"] >= 0 and row["gpt_minor_faults_per_step"] >= 0
  before, after = data["meta"]["matmul_peak_flops_before_after"]
  assert data["meta"]["matmul_peak_flops"] == max(before, after)
  prof = data["ema_step_profile"]
  assert prof and all(r["ms"] >= 0 for r in prof)
  # Kernels are named by the project lines that made them (the model's, or the CPU kernels' wrappers).
  project = ("ema_lm.py", "lm_head.py", "ffn.py", "native.py", "cpu_topk.py", "trace_layer.py")
  assert any(line.split(":")[0] in project for r in prof for line in r["lines"])


def test_lm_bench_allocator_ab_runs_both_settings_in_fresh_processes(tmp_path):
  out = tmp_path / "ab.json"
  cmd = [sys.executable, "-m", "benchmarks.lm_bench", "--lengths", "32", "--tokens", "64", "--width", "16"]
  subprocess.run(
      cmd + ["--repeats", "1", "--allocator-ab", "1", "--out", str(out)],
      cwd=ROOT,
      check=True,
      capture_output=True,
      timeout=600,
  )
  data = json.load(open(out))
  by = {r["setting"]: r for r in data["runs"]}
  assert sorted(by) == ["huge_pages", "no_huge_pages"]
  assert by["no_huge_pages"]["meta"]["huge_pages"].startswith("off: $EMA_JAX_HUGEPAGES")
  from ema_jax import host_memory

  if host_memory.why_not({}) is None:  # where the re-exec applies, the child ran with the tunable
    assert by["huge_pages"]["meta"]["huge_pages"].startswith("on (GLIBC_TUNABLES=")
  for name, m in data["medians"].items():
    assert m["32"]["ema_mfu"] == by[name]["rows"][0]["ema_mfu"] > 0
    assert m["32"]["ema_minor_faults_per_step"] == by[name]["rows"][0]["ema_minor_faults_per_step"]


def test_trace_profile_names_kernels_and_their_source(tmp_path):
  out = tmp_path / "prof.json"
  cmd = [sys.executable, "-m", "benchmarks.trace_profile", "--shape", "2x64x8x3", "--methods", "blocked/8,copy"]
  subprocess.run(cmd + ["--repeats", "1", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
  data = json.load(open(out))
  kinds = {(r["method"], r["kind"]) for r in data["rows"]}
  assert kinds == {(m, k) for m in ("blocked/8", "copy") for k in ("fwd", "train")}
  blocked = [r for r in data["rows"] if r["method"] == "blocked/8"]
  assert all(r["ms"] >= 0 and r["wall_ms"] > 0 for r in blocked)
  # At least one kernel is traced back to the blocked path's own source lines.
  assert any("closed_form.py" in line for r in blocked for line in r["lines"])


def test_learned_rows_compare_with_the_fixed_path(tmp_path):
  out = tmp_path / "learned.json"
  cmd = [sys.executable, "-m", "benchmarks.scan_bench", "--learned", "--shapes", "2x32x8x3", "--repeats", "1"]
  subprocess.run(cmd + ["--blocks", "8", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
  data = json.load(open(out))
  methods = {r["method"] for r in data["rows"]}
  assert {"learned shared/blocked/8", "learned per-channel/blocked/8", "fixed/auto", "copy"} <= methods
  fixed = next(r for r in data["rows"] if r["method"] == "fixed/auto")
  assert fixed["train_vs_fixed"] == 1.0 and "rates" in data["meta"]["train"]


def test_topk_bench_times_equal_masks(tmp_path):
  out = tmp_path / "topk.json"
  cmd = [sys.executable, "-m", "benchmarks.topk_bench", "--shapes", "64x96", "--k", "5", "--repeats", "2"]
  proc = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  if "does not apply here" in proc.stderr:
    pytest.skip("no CPU top-k kernel here")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.load(open(out))["rows"]
  assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
  assert all(r["xla_ms"] > 0 and r["kernel_ms"] > 0 and r["k"] == 5 for r in rows)
