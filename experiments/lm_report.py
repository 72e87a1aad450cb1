"""Collects the eval JSONs of LM runs into one table (JSON + Markdown).

  python -m experiments.lm_report --root workdirs/lm_small_scale --out results/lm/small_scale [--command TEXT]

Reads every <root>/*/eval_<step>.json (the newest step per run) and metrics.jsonl (median train tokens/s);
writes <out>.json (meta: date, machine, command; rows: run, weights, source, length, tokens, loss,
perplexity, bits_per_byte, train_tokens_per_s, ppl_ratio_to_gpt) and <out>.md (the same as a table).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time

from ema_jax import workdir as workdir_lib


def latest_eval(workdir):
  try:
    return workdir_lib.latest_eval(workdir)
  except FileNotFoundError:
    return None


def parameters(workdir):
  """Trainable parameters of the run's model (tied embeddings once), from its config.json; None if absent."""
  import math

  import jax
  import ml_collections
  from flax import nnx

  from ema_jax.tasks.base import get_task

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    task = get_task(ml_collections.ConfigDict(json.load(f)), workdir)
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--root", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--command", default="")
  args = p.parse_args()
  rows = []
  for wd in sorted(glob.glob(os.path.join(args.root, "*"))):
    ev = latest_eval(wd)
    if ev is None:
      continue
    tokens_per_s = None
    params = parameters(wd)
    mpath = os.path.join(wd, "metrics.jsonl")
    if os.path.exists(mpath):
      with open(mpath) as f:
        tps = [json.loads(l).get("tokens_per_s") for l in f]
      tps = [t for t in tps if t]
      tokens_per_s = sorted(tps)[len(tps) // 2] if tps else None
    for weights, res in ev["results"].items():
      for r in res["table"]:
        rows.append(
            dict(
                run=os.path.basename(wd),
                weights=weights,
                step=ev["step"],
                source=r["source"],
                length=r["length"],
                tokens=r["tokens"],
                loss=r["loss"],
                perplexity=r["perplexity"],
                bits_per_byte=r["bits_per_byte"],
                train_tokens_per_s=tokens_per_s,
                parameters=params,
            )
        )
  gpt = {(r["weights"], r["source"]): r["perplexity"] for r in rows if r["run"] == "gpt"}
  for r in rows:
    ref = gpt.get((r["weights"], r["source"]))
    r["ppl_ratio_to_gpt"] = r["perplexity"] / ref if ref else None
  meta = dict(
      date=time.strftime("%Y-%m-%d"),
      machine=f"{os.cpu_count()}-core CPU, {platform.processor() or platform.machine()}",
      command=args.command,
  )
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  lines = [
      f"Measured {meta['date']} on {meta['machine']}; command: `{meta['command']}`",
      "",
      "| run | parameters | weights | source | tokens | loss | perplexity | bits/byte | ppl / GPT | train tok/s |",
      "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    ratio = f"{r['ppl_ratio_to_gpt']:.3f}" if r["ppl_ratio_to_gpt"] else "-"
    tps = f"{r['train_tokens_per_s']:.0f}" if r["train_tokens_per_s"] else "-"
    params = f"{r['parameters']:,}" if r.get("parameters") else "-"
    lines.append(
        f"| {r['run']} | {params} | {r['weights']} | {r['source']} | {r['tokens']} | {r['loss']:.4f} | "
        f"{r['perplexity']:.3f} | {r['bits_per_byte']:.4f} | {ratio} | {tps} |"
    )
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
