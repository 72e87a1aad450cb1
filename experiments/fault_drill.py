"""Fault drill: interrupts and damages real training runs the way clusters do, and checks the outcome.

  python -m experiments.fault_drill                      # every kind of trial, both tasks
  python -m experiments.fault_drill --random_trials 5 --seed 1 --tasks set_complement --out results/fault_drill

Each trial runs `python train.py` in subprocesses on a small config of a real task (set complement and
the tiny EMA LM), does one thing to it, reruns the same command until it finishes, and compares the
run's metrics.jsonl (all rows, without the timing columns) and its final eval JSON with those of an
uninterrupted run of the same config:

  kill9     SIGKILL at a random moment (start-up, a step, an eval, also one running beside training, or a
            checkpoint write)
  sigterm   SIGTERM at a random moment; the process must exit 0
  corrupt   after a finished run: truncate the array files, delete state/_METADATA, or leave a
            half-written step, at the newest step or at the newest two; rerun
  mismatch  rerun a finished run with another model width: must be refused with the workdir unchanged
  lock      a second train.py on the workdir while the first runs: must be refused (one error line, the
            workdir unchanged by it), and the first must then finish identically
  lower_steps  rerun a finished run with `steps` below its newest checkpoint: must be refused
  config_change  resume from the middle with another weight-EMA decay (--allow_config_change): must take
            effect (outcome `applied`: the EMA's evaluation changes, the raw weights' records do not)
  torn_row  metrics.jsonl's last line cut in half (a finished run's final eval row; an eval row at the
            resume step): one warning, the row rebuilt from its eval JSON
  disk_full the workdir's filesystem (a tmpfs) fills up after the first checkpoint: one error line, exit
            2, older checkpoints untouched; the rerun after freeing space finishes identically
  multi     2 processes x 2 devices killed (SIGKILL) after their first checkpoint, resumed on 2 x 2,
            1 x 4 and 4 x 1 (processes x devices)
  sigterm_multi  2 x 2, SIGTERM to one process or to both after the first checkpoint: both save the same
            step and exit 0 within 60 s; resumed on 2 x 2 and 1 x 4

Outcomes: `identical` (bit for bit), `close` (a resume on another topology: the all-reduce order changes
the float rounding; max relative difference shown), `refused` (a clear one-line error and an unchanged
workdir, where that is the right answer), `applied` (a config change took effect), `skipped` (the trial
cannot run here, e.g. no tmpfs mount), `differing` or `failed` (a bug). Prints a markdown table and,
with --out, writes drill.json and drill.md there.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("steps_per_s", "tokens_per_s", "mfu")

# Small configs of the real tasks, as train.py flags.
TASKS = {
    "set_complement": (
        "configs/set_complement.py",
        dict(
            steps=300,
            batch_size=32,
            checkpoint_every=50,
            keep_checkpoints=10,
            log_every=7,
            # Evaluations at 25, 75, ... run in the background past a step and are waited for at the next
            # checkpoint; those at 50, 100, ... fall on a checkpoint.
            eval_every=25,
            **{
                "optim.warmup_steps": 10,
                "task.num_tokens": 12,
                "task.train_max_size": 4,
                "task.eval_examples": 16,
                "model.embed_dim": 16,
                "model.value_dim": 16,
            },
        ),
    ),
    "lm": (
        "configs/ema_lm.py:tiny",
        dict(
            steps=60,
            batch_size=8,
            checkpoint_every=20,
            keep_checkpoints=10,
            log_every=7,
            eval_every=30,
            **{
                "optim.warmup_steps": 5,
                "task.seq_len": 32,
                "task.eval_batch_size": 8,
                "data.eval_max_tokens": 2048,
                "model.width": 32,
                "model.num_blocks": 1,
                "model.ffn_hidden": 64,
            },
        ),
    ),
}


CHANGED_DECAY = 0.9  # the config_change trial's EMA decay: unlike every preset's (0.999, 0.99)

# Per-task changes to TASKS for one drill (the tests use shorter runs); set by Drill.
OVERRIDES: Dict[str, Dict[str, object]] = {}


@dataclasses.dataclass
class Trial:
  task: str
  kind: str
  detail: str
  outcome: str = ""
  note: str = ""
  seconds: float = 0.0


# ----------------------------------------------------------------------------------------------- running


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int = 1, nproc: int = 1, pid: int = 0, port: Optional[int] = None) -> Dict[str, str]:
  env = dict(
      os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )
  for k in ("EMA_JAX_COORDINATOR", "EMA_JAX_NUM_PROCESSES", "EMA_JAX_PROCESS_ID"):
    env.pop(k, None)
  if nproc > 1:
    env.update(EMA_JAX_COORDINATOR=f"127.0.0.1:{port}", EMA_JAX_NUM_PROCESSES=str(nproc), EMA_JAX_PROCESS_ID=str(pid))
  return env


def command(task: str, workdir: str, **extra) -> List[str]:
  config, overrides = TASKS[task]
  overrides = {**overrides, **OVERRIDES.get(task, {}), **extra}
  return [sys.executable, os.path.join(REPO, "train.py"), f"--config={config}", f"--workdir={workdir}"] + [
      f"--config.{k}={v}" for k, v in overrides.items()
  ]


def start(
    task: str, workdir: str, nproc: int = 1, devices: int = 1, log_prefix: Optional[str] = None, **extra
) -> List[subprocess.Popen]:
  """Starts the run's processes; process i's output goes to `<log_prefix>.p<i>.log` (default prefix: the
  workdir's own path)."""
  port = _free_port()
  log_prefix = log_prefix or os.path.abspath(workdir)
  procs = []
  for i in range(nproc):
    log = open(f"{log_prefix}.p{i}.log", "a")
    procs.append(
        subprocess.Popen(
            command(task, workdir, **extra),
            env=_env(devices, nproc, i, port),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
  return procs


def wait(procs: List[subprocess.Popen], timeout: float = 600) -> List[int]:
  deadline = time.time() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      codes.append(-9999)
  return codes


def run(task: str, workdir: str, nproc: int = 1, devices: int = 1, **extra) -> List[int]:
  return wait(start(task, workdir, nproc, devices, **extra))


def log_tail(workdir: str, n: int = 3) -> str:
  text = ""
  for path in sorted(
      glob.glob(os.path.join(os.path.dirname(os.path.abspath(workdir)), f"{os.path.basename(workdir)}.p*.log"))
  ):
    with open(path, errors="replace") as f:
      text += "".join(f.readlines()[-n:])
  return text.strip()


# --------------------------------------------------------------------------------------------- comparing


def read_metrics(workdir: str) -> Dict[int, Dict[str, float]]:
  rows: Dict[int, Dict[str, float]] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      step = row.pop("step")
      for k, v in row.items():
        if k in VOLATILE:
          continue
        if k in rows.setdefault(step, {}):
          raise AssertionError(f"step {step}: {k} logged twice")
        rows[step][k] = v
  return rows


def read_tensorboard(workdir: str) -> Dict[tuple, int]:
  """{(tag, step): number of events} over every event file of <workdir>/tensorboard (TFRecord framing:
  length, its CRC, the serialized Event, its CRC)."""
  import struct
  from tensorboardX.proto import event_pb2

  counts: Dict[tuple, int] = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        key = (value.tag, int(event.step))
        counts[key] = counts.get(key, 0) + 1
  return counts


def check_tensorboard(workdir: str) -> str:
  """'' when TensorBoard holds each scalar of metrics.jsonl exactly once, else what is wrong."""
  counts = read_tensorboard(workdir)
  twice = sorted(k for k, n in counts.items() if n > 1)
  if twice:
    return f"TensorBoard holds {len(twice)} duplicate events, e.g. {twice[0]}"
  want = {(k, step) for step, row in read_metrics(workdir).items() for k in row}
  beyond = sorted(set(counts) - want - {(k, s) for (k, s) in counts if k in VOLATILE})
  if beyond:
    return f"TensorBoard holds {len(beyond)} events that metrics.jsonl does not, e.g. {beyond[0]}"
  return ""


def read_final_eval(workdir: str, steps: int):
  with open(os.path.join(workdir, f"eval_{steps}.json")) as f:
    return json.load(f)["results"]


def _numbers(obj, prefix=""):
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _numbers(v, f"{prefix}{k}.")
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from _numbers(v, f"{prefix}{i}.")
  elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
    yield prefix[:-1], float(obj)
  else:
    yield prefix[:-1], obj


def compare(workdir: str, reference: str, steps: int) -> tuple:
  """('identical' | 'close' | 'differing', note) for metrics.jsonl and the final eval."""
  try:
    got = {"metrics": read_metrics(workdir), "eval": read_final_eval(workdir, steps)}
  except (OSError, ValueError, AssertionError) as e:
    return "differing", f"{type(e).__name__}: {e}"
  want = {"metrics": read_metrics(reference), "eval": read_final_eval(reference, steps)}
  a, b = dict(_numbers(json.loads(json.dumps(got)))), dict(_numbers(json.loads(json.dumps(want))))
  if set(a) != set(b):
    missing = sorted(set(b) - set(a))[:3]
    extra = sorted(set(a) - set(b))[:3]
    return "differing", f"missing {missing} extra {extra}"
  problem = check_tensorboard(workdir)
  if problem:
    return "differing", problem
  if a == b:
    return "identical", ""
  worst, where = 0.0, ""
  for k in a:
    x, y = a[k], b[k]
    if isinstance(x, float) and isinstance(y, float):
      if x != y:
        rel = abs(x - y) / max(abs(y), 1e-6)
        if rel > worst:
          worst, where = rel, k
    elif x != y:
      return "differing", f"{k}: {x!r} vs {y!r}"
  return ("close" if worst < 1e-4 else "differing"), f"max rel. diff {worst:.1e} at {where}"


def snapshot(workdir: str) -> Dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


# ---------------------------------------------------------------------------------------------- damaging


def truncate_arrays(step_dir: str) -> None:
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def delete_metadata(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def half_written(step_dir: str) -> None:
  shutil.rmtree(os.path.join(step_dir, "state"))
  os.remove(os.path.join(step_dir, "commit_success.txt"))
  os.makedirs(os.path.join(step_dir, "state"))


OCDBT_NODE_MAGIC = bytes.fromhex("0cdb20de")  # the first bytes of an OCDBT b-tree node file (crc-checked)


def flip_bytes(step_dir: str) -> None:
  """XORs 16 bytes in the middle of the largest array data file that a restore reads: no read error,
  other numbers, where there is one.

  Arrays above orbax's inline limit sit in value files (no crc: only our checksums can tell); smaller ones
  sit inside b-tree node files, whose crc makes the damage a read error. So: the largest value file;
  where every array is inline (the drill's small set-complement model), the merged root's node file
  (state/d), which every restore reads. Not a process's own node files (state/ocdbt.process_i/d): some
  are superseded by the merged root, never read, and can be the largest (2026-12-07, seed 8: a flip landed
  in one, and the step was rightly restored)."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)

  def is_node(path):
    with open(path, "rb") as f:
      return f.read(len(OCDBT_NODE_MAGIC)) == OCDBT_NODE_MAGIC

  values = [p for p in files if not is_node(p)]
  merged = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  path = max(values or merged or files, key=lambda p: (os.path.getsize(p), -len(p)))
  with open(path, "r+b") as f:
    f.seek(max(os.path.getsize(path) // 2 - 8, 0))
    middle = f.read(16)
    f.seek(-len(middle), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in middle))


DAMAGE = {
    "truncated arrays": truncate_arrays,
    "deleted _METADATA": delete_metadata,
    "half-written step": half_written,
    "flipped bytes": flip_bytes,
}


# ------------------------------------------------------------------------------------------------ trials


class Drill:

  def __init__(self, root: str, seed: int = 0, overrides: Optional[Dict[str, Dict[str, object]]] = None):
    OVERRIDES.clear()
    OVERRIDES.update(overrides or {})
    self.root = root
    self.rng = random.Random(seed)
    self.references: Dict[str, tuple] = {}  # task -> (workdir, wall seconds)
    self.n = 0

  def steps(self, task: str) -> int:
    return int(OVERRIDES.get(task, {}).get("steps", TASKS[task][1]["steps"]))

  def setting(self, task: str, name: str):
    return OVERRIDES.get(task, {}).get(name, TASKS[task][1][name])

  def reference(self, task: str) -> tuple:
    if task not in self.references:
      wd = os.path.join(self.root, f"{task}_reference")
      t0 = time.time()
      codes = run(task, wd)
      if codes != [0]:
        raise RuntimeError(f"the uninterrupted {task} run failed ({codes}): {log_tail(wd, 20)}")
      self.references[task] = (wd, time.time() - t0)
    return self.references[task]

  def workdir(self, task: str, kind: str) -> str:
    self.n += 1
    return os.path.join(self.root, f"{task}_{kind}_{self.n}")

  def finish(self, trial: Trial, wd: str, reference: str, max_reruns: int = 3, **extra) -> Trial:
    for _ in range(max_reruns):
      codes = run(trial.task, wd, **extra)
      if codes == [0] and os.path.exists(os.path.join(wd, f"eval_{self.steps(trial.task)}.json")):
        break
    else:
      trial.outcome, trial.note = "failed", f"rerun exit {codes}: {log_tail(wd)}"[-300:]
      return trial
    trial.outcome, trial.note = compare(wd, reference, self.steps(trial.task))
    return trial

  def signal_trial(
      self, task: str, sig: int, delay: Optional[float] = None, after_checkpoint: Optional[int] = None
  ) -> Trial:
    """Sends `sig` after `delay` seconds (random within the reference run's wall time by default) or
    as soon as checkpoint `after_checkpoint` is complete."""
    reference, wall = self.reference(task)
    kind = "kill9" if sig == signal.SIGKILL else "sigterm"
    if delay is None and after_checkpoint is None:
      delay = self.rng.uniform(0.0, wall)
    when = (
        f"at {delay:.1f} s of a {wall:.0f} s run"
        if after_checkpoint is None
        else f"right after checkpoint {after_checkpoint}"
    )
    trial = Trial(task, kind, when)
    t0 = time.time()
    wd = self.workdir(task, kind)
    procs = start(task, wd)
    if after_checkpoint is None:
      time.sleep(delay)
    else:
      done = os.path.join(wd, "checkpoints", str(after_checkpoint), "commit_success.txt")
      while not os.path.exists(done) and procs[0].poll() is None and time.time() - t0 < 600:
        time.sleep(0.01)
    if procs[0].poll() is None:
      procs[0].send_signal(sig)
    else:
      trial.detail += " (had already finished)"
    code = wait(procs)[0]
    if sig == signal.SIGTERM and code != 0:
      trial.outcome, trial.note = "failed", f"SIGTERM exit status {code}: {log_tail(wd)}"[-300:]
    else:
      self.finish(trial, wd, reference)
    trial.seconds = time.time() - t0
    return trial

  def corrupt_trial(self, task: str, damage: str, how_many: int) -> Trial:
    reference, _ = self.reference(task)
    trial = Trial(task, "corrupt", f"{damage}, newest {how_many} step(s)")
    t0 = time.time()
    wd = self.workdir(task, "corrupt")
    shutil.copytree(reference, wd)
    for p in glob.glob(os.path.join(wd, "*.log")):
      os.remove(p)
    os.remove(os.path.join(wd, f"eval_{self.steps(task)}.json"))  # the run stopped at its last checkpoint
    steps = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
    for step in steps[-how_many:]:
      DAMAGE[damage](os.path.join(wd, "checkpoints", str(step)))
    self.finish(trial, wd, reference)
    aside = [n for n in os.listdir(os.path.join(wd, "checkpoints")) if ".unreadable-" in n]
    if trial.outcome == "identical" and len(aside) != how_many:
      trial.outcome, trial.note = "differing", f"{len(aside)} step(s) set aside, expected {how_many}"
    elif trial.outcome == "identical":
      trial.note = f"set aside: {', '.join(sorted(aside))}"
    trial.seconds = time.time() - t0
    return trial

  def mismatch_trial(self, task: str) -> Trial:
    reference, _ = self.reference(task)
    width_field = "model.embed_dim" if task == "set_complement" else "model.width"
    trial = Trial(task, "mismatch", f"rerun with {width_field} doubled")
    t0 = time.time()
    wd = self.workdir(task, "mismatch")
    shutil.copytree(reference, wd)
    before = snapshot(wd)
    value = self.setting(task, width_field) * 2
    proc = subprocess.run(
        command(task, wd, **{width_field: value}), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    unchanged = snapshot(wd) == before
    first_error = next((l for l in proc.stderr.splitlines() if l.startswith("error:")), "")
    if proc.returncode != 0 and unchanged and width_field in proc.stderr and "Traceback" not in proc.stderr:
      trial.outcome, trial.note = "refused", first_error[:160]
    else:
      trial.outcome = "failed"
      trial.note = f"exit {proc.returncode}, workdir unchanged: {unchanged}, {proc.stderr[-200:]}"
    trial.seconds = time.time() - t0
    return trial

  def lock_trial(self, task: str) -> Trial:
    """A second run of the same command while the first holds the workdir's lock (the first is paused
    with SIGSTOP meanwhile, so any change to the workdir would be the second's)."""
    from ema_jax import workdir_lock  # no JAX

    reference, _ = self.reference(task)
    trial = Trial(task, "lock", "second train.py while the first runs")
    t0 = time.time()
    wd = self.workdir(task, "lock")
    first = start(task, wd)[0]
    while not os.path.exists(workdir_lock.lock_path(wd)) and first.poll() is None and time.time() - t0 < 600:
      time.sleep(0.01)
    if first.poll() is not None or not os.path.exists(workdir_lock.lock_path(wd)):
      wait([first])
      trial.outcome, trial.note = "failed", f"the first run never held the lock: {log_tail(wd)}"[-300:]
      trial.seconds = time.time() - t0
      return trial
    first.send_signal(signal.SIGSTOP)
    try:
      before = snapshot(wd)
      second = subprocess.run(command(task, wd), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
      unchanged = snapshot(wd) == before
    finally:
      first.send_signal(signal.SIGCONT)
    errors = [l for l in second.stderr.splitlines() if l.startswith("error:")]
    refused = (
        second.returncode == 2
        and len(errors) == 1
        and f"pid {first.pid}" in errors[0]
        and unchanged
        and "Traceback" not in second.stderr
    )
    code = wait([first])[0]
    if not refused:
      trial.outcome = "failed"
      trial.note = f"second run: exit {second.returncode}, workdir unchanged: {unchanged}, {second.stderr[-200:]}"
    elif code != 0:
      trial.outcome, trial.note = "failed", f"first run: exit {code}: {log_tail(wd)}"[-300:]
    else:
      outcome, note = compare(wd, reference, self.steps(task))
      if outcome == "identical":
        trial.outcome, trial.note = "refused", f"{errors[0][:120]}; the first run: identical"
      else:
        trial.outcome, trial.note = outcome, f"the first run after the refusal: {note}"
    trial.seconds = time.time() - t0
    return trial

  def _resume_copy(self, trial: Trial, base: str, nproc: int, devices: int, reference: str) -> None:
    """Reruns a copy of `base` on nproc x devices and sets the trial's outcome against the reference."""
    wd = f"{base}_{nproc}x{devices}"
    shutil.copytree(base, wd, ignore=shutil.ignore_patterns("*.log"))
    codes = run(trial.task, wd, nproc=nproc, devices=devices)
    if codes != [0] * nproc:
      trial.outcome, trial.note = "failed", f"exit {codes}: {log_tail(wd)}"[-300:]
    else:
      trial.outcome, trial.note = compare(wd, reference, self.steps(trial.task))

  def multi_trial(self, task: str, layouts=((2, 2), (1, 4), (4, 1))) -> List[Trial]:
    reference, _ = self.reference(task)
    first = self.setting(task, "checkpoint_every")
    base = self.workdir(task, "multi")
    procs = start(task, base, nproc=2, devices=2)
    t0 = time.time()
    while not os.path.exists(os.path.join(base, "checkpoints", str(first), "commit_success.txt")):
      if any(p.poll() is not None for p in procs) or time.time() - t0 > 600:
        break
      time.sleep(0.05)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    wait(procs)
    killed_at = max([int(n) for n in os.listdir(os.path.join(base, "checkpoints")) if n.isdigit()] or [0])
    trials = []
    for nproc, devices in layouts:
      trial = Trial(task, "multi", f"2x2 killed at checkpoint {killed_at}, resumed on {nproc}x{devices}")
      t1 = time.time()
      self._resume_copy(trial, base, nproc, devices, reference)
      trial.seconds = time.time() - t1
      trials.append(trial)
    return trials

  def sigterm_multi_trial(self, task: str, target: str, layouts=((2, 2), (1, 4))) -> List[Trial]:
    """2 processes x 2 devices; SIGTERM to process `target` ('0', '1' or 'all') right after the first
    checkpoint: every process must save the same step and exit 0 within 60 s; then resumed on each layout."""
    reference, _ = self.reference(task)
    first = self.setting(task, "checkpoint_every")
    base = self.workdir(task, "sigterm_multi")
    t0 = time.time()
    procs = start(task, base, nproc=2, devices=2)
    done = os.path.join(base, "checkpoints", str(first), "commit_success.txt")
    while not os.path.exists(done) and all(p.poll() is None for p in procs) and time.time() - t0 < 600:
      time.sleep(0.01)
    sent = time.time()
    for i, p in enumerate(procs):
      if p.poll() is None and target in ("all", str(i)):
        p.send_signal(signal.SIGTERM)
    codes = wait(procs, timeout=120)
    took = time.time() - sent
    steps = sorted(int(n) for n in os.listdir(os.path.join(base, "checkpoints")) if n.isdigit())
    what = f"2x2, SIGTERM to process {target} after checkpoint {first}"
    if codes != [0, 0] or took > 60 or not steps or steps[-1] <= first:
      trial = Trial(
          task,
          "sigterm_multi",
          what,
          "failed",
          f"exit {codes} after {took:.0f} s, checkpoints {steps}: {log_tail(base)}"[-300:],
      )
      trial.seconds = time.time() - t0
      return [trial]
    trials = []
    for nproc, devices in layouts:
      trial = Trial(
          task, "sigterm_multi", f"{what}: both saved {steps[-1]}, exit 0 in {took:.0f} s; resumed on {nproc}x{devices}"
      )
      t1 = time.time()
      self._resume_copy(trial, base, nproc, devices, reference)
      trial.seconds = time.time() - t1 + (took if not trials else 0)
      trials.append(trial)
    return trials

  def _finished_copy(self, task: str, kind: str) -> tuple:
    reference, _ = self.reference(task)
    wd = self.workdir(task, kind)
    shutil.copytree(reference, wd)
    for p in glob.glob(os.path.join(wd, "*.log")):
      os.remove(p)
    return reference, wd

  def lower_steps_trial(self, task: str) -> Trial:
    """A finished run rerun with `steps` below its newest checkpoint: refused, the workdir unchanged."""
    _, wd = self._finished_copy(task, "lower_steps")
    steps = self.steps(task) - self.setting(task, "checkpoint_every") // 2
    trial = Trial(task, "lower_steps", f"finished run rerun with steps={steps}")
    t0 = time.time()
    before = snapshot(wd)
    proc = subprocess.run(
        command(task, wd, steps=steps), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    if proc.returncode == 2 and len(errors) == 1 and snapshot(wd) == before and "Traceback" not in proc.stderr:
      trial.outcome, trial.note = "refused", errors[0][:140]
    else:
      trial.outcome, trial.note = "failed", f"exit {proc.returncode}, {proc.stderr[-200:]}"
    trial.seconds = time.time() - t0
    return trial

  def config_change_trial(self, task: str) -> Trial:
    """Resume from the middle with a changed weight-EMA decay (--allow_config_change): the change must
    take effect (the EMA's evaluation differs) while the raw weights' records equal the reference's."""
    reference, wd = self._finished_copy(task, "config_change")
    middle = self.steps(task) // 2 // self.setting(task, "checkpoint_every") * self.setting(task, "checkpoint_every")
    _stop_at(wd, middle)
    trial = Trial(task, "config_change", f"resumed at step {middle} with weight_ema.decay={CHANGED_DECAY}")
    t0 = time.time()
    proc = subprocess.run(
        command(task, wd, **{"weight_ema.decay": CHANGED_DECAY}) + ["--allow_config_change"],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
      trial.outcome, trial.note = "failed", f"exit {proc.returncode}: {proc.stderr[-200:]}"
    else:
      got, want = read_final_eval(wd, self.steps(task)), read_final_eval(reference, self.steps(task))
      raw_rows = lambda d: {s: {k: v for k, v in r.items() if "/ema/" not in k} for s, r in read_metrics(d).items()}
      if got.get("raw") != want.get("raw") or raw_rows(wd) != raw_rows(reference):
        trial.outcome, trial.note = "differing", "the raw weights' records changed"
      elif got.get("ema") == want.get("ema"):
        trial.outcome, trial.note = "differing", "the EMA's evaluation is unchanged: the new decay was ignored"
      else:
        trial.outcome, trial.note = "applied", "raw records identical, EMA evaluation changed"
    trial.seconds = time.time() - t0
    return trial

  def torn_row_trial(self, task: str, finished: bool) -> Trial:
    """metrics.jsonl's last line cut in half: on a finished run (the final eval row), or on a run
    stopped right after an in-loop eval at a checkpoint (the eval row at the resume step)."""
    reference, wd = self._finished_copy(task, "torn_row")
    t0 = time.time()
    if finished:
      trial = Trial(task, "torn_row", "finished run, last row (the final eval) cut in half")
    else:
      every = self.setting(task, "eval_every")
      both = [
          s
          for s in range(every, self.steps(task), every or 1)
          if every and s % self.setting(task, "checkpoint_every") == 0
      ]
      if not both:
        return Trial(
            task, "torn_row", "an eval row at a resume step", "skipped", "no in-loop eval falls on a checkpoint"
        )
      step = both[0]
      _stop_at(wd, step)
      trial = Trial(task, "torn_row", f"stopped at step {step}, its eval row cut in half")
    path = os.path.join(wd, "metrics.jsonl")
    with open(path) as f:
      lines = f.readlines()
    with open(path, "w") as f:
      f.writelines(lines[:-1] + [lines[-1][: len(lines[-1]) // 2]])
    proc = subprocess.run(command(task, wd), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    warned = [l for l in proc.stdout.splitlines() if "is torn" in l and "rebuilt" in l]
    if proc.returncode != 0 or len(warned) != 1:
      trial.outcome, trial.note = "failed", f"exit {proc.returncode}, {len(warned)} warning(s): {proc.stderr[-200:]}"
    else:
      trial.outcome, trial.note = compare(wd, reference, self.steps(task))
    trial.seconds = time.time() - t0
    return trial

  def disk_full_trial(self, task: str, first_write: str = "log") -> Trial:
    """The disk fills up (a tmpfs, filled by a second file while the run is paused) after the first
    checkpoint: one error line, exit 2, older checkpoints untouched; after freeing space the rerun
    finishes identically. first_write: 'log' (the next write is a metrics row) or 'checkpoint' (no rows
    or evals in between: the next write is the asynchronous checkpoint save)."""
    extra = dict(log_every=10**6, eval_every=0) if first_write == "checkpoint" else {}
    if extra:
      key = f"{task}/quiet"
      if key not in self.references:
        wd = os.path.join(self.root, f"{task}_reference_quiet")
        t1 = time.time()
        if run(task, wd, **extra) != [0]:
          raise RuntimeError(f"the uninterrupted {task} run failed: {log_tail(wd, 20)}")
        self.references[key] = (wd, time.time() - t1)
      reference = self.references[key][0]
    else:
      reference, _ = self.reference(task)
    trial = Trial(task, "disk_full", f"tmpfs filled after the first checkpoint; next write: {first_write}")
    t0 = time.time()
    mount = self.workdir(task, "disk_full")
    os.makedirs(mount)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount], capture_output=True, text=True)
    if mounted.returncode != 0:
      trial.outcome, trial.note = "skipped", f"cannot mount a tmpfs here: {mounted.stderr.strip()[:120]}"
      return trial
    try:
      wd = os.path.join(mount, "wd")
      # The run's output goes outside the tmpfs: on the full disk the process's own stdout/stderr writes
      # would fail too and could cut the very error line this trial checks.
      log_prefix = os.path.join(self.root, os.path.basename(mount) + "_first_run")
      log_path = log_prefix + ".p0.log"
      proc = start(task, wd, log_prefix=log_prefix, **extra)[0]
      first = self.setting(task, "checkpoint_every")
      done = os.path.join(wd, "checkpoints", str(first), "commit_success.txt")
      while not os.path.exists(done) and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.005)
      proc.send_signal(signal.SIGSTOP)
      kept = {k: v for k, v in snapshot(os.path.join(wd, "checkpoints")).items() if k.startswith(f"{first}/")}
      fill(os.path.join(mount, "filler"))
      proc.send_signal(signal.SIGCONT)
      code = wait([proc])[0]
      with open(log_path, errors="replace") as f:
        log = f.read()
      errors = [l for l in log.splitlines() if l.startswith("error:")]
      after = snapshot(os.path.join(wd, "checkpoints"))
      untouched = all(after.get(k) == v for k, v in kept.items())
      os.remove(os.path.join(mount, "filler"))
      if code != 2 or len(errors) != 1 or "Traceback" in log or not untouched:
        trial.outcome = "failed"
        trial.note = f"exit {code}, {len(errors)} error line(s), older checkpoint untouched: {untouched}: {log[-200:]}"
      else:
        self.finish(trial, wd, reference, **extra)
        if trial.outcome == "identical":
          trial.note = errors[0][:140]
    finally:
      subprocess.run(["umount", "-l", mount], capture_output=True)
    trial.seconds = time.time() - t0
    return trial


def fill(path: str) -> None:
  """Writes `path` until the filesystem is full."""
  with open(path, "wb", buffering=0) as f:
    for block in (1 << 20, 4096, 1):
      try:
        while True:
          f.write(b"\0" * block)
      except OSError:
        pass


def _stop_at(wd: str, step: int) -> None:
  """A finished run's workdir as if it had stopped right after checkpoint `step`."""
  for name in os.listdir(os.path.join(wd, "checkpoints")):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(wd, "checkpoints", name))
  for name in os.listdir(wd):
    if name.startswith("eval_") and name[5:-5].isdigit() and int(name[5:-5]) > step:
      os.remove(os.path.join(wd, name))
  path = os.path.join(wd, "metrics.jsonl")
  with open(path) as f:
    rows = [l for l in f if json.loads(l)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(rows)


def table(trials: List[Trial]) -> str:
  lines = ["| # | task | trial | what | outcome | note | s |", "|---|---|---|---|---|---|---:|"]
  for i, t in enumerate(trials, 1):
    note = t.note.replace("|", "/").replace("\n", " ")[:140]
    lines.append(f"| {i} | {t.task} | {t.kind} | {t.detail} | {t.outcome} | {note} | {t.seconds:.0f} |")
  counts: Dict[str, int] = {}
  for t in trials:
    counts[t.outcome] = counts.get(t.outcome, 0) + 1
  lines.append("")
  lines.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", default="set_complement,lm", help="comma-separated: set_complement, lm")
  parser.add_argument("--random_trials", type=int, default=3, help="kill -9 and SIGTERM trials each, per task")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_multi", action="store_true", help="skip the multi-process trials")
  parser.add_argument("--workdir", default=None, help="where the trial runs go (default: a temporary folder)")
  parser.add_argument("--out", default=None, help="folder for drill.json and drill.md")
  args = parser.parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix="fault_drill_")
  os.makedirs(root, exist_ok=True)
  drill = Drill(root, args.seed)
  trials: List[Trial] = []
  t0 = time.time()
  for task in [t for t in args.tasks.split(",") if t]:
    if task not in TASKS:
      parser.error(f"--tasks: unknown task {task!r}; accepted: {', '.join(TASKS)}")
    drill.reference(task)
    for _ in range(args.random_trials):
      for sig in (signal.SIGKILL, signal.SIGTERM):
        trials.append(drill.signal_trial(task, sig))
        print(table(trials[-1:]).splitlines()[2], flush=True)
    for damage in DAMAGE:
      for how_many in (1, 2):
        trials.append(drill.corrupt_trial(task, damage, how_many))
        print(table(trials[-1:]).splitlines()[2], flush=True)
    trials.append(drill.mismatch_trial(task))
    trials.append(drill.lock_trial(task))
    trials.append(drill.lower_steps_trial(task))
    trials.append(drill.config_change_trial(task))
    for finished in (True, False):
      trials.append(drill.torn_row_trial(task, finished))
    for first_write in ("log", "checkpoint"):
      trials.append(drill.disk_full_trial(task, first_write))
    for t in trials[-6:]:
      print(table([t]).splitlines()[2], flush=True)
    if not args.no_multi:
      trials.extend(drill.multi_trial(task))
      for target in ("1", "all"):
        trials.extend(drill.sigterm_multi_trial(task, target))
  text = table(trials)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
  header = (
      f"fault drill: {len(trials)} trials, seed {args.seed}, {time.time() - t0:.0f} s, "
      f"commit {commit.stdout.strip() or '?'}, {time.strftime('%Y-%m-%d')}, "
      f"{os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at the end; runs in {root}"
  )
  print(header)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "drill.json"), "w") as f:
      json.dump(
          dict(
              header=header,
              command=" ".join(["python -m experiments.fault_drill"] + (argv or sys.argv[1:])),
              trials=[dataclasses.asdict(t) for t in trials],
          ),
          f,
          indent=1,
      )
    with open(os.path.join(args.out, "drill.md"), "w") as f:
      f.write(header + "\n\n" + text + "\n")
  bad = [t for t in trials if t.outcome in ("differing", "failed")]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
