"""The single generic training loop used by every task.

The trainer owns: the mesh; creating the state directly with its shardings (jit of init with
out_shardings); the jitted, donated train step; dispatching step n before reading the metrics of step
n - 1; the NaN/Inf stop (the step keeps the last good state and the run stops without checkpointing
anything non-finite); periodic eval of raw and averaged weights; checkpoints with the data iterator's
position; preemption (SIGTERM -> save and exit 0); progress bar, tokens/s and MFU.

Exactness of resume: dropout keys are fold_in(seed key, step), the data iterator's position is saved with
the state, and metrics.jsonl is cut back to the restored step, so a killed-and-resumed run writes the same
metrics, step for step, as one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from ema_jax import checkpoint as ckpt_lib
from ema_jax import distributed, metrics as metrics_lib, optim, sharding
from ema_jax.tasks.base import EvalContext, LocalLearningTask, Task, get_task

log = logging.getLogger(__name__)

WEIGHTS = ("raw", "ema")


class NonFiniteError(RuntimeError):
  """Raised when a step produced a NaN or Inf loss or gradient."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  def need_int(name, lo):
    v = config.get(name)
    if not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"config.{name}={v!r}: expected an integer >= {lo}.")
  need_int("steps", 1)
  need_int("batch_size", 1)
  need_int("log_every", 1)
  need_int("eval_every", 0)
  need_int("checkpoint_every", 0)
  need_int("keep_checkpoints", 1)
  need_int("seed", 0)
  optim.validate_optim(config.optim, config.steps)
  optim.validate_weight_ema(config.weight_ema)


@dataclass
class Setup:
  """Everything built from a config before any compilation."""
  config: ml_collections.ConfigDict
  task: Task
  mesh: jax.sharding.Mesh
  graphdef: Any
  abstract_state: Any
  state_shardings: Any
  tx: optax.GradientTransformation
  schedule: Callable
  weight_ema: Any
  init_fn: Callable


def build(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """Validates the config, builds the task, mesh, optimizer and the abstract train state."""
  validate_config(config)
  task = get_task(config)
  task.validate()
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.validate_batch(config.batch_size, _seq_len(config), mesh, shard_seq=mesh.shape["seq"] > 1)
  tx, schedule = optim.make_optimizer(config.optim, config.steps)
  weight_ema = optim.make_weight_ema(config.weight_ema)

  def init_fn(key):
    params_key, dropout_key = jax.random.split(key)
    model = task.build_model(nnx.Rngs(params=params_key))
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    state = dict(step=jnp.zeros((), jnp.int32), params=params, other=other, opt=tx.init(params),
                 rng=dropout_key)
    state["ema"] = None if weight_ema is None else weight_ema.init(params)
    return state, graphdef

  abstract_state, graphdef = _eval_shape_with_static(init_fn, jax.random.key(0))
  shardings = sharding.state_shardings(abstract_state, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, shardings)
  return Setup(config, task, mesh, graphdef, abstract_state, shardings, tx, schedule, weight_ema,
               lambda key: init_fn(key)[0])


def _eval_shape_with_static(fn, *args):
  box = {}

  def only_arrays(*a):
    state, static = fn(*a)
    box["static"] = static
    return state

  return jax.eval_shape(only_arrays, *args), box["static"]


def _seq_len(config):
  for path in ("task.seq_len", "data.seq_len", "model.seq_len"):
    node = config
    ok = True
    for part in path.split("."):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
      else:
        ok = False
        break
    if ok and isinstance(node, int):
      return node
  return None


def make_train_step(setup: Setup):
  task, tx, schedule, wema, graphdef = setup.task, setup.tx, setup.schedule, setup.weight_ema, setup.graphdef

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(state["rng"], step)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["other"])
      return task.loss(model, batch, rngs=nnx.Rngs(dropout=key), train=True)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, step=step + 1, params=params, opt=opt)
    if wema is not None:
      new["ema"] = wema.update(state["ema"], params, step + 1)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Keep the last good state: a non-finite step changes nothing (the host then stops the run).
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(step), finite=finite)
    return new, metrics

  return train_step


def averaged_params(setup: Setup, state):
  """The weight-EMA parameters (debiased EMA or BEMA) as an nnx.State."""
  return setup.weight_ema.value(state["ema"], state["params"])


def make_model(setup: Setup, state, weights: str = "raw"):
  if weights == "raw":
    params = state["params"]
  elif weights == "ema":
    if setup.weight_ema is None:
      raise ValueError("--weights=ema: this run kept no weight EMA (config.weight_ema.kind='none').")
    params = jax.jit(setup.weight_ema.value)(state["ema"], state["params"])
  else:
    raise ValueError(f"weights={weights!r}: accepted raw, ema.")
  return nnx.merge(setup.graphdef, params, state["other"])


def weights_names(setup: Setup):
  return ["raw"] if setup.weight_ema is None else ["raw", setup.weight_ema.kind]


def evaluate_all(setup: Setup, state, workdir: Optional[str], step: int, weights=None) -> Dict[str, Any]:
  """Runs task.evaluate on raw and averaged weights; returns {name: results}."""
  ctx = EvalContext(put_batch=lambda b: sharding.put_local_batch(b, setup.mesh),
                    process_index=jax.process_index(), process_count=jax.process_count(), workdir=workdir)
  results = {}
  with jax.set_mesh(setup.mesh):
    for name in (weights or weights_names(setup)):
      model = make_model(setup, state, "raw" if name == "raw" else "ema")
      results[name] = setup.task.evaluate(model, ctx)
  return results


def write_eval(workdir: Optional[str], step: int, results: Dict[str, Any], table: str,
               tag: str = "") -> Optional[str]:
  if workdir is None or jax.process_index() != 0:
    return None
  path = epath.Path(workdir) / f"eval_{step}{tag}.json"
  path.write_text(json.dumps(dict(step=step, results=results, table=table), indent=1, default=_json_default))
  return str(path)


def _json_default(o):
  if isinstance(o, (np.generic, jax.Array)):
    return np.asarray(o).tolist()
  raise TypeError(type(o))


def scalar_results(results: Dict[str, Any]) -> Dict[str, float]:
  out = {}
  for name, res in results.items():
    for k, v in res.items():
      if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
        out[f"eval/{name}/{k}"] = float(v)
  return out


class _Preemption:
  """SIGTERM sets a flag; the loop saves and exits cleanly at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def restore_or_init(setup: Setup, checkpointer: Optional[ckpt_lib.Checkpointer]):
  """(state, data_state, start_step): the newest readable checkpoint, else a fresh state."""
  if checkpointer is not None:
    restored = checkpointer.restore_latest(setup.abstract_state)
    if restored is not None:
      step, state, data_state, _ = restored
      return state, data_state, step
  init = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)
  with jax.set_mesh(setup.mesh):
    return init(jax.random.key(setup.config.seed)), None, 0


def train(config: ml_collections.ConfigDict, workdir: Optional[str],
          allow_config_change: bool = False) -> Dict[str, Any]:
  """Trains to config.steps (resuming from workdir if it holds checkpoints); returns the final metrics.

  allow_config_change: resume even where the saved config differs in fields that keep the state's
  structure (e.g. the learning rate); structural differences are always refused.
  """
  distributed.initialize_from_env()
  local = get_task(config)
  if isinstance(local, LocalLearningTask):
    local.validate()
    return local.run(workdir)
  setup = build(config)
  task, mesh = setup.task, setup.mesh
  task.workdir = workdir
  is_main = jax.process_index() == 0
  if workdir is not None and is_main:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  checkpointer = (ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
                  if workdir is not None and config.checkpoint_every > 0 else None)
  state, data_state, start = restore_or_init(setup, checkpointer)
  if start:
    writer.truncate_after(start)
  it = task.train_iterator(jax.process_index(), jax.process_count())
  if data_state:
    it.set_state(data_state)

  shard_seq = mesh.shape["seq"] > 1
  put = lambda b: sharding.put_local_batch(b, mesh, shard_seq)
  config_json = json.loads(config.to_json_best_effort())
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state["params"]))
  step_fn = jax.jit(make_train_step(setup), in_shardings=(setup.state_shardings, None),
                    out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
  progress = metrics_lib.Progress(config.steps, start, enabled=is_main)
  thru = metrics_lib.Throughput(config.batch_size * task.tokens_per_example(), task.flops_per_token())
  if is_main:
    progress.write(f"ema_jax: task {config.task.name}, {n_params:,} parameters, mesh {dict(mesh.shape)}, "
                   f"{jax.process_count()} process(es), {jax.device_count()} device(s), start step {start}")

  window: Dict[str, list] = {}
  last: Dict[str, Any] = {}
  pending = None  # (step, device metrics) of the previous step, read after the next is dispatched

  def absorb(step, m):
    m = jax.device_get(m)
    if not bool(m["finite"]):
      raise NonFiniteError(f"step {step}: non-finite loss {float(m['loss'])} or gradient norm "
                           f"{float(m['grad_norm'])}; stopping. The last good checkpoint is kept.")
    for k, v in m.items():
      if k != "finite":
        window.setdefault(k, []).append(float(v))
    progress.update(1, loss=float(m["loss"]))
    if step % config.log_every == 0 or step == config.steps:
      row = {k: float(np.mean(v)) for k, v in window.items()}
      row.update(thru.measure(step))
      window.clear()
      writer.write(step, row)
      last.update(row)
      if is_main:
        progress.write(f"step {step:>7}  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))

  def run_eval(step):
    results = evaluate_all(setup, state, workdir, step)
    table = task.summarize(results, step, workdir if is_main else None)
    scal = scalar_results(results)
    writer.write(step, scal)
    last.update(scal)
    write_eval(workdir, step, results, table)
    if is_main and table:
      progress.write(table)
    return results

  thru.reset(start)
  status = "done"
  # The mesh is the context of every trace, so layers can go sequence-parallel (sharding.auto_traces).
  with _Preemption() as preempt, jax.set_mesh(mesh):
    try:
      for step in range(start, config.steps):
        batch = put(next(it))
        data_pos = it.get_state()
        state, m = step_fn(state, batch)
        if pending is not None:
          absorb(*pending)
        pending = (step + 1, m)
        n = step + 1
        boundary = (config.checkpoint_every and n % config.checkpoint_every == 0) or n == config.steps
        eval_now = config.eval_every and n % config.eval_every == 0 and n != config.steps
        if boundary or eval_now or preempt.requested:
          absorb(*pending)
          pending = None
        if eval_now:
          run_eval(n)
        if checkpointer is not None and (boundary or preempt.requested):
          checkpointer.save(n, state, data_pos, config_json)
        if preempt.requested and n < config.steps:
          status = "preempted"
          if is_main:
            progress.write(f"SIGTERM: saved step {n} and stopping; rerun the same command to resume.")
          break
      if pending is not None:
        absorb(*pending)
      if status == "done":
        run_eval(config.steps)  # the final evaluation always runs
    except NonFiniteError as e:
      status = "nonfinite"
      if is_main:
        progress.write(f"ERROR: {e}")
      raise
    finally:
      progress.close()
      if checkpointer is not None:
        checkpointer.close()
      writer.close()
  last["status"] = status
  return last
