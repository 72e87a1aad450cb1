"""Optimizers, learning-rate schedules, and weight EMA (debiased EMA and BEMA).

Weight EMA lives in the train state as a pytree and is checkpointed with it. Its hyperparameters that a
sweep may vary (the EMA decay) are stored as arrays inside that state, so jax.vmap over many states with
different decays needs no recompilation.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ema_jax.errors import config_error

SCHEDULES = ("constant", "cosine", "linear", "rsqrt")
EMA_KINDS = ("none", "ema", "bema")


def validate_optim(cfg: ml_collections.ConfigDict, total_steps: int) -> None:
  if not cfg.lr > 0:
    config_error("optim.lr", cfg.lr, "a positive learning rate")
  if cfg.schedule not in SCHEDULES:
    config_error("optim.schedule", cfg.schedule, f"one of: {', '.join(SCHEDULES)}")
  if not 0 <= cfg.warmup_steps <= total_steps:
    config_error("optim.warmup_steps", cfg.warmup_steps, f"0 <= warmup_steps <= steps ({total_steps})")
  if cfg.weight_decay < 0:
    config_error("optim.weight_decay", cfg.weight_decay, ">= 0")
  if cfg.grad_clip is not None and not cfg.grad_clip > 0:
    config_error("optim.grad_clip", cfg.grad_clip, "a positive global norm or None")
  for f in ("b1", "b2"):
    if not 0 <= cfg[f] < 1:
      config_error(f"optim.{f}", cfg[f], "0 <= value < 1")
  if not 0 <= cfg.final_lr_fraction <= 1:
    config_error("optim.final_lr_fraction", cfg.final_lr_fraction, "a fraction in [0, 1]")


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to cfg.lr, then constant / cosine / linear decay to final_lr_fraction * lr / rsqrt."""
  lr, warm = cfg.lr, int(cfg.warmup_steps)
  end = lr * cfg.final_lr_fraction
  decay_steps = max(total_steps - warm, 1)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.final_lr_fraction)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(lr, end, decay_steps)
  else:
    after = lambda s: lr * jax.lax.rsqrt(1.0 + s.astype(jnp.float32) / max(warm, 1))
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def _decay_mask(params):
  # No weight decay on vectors (biases, norm scales, learned trace rates).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


LR_SCALE = "lr_scale"


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup/decay and global-norm clipping.

  The learning rate is schedule(step) * lr_scale, with lr_scale (1 unless set_lr_scale changes it) an
  array in the optimizer state: jax.vmap over states with different scales trains runs with different
  learning rates in one program (experiments/set_complement_sweep.py).
  """
  validate_optim(cfg, total_steps)
  schedule = make_schedule(cfg, total_steps)

  def scaled_adamw(learning_rate, lr_scale):
    # A constant schedule keeps AdamW on optax's scale_by_schedule path (the step size cast to the
    # updates' dtype), and x * 1.0 is exact: with lr_scale = 1 the updates are bit-identical to
    # optax.adamw(schedule).
    lr = learning_rate * lr_scale
    return optax.adamw(lambda _: lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)

  parts = []
  if cfg.grad_clip is not None:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(
      optax.inject_hyperparams(scaled_adamw, hyperparam_dtype=jnp.float32)(learning_rate=schedule, lr_scale=1.0)
  )
  return optax.chain(*parts), schedule


def lr_scale(opt_state) -> jax.Array:
  """The learning-rate multiplier held in a make_optimizer state."""
  return optax.tree_utils.tree_get(opt_state, LR_SCALE)


def set_lr_scale(opt_state, scale):
  """The state with its learning-rate multiplier replaced (a float32 scalar, which may be traced)."""
  return optax.tree_utils.tree_set(opt_state, **{LR_SCALE: jnp.asarray(scale, jnp.float32)})


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          lr=1e-3,
          schedule="cosine",
          warmup_steps=100,
          final_lr_fraction=0.1,
          weight_decay=0.0,
          grad_clip=1.0,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
      )
  )


# ---------------------------------------------------------------------------------------------- weight EMA


class EMAState(NamedTuple):
  """Debiased EMA: zero-initialised average, its decay, and the number of updates folded in."""

  average: Any
  decay: jax.Array
  count: jax.Array


class BEMAState(NamedTuple):
  """BEMA (Block and Zhang 2025): the EMA part, the weights at the start, and the update count."""

  ema: Any
  theta0: Any
  count: jax.Array


class WeightEMA:
  """Debiased EMA of the weights: ema_t = beta ema_{t-1} + (1 - beta) theta_t, read as ema_t / (1 - beta^t)."""

  kind = "ema"

  def __init__(self, decay: float = 0.999, every: int = 1):
    self.decay = decay
    self.every = every

  def init(self, params, decay=None) -> EMAState:
    d = self.decay if decay is None else decay
    return EMAState(
        jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params),
        jnp.asarray(d, jnp.float32),
        jnp.zeros((), jnp.int32),
    )

  def update(self, state: EMAState, params, step) -> EMAState:
    """Folds in theta after optimizer step `step` (1-based) when step % every == 0."""
    do = (jnp.asarray(step) % self.every) == 0
    beta = state.decay

    def upd(avg, p):
      new = beta * avg + (1.0 - beta) * p.astype(jnp.float32)
      return jnp.where(do, new, avg)

    return EMAState(jax.tree.map(upd, state.average, params), state.decay, state.count + do.astype(jnp.int32))

  def value(self, state: EMAState, params):
    """The debiased average (the raw weights themselves before the first update)."""
    # 1 - beta^t through exp(t log beta) (never repeated products).
    corr = -jnp.expm1(state.count.astype(jnp.float32) * jnp.log(state.decay))
    safe = jnp.where(state.count > 0, corr, 1.0)
    return jax.tree.map(
        lambda a, p: jnp.where(state.count > 0, a / safe, p.astype(jnp.float32)).astype(p.dtype), state.average, params
    )


class BEMA:
  """Bias-corrected EMA: beta_t = (rho + gamma t)^-kappa, alpha_t = (rho + gamma t)^-eta,
  ema_t = (1 - beta_t) ema_{t-1} + beta_t theta_t (ema_0 = theta_0), bema_t = alpha_t (theta_t - theta_0) + ema_t.

  t counts the updates folded in (one every `every` optimizer steps).
  """

  kind = "bema"

  def __init__(self, kappa: float = 0.5, eta: float = 0.2, gamma: float = 1.0, rho: float = 10.0, every: int = 1):
    self.kappa, self.eta, self.gamma, self.rho, self.every = kappa, eta, gamma, rho, every

  def init(self, params, decay=None) -> BEMAState:
    f32 = lambda p: p.astype(jnp.float32)
    return BEMAState(jax.tree.map(f32, params), jax.tree.map(f32, params), jnp.zeros((), jnp.int32))

  def _rates(self, t):
    base = self.rho + self.gamma * t.astype(jnp.float32)
    return base ** (-self.kappa), base ** (-self.eta)

  def update(self, state: BEMAState, params, step) -> BEMAState:
    do = (jnp.asarray(step) % self.every) == 0
    t = state.count + 1
    beta, _ = self._rates(t)
    ema = jax.tree.map(
        lambda e, p: jnp.where(do, (1.0 - beta) * e + beta * p.astype(jnp.float32), e), state.ema, params
    )
    return BEMAState(ema, state.theta0, state.count + do.astype(jnp.int32))

  def value(self, state: BEMAState, params):
    _, alpha = self._rates(state.count)
    out = jax.tree.map(lambda e, p, p0: alpha * (p.astype(jnp.float32) - p0) + e, state.ema, params, state.theta0)
    out = jax.tree.map(lambda o, p: jnp.where(state.count > 0, o, p.astype(jnp.float32)).astype(p.dtype), out, params)
    return out


def validate_weight_ema(cfg: ml_collections.ConfigDict) -> None:
  if cfg.kind not in EMA_KINDS:
    config_error("weight_ema.kind", cfg.kind, f"one of: {', '.join(EMA_KINDS)}")
  if not (isinstance(cfg.every, int) and cfg.every >= 1):
    config_error("weight_ema.every", cfg.every, "an integer >= 1")
  if cfg.kind == "ema" and not 0 < cfg.decay < 1:
    config_error("weight_ema.decay", cfg.decay, "a decay in (0, 1), e.g. 0.999")
  if cfg.kind == "bema":
    if not cfg.rho > 0 or not cfg.gamma > 0:
      config_error("weight_ema.rho/gamma", (cfg.rho, cfg.gamma), "positive values (defaults 10, 1)")
    if not cfg.kappa >= 0 or not cfg.eta >= 0:
      config_error("weight_ema.kappa/eta", (cfg.kappa, cfg.eta), "non-negative exponents (defaults 0.5, 0.2)")


def make_weight_ema(cfg: ml_collections.ConfigDict):
  """WeightEMA, BEMA, or None for kind='none'."""
  validate_weight_ema(cfg)
  if cfg.kind == "ema":
    return WeightEMA(cfg.decay, cfg.every)
  if cfg.kind == "bema":
    return BEMA(cfg.kappa, cfg.eta, cfg.gamma, cfg.rho, cfg.every)
  return None


def default_weight_ema_config(kind: str = "ema") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(kind=kind, decay=0.999, every=1, kappa=0.5, eta=0.2, gamma=1.0, rho=10.0))
