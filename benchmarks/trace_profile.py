"""Where the time of a trace method goes: XLA's own per-kernel timings, grouped by the source lines they
come from, for the forward and the training-like step that benchmarks.scan_bench times.

  python -m benchmarks.trace_profile [--shape 8x2048x256x3] [--methods blocked/8,fused/16,sequential]
                                     [--per-channel] [--learned] [--repeats 5] [--reuse-heap]
                                     [--out results/trace_profile.json]

For each method it jits the forward (x -> traces) and the training step as a model sees it (scan_bench's:
jax.value_and_grad of vdot(h, dh) w.r.t. x, and the rates with --learned, the upstream gradient dh an
argument), runs each --repeats times under jax.profiler, and reads the kernel (thunk) events out of the
profile: their wall time per call, summed per XLA fusion, with the fusion's output shape and the project
source lines its instructions were traced from (so "the output pass", "the chunk-level loop" and "the
backward's dx pass" can be told apart). Kernels that run in parallel on several threads count once per
thread, so the column sums can exceed the call's wall time; the wall time per call is printed beside them.
--reuse-heap re-runs it with glibc told to keep freed memory (as benchmarks.scan_bench), so page faults stay out.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks import command_line, rerun_argv
from benchmarks.scan_bench import _HEAP_ENV, copy_op, rates, train_step, upstream, uptime
from ema_jax import traces


def method_fn(name, k):
  """f(x, rates) -> traces of `name` ('method' or 'method/chunk'), or the copy."""
  if name == "copy":
    return lambda x, r: copy_op(x, k)
  method, _, c = name.partition("/")
  return lambda x, r: traces.ema_traces(x, r, method=method, chunk_size=int(c) if c else None)[0]


def source_map(hlo_text):
  """fusion (or other instruction) name -> (output shape, sorted project source lines of its instructions)."""
  files = dict(re.findall(r'^(\d+) "(.*)"$', hlo_text.split("FunctionNames")[0], re.M))
  funcs = dict(re.findall(r'^(\d+) "(.*)"$', hlo_text.split("FunctionNames")[1].split("FileLocations")[0], re.M))
  locs = {
      i: (files.get(f, "?"), funcs.get(fn, "?"), int(line))
      for i, f, fn, line in re.findall(r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", hlo_text, re.M)
  }
  frames = dict(re.findall(r"^(\d+) \{file_location_id=(\d+)", hlo_text, re.M))

  def where(frame):
    f, fn, line = locs.get(frames.get(frame, ""), ("?", "?", 0))
    return f"{os.path.basename(f)}:{line} {fn}" if "ema_jax" in f else None

  # Lines of each computation's instructions.
  comp_lines = collections.defaultdict(set)
  current = None
  for line in hlo_text.split("\n"):
    m = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if m:
      current = m.group(1)
      continue
    for fr in re.findall(r"stack_frame_id=(\d+)", line):
      w = where(fr)
      if w and current:
        comp_lines[current].add(w)
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) (\w[\w-]*)\((.*)$", hlo_text, re.M):
    name, shape, op, rest = m.groups()
    calls = re.findall(r"calls=%(\S+?)[,\s]", rest + " ") + re.findall(r"body=%(\S+?)[,\s]", rest + " ")
    lines = set()
    for c in calls:
      lines |= comp_lines.get(c, set())
    for fr in re.findall(r"stack_frame_id=(\d+)", rest):
      w = where(fr)
      if w:
        lines.add(w)
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    out[name] = (re.sub(r"\{[^}]*\}", "", shape), target.group(1) if target else op, sorted(lines))
  return out


def profile(fn, args, repeats, trace_dir):
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  jax.profiler.stop_trace()
  wall = (time.perf_counter() - t0) / repeats
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto*"), recursive=True), key=os.path.getmtime)[-1]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  totals = collections.Counter()
  skip = ("ThunkExecutor", "block_until_ready", "stop_trace", "start_trace", "PjRt", "$")
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(skip):
      totals[e["name"]] += e.get("dur", 0) / 1e3 / repeats  # ms per call
  return totals, wall


def main():
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.trace_profile",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--shape", default="8x2048x256x3", help="BxTxDxK")
  p.add_argument("--methods", default="blocked/8,fused/16,sequential,copy")
  p.add_argument("--per-channel", action="store_true", help="[K, D] write rates")
  p.add_argument("--learned", action="store_true", help="rates are an argument: the step also computes their gradient")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--top", type=int, default=12, help="kernels shown per method and pass")
  p.add_argument("--reuse-heap", action="store_true")
  p.add_argument("--out", default=None, help="write the table as JSON here")
  args = p.parse_args()
  if args.reuse_heap and any(os.environ.get(k) != v for k, v in _HEAP_ENV.items()):
    os.execve(sys.executable, rerun_argv("benchmarks.trace_profile"), {**os.environ, **_HEAP_ENV})
  bsz, t_len, d, k = (int(v) for v in args.shape.split("x"))
  x = jax.random.normal(jax.random.key(0), (bsz, t_len, d), jnp.float32)
  alphas = rates(k, d, args.per_channel)
  alphas = jnp.asarray(alphas) if args.learned else alphas
  report = dict(
      meta=dict(
          date=time.strftime("%Y-%m-%d %H:%M:%S"),
          command=command_line("benchmarks.trace_profile"),
          uptime_before=uptime(),
          backend=jax.default_backend(),
          jax=jax.__version__,
          malloc_env={k: os.environ[k] for k in _HEAP_ENV if k in os.environ},
          note="ms per call summed per kernel over the threads that ran it",
      ),
      rows=[],
  )
  for name in args.methods.split(","):
    f = method_fn(name, k)
    dh = upstream((bsz, t_len, k, d))
    if args.learned:
      fwd, fwd_args = jax.jit(f), (x, alphas)
      train, train_args = train_step(f, (0, 1)), (x, alphas, dh)
    else:
      fwd, fwd_args = jax.jit(lambda x, f=f: f(x, alphas)), (x,)
      train, train_args = train_step(lambda x, f=f: f(x, alphas)), (x, dh)
    for kind, fn, call_args in (("fwd", fwd, fwd_args), ("train", train, train_args)):
      smap = source_map(fn.lower(*call_args).compile().as_text())
      with tempfile.TemporaryDirectory() as tmp:
        totals, wall = profile(fn, call_args, args.repeats, tmp)
      print(
          f"\n{name} {kind}: {wall * 1e3:.2f} ms per call (wall, profiler on); kernels, ms per call summed over threads:"
      )
      for kernel, ms in totals.most_common(args.top):
        shape, op, lines = smap.get(kernel, ("?", "?", []))
        print(f"  {ms:8.2f}  {kernel:32s} {shape:26s} {op if op != 'fusion' else ''} {'; '.join(lines)[:150]}")
        report["rows"].append(
            dict(method=name, kind=kind, wall_ms=wall * 1e3, kernel=kernel, ms=ms, shape=shape, op=op, lines=lines)
        )
  report["meta"]["uptime_after"] = uptime()
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
      json.dump(report, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
