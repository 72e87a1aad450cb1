"""Many devices and many processes, each in its own subprocess with forced CPU devices:

- a (data 2, fsdp 2, seq 2) mesh of 8 devices gives the one-device loss and gradients (EMA LM, GPT);
- set complement and the EMA LM: 2 processes x 2 devices killed after a checkpoint resume on 2 x 2, 1 x 4
  and 4 x 1, and their metrics equal an uninterrupted one-process run's;
- when one process of an LM run dies, the other exits non-zero within a minute;
- meshes, batches and sequence lengths the devices cannot divide fail before compilation.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # several processes or forced devices in subprocesses: the slow set

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_for(devices, nproc=1, pid=0, port=None, **extra):
  env = dict(
      os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )
  for k in ("EMA_JAX_COORDINATOR", "EMA_JAX_NUM_PROCESSES", "EMA_JAX_PROCESS_ID"):
    env.pop(k, None)
  if nproc > 1:
    env.update(EMA_JAX_COORDINATOR=f"127.0.0.1:{port}", EMA_JAX_NUM_PROCESSES=str(nproc), EMA_JAX_PROCESS_ID=str(pid))
  env.update(extra)
  return env


def test_sharded_step_equals_one_device():
  out = subprocess.run(
      [sys.executable, os.path.join(TESTS_DIR, "sharded_step_worker.py")],
      cwd=REPO,
      env=env_for(8),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
  assert {r["model"] for r in rows} == {"ema_lm", "ema_lm_attention_history", "gpt"}
  for r in rows:
    assert r["devices"] == 8 and r["sharded_params"] > 0
    assert r["input_sharding"] == "P(('data', 'fsdp'), 'seq')"
    assert r["loss_rel"] < 1e-5, r
    assert r["grad_rel"] < 1e-4, r


@pytest.mark.parametrize(
    "code,match",
    [
        ("c.mesh.data = 3", "needs 3 devices but 4 are available"),
        ("c.mesh.data = 4; c.batch_size = 6", "batch_size=6 is not divisible by mesh data x fsdp = 4 x 1"),
    ],
)
def test_indivisible_mesh_fails_before_compilation(code, match):
  script = (
      f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import toy_task; from ema_jax import trainer; "
      f"c = toy_task.get_config(); {code}; trainer.build(c)"
  )
  out = subprocess.run(
      [sys.executable, "-c", script], cwd=REPO, env=env_for(4), capture_output=True, text=True, timeout=300
  )
  assert out.returncode != 0 and match in out.stderr, out.stderr[-2000:]


def test_sequence_not_divisible_by_seq_axis():
  script = (
      "import jax, jax.numpy as jnp, ml_collections; from ema_jax import sharding; "
      "from ema_jax.traces import seq_parallel; "
      "m = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, seq=4))); "
      "seq_parallel.seq_parallel_traces(jnp.zeros((2, 30, 8)), (0.5, 0.1), mesh=m)"
  )
  out = subprocess.run(
      [sys.executable, "-c", script], cwd=REPO, env=env_for(4), capture_output=True, text=True, timeout=300
  )
  assert out.returncode != 0 and "sequence length 30 is not divisible by mesh seq = 4" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("task", ["set_complement", "lm"])
def test_killed_multiprocess_run_resumes_on_any_topology(task, tmp_path):
  """2 processes x 2 devices killed (SIGKILL) after a checkpoint, resumed on 2 x 2, 1 x 4 and 4 x 1:
  every row of metrics.jsonl and the final evaluation match an uninterrupted one-process run (to float
  rounding: the gradient all-reduce order depends on the mesh)."""
  from experiments import fault_drill

  short = {
      "set_complement": dict(steps=60, checkpoint_every=20, eval_every=30),
      "lm": dict(steps=30, checkpoint_every=10, eval_every=0),
  }
  drill = fault_drill.Drill(str(tmp_path), overrides={task: short[task]})
  trials = drill.multi_trial(task)
  assert len(trials) == 3
  for t in trials:
    assert "killed at checkpoint" in t.detail and f"checkpoint {short[task]['steps']}" not in t.detail
    assert t.outcome in ("identical", "close"), (t, fault_drill.log_tail(str(tmp_path), 20))


@pytest.mark.slow
def test_dead_peer_stops_an_lm_run_within_a_minute(tmp_path):
  from experiments import fault_drill

  wd = str(tmp_path / "wd")
  procs = fault_drill.start("lm", wd, nproc=2, devices=1, steps=100000)
  t0 = time.time()
  while not os.path.exists(os.path.join(wd, "checkpoints", "20", "commit_success.txt")):
    assert all(p.poll() is None for p in procs), fault_drill.log_tail(wd, 20)
    assert time.time() - t0 < 300, "no checkpoint"
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  try:
    procs[0].wait(timeout=90)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("the surviving process was still running 90 s after its peer died")
  assert procs[0].returncode != 0
  assert time.time() - killed_at < 60


@pytest.mark.slow
def test_time_based_checkpoints_are_decided_identically_on_every_process(tmp_path):
  """2 processes, checkpoint_every_seconds only: each process's clock sets a flag, the step reduces it,
  so both save the same steps (a save that only one process started would hang or fail the run); the
  records equal an uninterrupted one-process run's to float rounding."""
  from experiments import fault_drill

  extra = dict(steps=30, checkpoint_every=1000, keep_checkpoints=100, checkpoint_every_seconds=0.2, eval_every=0)
  drill = fault_drill.Drill(str(tmp_path), overrides={"lm": extra})
  reference, _ = drill.reference("lm")
  wd = str(tmp_path / "two")
  assert fault_drill.run("lm", wd, nproc=2, devices=1) == [0, 0], fault_drill.log_tail(wd, 20)
  steps = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
  assert steps[-1] == 30 and len(steps) >= 2, steps
  outcome, note = fault_drill.compare(wd, reference, 30)
  assert outcome in ("identical", "close"), note
