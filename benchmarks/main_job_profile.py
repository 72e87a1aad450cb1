"""Where the wall time of a train.py run goes: start-up, compilation, training, evaluations, plots, saves.

    python -m benchmarks.main_job_profile --workdir /tmp/main_job_profile [--out results/main_job_profile.json]
        [-- TRAIN.PY FLAGS]     # default: --config configs/set_complement.py (the README's main job)

Runs train.py's main in this process (the workdir is emptied first) with timers around the trainer's
phases, and JAX's compile-duration events summed per program. Reports, in seconds from the start of this
process:
  imports        until train.py's main is entered (Python, JAX, flax, orbax)
  to_first_step  from there until the train step is first traced (build, restore or init)
  training       from there until the final evaluation: the train step's compile, the step loop, the
                 evaluations it waited for
  final_eval     the final evaluation (evaluate_all) and its table and plots (summarize)
  exit           from the end of the final evaluation's summary to the end of train.py's main (closing
                 the checkpointer and the logs; the interpreter's own shutdown is not in it)
and, apart, what overlaps those: every evaluation of every weight set (in which thread, when it started and
how long it took), the temperature fits, the trainer's waits for a background evaluation, checkpoint saves
(the synchronous part), plots, and XLA compile time per program. The timers add well under 1% to the run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import sys
import threading
import time

T0 = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  from ema_jax import host_memory  # no JAX

  if argv is None:
    host_memory.reexec()  # what train.py's first lines do (huge pages for big buffers), before the timers matter
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.main_job_profile",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--workdir", required=True, help="emptied first: every run starts from step 0")
  p.add_argument("--out", default=None, help="also write the phases and events as JSON here")
  p.add_argument("train_flags", nargs="*", help="train.py's flags after --, other than --workdir")
  args = p.parse_args(argv)
  command = "python -m benchmarks.main_job_profile " + " ".join(sys.argv[1:] if argv is None else argv)
  flags = args.train_flags or ["--config", "configs/set_complement.py"]
  if os.path.exists(args.workdir):
    shutil.rmtree(args.workdir)

  import runpy

  import jax
  from jax._src import monitoring

  from ema_jax import checkpoint as ckpt_lib
  from ema_jax import length_report, trainer
  from ema_jax.tasks import base

  marks = {}
  spans = []  # (label, thread, start, seconds)
  compiles = collections.defaultdict(float)

  def now():
    return time.perf_counter() - T0

  def timed(owner, name, label):
    orig = getattr(owner, name)

    def wrapper(*a, **k):
      start = now()
      try:
        return orig(*a, **k)
      finally:
        spans.append((label, threading.current_thread().name, start, now() - start))

    setattr(owner, name, wrapper)
    return orig

  def on_duration(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles[kw.get("fun_name", "?")] += duration

  monitoring.register_event_duration_secs_listener(on_duration)
  timed(trainer, "evaluate_all", "evaluate_all")
  timed_eval = trainer.evaluate_all
  timed(trainer.BackgroundEval, "finish", "wait for a background evaluation")
  timed(ckpt_lib.Checkpointer, "save", "checkpoint save")
  timed(length_report, "plot_per_length", "plots")
  real_task_class = base.task_class
  patched = set()

  def task_class(config):  # the run's task class, its evaluation phases timed
    cls = real_task_class(config)
    if cls not in patched:
      patched.add(cls)
      if hasattr(cls, "fit_temperature"):
        timed(cls, "fit_temperature", "temperature fit")
      timed(cls, "summarize", "summarize")
    return cls

  base.task_class = task_class
  real_make_step = trainer.make_train_step

  def make_train_step(setup):
    step = real_make_step(setup)

    def first_marked(state, batch):  # traced once: the mark is the first dispatch
      marks.setdefault("first_step", now())
      return step(state, batch)

    return first_marked

  trainer.make_train_step = make_train_step

  def evaluate_all(setup, state, workdir, step, weights=None, final=False):
    if final:
      marks["final_eval"] = now()
    return timed_eval(setup, state, workdir, step, weights=weights, final=final)

  trainer.evaluate_all = evaluate_all

  sys.argv = ["train.py", *flags, "--workdir", args.workdir]
  cwd = os.getcwd()
  os.chdir(REPO)
  marks["main"] = now()
  try:
    runpy.run_path(os.path.join(REPO, "train.py"), run_name="__main__")
  except SystemExit as e:
    if e.code not in (0, None):
      raise
  finally:
    os.chdir(cwd)
  marks["end"] = now()
  summary_end = max((s + d for label, _, s, d in spans if label == "summarize"), default=marks["end"])
  final = marks.get("final_eval", marks["end"])
  phases = {
      "imports": marks["main"],
      "to_first_step": marks.get("first_step", marks["main"]) - marks["main"],
      "training": final - marks.get("first_step", marks["main"]),
      "final_eval": summary_end - final,
      "exit": marks["end"] - summary_end,
      "total": marks["end"],
  }
  print(f"\n{' '.join(flags)}: {phases['total']:.2f} s in this process")
  for k, v in phases.items():
    print(f"  {k:16s} {v:7.2f}")
  print("events (start s, seconds, thread):")
  for label, thread, start, seconds in sorted(spans, key=lambda r: r[2]):
    if seconds >= 0.01:
      print(f"  {start:7.2f} {seconds:6.2f}  {label:32s} {thread}")
  print(f"XLA compile, {sum(compiles.values()):.2f} s in all:")
  for name, seconds in sorted(compiles.items(), key=lambda kv: -kv[1]):
    if seconds >= 0.02:
      print(f"  {seconds:6.2f}  {name}")
  if args.out:
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M"),
        command=command,
        train_flags=flags,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}",
        load_avg_at_end=list(os.getloadavg()),
        huge_pages=host_memory.describe(),
    )
    rows = [
        dict(label=l, thread=t, start_s=s, seconds=d)
        for l, t, s, d in sorted(spans, key=lambda r: r[2])
        if d >= 0.005 or l != "wait for a background evaluation"  # not the trainer's every-step look
    ]
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, phases=phases, events=rows, compile_seconds=dict(compiles)), f, indent=1)
  return phases


if __name__ == "__main__":
  main()
