"""The set-complement sweep's training and evaluation: the trainer's step vmapped over the runs of a group,
the plateau rule, each weights' fitted temperature, and the per-size metrics (experiments/set_complement_sweep.py).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ema_jax import optim, temperature, trainer
from ema_jax.tasks import set_complement as sc
from ema_jax.tasks import set_complement_metrics as scm
from experiments.set_complement_sweep_sampling import average_names, hyper_arrays

# The metrics as-is and the attention's (no temperature changes it); the tempered ones (t_*) come with a
# fitted temperature.
AS_IS = scm.BASE_METRICS + scm.ATTENTION
ALL_METRICS = scm.BASE_METRICS + scm.TEMPERED + scm.ATTENTION


def group_config(
    config: ml_collections.ConfigDict, embed_dim: int, value_dim: int, num_heads: int, burn_ins: Sequence[int]
) -> ml_collections.ConfigDict:
  """The train.py config of a group's runs: their dims, the debiased EMA and one BEMA per burn-in
  ('bema_<tau>'), dropout rates held in the model's state, peak learning rate 1 (each run's lr is its
  lr_scale)."""
  c = ml_collections.ConfigDict(config.to_dict())
  del c["sweep"]
  c.model.update(
      embed_dim=embed_dim, value_dim=value_dim, num_heads=num_heads, dropout=0.0, dropout_on="", traced_dropout=True
  )
  c.optim.lr = 1.0
  c.weight_ema.kind = ",".join(average_names(burn_ins))
  return c


def fit_temperature_device(logits_BN: jax.Array, target_BN: jax.Array, iters: int = 64) -> jax.Array:
  """temperature.fit_temperature's T (the minimiser of the mean cross-entropy of softmax(logits / T)
  against the targets) in float32 on device, so that it vmaps over runs: bisection on the sign of the
  derivative in log beta (beta = 1 / T) over temperature.BETA_RANGE, the bound where the optimum lies beyond.
  """
  z_BN = logits_BN.astype(jnp.float32)
  # Shift each row so that its target mean is 0: softmax is unchanged and the derivative,
  # mean(E_p[z] - E_target[z]), is then one term, without the cancellation of two large ones.
  z_BN = z_BN - (target_BN * z_BN).sum(-1, keepdims=True)
  grad = lambda log_beta: jnp.mean((jax.nn.softmax(jnp.exp(log_beta) * z_BN, axis=-1) * z_BN).sum(-1))
  lo0, hi0 = (jnp.log(jnp.float32(b)) for b in temperature.BETA_RANGE)

  def body(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    up = grad(mid) > 0  # the cross-entropy rises past mid: the optimum is below
    return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

  lo, hi = jax.lax.fori_loop(0, iters, body, (lo0, hi0))
  beta = jnp.exp(0.5 * (lo + hi))
  beta = jnp.where(
      grad(lo0) >= 0, temperature.BETA_RANGE[0], jnp.where(grad(hi0) <= 0, temperature.BETA_RANGE[1], beta)
  )
  return 1.0 / beta


class GroupPrograms:
  """The trainer's setup and step for all runs sharing dims and heads, vmapped over runs; every run keeps
  the debiased EMA and a BEMA per burn-in of `burn_ins` (an int: one)."""

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      embed_dim: int,
      value_dim: int,
      num_heads: int,
      burn_ins: Union[int, Sequence[int]],
  ):
    burn_ins = [burn_ins] if isinstance(burn_ins, int) else list(burn_ins)
    self.setup = trainer.build(group_config(config, embed_dim, value_dim, num_heads, burn_ins))
    self.averages = list(self.setup.weight_ema.names)
    self.names = ["raw"] + self.averages
    self.num_tokens = self.setup.task.num_tokens
    # Runs share the batch; everything else (the whole train state) has a leading run axis.
    step = jax.vmap(trainer.make_train_step(self.setup), in_axes=(0, None))

    def chunk(state, batches_K):
      def body(st, batch):
        st, m = step(st, batch)
        # The loss of a step that kept no update (non-finite loss or gradient) reads as NaN.
        return st, jnp.where(m["finite"], m["loss"], jnp.nan)

      return jax.lax.scan(body, state, batches_K)

    self.init = jax.jit(jax.vmap(self.init_one))
    self.train_chunk = jax.jit(chunk, donate_argnums=0)
    self.averaged = jax.jit(jax.vmap(self.averaged_one))
    self.eval_metrics = jax.jit(jax.vmap(self.eval_one, in_axes=(0, 0, None, None, 0)))
    self.check_logits = jax.jit(jax.vmap(self.check_one, in_axes=(0, 0, None, None)))
    self.check_kl = jax.jit(jax.vmap(self.kl_one, in_axes=(0, 0, None, None)))
    self.fit_temperature = jax.jit(jax.vmap(fit_temperature_device))

  def init_one(self, hp):
    """The trainer's initial state for seed hp['key'], with the run's lr, dropout rates and EMA decay."""
    s = self.setup
    state = s.init_fn(hp["key"])
    model = nnx.merge(s.graphdef, state["params"], state["other"])
    model.dropout_rates.value = hp["rates"]
    _, _, other = nnx.split(model, nnx.Param, ...)
    state = dict(state, other=other, opt=optim.set_lr_scale(state["opt"], hp["lr"]))
    state["ema"] = dict(state["ema"], ema=state["ema"]["ema"]._replace(decay=hp["decay"]))
    return state

  def averaged_one(self, state):
    """{average name: params} of one run."""
    return {k: self.setup.weight_ema.value(state["ema"], state["params"], k) for k in self.averages}

  def eval_one(self, params, other, tokens_BL, mask_BL, beta):
    """The task's metrics (ema_jax/tasks/set_complement.py) as-is, at inverse temperature beta, and of
    the attention; batch means."""
    state = nnx.merge_state(params, other)
    # The full forward (set_complement.set_logits): runs merged across reruns keep their bits.
    batch = dict(tokens=tokens_BL, mask=mask_BL)
    return sc._eval_metrics(self.setup.graphdef, state, batch, self.num_tokens, beta, full_forward=True)

  def check_one(self, params, other, tokens_BL, mask_BL):
    """(logits [B, N], uniform targets over the absent tokens [B, N]) of one run on a check batch."""
    state = nnx.merge_state(params, other)
    batch = dict(tokens=tokens_BL, mask=mask_BL)
    return sc._check_logits(self.setup.graphdef, state, batch, self.num_tokens, full_forward=True)

  def kl_one(self, params, other, tokens_BL, mask_BL):
    """The mean KL of one run on a batch (the plateau check's, without the other metrics' cost)."""
    logits_BN, target_BN = self.check_one(params, other, tokens_BL, mask_BL)
    present_BN = (target_BN == 0).astype(jnp.float32)
    return jnp.mean(scm.complement_metrics(logits_BN, present_BN)["kl"])

  def weights(self, state, name: str, averaged=None):
    """The params [R, ...] of weights `name` ('raw' or an average)."""
    if name == "raw":
      return state["params"]
    return (self.averaged(state) if averaged is None else averaged)[name]


def chunk_length(steps: int, chunk_steps: int) -> int:
  """The largest divisor of steps <= chunk_steps (equal chunks compile once), unless that is much smaller."""
  k = next(k for k in range(min(chunk_steps, steps), 0, -1) if steps % k == 0)
  return k if 4 * k >= min(chunk_steps, steps) else min(chunk_steps, steps)


class TrainingStream:
  """The shared training stream (process 0 of 1) in chunks of K stacked batches, built as far as needed and
  kept, so every group reads the same batches."""

  def __init__(self, config: ml_collections.ConfigDict, chunk_steps: int):
    self.steps = int(config.steps)
    self.k = chunk_length(self.steps, chunk_steps)
    self._it = sc.SetComplementTask(config).train_iterator(0, 1)
    self._chunks: List[Dict[str, np.ndarray]] = []

  def __len__(self):
    return -(-self.steps // self.k)

  def chunk(self, i: int) -> Dict[str, np.ndarray]:
    while len(self._chunks) <= i:
      start = len(self._chunks) * self.k
      batches = [next(self._it) for _ in range(min(self.k, self.steps - start))]
      self._chunks.append({k: np.stack([b[k] for b in batches]) for k in batches[0]})
    return self._chunks[i]


def training_chunks(config: ml_collections.ConfigDict, chunk_steps: int):
  """[{name: [K, ...]}]: every chunk of the shared training stream up to config.steps."""
  stream = TrainingStream(config, chunk_steps)
  return [stream.chunk(i) for i in range(len(stream))]


def plateau_check(history: Sequence[float], patience: int, rel_tol: float) -> bool:
  """True when none of the last `patience` values beat the best earlier value by more than rel_tol."""
  h = np.asarray(history, np.float64)
  if h.size <= patience or not np.all(np.isfinite(h)):
    return False
  return bool(h[-patience:].min() > (1.0 - rel_tol) * h[:-patience].min())


def in_range_kl(programs: GroupPrograms, state, batches) -> np.ndarray:
  """[R] mean KL of the raw weights over the in-range check batches (one per size)."""
  kls = [np.asarray(programs.check_kl(state["params"], state["other"], b["tokens"], b["mask"])) for b in batches]
  return np.mean(kls, axis=0)


def train_group(programs: GroupPrograms, runs, chunks, check_batches=None, sweep=None, log=None, stop_at_plateau=False):
  """Trains the group's runs together.

  chunks: a TrainingStream or a list of chunks. With check_batches and sweep, the raw in-range KL of every
  run is measured after each chunk and training stops once every run has plateaued (plateau_check, after
  sweep.min_steps) or the stream ends. stop_at_plateau: each run's state is the one of the check at which it
  plateaued (it trains no further), and once at most 2/3 of the runs in the vmapped batch still train, the
  batch shrinks to them (a recompile, then less compute per step). Returns (final states [R, ...],
  losses [steps, R] (NaN where a step failed or the run no longer trained), info {steps (the most trained),
  steps_trained [R], history [checks, R] (NaN once stopped), check_steps, plateau_step [R] (None: not
  reached), diverged [R]}).
  """
  state = programs.init(hyper_arrays(runs))
  n_runs = len(runs)
  n = len(chunks)
  get = chunks.chunk if isinstance(chunks, TrainingStream) else chunks.__getitem__
  losses, history, check_steps = [], [], []
  plateau_step: List[Optional[int]] = [None] * n_runs
  steps_trained = [0] * n_runs
  diverged = np.zeros(n_runs, bool)
  active = list(range(n_runs))  # the runs of the vmapped batch, in its order
  finished: Dict[int, Any] = {}  # run -> its state, once it stopped training
  steps = 0
  row = lambda st, i: jax.tree.map(lambda a: a[i], st)  # a copy: the batch's buffers are donated next
  for i in range(n):
    batches_K = get(i)
    state, loss_KA = programs.train_chunk(state, batches_K)
    loss_KA = np.asarray(loss_KA)
    k = loss_KA.shape[0]
    loss_KR = np.full((k, n_runs), np.nan)
    training = [j for j in active if j not in finished]
    pos = {j: a for a, j in enumerate(active)}
    loss_KR[:, training] = loss_KA[:, [pos[j] for j in training]]
    losses.append(loss_KR)
    steps += k
    for j in training:
      steps_trained[j] = steps
      diverged[j] |= not np.all(np.isfinite(loss_KR[:, j]))
    if check_batches is None:
      continue
    kl_A = in_range_kl(programs, state, check_batches)
    kl_R = np.full(n_runs, np.nan)
    kl_R[training] = kl_A[[pos[j] for j in training]]
    history.append(kl_R)
    check_steps.append(steps)
    hist = np.stack(history)
    for j in training:
      # A run that still trains has trained since the start: its history has no gaps.
      if (
          plateau_step[j] is None
          and steps >= sweep.min_steps
          and plateau_check(hist[:, j], sweep.patience, sweep.rel_tol)
      ):
        plateau_step[j] = steps
      if stop_at_plateau and (plateau_step[j] is not None or diverged[j]):
        finished[j] = row(state, pos[j])
    if all(plateau_step[j] is not None or diverged[j] for j in range(n_runs)):
      break
    still = [j for j in active if j not in finished]
    if stop_at_plateau and 3 * len(still) <= 2 * len(active):
      idx = np.asarray([pos[j] for j in still])
      state = jax.tree.map(lambda a: a[idx], state)
      active = still
    if log is not None and len(check_steps) % 8 == 0:
      log(f"    step {steps}: {sum(p is not None for p in plateau_step)}/{n_runs} runs at their plateau")
  if log is not None and check_batches is not None:
    log(f"    stopped at step {steps}: {sum(p is not None for p in plateau_step)}/{n_runs} runs at their plateau")
  if finished:
    pos = {j: a for a, j in enumerate(active)}
    host = [finished[j] if j in finished else row(state, pos[j]) for j in range(n_runs)]
    state = jax.tree.map(lambda *a: jnp.stack(a), *host)
  info = dict(
      steps=steps,
      steps_trained=steps_trained,
      history=np.stack(history) if history else np.zeros((0, n_runs)),
      check_steps=check_steps,
      plateau_step=plateau_step,
      diverged=diverged.tolist(),
  )
  return state, np.concatenate(losses, 0), info


def stack_check_batches(check_batches) -> Dict[str, np.ndarray]:
  """The in-range check batches (one per size, one padded length) as one batch: the temperature's data."""
  return {k: np.concatenate([b[k] for b in check_batches]) for k in ("tokens", "mask")}


def fit_temperatures(programs: GroupPrograms, state, check_batches, averaged=None) -> Dict[str, np.ndarray]:
  """{weights name: [R] temperatures}: each run's and each weights' one T, fitted on the in-range check set
  (seed eval_seed + 1, every in-range size), as the task's evaluation does."""
  batch = stack_check_batches(check_batches)
  averaged = programs.averaged(state) if averaged is None else averaged
  out = {}
  for name in programs.names:
    logits_RBN, target_RBN = programs.check_logits(
        programs.weights(state, name, averaged), state["other"], batch["tokens"], batch["mask"]
    )
    out[name] = np.asarray(jax.device_get(programs.fit_temperature(logits_RBN, target_RBN)), np.float64)
  return out


def evaluate_group(
    programs: GroupPrograms, state, eval_batches, temperatures: Optional[Dict[str, np.ndarray]] = None
) -> Dict[str, Dict[str, np.ndarray]]:
  """{weights name: {metric: [R, S]}} over the evaluation sizes; with temperatures ({name: [R]}), also the
  metrics at each run's and weights' temperature (t_*)."""
  out = {}
  averaged = programs.averaged(state)
  metrics = ALL_METRICS if temperatures is not None else AS_IS
  n_runs = state["step"].shape[0]
  for name in programs.names:
    temp = np.ones(n_runs) if temperatures is None else temperatures[name]
    beta = jnp.asarray(1.0 / np.asarray(temp), jnp.float32)
    params = programs.weights(state, name, averaged)
    per: Dict[str, List[np.ndarray]] = {}
    for b in eval_batches:
      res = jax.device_get(programs.eval_metrics(params, state["other"], b["tokens"], b["mask"], beta))
      for m in metrics:
        if m in res:  # the attention's metrics are the decoder's only
          per.setdefault(m, []).append(np.asarray(res[m], np.float64))
    out[name] = {m: np.stack(v, axis=1) for m, v in per.items()}
  return out
