"""Throughput of the language-model training data pipeline (read, tokenize, pack, batch).

    python -m benchmarks.data_bench [--data ../shared/data/wikipedia] [--tokenizers gpt2,byte]
        [--read_threads 0,2] [--seq_len 1024] [--global_batch 32] [--out results/data_bench.json]

For each tokenizer and read-ahead thread count (config.data.read_threads), builds
`make_train_iterator` on the JSON-lines files `{data}/train*.jsonl` (one process, so one stream
per row of the global batch), takes one batch (reads every row's first documents), then times
whole batches for --min_seconds and reports tokens/s of `inputs`. "vs encode" is the ratio to the
tokenizer alone encoding the same documents in one thread (the bound for one Python process);
"vs need" the ratio to --need_tokens_per_s, what the accelerator consumes (default 300k tokens/s,
the top of the 130M model's range on one accelerator).
"""

import argparse
import json
import os
import platform
import time

from ema_jax.data import text
from ema_jax.data import tokenizer as tokenizer_lib


def encode_rate(tok, docs, min_seconds):
  """Tokens/s of the tokenizer alone, one thread, over as many documents as fit the budget."""
  tokens, start, i = 0, time.perf_counter(), 0
  while time.perf_counter() - start < min_seconds or i < 10:
    tokens += len(tok.encode(docs[i % len(docs)]))
    i += 1
  return tokens / (time.perf_counter() - start)


def pipeline_rate(data_cfg, tok, seq_len, global_batch, min_seconds):
  start = time.perf_counter()
  it = text.make_train_iterator(data_cfg, tok, seq_len, global_batch, seed=0, process_index=0, process_count=1)
  build = time.perf_counter() - start
  next(it)
  first = time.perf_counter() - start - build
  batches, start = 0, time.perf_counter()
  while time.perf_counter() - start < min_seconds or batches < 3:
    next(it)
    batches += 1
  seconds = time.perf_counter() - start
  it.close()
  return dict(
      build_s=build, first_batch_s=first, batches=batches, tokens_per_s=batches * global_batch * seq_len / seconds
  )


def main():
  parser = argparse.ArgumentParser(prog="python -m benchmarks.data_bench", description=__doc__.splitlines()[0])
  parser.add_argument("--data", default=os.path.join("..", "shared", "data", "wikipedia"))
  parser.add_argument("--tokenizers", default="gpt2,byte")
  parser.add_argument("--read_threads", default="0,2")
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--global_batch", type=int, default=32)
  parser.add_argument("--min_seconds", type=float, default=5.0, help="timing budget per row")
  parser.add_argument("--need_tokens_per_s", type=float, default=300e3)
  parser.add_argument("--out", default="results/data_bench.json")
  args = parser.parse_args()
  pattern = os.path.join(args.data, "{split}*.jsonl")

  rows = []
  for name in args.tokenizers.split(","):
    tok = tokenizer_lib.get_tokenizer(name)
    base_cfg = dict(source="files", path=pattern, tokenizer=name)
    docs = list(text.load_documents(base_cfg, "train"))
    encode = encode_rate(tok, docs, args.min_seconds)
    for threads in (int(t) for t in args.read_threads.split(",")):
      cfg = dict(base_cfg, read_threads=threads)
      result = pipeline_rate(cfg, tok, args.seq_len, args.global_batch, args.min_seconds)
      rows.append(
          dict(
              tokenizer=name,
              read_threads=threads,
              seq_len=args.seq_len,
              global_batch=args.global_batch,
              encode_tokens_per_s=encode,
              vs_encode=result["tokens_per_s"] / encode,
              vs_need=result["tokens_per_s"] / args.need_tokens_per_s,
              **result,
          )
      )

  header = (
      f"{'tokenizer':<10}{'threads':>8}{'shape':>10}{'build s':>9}{'1st s':>7}"
      f"{'tokens/s':>12}{'encode tok/s':>14}{'vs encode':>11}{'vs need':>9}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    print(
        f"{r['tokenizer']:<10}{r['read_threads']:>8}{r['global_batch']:>5}x{r['seq_len']:<4}"
        f"{r['build_s']:>9.2f}{r['first_batch_s']:>7.2f}{r['tokens_per_s']:>12,.0f}"
        f"{r['encode_tokens_per_s']:>14,.0f}{r['vs_encode']:>11.2f}{r['vs_need']:>9.1f}"
    )

  result = dict(
      benchmark="data_bench",
      data=os.path.abspath(args.data),
      rows=rows,
      machine=dict(
          platform=platform.platform(),
          processor=platform.processor(),
          cpu_count=os.cpu_count(),
          python=platform.python_version(),
      ),
      date=time.strftime("%Y-%m-%d %H:%M:%S"),
  )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
