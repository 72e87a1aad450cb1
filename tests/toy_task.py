"""A tiny regression task for testing the generic trainer (tests only)."""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ema_jax import optim
from ema_jax.tasks.base import BatchIterator, Task

W_TRUE = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)


class ToyIterator(BatchIterator):
  """The global batch of a step depends only on (seed, step); process p takes its rows of it, so the
  data is the same whatever the number of processes."""

  def __init__(self, global_batch, seed, process_index, process_count, sleep=0.0, nan_at_step=-1):
    self.global_batch, self.seed, self.step = global_batch, seed, 0
    self.pid, self.nproc = process_index, process_count
    self.sleep, self.nan_at_step = sleep, nan_at_step

  def __next__(self):
    if self.sleep:
      time.sleep(self.sleep)
    rng = np.random.default_rng([self.seed, self.step])
    x = rng.normal(size=(self.global_batch, 4)).astype(np.float32)
    y = x @ W_TRUE + 0.1 * rng.normal(size=(self.global_batch, 1)).astype(np.float32)
    if self.step == self.nan_at_step:
      y[0, 0] = np.nan
    self.step += 1
    local = self.global_batch // self.nproc
    rows = slice(self.pid * local, (self.pid + 1) * local)
    return {"x": x[rows], "y": y[rows]}

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = int(state["step"])


class Model(nnx.Module):

  def __init__(self, rngs, hidden, dropout):
    self.l1 = nnx.Linear(4, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, 1, rngs=rngs)
    self.drop = nnx.Dropout(dropout)

  def __call__(self, x, *, deterministic, rngs=None):
    return self.l2(self.drop(jax.nn.gelu(self.l1(x)), deterministic=deterministic, rngs=rngs))


class ToyTask(Task):

  def validate(self):
    if self.config.task.hidden < 1:
      raise ValueError(f"config.task.hidden={self.config.task.hidden}: expected >= 1.")

  def build_model(self, rngs):
    return Model(rngs, self.config.task.hidden, self.config.task.dropout)

  def train_iterator(self, process_index, process_count):
    t = self.config.task
    return ToyIterator(self.config.batch_size, self.config.seed, process_index, process_count, t.sleep, t.nan_at_step)

  def loss(self, model, batch, *, rngs, train):
    pred = model(batch["x"], deterministic=not train, rngs=rngs)
    loss = jnp.mean((pred - batch["y"]) ** 2) * self.config.task.loss_scale
    return loss, {"mse": jnp.mean((pred - batch["y"]) ** 2)}

  def evaluate(self, model, ctx):
    rng = np.random.default_rng(123)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    local = 64 // ctx.process_count
    rows = slice(ctx.process_index * local, (ctx.process_index + 1) * local)
    b = ctx.put_batch({"x": x[rows], "y": (x @ W_TRUE)[rows]})
    mse = jax.jit(lambda b: jnp.mean((model(b["x"], deterministic=True) - b["y"]) ** 2))(b)
    return {"mse": float(mse), "table": [1, 2, 3]}

  def summarize(self, results, step, workdir):
    return "\n".join(f"{k}: mse {v['mse']:.6f}" for k, v in results.items())


TASK = ToyTask


def get_config(steps=20, **kw):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = steps
  c.batch_size = 8
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 5
  c.keep_checkpoints = 10
  c.optim = optim.default_optim_config()
  c.optim.warmup_steps = 2
  c.optim.lr = 1e-2
  c.weight_ema = optim.default_weight_ema_config("ema")
  c.weight_ema.decay = 0.9
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, seq=1))
  c.task = ml_collections.ConfigDict(
      dict(name="toy_task", hidden=8, dropout=0.1, loss_scale=1.0, sleep=0.0, nan_at_step=-1)
  )
  for k, v in kw.items():
    c[k] = v
  return c
