"""Decoding speed and state per sequence of the EMA LM and the GPT, one new token at a given context length.

  python -m benchmarks.decode_bench [--contexts 256,1024,4096,16384] [--batches 1,32] [--width 128]
                                    [--depth 2] [--repeats 20] [--out results/decode_bench.json] [--quick]

Both models at width D, `depth` blocks, the byte vocabulary (257). The GPT's cost of one token grows with
the context: its KV cache is filled to the context length (random keys and values; the time does not
depend on them) and one jitted decode_step reads all of it. The EMA LM's state is K D trace numbers per
block whatever the context, so its step costs the same at every length (it is still timed at each one, as
a check). The cache is donated, so the step updates it in place, as the generation loop's scan does.

Tokens/s = batch / median step time; state bytes per sequence = the cache arrays' nbytes / batch. Cells are
timed in a fresh random order on every repeat (contenders interleaved, so a change in machine load hits all
of them alike), medians reported; the machine load (os.getloadavg) before and after and the date go into the
JSON. --quick: contexts 64 and 256, batches 1 and 2, width 32, 3 repeats: a seconds-long check that it runs.
"""

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ema_jax.models import ema_lm, transformer

VOCAB = 257  # the byte tokenizer


def build(kind: str, width: int, depth: int, max_context: int, extra: int):
  """The model and a function (batch, context) -> cache filled to `context` tokens."""
  if kind == "ema_lm":
    cfg = ema_lm.EMALMConfig(vocab_size=VOCAB, width=width, num_blocks=depth, ffn_hidden=4 * width, heads=4)
    model = ema_lm.EMALM(cfg, rngs=nnx.Rngs(0))

    def cache_at(batch, context):
      cache = model.init_cache(batch)
      key = jax.random.key(context)
      cache = jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype) if x.dtype == jnp.float32 else x, cache)
      return dict(cache, t=jnp.full((batch,), context, jnp.int32))

    return model, cache_at
  heads = max(1, width // 32)
  cfg = transformer.GPTConfig(
      vocab_size=VOCAB, context_len=max_context + extra, num_layers=depth, num_heads=heads, width=width
  )
  model = transformer.GPT(cfg, rngs=nnx.Rngs(0))

  def cache_at(batch, context):
    cache = model.init_cache(batch, context + extra)
    key = jax.random.key(context)
    blocks = [
        {
            n: jax.random.normal(jax.random.fold_in(key, 2 * i + j), a.shape, a.dtype)
            for j, (n, a) in enumerate(c.items())
        }
        for i, c in enumerate(cache["blocks"])
    ]
    return dict(blocks=blocks, t=jnp.full((batch,), context, jnp.int32), start=jnp.zeros((batch,), jnp.int32))

  return model, cache_at


def state_bytes(kind: str, cache_at, context: int) -> int:
  """Bytes of one sequence's decoding state with exactly `context` tokens in it (the GPT's timed cache has
  spare slots for the positions the repeats move through; they are not counted)."""
  total = 0
  for x in jax.tree.leaves(jax.eval_shape(lambda: cache_at(1, context))):
    slots = x.shape[1] if kind == "gpt" and x.ndim == 4 else None  # [1, slots, H, d] keys and values
    total += x.size * x.dtype.itemsize * (context / slots if slots else 1)
  return int(total)


class Cell:
  """One (model, batch, context): its jitted step, its live (donated) cache, its times."""

  def __init__(self, kind, model, cache_at, batch, context):
    self.kind, self.batch, self.context = kind, batch, context
    graphdef, state = nnx.split(model)
    self.state = state
    self.step = jax.jit(lambda s, c, tok: nnx.merge(graphdef, s).decode_step(c, tok), donate_argnums=(1,))
    self.cache = cache_at(batch, context)
    self.state_bytes = state_bytes(kind, cache_at, context)
    self.token = jnp.zeros((batch,), jnp.int32)
    self.times = []
    self.run()  # compile and warm up

  def run(self):
    t0 = time.perf_counter()
    self.cache, logits = self.step(self.state, self.cache, self.token)
    jax.block_until_ready(logits)
    return time.perf_counter() - t0

  def result(self):
    median = statistics.median(self.times)
    return dict(
        model=self.kind,
        batch=self.batch,
        context=self.context,
        median_s=median,
        tokens_per_s=self.batch / median,
        state_bytes_per_sequence=self.state_bytes,
        repeats=len(self.times),
    )


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.decode_bench", description=__doc__.split("\n\n")[0])
  p.add_argument("--contexts", default="256,1024,4096,16384")
  p.add_argument("--batches", default="1,32")
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="JSON output (default: print only)")
  p.add_argument("--quick", action="store_true", help="seconds-long check: small everything")
  args = p.parse_args(argv)
  if args.quick:
    args.contexts, args.batches, args.width, args.repeats = "64,256", "1,2", 32, 3
  contexts = [int(c) for c in args.contexts.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  load_before = os.getloadavg()
  extra = args.repeats + 2  # positions the timed GPT steps move through past the context
  cells = []
  for kind in ("ema_lm", "gpt"):
    model, cache_at = build(kind, args.width, args.depth, max(contexts), extra)
    for b in batches:
      for c in contexts:
        cells.append(Cell(kind, model, cache_at, b, c))
  rng = random.Random(args.seed)
  for _ in range(args.repeats):
    order = cells[:]
    rng.shuffle(order)
    for cell in order:
      cell.times.append(cell.run())
  rows = [cell.result() for cell in cells]
  ema = {(r["batch"], r["context"]): r for r in rows if r["model"] == "ema_lm"}
  print(f"{'model':<8}{'batch':>6}{'context':>9}{'ms/token step':>15}{'tokens/s':>12}{'state B/seq':>14}{'vs EMA':>9}")
  for r in rows:
    ratio = r["tokens_per_s"] / ema[(r["batch"], r["context"])]["tokens_per_s"]
    print(
        f"{r['model']:<8}{r['batch']:>6}{r['context']:>9}{1e3 * r['median_s']:>15.3f}{r['tokens_per_s']:>12.1f}"
        f"{r['state_bytes_per_sequence']:>14,}{ratio:>9.2f}"
    )
  out = dict(
      benchmark="decode_bench",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      machine=dict(
          platform=platform.platform(),
          cpu_count=os.cpu_count(),
          backend=jax.default_backend(),
          jax=jax.__version__,
          loadavg_before=list(load_before),
          loadavg_after=list(os.getloadavg()),
      ),
      settings=dict(vars(args), vocab=VOCAB),
      rows=rows,
  )
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
      json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
