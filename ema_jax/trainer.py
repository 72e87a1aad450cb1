"""The single generic training loop used by every task.

The trainer owns: the mesh; creating the state directly with its shardings (jit of init with
out_shardings); the jitted, donated train step; dispatching step n before reading the metrics of step
n - 1; the NaN/Inf stop (the step keeps the last good state and the run stops without checkpointing
anything non-finite); periodic eval of raw and averaged weights (in a background thread on a one-device run,
while training goes on: BackgroundEval); checkpoints with the data iterator's
position, every `checkpoint_every` steps and/or every `checkpoint_every_seconds`; preemption (SIGTERM to
any process -> every process saves the same step and exits 0); progress bar, tokens/s and MFU.

Flags that must be decided identically on every process (stop on SIGTERM before the first step, a
time-based checkpoint) travel as one boolean per batch row and are reduced inside the jitted step, so
every process reads the same value with the step's metrics: no extra collective, no host round trip.

Exactness of resume: dropout keys are fold_in(seed key, step), the data iterator's position is saved with
the state, and metrics.jsonl is cut back to the restored step, so a killed-and-resumed run writes the same
metrics, step for step, as one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from ema_jax import checkpoint as ckpt_lib
from ema_jax import distributed, metrics as metrics_lib, optim, preemption, sharding
from ema_jax import resume, trainer_config
from ema_jax import workdir as workdir_lib
from ema_jax import workdir_lock
from ema_jax.tasks.base import BatchIterator, EvalContext, LocalLearningTask, Task, get_task

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Raised when a step produced a NaN or Inf loss or gradient."""


default_config = trainer_config.default_config
validate_config = trainer_config.validate


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
  _average_fns: Dict[str, Callable] = field(default_factory=dict, repr=False)

  def average_fn(self, weights: str) -> Callable:
    """(ema state, params) -> the `weights` average, jitted once per run (every evaluation reuses it)."""
    if weights not in self._average_fns:
      self._average_fns[weights] = jax.jit(lambda e, p: self.weight_ema.value(e, p, weights))
    return self._average_fns[weights]


def build(config: ml_collections.ConfigDict, devices=None, workdir: Optional[str] = None) -> Setup:
  """Validates the config, builds the task, mesh, optimizer and the abstract train state."""
  validate_config(config)
  task = get_task(config, workdir)
  task.validate()
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.validate_batch(config.batch_size, task.seq_len(), mesh, shard_seq=mesh.shape["seq"] > 1)
  tx, schedule = optim.make_optimizer(config.optim, config.steps)
  weight_ema = optim.make_weight_ema(config.weight_ema)

  def init_fn(key):
    params_key, dropout_key = jax.random.split(key)
    model = task.build_model(nnx.Rngs(params=params_key))
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    state = dict(step=jnp.zeros((), jnp.int32), params=params, other=other, opt=tx.init(params), rng=dropout_key)
    state["ema"] = None if weight_ema is None else weight_ema.init(params)
    return state, graphdef

  abstract_state, graphdef = _eval_shape_with_static(init_fn, jax.random.key(0))
  shardings = sharding.state_shardings(abstract_state, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )
  return Setup(
      config, task, mesh, graphdef, abstract_state, shardings, tx, schedule, weight_ema, lambda key: init_fn(key)[0]
  )


def _eval_shape_with_static(fn, *args):
  box = {}

  def only_arrays(*a):
    state, static = fn(*a)
    box["static"] = static
    return state

  return jax.eval_shape(only_arrays, *args), box["static"]


def make_train_step(setup: Setup):
  """The pure step train_step(state, batch) -> (state, metrics) that train() jits.

  Everything a run may vary without changing the program is data in the state: the learning-rate
  multiplier (optimizer state), the weight-EMA decay, the dropout key, and a model's traced dropout rates
  (its non-Param state). jax.vmap(train_step, in_axes=(0, None)) over states stacked on a leading run
  axis therefore trains several runs on one batch stream (experiments/set_complement_sweep.py).
  """
  task, tx, schedule, wema, graphdef = setup.task, setup.tx, setup.schedule, setup.weight_ema, setup.graphdef

  def train_step(state, batch):
    batch = dict(batch)
    preempted = batch.pop(STOP_KEY, None)
    save_due = batch.pop(SAVE_KEY, None)
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
    lr = schedule(step) * optim.lr_scale(state["opt"])
    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=grad_norm,
        lr=lr,
        finite=finite,
        stop=jnp.any(preempted) if preempted is not None else jnp.zeros((), bool),
        save_due=jnp.any(save_due) if save_due is not None else jnp.zeros((), bool),
    )
    return new, metrics

  return train_step


def make_model(setup: Setup, state, weights: str = "raw"):
  """The model with the raw weights or with one of the run's averages ('ema', 'bema')."""
  if weights == "raw":
    params = state["params"]
  else:
    kept = [] if setup.weight_ema is None else setup.weight_ema.names
    if weights not in kept:
      raise ValueError(
          f"--weights={weights}: this run kept {', '.join(['raw'] + kept)} "
          f"(config.weight_ema.kind={setup.config.weight_ema.kind!r})."
      )
    params = setup.average_fn(weights)(state["ema"], state["params"])
  return nnx.merge(setup.graphdef, params, state["other"])


def weights_names(setup: Setup):
  return ["raw"] + ([] if setup.weight_ema is None else list(setup.weight_ema.names))


def evaluate_all(
    setup: Setup, state, workdir: Optional[str], step: int, weights=None, final: bool = False
) -> Dict[str, Any]:
  """Runs task.evaluate on raw and averaged weights; returns {name: results}. final: the run's last
  evaluation or eval.py's (EvalContext.final)."""
  ctx = EvalContext(
      put_batch=lambda b: sharding.put_local_batch(b, setup.mesh),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      workdir=workdir,
      final=final,
  )
  results = {}
  with jax.set_mesh(setup.mesh):
    for name in weights or weights_names(setup):
      model = make_model(setup, state, name)
      results[name] = setup.task.evaluate(model, ctx)
  return results


def write_eval(workdir: Optional[str], step: int, results: Dict[str, Any], table: str, tag: str = "") -> Optional[str]:
  if workdir is None or jax.process_index() != 0:
    return None
  return workdir_lib.write_eval(workdir, step, results, table, tag=tag)


scalar_results = workdir_lib.eval_row


STOP_KEY = "_preempted"  # a per-row flag fed with each batch; the step reduces it over all processes
SAVE_KEY = "_save_due"  # the same for "checkpoint_every_seconds has passed" (per-process clocks, any wins)


class SaveTimer:
  """checkpoint_every_seconds on this process's clock (the step reduces the flag over processes)."""

  def __init__(self, seconds: float):
    self.seconds = float(seconds or 0)
    self.last = time.monotonic()

  def due(self) -> bool:
    return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

  def saved(self) -> None:
    self.last = time.monotonic()


def gather_data_state(it) -> Dict[str, Any]:
  """The whole run's data position: every process's get_state(), merged by the iterator's class."""
  local = it.get_state()
  parts = [local] if jax.process_count() == 1 else sharding.allgather_json(local)
  return getattr(type(it), "merge_states", BatchIterator.merge_states)(parts)


# The parts of the state that evaluate_all reads (make_model): copied for an evaluation in the background.
EVAL_STATE_KEYS = ("params", "ema", "other")


def eval_in_background(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> bool:
  """Whether in-loop evaluations run beside training: config.eval_in_background, on a run of one device.

  Only one: a program over several devices launches one part per device, and two threads launching two
  such programs can reach the devices in different orders, so their collectives could wait on each other
  (NCCL on GPUs, the in-process rendezvous on CPU devices, across processes on TPU hosts).
  """
  return bool(config.get("eval_in_background", True)) and jax.process_count() == 1 and mesh.devices.size == 1


class BackgroundEval:
  """One in-loop evaluation at a time in a thread, on a copy of the step's weights, while training goes on.

  The evaluation's programs and inputs are those of a blocking one, so its results are the same bits; the
  cores a small model's step leaves idle (on a CPU) do the evaluation's work. The trainer publishes the
  results (metrics row, eval JSON, table) from its own thread, and waits for a running evaluation before
  every checkpoint, so an evaluation at step e is on disk before any checkpoint past e: a resume never
  skips one. On several devices or processes, evaluations block (eval_in_background says why).
  """

  def __init__(self, setup: "Setup", workdir: Optional[str]):
    self._setup, self._workdir = setup, workdir
    self._running = None  # (step, thread, outcome)

  @property
  def running(self) -> bool:
    return self._running is not None

  def start(self, state, step: int) -> None:
    assert self._running is None, "one evaluation at a time: finish() the running one first"
    # A copy: the next step donates the state's buffers.
    snapshot = {k: jax.tree.map(lambda x: x.copy(), state[k]) for k in EVAL_STATE_KEYS if k in state}
    jax.block_until_ready(snapshot)
    outcome: Dict[str, Any] = {}

    def work():
      try:
        outcome["results"] = evaluate_all(self._setup, snapshot, self._workdir, step)
      except BaseException as e:  # re-raised in the trainer's thread by finish()
        outcome["error"] = e

    thread = threading.Thread(target=work, name=f"ema_jax-eval-{step}", daemon=True)
    thread.start()
    self._running = (step, thread, outcome)

  def finish(self, wait: bool = True) -> Optional[Tuple[int, Dict[str, Any], float]]:
    """(step, results, seconds waited) of the running evaluation once it is done; None if none is running
    or (wait=False) it is still running. An error of the evaluation is raised here."""
    if self._running is None:
      return None
    step, thread, outcome = self._running
    if not wait and thread.is_alive():
      return None
    t0 = time.perf_counter()
    thread.join()
    self._running = None
    if "error" in outcome:
      raise outcome["error"]
    return step, outcome["results"], time.perf_counter() - t0

  def abandon(self, timeout: float = 120.0) -> None:
    """Drops a running evaluation (the run is ending on an error), waiting up to `timeout` seconds for its
    thread, so the interpreter does not shut JAX down under a running program."""
    if self._running is not None:
      self._running[1].join(timeout)
      self._running = None


def train(
    config: ml_collections.ConfigDict, workdir: Optional[str], allow_config_change: bool = False
) -> Dict[str, Any]:
  """Trains to config.steps (resuming from workdir if it holds checkpoints); returns the final metrics.

  allow_config_change: resume even where the saved config differs in fields that keep the state's
  structure (e.g. the learning rate); structural differences are always refused.
  """
  preemption.install()
  distributed.initialize_from_env()
  if isinstance(get_task(config), LocalLearningTask):
    raise ValueError(
        f"config.task.name={config.task.name!r} is fitted by a local rule, not by gradient steps: run it "
        "with train.py or ema_jax.launch.run(config, workdir)."
    )
  setup = build(config, workdir=workdir)
  with workdir_lock.held(workdir):  # one writer per workdir: taken before anything is written to it
    try:
      return _train_locked(config, setup, workdir, allow_config_change)
    except OSError as e:  # a full disk under metrics, evals or plots: one line, like a checkpoint's
      if workdir is None or not ckpt_lib.is_disk_full(e):
        raise
      ckpt = ckpt_lib.Checkpointer(workdir, max(1, config.keep_checkpoints))
      raise ckpt_lib.CheckpointWriteError(
          ckpt_lib.write_error_message(ckpt.directory, e, None, ckpt.all_steps(), what=e.filename or f"to {workdir}")
      ) from e


def _train_locked(config, setup: Setup, workdir: Optional[str], allow_config_change: bool) -> Dict[str, Any]:
  """train() once this run holds the workdir's lock (ema_jax/workdir_lock.py)."""
  task, mesh = setup.task, setup.mesh
  is_main = jax.process_index() == 0
  config_json = json.loads(config.to_json_best_effort())

  # Read, refuse or set aside before anything is written to the workdir.
  checkpointer = (
      ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
      if workdir is not None and (config.checkpoint_every > 0 or config.get("checkpoint_every_seconds", 0) > 0)
      else None
  )
  restored = (
      checkpointer.restore_latest(setup.abstract_state, config_json, allow_config_change)
      if checkpointer is not None
      else None
  )
  if restored is None and workdir is not None:
    resume.check_run_config(workdir, config_json, allow_config_change)
  if restored is not None:
    resume.check_resume(workdir, config, config_json, checkpointer, restored[0])
  it = task.train_iterator(jax.process_index(), jax.process_count())
  if restored is not None:
    start, state, data_state, loop_state = restored
    resume.restore_data(it, data_state, start)
    if allow_config_change and ckpt_lib.config_differences(checkpointer.read_config(start), config_json):
      with jax.set_mesh(mesh):
        state = resume.apply_config(setup, state)
  else:
    start, loop_state = 0, {}
    init = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)
    with jax.set_mesh(mesh):
      state = init(jax.random.key(config.seed))

  final_eval_path = workdir_lib.eval_path(workdir, config.steps) if workdir else None
  finished = start >= config.steps
  if workdir is not None and is_main:
    for warning in workdir_lib.repair_metrics(workdir):
      print(warning, flush=True)
    if restored is None and workdir_lib.read_metrics(workdir):
      print(
          f"WARNING: {workdir} holds no checkpoint to resume from; its {workdir_lib.METRICS_FILE} "
          f"(up to step {max(r.get('step', 0) for r in workdir_lib.read_metrics(workdir))}) is being "
          "replaced by this run's, from step 0.",
          flush=True,
      )
  if finished and final_eval_path is not None and final_eval_path.exists():
    return resume.report_finished(final_eval_path, checkpointer, is_main)

  if workdir is not None and is_main:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    workdir_lib.write_json_atomic(epath.Path(workdir) / workdir_lib.CONFIG_FILE, config_json)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  # Rows a killed run wrote past the restored step go (and the final eval's, when it is redone), and
  # TensorBoard is rebuilt from what is left, so a resumed run's records equal an uninterrupted one's.
  writer.resume(start, drop_eval_at_step=finished)

  shard_seq = mesh.shape["seq"] > 1
  put = lambda b: sharding.put_local_batch(b, mesh, shard_seq)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state["params"]))
  step_fn = jax.jit(
      make_train_step(setup),
      in_shardings=(setup.state_shardings, None),
      out_shardings=(setup.state_shardings, None),
      donate_argnums=(0,),
  )
  progress = metrics_lib.Progress(config.steps, start, enabled=is_main)
  thru = metrics_lib.Throughput(config.batch_size * task.tokens_per_example(), task.flops_per_token())
  if is_main:
    progress.write(
        f"ema_jax: task {config.task.name}, {n_params:,} parameters, mesh {dict(mesh.shape)}, "
        f"{jax.process_count()} process(es), {jax.device_count()} device(s), start step {start}"
    )

  # The running means of the current log window survive a checkpoint, so a row logged after a resume
  # averages the same steps as in an uninterrupted run.
  window: Dict[str, list] = {k: list(v) for k, v in dict(loop_state.get("window", {})).items()}
  last: Dict[str, Any] = {}
  pending = None  # (step, device metrics) of the previous step, read after the next is dispatched

  saved_at = {"step": start if restored is not None else None}  # the newest checkpoint of this workdir
  timer = SaveTimer(config.get("checkpoint_every_seconds", 0))

  def absorb(step, m) -> Tuple[bool, bool]:
    """Logs step `step`'s metrics; returns its (stop, time-based save due) flags."""
    m = jax.device_get(m)
    if not bool(m["finite"]):
      if restored is not None and saved_at["step"] == start:
        kept = (
            f"This run resumed from the checkpoint of step {start} ({checkpointer.step_dir(start)}) "
            f"{step - start} step(s) earlier and saved none since; it is kept."
        )
      elif saved_at["step"] is not None:
        kept = f"The newest checkpoint (step {saved_at['step']}) is kept."
      else:
        kept = "No checkpoint was saved."
      raise NonFiniteError(
          f"step {step}: non-finite loss {float(m['loss'])} or gradient norm "
          f"{float(m['grad_norm'])}; stopping. {kept}"
      )
    for k, v in m.items():
      if k not in ("finite", "stop", "save_due"):
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
    # A flag set before the newest save was already served by it.
    return bool(m["stop"]), bool(m["save_due"]) and step > (saved_at["step"] or 0)

  def publish_eval(step, results):
    final = step == config.steps
    # Plots go to fixed names under <workdir>/plots, so only the final evaluation's last; the in-loop ones
    # draw none (eval.py draws them for any step).
    table = task.summarize(results, step, workdir if is_main and final else None)
    scal = scalar_results(results)
    writer.write(step, scal)  # the row first: an eval JSON on disk means its row is in metrics.jsonl
    last.update(scal)
    write_eval(workdir, step, results, table)
    if is_main and table:
      progress.write(table)
    return results

  def run_eval(step):
    return publish_eval(step, evaluate_all(setup, state, workdir, step, final=step == config.steps))

  background = BackgroundEval(setup, workdir) if eval_in_background(config, mesh) else None

  def finish_background(wait=True):
    """Publishes the background evaluation once it is done (wait: block until it is)."""
    done = background.finish(wait) if background is not None else None
    if done is not None:
      step, results, waited = done
      thru.exclude(waited)  # tokens/s counts training time only
      publish_eval(step, results)

  def save(n):
    data_pos = gather_data_state(it)
    # A copy: the save is asynchronous and the window changes with the next step.
    loop = {"window": {k: list(v) for k, v in window.items()}}
    checkpointer.save(n, state, data_pos, loop, config_json)
    saved_at["step"] = n
    timer.saved()

  thru.reset(start)
  status = "done"
  eval_at = frozenset(int(s) for s in config.get("eval_steps", ()))
  # The mesh is the context of every trace, so layers can go sequence-parallel (seq_parallel.auto_traces).
  with jax.set_mesh(mesh):
    try:
      if not finished and preemption.requested() and jax.process_count() == 1:
        # SIGTERM during start-up: nothing new to save. (With several processes the flag goes through
        # the first step, so that every process stops at the same step.)
        status = "preempted"
        if is_main:
          progress.write(f"SIGTERM before the first step: nothing new to save (step {start}); exiting.")
      for step in range(start, config.steps if status == "done" else start):
        batch = next(it)
        rows = next(iter(batch.values())).shape[0]
        batch[STOP_KEY] = np.full((rows,), preemption.requested(), bool)
        batch[SAVE_KEY] = np.full((rows,), timer.due(), bool)
        state, m = step_fn(state, put(batch))
        stop = save_due = False
        if pending is not None:
          stop, save_due = absorb(*pending)
        pending = (step + 1, m)
        n = step + 1
        # Several processes: JAX's preemption sync (every process calls it at every step).
        stop = preemption.sync_point_reached(n) or stop
        boundary = (config.checkpoint_every and n % config.checkpoint_every == 0) or n == config.steps
        periodic = config.eval_every and n % config.eval_every == 0
        eval_now = (periodic or n in eval_at) and n != config.steps
        if boundary or eval_now or stop or save_due:
          now_stop, now_due = absorb(*pending)
          stop, save_due = stop or now_stop, save_due or now_due
          pending = None
        if checkpointer is not None:
          checkpointer.check_saved()  # a failed async save (e.g. a full disk) stops the run here
        finish_background(wait=False)
        if eval_now and background is not None:
          finish_background()  # one at a time
          background.start(state, n)
        elif eval_now:
          t_eval = time.perf_counter()
          run_eval(n)
          thru.exclude(time.perf_counter() - t_eval)  # tokens/s counts training time only
        if checkpointer is not None and (boundary or stop or save_due):
          finish_background()  # an evaluation is on disk before any checkpoint past its step
          save(n)
        if stop and n < config.steps:
          status = "preempted"
          if is_main:
            progress.write(
                f"SIGTERM: saved step {n} and stopping; rerun the same command to resume."
                if checkpointer is not None
                else f"SIGTERM: stopping at step {n} (no checkpoints)."
            )
          break
      if pending is not None:
        absorb(*pending)
      finish_background()
      if status == "done":
        run_eval(config.steps)  # the final evaluation always runs
    except NonFiniteError as e:
      status = "nonfinite"
      finish_background()  # an evaluation of earlier, finite weights still counts
      if is_main:
        progress.write(f"ERROR: {e}")
      raise
    finally:
      if background is not None:
        background.abandon()  # on an error: its result is not written, but it is not cut off mid-program
      progress.close()
      if checkpointer is not None:
        checkpointer.close()
      writer.close()
  last["status"] = status
  return last
