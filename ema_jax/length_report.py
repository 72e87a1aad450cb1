"""Length-generalization reports shared by the tasks that train on short inputs and test on long ones.

A task evaluates per length (set size, board position, ...) and reports each metric per length, its means
inside and beyond the trained range, a text table with a readable subset of the lengths, and one plot per
metric with the trained range shaded. Set complement and Othello use these; their differences (labels,
number format, an extra column or reference line) are arguments.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np

RANGES = ("in_range", "out_of_range")


def range_means(
    lengths: Sequence[int], per_length: Mapping[str, Sequence[float]], train_len: int, metrics: Sequence[str]
) -> Dict[str, float]:
  """{'in_range/<m>': mean over lengths <= train_len, 'out_of_range/<m>': mean beyond}; empty sides left out."""
  lengths = np.asarray(lengths)
  out = {}
  for name, part in (("in_range", lengths <= train_len), ("out_of_range", lengths > train_len)):
    if part.any():
      for m in metrics:
        out[f"{name}/{m}"] = float(np.mean(np.asarray(per_length[m], np.float64)[part]))
  return out


def table_rows(lengths, train_len: int, max_rows: int = 20, margin: int = 1):
  """Lengths to show: every one when few, else the first two, the last, a few inside the trained range,
  those within `margin` of train_len, and an even spread beyond it."""
  lengths = sorted(lengths)
  if len(lengths) <= max_rows:
    return lengths
  keep = {lengths[0], lengths[1], lengths[-1]}
  keep |= {n for n in lengths if abs(n - train_len) <= margin}
  keep |= {n for n in lengths if n < train_len and n % max(train_len // 4, 1) == 0}
  beyond = [n for n in lengths if n > train_len + margin]
  if beyond:
    idx = np.unique(np.linspace(0, len(beyond) - 1, max(max_rows - len(keep), 2)).round().astype(int))
    keep |= {beyond[i] for i in idx}
  return sorted(keep)


def format_table(
    results,
    kinds: Sequence[str],
    *,
    per_key: str,
    length_key: str,
    train_len: int,
    metrics: Sequence[str],
    short: Mapping[str, str],
    title: str,
    length_header: str,
    fmt: Callable[[float], str],
    max_rows: int,
    margin: int,
    extra_column: Optional[tuple] = None,
    range_labels=("in", "out"),
) -> str:
  """One row per shown length ('*' beyond train_len) and one per range, a column per (metric, kind).

  results[kind][per_key][length_key] lists the lengths and results[kind][per_key][m] the values;
  results[kind]['in_range/<m>'] the range means. extra_column = (header, per_key field, fmt) adds the
  first kind's values of that field (blank on the range rows).
  """
  cols = [(m, k) for m in metrics for k in kinds]
  head = [length_header] + [f"{short[m]}:{k}" for m, k in cols] + ([extra_column[0]] if extra_column else [])
  widths = [max(6, len(h)) for h in head]
  lines = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
  ref = results[kinds[0]][per_key]
  index = {k: {n: i for i, n in enumerate(results[k][per_key][length_key])} for k in kinds}
  for n in table_rows(ref[length_key], train_len, max_rows, margin):
    row = [f"{n}{'*' if n > train_len else ' '}"]
    for m, k in cols:
      i = index[k].get(n)
      row.append(fmt(results[k][per_key][m][i]) if i is not None else "-")
    if extra_column:
      row.append(extra_column[2](ref[extra_column[1]][index[kinds[0]][n]]))
    lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
  for part, label in zip(RANGES, range_labels):
    row = [label]
    for m, k in cols:
      v = results[k].get(f"{part}/{m}")
      row.append(fmt(v) if v is not None else "-")
    if extra_column:
      row.append("")
    lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
  return "\n".join(lines)


def plot_per_length(
    results,
    kinds: Sequence[str],
    *,
    per_key: str,
    length_key: str,
    train_len: int,
    metrics: Sequence[str],
    labels: Mapping[str, str],
    log_scale: Sequence[str],
    out_dir: str,
    prefix: str,
    xlabel: str,
    shade_label: str,
    step: Optional[int] = None,
    markersize: Optional[float] = None,
    reference: Optional[Callable] = None,
) -> list:
  """One PNG per metric against length, the trained range shaded, one line per weights kind.

  reference(ax, metric) may draw a reference line (e.g. chance) before the legend.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for m in metrics:
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    ax.axvspan(0.5, train_len + 0.5, color="0.9", label=shade_label)
    for k in kinds:
      per = results[k][per_key]
      kw = {} if markersize is None else {"markersize": markersize}
      ax.plot(per[length_key], per[m], marker=".", label=k, **kw)
    if reference is not None:
      reference(ax, m)
    if m in log_scale and any(v > 0 for k in kinds for v in results[k][per_key][m]):
      ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(labels[m])
    ax.set_title(labels[m] + (f", step {step}" if step is not None else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_{m}.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths
