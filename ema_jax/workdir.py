"""The workdir's file format: names and atomic writes.

Every JSON file of a workdir is written to a temporary file in the same folder, flushed and fsynced,
then renamed over the target, so a process killed mid-write leaves either the old file or the new one,
never a truncated one. Buckets (gs://...) have no rename; there an object write is already all or
nothing, so the file is written directly.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

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
