"""eval.py's work: restore a checkpoint onto this machine's devices and evaluate it, never retraining."""

from __future__ import annotations

import ast
from typing import Optional, Sequence

import jax
import ml_collections

from ema_jax import checkpoint as ckpt_lib
from ema_jax import sharding, trainer
from ema_jax.tasks.base import get_task


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _set(cfg: ml_collections.ConfigDict, dotted: str, value) -> None:
  node = cfg
  parts = dotted.split(".")
  for p in parts[:-1]:
    if p not in node:
      raise ValueError(f"--set {dotted}: the saved config has no field {p!r}.")
    node = node[p]
  if parts[-1] not in node:
    raise ValueError(f"--set {dotted}: the saved config has no field {parts[-1]!r}; fields: {sorted(node.keys())}.")
  node[parts[-1]] = value


def load_config(workdir: str, step: Optional[int] = None, mesh: str = "data=-1",
                overrides: Sequence[str] = (), lengths: Optional[str] = None) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(ckpt_lib.read_config(workdir, step))
  mesh_cfg = dict(data=1, fsdp=1, seq=1)
  for item in (mesh or "").split(","):
    if not item:
      continue
    k, _, v = item.partition("=")
    if k not in mesh_cfg:
      raise ValueError(f"--mesh {mesh!r}: unknown axis {k!r}; axes are data, fsdp, seq.")
    mesh_cfg[k] = int(v)
  cfg.mesh = ml_collections.ConfigDict(mesh_cfg)
  for item in overrides:
    k, sep, v = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected key=value.")
    _set(cfg, k, _parse_value(v))
  if lengths:
    try:
      values = [int(v) for v in lengths.split(",") if v]
    except ValueError:
      raise ValueError(f"--lengths={lengths!r}: expected comma-separated integers.") from None
    field = getattr(type(get_task(cfg)), "EVAL_LENGTHS_FIELD", "eval_lengths")
    cfg.task[field] = values
  return cfg


def run(workdir: str, step: Optional[int] = None, weights: str = "all", lengths: Optional[str] = None,
        mesh: str = "data=-1", overrides: Sequence[str] = ()):
  cfg = load_config(workdir, step, mesh, overrides, lengths)
  setup = trainer.build(cfg)
  setup.task.workdir = workdir
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=10 ** 6, async_save=False)
  steps = checkpointer.all_steps()
  step = steps[-1] if step is None else step
  state, _, _ = checkpointer.restore(step, setup.abstract_state)
  available = trainer.weights_names(setup)
  if weights == "all":
    names = available
  else:
    names = [w.strip() for w in weights.split(",") if w.strip()]
    names = [available[1] if (w in ("ema", "bema") and len(available) > 1) else w for w in names]
    bad = [w for w in names if w not in available]
    if bad:
      raise ValueError(f"--weights={weights!r}: this checkpoint has {available}.")
  results = trainer.evaluate_all(setup, state, workdir, step, weights=names)
  table = setup.task.summarize(results, step, workdir if jax.process_index() == 0 else None)
  tag = "" if (weights == "all" and not lengths) else "_" + "_".join(
      x for x in (weights.replace(",", "-") if weights != "all" else "", (lengths or "").replace(",", "-")) if x)
  path = trainer.write_eval(workdir, step, results, table, tag=tag)
  if jax.process_index() == 0:
    print(table)
    if path:
      print(f"wrote {path}")
  checkpointer.close()
  return results
