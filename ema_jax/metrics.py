"""Metric writers (console, metrics.jsonl, TensorBoard), progress bar, throughput and MFU.

Only process 0 writes; every other process gets a writer that does nothing.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np
from etils import epath

from ema_jax import workdir as workdir_lib

# Peak dense bf16 FLOP/s per device, for MFU. CPU has no meaningful peak: MFU is left out there.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def device_peak_flops(device: Optional[jax.Device] = None) -> Optional[float]:
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak
  return None


def to_scalar(v):
  v = np.asarray(v)
  if v.dtype == bool:
    return bool(v)
  if np.issubdtype(v.dtype, np.integer):
    return int(v)
  return float(v)


class MetricWriter:
  """Appends {"step": n, ...} lines to <workdir>/metrics.jsonl and TensorBoard events.

  The workdir may be a bucket (gs://...; etils.epath, which needs gcsfs or TensorFlow for gs://).
  """

  def __init__(self, workdir: Optional[str], enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled and workdir is not None
    self.workdir = workdir
    self._tb = None
    self._old_events = []
    if self.enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter

          tb_dir = epath.Path(workdir) / "tensorboard"
          self._old_events = (
              [f for f in tb_dir.iterdir() if f.name.startswith("events.out.tfevents")] if tb_dir.is_dir() else []
          )
          self._tb = SummaryWriter(str(tb_dir))
        except ImportError:  # optional; metrics.jsonl is the record
          self._tb = None

  def resume(self, step: int, drop_eval_at_step: bool = False) -> None:
    """Before a (re)started run writes anything: drops the rows a killed run wrote past `step` (and
    `step`'s eval rows when the final evaluation is redone), then rebuilds TensorBoard from what is
    left, so neither record holds a step twice."""
    if not self.enabled:
      return
    rows = workdir_lib.truncate_metrics(self.workdir, step, drop_eval_at_step)
    self._rebuild_tensorboard(rows)

  def _rebuild_tensorboard(self, rows):
    if self._tb is None:
      return
    # The event files are derived from metrics.jsonl: the new writer replays the kept rows, then the
    # older files (which may hold steps past the restored one) are removed.
    old = self._old_events
    if not old:
      return
    for row in rows:
      self._add_scalars(row)
    self._tb.flush()
    for f in old:
      f.unlink()

  def _add_scalars(self, row):
    step = row["step"]
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({prefix + k: to_scalar(v) for k, v in metrics.items()})
    workdir_lib.append_metrics(self.workdir, row)
    if self._tb is not None:
      self._add_scalars(row)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      tb, self._tb = self._tb, None
      try:
        tb.close()
      except OSError:
        pass  # e.g. a full disk: metrics.jsonl is the record, and a resume rebuilds TensorBoard from it


class Progress:
  """A tqdm bar on process 0 (plain lines when stdout is not a terminal)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")

  def update(self, n: int = 1, **postfix):
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def write(self, msg: str):
    if self.bar is not None:
      self.bar.write(msg)
    else:
      print(msg, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


class Throughput:
  """Tokens/s and MFU between two log points."""

  def __init__(self, tokens_per_step: int, flops_per_token: Optional[float]):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    peak = device_peak_flops()
    self.peak = None if peak is None else peak * jax.device_count()
    self.t0, self.s0 = time.perf_counter(), None

  def reset(self, step):
    self.t0, self.s0 = time.perf_counter(), step

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an in-loop evaluation) out of the current interval's time."""
    self.t0 += seconds

  def measure(self, step) -> Dict[str, float]:
    now = time.perf_counter()
    out = {}
    if self.s0 is not None and step > self.s0:
      dt = now - self.t0
      tps = self.tokens_per_step * (step - self.s0) / dt
      out["steps_per_s"] = (step - self.s0) / dt
      out["tokens_per_s"] = tps
      if self.flops_per_token and self.peak:
        out["mfu"] = tps * self.flops_per_token / self.peak
    self.t0, self.s0 = now, step
    return out
