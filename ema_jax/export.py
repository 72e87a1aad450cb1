"""A trained language model out of its workdir: restore it, export it to safetensors, load it back.

  python -m ema_jax.export --workdir W [--out model.safetensors] [--weights raw|ema|bema] [--step N]

writes the chosen weights (each NNX parameter path, e.g. 'blocks/0/mix/kernel', -> a float32 array) to
model.safetensors and beside it model.json: the model kind ('ema_lm', 'gpt', ...), every field of its
model config, the tokenizer, the step and weights exported and the run's whole training config (so a
task, and evaluation, can be rebuilt without the orbax checkpoint). `load_exported(path)` returns
(model, info); generate.py --export PATH and `evaluate_exported` use it.

safetensors (Hugging Face's format: a JSON header of names, dtypes, shapes and offsets, then raw
little-endian bytes) was chosen because any framework reads it without running code from the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

FORMAT = "ema_jax.export/1"
SUFFIX = ".safetensors"


def info_path(path: str) -> str:
  """model.json beside model.safetensors."""
  return path[: -len(SUFFIX)] + ".json" if path.endswith(SUFFIX) else path + ".json"


def _jsonable(value):
  if isinstance(value, tuple):
    return [_jsonable(v) for v in value]
  return value


def restore_model(workdir: str, *, step: Optional[int] = None, weights: str = "raw", mesh: str = "data=-1"):
  """(model, info) of a training workdir's checkpoint, restored onto this machine's devices.

  weights: 'raw' or one of the run's averages ('ema', 'bema'; a run with one average answers to either).
  """
  from ema_jax import checkpoint as ckpt_lib
  from ema_jax import evaluation, trainer

  checkpointer = ckpt_lib.Checkpointer(workdir, keep=10**6, async_save=False)
  try:
    step = evaluation.resolve_step(checkpointer, step, workdir)
    cfg = evaluation.load_config(workdir, step, mesh)
    setup = trainer.build(cfg, workdir=workdir)
    names = evaluation.weights_to_evaluate(weights, trainer.weights_names(setup))
    if len(names) != 1:
      raise ValueError(f"--weights={weights!r}: name one of {', '.join(trainer.weights_names(setup))}.")
    state, _, _ = checkpointer.restore(step, setup.abstract_state)
  finally:
    checkpointer.close()
  model = trainer.make_model(setup, state, names[0])
  return model, model_info(cfg, setup.task, step, names[0])


def model_info(cfg: ml_collections.ConfigDict, task, step: int, weights: str) -> dict:
  """What load_exported needs to rebuild the model and its tokenizer, as JSON-ready values."""
  if not hasattr(task, "model_config") or "kind" not in cfg.model:
    raise ValueError(
        f"export: task {cfg.task.name!r} has no language model to export (config.model.kind); "
        f"export works for the lm task (ema_lm, gpt, aggregator)."
    )
  model_cfg = task.model_config()
  tok = task.tokenizer
  return dict(
      format=FORMAT,
      task=cfg.task.name,
      model_kind=cfg.model.kind,
      model_config={k: _jsonable(v) for k, v in dataclasses.asdict(model_cfg).items()},
      tokenizer=dict(name=tok.name, vocab_size=int(tok.vocab_size), eod_id=int(tok.eod_id)),
      step=int(step),
      weights=weights,
      config=json.loads(cfg.to_json_best_effort()),
  )


def flat_params(model) -> dict:
  """{'a/b/kernel': float32 NumPy array} of every nnx.Param of the model."""
  pure = nnx.state(model, nnx.Param).to_pure_dict()
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out[name] = np.ascontiguousarray(np.asarray(jax.device_get(leaf), np.float32))
  return out


def save(model, info: dict, out: str) -> tuple:
  """Writes out (.safetensors) and its .json; returns both paths."""
  from safetensors.numpy import save_file

  if not out.endswith(SUFFIX):
    raise ValueError(f"export: --out={out!r}; expected a path ending in {SUFFIX} (e.g. model{SUFFIX}).")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  save_file(flat_params(model), out, metadata=dict(format=FORMAT, model_kind=str(info["model_kind"])))
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(out, 0o666 & ~mask)  # safetensors writes through a private temporary file (mode 0600)
  meta = info_path(out)
  tmp = meta + ".tmp"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  os.replace(tmp, meta)
  return out, meta


def default_out(workdir: str, step: int, weights: str) -> str:
  """Where an export goes unless --out says otherwise: inside the run's workdir, never the current folder."""
  return os.path.join(workdir, "export", f"step_{step}_{weights}{SUFFIX}")


def export(workdir: str, out: Optional[str] = None, *, weights: str = "raw", step: Optional[int] = None) -> tuple:
  model, info = restore_model(workdir, step=step, weights=weights)
  return save(model, info, out or default_out(workdir, info["step"], info["weights"]))


def _model_class(kind: str):
  from ema_jax import models

  if kind not in models.MODEL_KINDS:
    raise ValueError(f"load_exported: model kind {kind!r}; this version knows {', '.join(models.MODEL_KINDS)}.")
  entry = models.sequence_model(kind)
  return entry.config_cls, entry.model_cls


def read_info(path: str) -> dict:
  meta = info_path(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"load_exported: {path} does not exist; write one with " f"`python -m ema_jax.export --workdir W --out {path}`."
    )
  if not os.path.exists(meta):
    raise FileNotFoundError(
        f"load_exported: {meta} (the model config beside {path}) does not exist; export writes both, "
        f"keep them together."
    )
  try:
    with open(meta) as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"load_exported: {meta} is not valid JSON ({e}); export the model again.") from None
  if not isinstance(info, dict) or info.get("format") != FORMAT:
    raise ValueError(f"load_exported: {meta} is not an ema_jax export (format {FORMAT!r}); export the model again.")
  return info


def load_exported(path: str):
  """(model, info) from an export: the model with exactly the exported float32 weights, info as model.json."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  info = read_info(path)
  cfg_cls, model_cls = _model_class(info["model_kind"])
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in info["model_config"].items()}
  model = model_cls(cfg_cls(**fields), rngs=nnx.Rngs(0))
  try:
    arrays = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(
        f"load_exported: {path} is not a readable safetensors file ({e}); export the model again."
    ) from None
  expected = flat_params(model)
  missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
  bad = [k for k in expected if k in arrays and arrays[k].shape != expected[k].shape]
  if missing or extra or bad:
    raise ValueError(
        f"load_exported: {path} does not match its {info['model_kind']} config: missing {missing[:5]}, "
        f"unexpected {extra[:5]}, wrong shapes {bad[:5]}; export the model again."
    )
  params = nnx.state(model, nnx.Param)
  pure = params.to_pure_dict()
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(pure)
  names = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in leaves_with_path]
  pure = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[n]) for n in names])
  nnx.replace_by_pure_dict(params, pure)
  nnx.update(model, params)
  return model, info


def evaluate_exported(path: str, lengths=None) -> dict:
  """The lm task's evaluation (loss, perplexity, bits per byte; final, whole splits) of an export."""
  from ema_jax.tasks.base import EvalContext, get_task

  model, info = load_exported(path)
  cfg = ml_collections.ConfigDict(info["config"])
  if lengths:
    cfg.task.eval_lengths = list(lengths)
  task = get_task(cfg)
  task.validate()
  ctx = EvalContext(
      put_batch=lambda b: jax.tree.map(jnp.asarray, b), process_index=0, process_count=1, workdir=None, final=True
  )
  return task.evaluate(model, ctx)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ema_jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="A training workdir.")
  parser.add_argument(
      "--out",
      default=None,
      help="Output path ending in .safetensors (model.json goes beside); default "
      "<workdir>/export/step_<step>_<weights>.safetensors.",
  )
  parser.add_argument("--weights", default="raw", help="raw or one of the run's averages (ema, bema).")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
  args = parser.parse_args(argv)
  from ema_jax import errors

  try:
    out, meta = export(args.workdir, args.out, weights=args.weights, step=args.step)
  except errors.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out} and {meta}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
