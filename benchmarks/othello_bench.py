"""Throughput of the batched Othello engine: random-game generation and legal-move-mask replay.

    python -m benchmarks.othello_bench [--batch_sizes 1,256,4096] [--out results/othello_bench.json]

Each row times whole batches (one call per batch, best of several repeats after a warm-up) and
reports games/s and moves/s; "vs batch 1" is the throughput ratio to the single-game batch.
"""

import argparse
import json
import os
import platform
import time

import numpy as np

from ema_jax.data import othello


def best_time(fn, min_seconds, max_repeats):
  fn()  # warm-up
  times, total = [], 0.0
  while len(times) < max_repeats and (total < min_seconds or len(times) < 3):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
    total += times[-1]
  return min(times), len(times)


def main():
  parser = argparse.ArgumentParser(prog="python -m benchmarks.othello_bench", description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", default="1,256,4096")
  parser.add_argument("--min_seconds", type=float, default=2.0, help="timing budget per row")
  parser.add_argument("--out", default="results/othello_bench.json")
  args = parser.parse_args()
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

  rows = []
  for operation in ("generate_games", "legal_move_masks"):
    for batch in batch_sizes:
      moves, lengths = othello.generate_games(batch, seed=0)
      if operation == "generate_games":
        fn = lambda: othello.generate_games(batch, seed=1, batch_size=batch)  # noqa: E731
      else:
        fn = lambda: othello.legal_move_masks(moves)  # noqa: E731
      seconds, repeats = best_time(fn, args.min_seconds, max_repeats=50)
      rows.append(
          dict(
              operation=operation,
              batch=batch,
              seconds_per_batch=seconds,
              repeats=repeats,
              games_per_s=batch / seconds,
              moves_per_s=float(lengths.sum()) / seconds,
          )
      )
  for row in rows:
    peer = next(r for r in rows if r["operation"] == row["operation"] and r["batch"] == batch_sizes[0])
    row["vs_first_batch"] = row["games_per_s"] / peer["games_per_s"]

  peer_name = f"vs batch {batch_sizes[0]}"
  header = f"{'operation':<18}{'batch':>7}{'ms/batch':>11}{'games/s':>11}{'moves/s':>12}{peer_name:>12}"
  print(header)
  print("-" * len(header))
  for r in rows:
    print(
        f"{r['operation']:<18}{r['batch']:>7}{1e3 * r['seconds_per_batch']:>11.2f}"
        f"{r['games_per_s']:>11.0f}{r['moves_per_s']:>12.0f}{r['vs_first_batch']:>12.1f}"
    )

  machine = dict(
      platform=platform.platform(),
      processor=platform.processor(),
      cpu_count=os.cpu_count(),
      load_average=os.getloadavg(),
      python=platform.python_version(),
      numpy=np.__version__,
  )
  print(f"machine: {machine}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as file:
    json.dump(
        dict(benchmark="othello", date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine, rows=rows), file, indent=2
    )
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
