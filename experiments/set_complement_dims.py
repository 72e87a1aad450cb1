"""The smallest embedding and value dimensions that solve the set-complement task, on the paper's model.

  python -m experiments.set_complement_dims --workdir W [--results results/set_complement_dims]
      [--num_tokens 16 --train_max_size 8 --embed_dims 2,4,6,8,12,16 --value_dims 1,2,4,8,16 --seeds 0,1]
      [--steps 8000 --lr 3e-3 --kl_solved 0.05]

For every (embed_dim d, value_dim dv) of the grid it trains the decoder model (config.model.kind 'decoder',
no dropout, constant lr after warmup) with every seed at once (the sweep's vmapped trainer step,
experiments/set_complement_sweep.py), until the raw in-range KL has plateaued (the sweep's rule) or the
step cap; then evaluates every set size 1..N-1 and the balance conditions at lengths 1 and 2
(ema_jax/tasks/set_complement_theory.py). A cell "solves sizes 1..S" when the in-range KL (mean over sizes
1..S, held-out sets) is at most --kl_solved for every seed (our threshold).

Bound written beside the grid (ours; the paper's own statement could not be read here): at length 1 the
logits are f((x)) = B[x] + D[x] = E[x] (I + W_V W_O) U, a matrix of rank <= d. Exactly uniform outputs over
the N - 1 valid tokens need rows c_x 1 - Delta_x e_x (Delta_x > 0), a matrix of rank >= N - 1, so an exact
solution needs d >= N - 1; a finite KL threshold can be met below it, which the grid measures.

Writes --results: dims.csv (one row per cell and seed), summary.json, summary.md (KL grids and the smallest
solving dims) and plots/dims_kl.png.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np
from absl import app, flags


def define_flags():
  """The command-line flags, defined only when the module runs as a script (tests import it)."""
  global _WORKDIR, _RESULTS, _N, _S, _EMBED, _VALUE, _SEEDS, _STEPS, _LR, _BATCH, _KL
  _WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (nothing large is written).", required=True)
  _RESULTS = flags.DEFINE_string("results", None, "Where summary.md/json, dims.csv and plots go (default: workdir).")
  _N = flags.DEFINE_integer("num_tokens", 16, "N set tokens.")
  _S = flags.DEFINE_integer("train_max_size", 8, "Training sizes 1..S.")
  _EMBED = flags.DEFINE_string("embed_dims", "2,4,6,8,12,16", "Embedding dims d.")
  _VALUE = flags.DEFINE_string("value_dims", "1,2,4,8,16", "Value dims dv.")
  _SEEDS = flags.DEFINE_string("seeds", "0,1", "Seeds, trained together per cell.")
  _STEPS = flags.DEFINE_integer("steps", 8000, "Step cap per cell.")
  _LR = flags.DEFINE_float("lr", 3e-3, "Learning rate (constant after min(100, steps / 4) warmup steps).")
  _BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
  _KL = flags.DEFINE_float("kl_solved", 0.05, "In-range KL at or below which a seed counts as solved.")


def ints(s: str) -> List[int]:
  try:
    out = [int(x) for x in s.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"expected comma-separated integers, got {s!r}") from None
  if not out or min(out) < 1:
    raise ValueError(f"expected positive integers, got {s!r}")
  return out


def base_config(n: int, s: int, steps: int, batch: int):
  from configs import set_complement

  c = set_complement.get_config("sweep")
  c.steps, c.batch_size = steps, batch
  c.optim.schedule, c.optim.warmup_steps = "constant", min(100, steps // 4)
  c.task.num_tokens, c.task.train_max_size = n, s
  c.task.eval_examples = 128
  c.model.kind = "decoder"
  c.sweep.chunk_steps, c.sweep.min_steps = 250, min(2000, steps)
  c.sweep.bema_burn_in = [0]
  return c


def run_grid(c, lr: float, embed_dims, value_dims, seeds, kl_solved: float, log=print) -> Dict[str, Any]:
  import jax
  from flax import nnx

  from ema_jax.data import set_complement as data
  from ema_jax.tasks import set_complement as sc
  from ema_jax.tasks import set_complement_metrics as scm
  from ema_jax.tasks import set_complement_theory as theory
  from experiments import set_complement_sweep as sweep

  n, s_max = int(c.task.num_tokens), int(c.task.train_max_size)
  sizes = list(range(1, n))
  t = c.task
  eval_batches = [data.eval_batch(int(t.eval_seed), s, int(t.eval_examples), num_tokens=n, length=n - 1) for s in sizes]
  check = [data.eval_batch(int(t.eval_seed) + 1, s, 64, num_tokens=n, length=s_max) for s in range(1, s_max + 1)]
  stream = sweep.TrainingStream(c, int(c.sweep.chunk_steps))
  rows = []
  for d in embed_dims:
    for dv in value_dims:
      t0 = time.time()
      runs = [
          dict(
              run=i,
              seed=int(seed),
              embed_dim=d,
              value_dim=dv,
              num_heads=1,
              lr=lr,
              dropout=0.0,
              dropout_on="",
              ema_decay=0.999,
              bema_burn_in=0,
              **{f"drop_{x}": 0.0 for x in ("attention", "embedding", "output")},
          )
          for i, seed in enumerate(seeds)
      ]
      programs = sweep.GroupPrograms(c, d, dv, 1, 0)
      state, losses, info = sweep.train_group(programs, runs, stream, check, c.sweep)
      res = sweep.evaluate_group(programs, state, eval_batches)["raw"]
      for j, run in enumerate(runs):
        per = {m: res[m][j].tolist() for m in sweep.METRICS}
        summ = scm.range_summary(sizes, per, s_max)
        params = jax.tree.map(lambda a: a[j], state["params"])
        other = jax.tree.map(lambda a: a[j], state["other"])
        model = nnx.merge(programs.setup.graphdef, params, other)
        bal = theory.displacement_stats(model, n, sc.balance_logits)
        rows.append(
            dict(
                embed_dim=d,
                value_dim=dv,
                seed=run["seed"],
                steps=info["steps"],
                plateau_step=info["plateau_step"][j],
                in_kl=summ["in_range/kl"],
                out_kl=summ["out_of_range/kl"],
                in_invalid_mass=summ["in_range/invalid_mass"],
                out_invalid_mass=summ["out_of_range/invalid_mass"],
                max_in_kl=float(max(per["kl"][:s_max])),
                solved=bool(summ["in_range/kl"] <= kl_solved),
                balanced=bool(bal["balanced"]),
                delta1_cv=bal["delta1_cv"],
                delta2_first_over_last=bal["delta2_first_over_last"],
                kl_per_size=per["kl"],
            )
        )
      cell = rows[-len(runs) :]
      log(
          f"d={d:3d} dv={dv:3d}: {info['steps']} steps, {time.time() - t0:.0f} s; in-range KL "
          + ", ".join(f"{r['in_kl']:.3g}" for r in cell)
          + f"; solved {sum(r['solved'] for r in cell)}/{len(cell)}"
      )
  return dict(rows=rows, sizes=sizes)


def smallest_solving(rows, embed_dims, value_dims):
  """{'min_embed_dim': for each dv the smallest d solving with every seed, 'min_value_dim': likewise}."""
  solved = {}
  for r in rows:
    solved.setdefault((r["embed_dim"], r["value_dim"]), []).append(r["solved"])
  ok = {k: all(v) for k, v in solved.items()}
  by_dv = {dv: next((d for d in embed_dims if ok.get((d, dv))), None) for dv in value_dims}
  by_d = {d: next((dv for dv in value_dims if ok.get((d, dv))), None) for d in embed_dims}
  return dict(min_embed_dim_for_value_dim=by_dv, min_value_dim_for_embed_dim=by_d)


def write_outputs(out_dir: str, grid, embed_dims, value_dims, meta) -> Dict[str, Any]:
  os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
  rows = grid["rows"]
  cols = [k for k in rows[0] if k != "kl_per_size"]
  with open(os.path.join(out_dir, "dims.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in rows:
      w.writerow([f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in cols])
  mean = lambda key: {
      (d, dv): float(np.exp(np.mean(np.log([r[key] for r in rows if (r["embed_dim"], r["value_dim"]) == (d, dv)]))))
      for d in embed_dims
      for dv in value_dims
  }
  kl_in, kl_out = mean("in_kl"), mean("out_kl")
  best = smallest_solving(rows, embed_dims, value_dims)
  summary = dict(meta, smallest=best, rows=rows, sizes=grid["sizes"])
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)

  n, s = meta["num_tokens"], meta["train_max_size"]
  lines = [
      f"# Smallest dimensions that solve set complement (N = {n}, sizes 1..{s}), the paper's decoder model",
      "",
      f"Command: `{meta['command']}`  ",
      f"{meta['date']}, {meta['machine']}, load average {meta['load_start']} at the start, {meta['load_end']} at "
      f"the end; {meta['wall_s']:.0f} s.  ",
      f"Each cell: seeds {meta['seeds']} trained until the in-range KL plateaued (cap {meta['steps']} steps), lr "
      f"{meta['lr']:g} constant, batch {meta['batch_size']}. Solved = in-range KL <= {meta['kl_solved']:g} for "
      "every seed (our threshold).",
      "",
  ]
  for title, table in (("In-range KL (geometric mean over seeds)", kl_in), ("Out-of-range KL", kl_out)):
    lines += [f"## {title}", "", "| d \\ dv | " + " | ".join(map(str, value_dims)) + " |"]
    lines += ["|---" * (len(value_dims) + 1) + "|"]
    for d in embed_dims:
      lines.append(f"| {d} | " + " | ".join(f"{table[(d, dv)]:.3g}" for dv in value_dims) + " |")
    lines.append("")
  lines += [
      "## Smallest solving dimensions",
      "",
      "Smallest embedding dim d for each value dim: "
      + ", ".join(
          f"dv={dv}: {v if v is not None else 'none in grid'}" for dv, v in best["min_embed_dim_for_value_dim"].items()
      )
      + ".  ",
      "Smallest value dim for each embedding dim: "
      + ", ".join(
          f"d={d}: {v if v is not None else 'none in grid'}" for d, v in best["min_value_dim_for_embed_dim"].items()
      )
      + ".",
      "",
      f"Exact bound (our derivation, docstring of experiments/set_complement_dims.py): exactly uniform outputs at "
      f"length 1 need d >= N - 1 = {n - 1}; the KL threshold above is met by the dims shown.",
      "",
      f"Balanced at lengths 1 and 2 (our reading, ema_jax/tasks/set_complement_theory.py): "
      f"{sum(r['balanced'] for r in rows)} of {len(rows)} trained models.",
      "",
  ]
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write("\n".join(lines))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
  for ax, (title, table) in zip(axes, (("in-range KL", kl_in), ("out-of-range KL", kl_out))):
    grid_v = np.log10([[table[(d, dv)] for dv in value_dims] for d in embed_dims])
    im = ax.imshow(grid_v, origin="lower", cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(value_dims)), value_dims)
    ax.set_yticks(range(len(embed_dims)), embed_dims)
    ax.set_xlabel("value dim dv")
    ax.set_ylabel("embedding dim d")
    ax.set_title(f"log10 {title}")
    fig.colorbar(im, ax=ax)
  fig.suptitle(f"Set complement N = {n}, training sizes 1..{s}")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "plots", "dims_kl.png"))
  plt.close(fig)
  return summary


def main(argv):
  del argv
  embed_dims, value_dims, seeds = ints(_EMBED.value), ints(_VALUE.value), [int(x) for x in _SEEDS.value.split(",")]
  n, s = _N.value, _S.value
  if not 1 <= s < n:
    raise ValueError(f"--train_max_size={s}: expected 1 <= S < num_tokens={n}.")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  t0, load0 = time.time(), round(os.getloadavg()[0], 2)
  c = base_config(n, s, _STEPS.value, _BATCH.value)
  grid = run_grid(c, _LR.value, embed_dims, value_dims, seeds, _KL.value)
  import platform

  meta = dict(
      command="python -m experiments.set_complement_dims " + " ".join(sys.argv[1:]),
      date=time.strftime("%Y-%m-%d"),
      machine=f"{platform.machine()} CPU, {os.cpu_count()} cores",
      load_start=load0,
      load_end=round(os.getloadavg()[0], 2),
      wall_s=time.time() - t0,
      num_tokens=n,
      train_max_size=s,
      seeds=seeds,
      steps=_STEPS.value,
      lr=_LR.value,
      batch_size=_BATCH.value,
      kl_solved=_KL.value,
  )
  summary = write_outputs(_RESULTS.value or _WORKDIR.value, grid, embed_dims, value_dims, meta)
  print(json.dumps(summary["smallest"], indent=1))


if __name__ == "__main__":
  from ema_jax import host_memory

  host_memory.reexec()  # as train.py: huge pages for big host buffers (same numbers)
  define_flags()
  app.run(main)
