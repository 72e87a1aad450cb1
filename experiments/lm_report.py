"""Collects the eval JSONs of LM runs into one table (JSON + Markdown).

  python -m experiments.lm_report --root workdirs/lm_small_scale --out results/lm/small_scale [--command TEXT]

Reads every <root>/*/eval_<step>.json (the newest step per run) and metrics.jsonl (median train tokens/s);
writes <out>.json (meta: date, machine, command; rows: run, weights, source, length, tokens, loss,
perplexity, bits_per_byte, perplexity_per_gpt2_token, train_tokens_per_s, ppl_ratio_to_gpt) and <out>.md (the
same as a table).

  python -m experiments.lm_report --out results/lm/small_scale --refresh

re-reads a saved table and adds perplexity per GPT-2 token to rows made before it was recorded, from each
row's loss and the GPT-2 token count of the same text (the source's file, checked by its target count).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
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


def gpt2_tokens_of_source(source: str, tokens: int, tokenizer: str = "byte") -> int:
  """GPT-2 tokens of an evaluation source evaluated whole (configs/lm_common.py's Wikipedia validation file
  or C4 sample); checks that the run's target count is the same text's."""
  from configs import lm_common
  from ema_jax.data import tokenizer as tokenizer_lib
  from ema_jax.data.text import eval_batches

  paths = {"validation": lm_common.WIKI, "c4_sample": lm_common.C4_SAMPLE}
  if source not in paths:
    raise ValueError(f"lm_report: no known file for source {source!r} (known: {', '.join(paths)}).")
  cfg = dict(source="files", path=paths[source], eval_split="validation", tokenizer=tokenizer)
  cwd = os.getcwd()
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the config paths are repo-relative
  try:
    batches = eval_batches.make_eval_batches(cfg, tokenizer_lib.get_tokenizer(tokenizer), 256, 1, max_tokens=0)
  finally:
    os.chdir(cwd)
  if batches.num_tokens != tokens:
    raise ValueError(
        f"lm_report: {source} has {batches.num_tokens} {tokenizer} targets today, the row {tokens}: not the same text."
    )
  return batches.num_gpt2_tokens


def add_gpt2_perplexity(rows) -> None:
  """perplexity_per_gpt2_token for rows that lack it: exp(loss * tokens / GPT-2 tokens of the same text)."""
  cache = {}
  for r in rows:
    if r.get("perplexity_per_gpt2_token") is None:
      key = (r["source"], r["tokens"])
      if key not in cache:
        cache[key] = gpt2_tokens_of_source(r["source"], r["tokens"])
      r["gpt2_tokens"] = cache[key]
      r["perplexity_per_gpt2_token"] = math.exp(r["loss"] * r["tokens"] / cache[key])


def write_outputs(rows, meta, out) -> None:
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  command = meta.get("command") or "; ".join(meta.get("commands", []))
  lines = [f"Measured {meta['date']} on {meta['machine']}; command: `{command}`"]
  if meta.get("refreshed"):
    lines.append(f"({meta['refreshed']})")
  lines += [
      "",
      "| run | parameters | weights | source | tokens | loss | perplexity | bits/byte | ppl / GPT-2 token | ppl / GPT "
      "| train tok/s |",
      "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    ratio = f"{r['ppl_ratio_to_gpt']:.3f}" if r.get("ppl_ratio_to_gpt") else "-"
    tps = f"{r['train_tokens_per_s']:.0f}" if r.get("train_tokens_per_s") else "-"
    count = r.get("parameters") or r.get("params")
    params = f"{count:,}" if count else "-"
    lines.append(
        f"| {r['run']} | {params} | {r['weights']} | {r['source']} | {r['tokens']} | {r['loss']:.4f} | "
        f"{r['perplexity']:.3f} | {r['bits_per_byte']:.4f} | {r['perplexity_per_gpt2_token']:.1f} | {ratio} | {tps} |"
    )
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--root", help="Folder of run workdirs.")
  p.add_argument("--out", required=True)
  p.add_argument("--command", default="")
  p.add_argument(
      "--refresh",
      action="store_true",
      help="Re-read <out>.json and add the columns it lacks (perplexity per GPT-2 token), keeping its meta.",
  )
  args = p.parse_args()
  if args.refresh:
    with open(args.out + ".json") as f:
      saved = json.load(f)
    add_gpt2_perplexity(saved["rows"])
    saved["meta"]["refreshed"] = (
        f"perplexity per GPT-2 token added {time.strftime('%Y-%m-%d')} by `python -m experiments.lm_report "
        f"--out {args.out} --refresh` from each row's loss and the GPT-2 token count of the same text"
    )
    write_outputs(saved["rows"], saved["meta"], args.out)
    return
  if not args.root:
    raise SystemExit("lm_report: --root is required (or --refresh).")
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
                perplexity_per_gpt2_token=r.get("perplexity_per_gpt2_token"),
                train_tokens_per_s=tokens_per_s,
                parameters=params,
            )
        )
  add_gpt2_perplexity(rows)
  gpt = {(r["weights"], r["source"]): r["perplexity"] for r in rows if r["run"] == "gpt"}
  for r in rows:
    ref = gpt.get((r["weights"], r["source"]))
    r["ppl_ratio_to_gpt"] = r["perplexity"] / ref if ref else None
  meta = dict(
      date=time.strftime("%Y-%m-%d"),
      machine=f"{os.cpu_count()}-core CPU, {platform.processor() or platform.machine()}",
      command=args.command,
  )
  write_outputs(rows, meta, args.out)


if __name__ == "__main__":
  main()
