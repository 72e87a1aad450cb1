"""eval.py's work: restore a checkpoint onto this machine's devices and evaluate it, never retraining.

Its outputs go under <workdir>/eval/ (or --output_dir), beside the training run's eval_<step>.json and
plots/: eval_<step><tag>.json and eval_<step><tag>/plots/, one name per (step, weights, lengths), so
evaluating a subset never replaces the run's own results or another evaluation's.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Optional, Sequence

import jax
import ml_collections
from etils import epath

from ema_jax import checkpoint as ckpt_lib
from ema_jax import trainer
from ema_jax import workdir as workdir_lib
from ema_jax.tasks.base import task_class


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


def load_config(
    workdir: str,
    step: Optional[int] = None,
    mesh: str = "data=-1",
    overrides: Sequence[str] = (),
    lengths: Optional[str] = None,
) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(ckpt_lib.read_config(workdir, step))
  mesh_cfg = dict(data=1, fsdp=1, seq=1)
  for item in (mesh or "").split(","):
    if not item:
      continue
    k, _, v = item.partition("=")
    if k not in mesh_cfg:
      raise ValueError(f"--mesh {mesh!r}: unknown axis {k!r}; axes are data, fsdp, seq.")
    try:
      mesh_cfg[k] = int(v)
    except ValueError:
      raise ValueError(f"--mesh {mesh!r}: {k}={v!r} is not an integer (e.g. data=-1 or data=2,fsdp=2).") from None
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
    field = getattr(task_class(cfg), "EVAL_LENGTHS_FIELD", "eval_lengths")
    check_position_limit(cfg, lengths, values)
    cfg.task[field] = values
  return cfg


def check_position_limit(cfg: ml_collections.ConfigDict, lengths: str, values: Sequence[int]) -> None:
  """A GPT cannot read past its learned positions: --lengths beyond context_len fails here, by name."""
  model = cfg.get("model")
  if not isinstance(model, ml_collections.ConfigDict) or model.get("kind") != "gpt":
    return
  task = task_class(cfg)(cfg)
  context_len = task.model_config().context_len
  too_long = [n for n in values if n > context_len]
  if too_long:
    fit = ",".join(str(n) for n in values if n <= context_len) or str(context_len)
    raise ValueError(
        f"--lengths={lengths}: length {', '.join(map(str, too_long))} exceeds this GPT's context_len="
        f"{context_len} (learned absolute positions 0..{context_len - 1}; it has none for longer windows). "
        f"Evaluate it at lengths up to {context_len} (e.g. --lengths {fit}); the EMA LM has no such limit."
    )


def resolve_step(checkpointer: ckpt_lib.Checkpointer, step: Optional[int], workdir: str) -> int:
  """The step to evaluate (the newest by default); a step without a checkpoint lists those there are."""
  steps = checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(
        f"no checkpoints in {checkpointer.directory}: nothing to evaluate; train first "
        f"(python train.py --config ... --workdir {workdir})."
    )
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(
        f"--step={step}: no checkpoint for it in {checkpointer.directory}; available steps: "
        f"{', '.join(map(str, steps))}."
    )
  return step


def weights_to_evaluate(weights: str, available: Sequence[str]) -> list:
  if weights == "all":
    return list(available)
  names = [w.strip() for w in weights.split(",") if w.strip()]
  # A run with one average answers to either name ('ema' for a BEMA run), as before.
  if len(available) == 2:
    names = [available[1] if w in ("ema", "bema") else w for w in names]
  bad = [w for w in names if w not in available]
  if bad or not names:
    raise ValueError(f"--weights={weights!r}: this checkpoint has {', '.join(available)} (or all).")
  return names


def output_tag(weights: str, lengths: Optional[str]) -> str:
  """'' for the default evaluation, else '_<weights>_<lengths>' (e.g. '_raw_16-32')."""
  parts = (weights.replace(",", "-") if weights != "all" else "", (lengths or "").replace(",", "-"))
  return "".join("_" + p for p in parts if p)


def plots_dir(out_dir: str, step: int, tag: str = "") -> str:
  """Each evaluation's plots in a folder of their own (step, weights, lengths), so that evaluating another
  subset never replaces them: out_dir/eval_<step><tag>/plots."""
  return os.path.join(out_dir, f"eval_{step}{tag}", "plots")


def write_outputs(task, results, table: str, step: int, out_dir: str, tag: str = "") -> str:
  """eval_<step><tag>.json (atomic) and the task's plots in plots_dir(); returns the JSON's path."""
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  path = workdir_lib.write_eval(out_dir, step, results, table, tag=tag)
  task.summarize(results, step, os.path.dirname(plots_dir(out_dir, step, tag)))  # tasks write into <dir>/plots
  return path


def run(
    workdir: str,
    step: Optional[int] = None,
    weights: str = "all",
    lengths: Optional[str] = None,
    mesh: str = "data=-1",
    overrides: Sequence[str] = (),
    output_dir: Optional[str] = None,
):
  """Evaluates one checkpoint of `workdir`; returns {weights name: results}.

  Prints the table first, then writes the JSON and plots under output_dir (default <workdir>/eval):
  beside the training run's own eval_<step>.json and plots/, never over them. Where that cannot be
  written (a read-only workdir), the table is all there is: a warning says so and the run still succeeds.
  """
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=10**6, async_save=False)
  try:
    step = resolve_step(checkpointer, step, workdir)
    cfg = load_config(workdir, step, mesh, overrides, lengths)
    setup = trainer.build(cfg, workdir=workdir)
    names = weights_to_evaluate(weights, trainer.weights_names(setup))
    state, _, _ = checkpointer.restore(step, setup.abstract_state)
    results = trainer.evaluate_all(setup, state, workdir, step, weights=names, final=True)
  finally:
    checkpointer.close()
  if jax.process_index() != 0:
    return results
  table = setup.task.summarize(results, step, None)
  print(table, flush=True)
  out_dir = output_dir or os.path.join(workdir, workdir_lib.EVAL_DIR)
  try:
    path = write_outputs(setup.task, results, table, step, out_dir, output_tag(weights, lengths))
  except OSError as e:
    reason = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
    print(
        f"warning: the results above could not be written to {out_dir} ({reason}); "
        f"pass --output_dir DIR to write them elsewhere.",
        file=sys.stderr,
        flush=True,
    )
  else:
    print(f"wrote {path} and plots in {plots_dir(out_dir, step, output_tag(weights, lengths))}", flush=True)
  return results
