"""Many devices and many processes, each in its own subprocess with forced CPU devices:

- a (data 2, fsdp 2, seq 2) mesh of 8 devices gives the one-device loss and gradients (EMA LM, GPT);
- 2 processes x 2 devices train, checkpoint, then 1 process x 4 devices (another mesh) resumes: the
  metrics equal an uninterrupted one-process run;
- when one process dies the other exits non-zero within a bounded time;
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

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_for(devices, nproc=1, pid=0, port=None, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  for k in ("EMA_JAX_COORDINATOR", "EMA_JAX_NUM_PROCESSES", "EMA_JAX_PROCESS_ID"):
    env.pop(k, None)
  if nproc > 1:
    env.update(EMA_JAX_COORDINATOR=f"127.0.0.1:{port}", EMA_JAX_NUM_PROCESSES=str(nproc),
               EMA_JAX_PROCESS_ID=str(pid))
  env.update(extra)
  return env


def start(nproc, devices, args, **extra):
  port = free_port()
  return [subprocess.Popen([sys.executable, os.path.join(TESTS_DIR, "multihost_worker.py"), *map(str, args)],
                           env=env_for(devices, nproc, i, port, **extra), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(nproc)]


def finish(procs, timeout=300):
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    outs.append(out)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def metrics(workdir):
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows.setdefault(r.pop("step"), {}).update({k: v for k, v in r.items() if k in ("loss", "grad_norm", "lr", "mse")})
  return rows


def test_sharded_step_equals_one_device():
  out = subprocess.run([sys.executable, os.path.join(TESTS_DIR, "sharded_step_worker.py")], cwd=REPO,
                       env=env_for(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
  assert {r["model"] for r in rows} == {"ema_lm", "ema_lm_attention_history", "gpt"}
  for r in rows:
    assert r["devices"] == 8 and r["sharded_params"] > 0
    assert r["input_sharding"] == "P(('data', 'fsdp'), 'seq')"
    assert r["loss_rel"] < 1e-5, r
    assert r["grad_rel"] < 1e-4, r


def test_two_processes_then_resume_on_another_mesh(tmp_path):
  ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
  finish(start(1, 1, [ref, 20]))
  finish(start(2, 2, [wd, 10]))                    # 2 processes x 2 devices, stops at 10
  assert os.path.isdir(os.path.join(wd, "checkpoints", "10"))
  finish(start(1, 4, [wd, 20]))                    # 1 process x 4 devices resumes to 20
  got, want = metrics(wd), metrics(ref)
  assert sorted(got) == sorted(want) == list(range(1, 21))
  for step in want:
    for k, v in want[step].items():
      assert got[step][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (step, k)


def test_dead_process_makes_the_other_exit(tmp_path):
  wd = str(tmp_path)
  procs = start(2, 1, [wd, 100000, 0.05], EMA_JAX_HEARTBEAT_TIMEOUT="10")
  t0 = time.time()
  while not os.path.exists(os.path.join(wd, "checkpoints", "5")):
    assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
    assert time.time() - t0 < 240, "no checkpoint"
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  try:
    procs[0].wait(timeout=120)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("the surviving process hung for 120 s after its peer died")
  assert procs[0].returncode != 0
  assert time.time() - killed_at < 120


@pytest.mark.parametrize("code,match", [
    ("c.mesh.data = 3", "needs 3 devices but 4 are available"),
    ("c.mesh.data = 4; c.batch_size = 6", "batch_size=6 is not divisible by mesh data x fsdp = 4 x 1"),
])
def test_indivisible_mesh_fails_before_compilation(code, match):
  script = (f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import toy_task; from ema_jax import trainer; "
            f"c = toy_task.get_config(); {code}; trainer.build(c)")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env_for(4), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0 and match in out.stderr, out.stderr[-2000:]


def test_sequence_not_divisible_by_seq_axis():
  script = ("import jax, jax.numpy as jnp, ml_collections; from ema_jax import sharding; "
            "m = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, seq=4))); "
            "sharding.seq_parallel_traces(jnp.zeros((2, 30, 8)), (0.5, 0.1), mesh=m)")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env_for(4), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0 and "sequence length 30 is not divisible by mesh seq = 4" in out.stderr
