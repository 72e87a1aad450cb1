"""Training answer accuracy of each probe run, averaged over windows of steps (from its metrics.jsonl):
whether a model's curve is still rising at the end of the budget.

  python results/probes/training_curves.py WORKDIR [OUT.json]

WORKDIR holds the runs of `python -m experiments.probes --workdir WORKDIR ...` (recall_<model>_s<seed>/).
"""

import glob
import json
import os
import sys

WINDOWS = [(500, 1000), (1500, 2000), (3000, 3500), (5000, 5500), (6500, 7000)]


def curve(run: str) -> dict:
  last = {}
  for line in open(os.path.join(run, "metrics.jsonl")):
    row = json.loads(line) if line.strip() else {}
    if "answer_accuracy" in row and "step" in row:
      last[row["step"]] = row["answer_accuracy"]  # a resumed run's rows replace the ones it redid
  out = {}
  for lo, hi in WINDOWS:
    values = [a for s, a in last.items() if lo < s <= hi]
    out[f"{lo}-{hi}"] = round(sum(values) / len(values), 3) if values else None
  return out


def main():
  runs = sorted(glob.glob(os.path.join(sys.argv[1], "*_s*")))
  out = {os.path.basename(r): curve(r) for r in runs if os.path.exists(os.path.join(r, "metrics.jsonl"))}
  for name, c in out.items():
    print(name, c)
  if len(sys.argv) > 2:
    with open(sys.argv[2], "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
