"""The README's main job timed as a whole command, two (or more) checkouts interleaved in random order.

  python -m benchmarks.main_job_ab --checkouts new=.,old=/tmp/wt_old [--rounds 6] [--out results/main_job_ab.json]
                                   [--workdir /tmp/main_job_ab] [-- extra train.py flags]

Each round runs `python train.py --config configs/set_complement.py --workdir W` once per checkout (a git
worktree of the commit to compare, same Python), in a fresh random order, each from a fresh workdir, and
records its wall time (the whole command, as /usr/bin/time would), the load average before it, a speed probe
after it (the median of 10 float32 512^3 NumPy matmuls, to see the machine's own drift) and the sha256 of
its final eval JSON. On a machine whose speed drifts (this 2-core VM: the same command 36-85 s within an
hour) only such interleaved rounds compare; the JSON keeps every run, the medians per checkout and whether
every run's results are the same bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks import command_line

PROBE = (
    "import numpy as np, time\n"
    "a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)\n"
    "ts = []\n"
    "for _ in range(10):\n"
    "  t0 = time.perf_counter(); a @ a; ts.append(time.perf_counter() - t0)\n"
    "print(sorted(ts)[len(ts) // 2] * 1e4)\n"  # ms for 10 matmuls, from the median one
)


def parse_checkouts(text: str):
  out = {}
  for item in [s for s in text.split(",") if s]:
    label, sep, path = item.partition("=")
    if not sep or not label or not os.path.isfile(os.path.join(path, "train.py")):
      raise SystemExit(f"error: --checkouts item {item!r}: expected label=path to a checkout holding train.py")
    out[label] = os.path.abspath(path)
  if len(out) < 1:
    raise SystemExit("error: --checkouts: expected at least one label=path")
  return out


def final_eval(workdir: str) -> str:
  names = [n for n in os.listdir(workdir) if n.startswith("eval_") and n[5:-5].isdigit()]
  if not names:
    return ""
  return os.path.join(workdir, max(names, key=lambda n: int(n[5:-5])))


def run_once(checkout: str, workdir: str, flags) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  load = os.getloadavg()[0]
  cmd = [sys.executable, "train.py", "--config", "configs/set_complement.py", "--workdir", workdir, *flags]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"error: {' '.join(cmd)} in {checkout} exited {proc.returncode}: {proc.stderr[-500:]}")
  probe = float(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True).stdout)
  path = final_eval(workdir)
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return dict(wall_s=wall, load_before=load, probe_ms_after=probe, eval=os.path.basename(path), sha256=digest)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.main_job_ab", description=__doc__.splitlines()[0])
  p.add_argument("--checkouts", required=True, help="label=path,label=path: checkouts (worktrees) to compare")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--seed", type=int, default=0, help="seeds the order within each round")
  p.add_argument("--workdir", default="/tmp/main_job_ab", help="the runs' workdirs go under it")
  p.add_argument("--out", default=None, help="JSON of every run and the medians")
  p.add_argument("train_flags", nargs="*", help="extra train.py flags, after --")
  args = p.parse_args(argv)
  checkouts = parse_checkouts(args.checkouts)
  if args.rounds < 1:
    p.error(f"--rounds={args.rounds}: expected a positive integer")
  rng = random.Random(args.seed)
  rows = []
  for r in range(1, args.rounds + 1):
    order = list(checkouts)
    rng.shuffle(order)
    for label in order:
      row = dict(
          round=r, label=label, **run_once(checkouts[label], os.path.join(args.workdir, label), args.train_flags)
      )
      row["time"] = time.strftime("%H:%M:%S")
      rows.append(row)
      print(
          f"{row['time']} round {r} {label:>8} wall {row['wall_s']:7.2f} s  load before {row['load_before']:.2f}  "
          f"probe {row['probe_ms_after']:.1f} ms  {row['eval']} sha256 {row['sha256'][:8]}",
          flush=True,
      )
  medians = {l: statistics.median(x["wall_s"] for x in rows if x["label"] == l) for l in checkouts}
  same = len({x["sha256"] for x in rows}) == 1
  print("medians: " + ", ".join(f"{l} {m:.1f} s" for l, m in medians.items()) + f"; same result bits: {same}")
  if args.out:
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M"),
        command=command_line("benchmarks.main_job_ab", argv),
        checkouts={l: dict(path=c, commit=_commit(c)) for l, c in checkouts.items()},
        machine=f"{os.uname().machine}, {os.cpu_count()} CPUs",
        load_avg_at_end=list(os.getloadavg()),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, rows=rows, median_wall_s=medians, same_result_bits=same), f, indent=1)
  return 0


def _commit(path: str) -> str:
  got = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
  return got.stdout.strip() if got.returncode == 0 else "?"


if __name__ == "__main__":
  sys.exit(main())
