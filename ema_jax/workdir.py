"""The workdir's file format: names, atomic writes, metrics.jsonl and eval JSONs.

A training workdir holds config.json, metrics.jsonl (one JSON object per line: {"step": n, name: value,
...}; train rows and eval rows are separate lines), eval_<step>.json ({"step", "results", "table", ...}),
plots/, tensorboard/, checkpoints/ and eval/ (eval.py's outputs). Every reader and writer of these files
goes through this module.

Every JSON file of a workdir is written to a temporary file in the same folder, flushed and fsynced,
then renamed over the target, so a process killed mid-write leaves either the old file or the new one,
never a truncated one. Buckets (gs://...) have no rename; there an object write is already all or
nothing, so the file is written directly.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
from etils import epath

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"  # the run's config, written when it starts (checkpoints hold it too)
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"  # eval.py's outputs: beside the training run's, never over them


def eval_file(step: int, tag: str = "") -> str:
  return f"eval_{step}{tag}.json"


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if hasattr(o, "__array__"):
    return np.asarray(o).tolist()
  raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def dumps(obj: Any, indent: Optional[int] = 1) -> str:
  return json.dumps(obj, indent=indent, default=_json_default)


def write_text_atomic(path, text: str) -> None:
  path = str(path)
  if "://" in path:
    epath.Path(path).write_text(text)
    return
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_json_atomic(path, obj: Any, indent: Optional[int] = 1) -> None:
  write_text_atomic(path, dumps(obj, indent))


# ------------------------------------------------------------------------------------------ eval JSONs

_EVAL_RE = re.compile(r"^eval_(\d+)\.json$")


def eval_path(workdir, step: int, tag: str = "") -> epath.Path:
  return epath.Path(workdir) / eval_file(step, tag)


def write_eval(workdir, step: int, results: Dict[str, Any], table: str = "", tag: str = "", **extra) -> str:
  """Writes eval_<step><tag>.json atomically; returns its path."""
  path = eval_path(workdir, step, tag)
  write_json_atomic(path, dict(step=int(step), results=results, table=table, **extra))
  return str(path)


def eval_steps(workdir) -> List[int]:
  """Steps that have an eval_<step>.json (untagged), in order."""
  d = epath.Path(workdir)
  if not d.is_dir():
    return []
  return sorted(int(m.group(1)) for m in (_EVAL_RE.match(p.name) for p in d.iterdir()) if m)


def read_eval(workdir, step: int, tag: str = "") -> Dict[str, Any]:
  return json.loads(eval_path(workdir, step, tag).read_text())


def latest_eval(workdir) -> Dict[str, Any]:
  """The eval_<step>.json of the largest step; FileNotFoundError if the run has none yet."""
  steps = eval_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir}: no eval_<step>.json (has the run finished?)")
  return read_eval(workdir, steps[-1])


# --------------------------------------------------------------------------------------- metrics.jsonl


def metrics_path(workdir) -> epath.Path:
  return epath.Path(workdir) / METRICS_FILE


def read_metrics(workdir) -> List[Dict[str, Any]]:
  """The rows of metrics.jsonl in file order; a torn line (a killed writer) is skipped (repair_metrics
  reports and mends those)."""
  path = metrics_path(workdir)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def eval_row(results: Dict[str, Any]) -> Dict[str, float]:
  """The metrics.jsonl row of an evaluation: its scalar results as eval/<weights>/<name>."""
  out = {}
  for name, res in results.items():
    for k, v in res.items():
      if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
        out[f"eval/{name}/{k}"] = float(v)
  return out


_STEP_RE = re.compile(r'^\{"step": (\d+)')


def repair_metrics(workdir) -> List[str]:
  """Mends torn lines of metrics.jsonl (a write cut short by a crash or a full disk); returns one warning
  per torn line.

  A torn evaluation row is rebuilt from eval_<step>.json (written after its row, so it exists only if the
  row had been complete), unless the file already holds that step's eval row; any other torn line is
  dropped: its step comes after the restored checkpoint and is computed again, or it cannot be recovered.
  """
  path = metrics_path(workdir)
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  rows, torn = [], []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      rows.append(None)
      torn.append(i)
  if not torn:
    return []
  has_eval = {r.get("step") for r in rows if r and any(k.startswith("eval/") for k in r)}
  warnings = []
  for i in torn:
    m = _STEP_RE.match(lines[i])
    step = int(m.group(1)) if m else None
    what = f"{path}: line {i + 1} is torn ({len(lines[i])} characters: {lines[i][:40]!r}...)"
    source = eval_path(workdir, step) if step is not None else None
    rebuilt = None
    if step is not None and step not in has_eval and '"eval/' in lines[i] and source.exists():
      try:
        rebuilt = {"step": step, **eval_row(json.loads(source.read_text())["results"])}
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        rebuilt = None
    if rebuilt is not None:
      rows[i] = rebuilt
      has_eval.add(step)
      warnings.append(f"WARNING: {what}; rebuilt that evaluation row from {source.name}.")
    else:
      warnings.append(
          f"WARNING: {what}; dropped it (no other copy of it; steps after the checkpoint resumed from are logged again)."
      )
  write_metrics(workdir, [r for r in rows if r is not None])
  return warnings


def append_metrics(workdir, row: Dict[str, Any]) -> None:
  path = metrics_path(workdir)
  try:
    with path.open("a") as f:
      f.write(json.dumps(row) + "\n")
  except OSError as e:
    if e.filename or not e.errno:
      raise
    raise OSError(e.errno, e.strerror, str(path)) from e  # name the file in the one-line error


def truncate_metrics(workdir, step: int, drop_eval_at_step: bool = False) -> List[Dict[str, Any]]:
  """Keeps the rows up to `step` (without `step`'s eval rows if asked), atomically; returns them."""
  rows = [
      r
      for r in read_metrics(workdir)
      if r.get("step", 0) < step
      or (r.get("step", 0) == step and not (drop_eval_at_step and any(k.startswith("eval/") for k in r)))
  ]
  if metrics_path(workdir).exists():
    write_text_atomic(metrics_path(workdir), "".join(json.dumps(r) + "\n" for r in rows))
  return rows


def write_metrics(workdir, rows: List[Dict[str, Any]]) -> None:
  """Replaces metrics.jsonl with `rows` (atomically)."""
  write_text_atomic(metrics_path(workdir), "".join(json.dumps(r) + "\n" for r in rows))
