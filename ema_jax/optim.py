"""Optimizers, learning-rate schedules, and weight EMA (debiased EMA and BEMA).

Weight EMA lives in the train state as a pytree and is checkpointed with it. Its hyperparameters that a
sweep may vary (the EMA decay) are stored as arrays inside that state, so jax.vmap over many states with
different decays needs no recompilation.
"""

from __future__ import annotations

import re
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ema_jax.errors import config_error

SCHEDULES = ("constant", "cosine", "linear", "rsqrt")
EMA_KINDS = ("none", "ema", "bema")
# 'bema_<tau>': a BEMA with its own burn-in tau (optimizer steps), so one run can keep several burn-ins
# of the same trajectory side by side (experiments/set_complement_sweep.py); plain 'bema' uses burn_in.
BEMA_TAU_KIND = re.compile(r"bema_(\d+)")


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
  """BEMA (Block and Zhang 2025): the EMA part, theta_0 (the weights at the end of the burn-in), t (optimizer
  steps since the burn-in at the last update), the number of updates folded in, and the weights at the last
  update (only kept when the average updates every k > 1 steps; None otherwise)."""

  ema: Any
  theta0: Any
  t: jax.Array
  count: jax.Array
  last: Any = None


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
  """BEMA, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes" (Block and Zhang, arXiv 2508.00180).

  With tau the burn-in (optimizer steps), phi = `every` the update period, and t = s - tau counted in
  optimizer steps (not in updates) since the burn-in at optimizer step s:
    s <= tau:                 theta_0 = ema = theta_s (the average restarts from the current weights; the
                              value is the raw weights);
    s > tau, t % phi == 0:    beta_t = (rho + gamma t)^-kappa,  alpha_t = (rho + gamma t)^-eta,
                              ema = (1 - beta_t) ema + beta_t theta_s,
                              bema = alpha_t (theta_s - theta_0) + ema.
  Between updates (phi > 1) the value is the bema of the last update, from the weights of that step.
  Defaults kappa = 0.5, eta = 0.2, gamma = 1, rho = 10 are the BEMA paper's; tau = 0 takes theta_0 at the
  random initialisation (the earlier behaviour of this class).

  The variant: the BEMA paper's estimator with its power-law schedules for both the EMA rate and the bias
  correction, not a fixed-decay EMA plus correction; a floor on beta_t (some ports add one) is not applied.
  The paper's full text was not available offline when this was checked (2026-11-29); the rule, defaults,
  burn-in and update period follow its abstract and public descriptions of its algorithm (parameters named
  ema power, bias power, multiplier, lag, burn-in, update frequency). All state is float32.
  """

  kind = "bema"

  def __init__(
      self,
      kappa: float = 0.5,
      eta: float = 0.2,
      gamma: float = 1.0,
      rho: float = 10.0,
      every: int = 1,
      burn_in: int = 0,
  ):
    self.kappa, self.eta, self.gamma, self.rho, self.every, self.burn_in = kappa, eta, gamma, rho, every, burn_in

  def init(self, params, decay=None) -> BEMAState:
    f32 = lambda p: p.astype(jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    last = jax.tree.map(f32, params) if self.every > 1 else None
    return BEMAState(jax.tree.map(f32, params), jax.tree.map(f32, params), zero, zero, last)

  def _base(self, t):
    return self.rho + self.gamma * t.astype(jnp.float32)

  def update(self, state: BEMAState, params, step) -> BEMAState:
    """Folds in theta after optimizer step `step` (1-based)."""
    step = jnp.asarray(step, jnp.int32)
    t = step - self.burn_in
    burning = t <= 0
    do = (~burning) & ((t % self.every) == 0)
    beta = self._base(t) ** (-self.kappa)
    f32 = lambda p: p.astype(jnp.float32)

    def ema_leaf(e, p):
      p = f32(p)
      return jnp.where(burning, p, jnp.where(do, (1.0 - beta) * e + beta * p, e))

    ema = jax.tree.map(ema_leaf, state.ema, params)
    theta0 = jax.tree.map(lambda z, p: jnp.where(burning, f32(p), z), state.theta0, params)
    new_t = jnp.where(do, t, jnp.where(burning, 0, state.t))
    count = jnp.where(burning, 0, state.count + do.astype(jnp.int32))
    last = state.last
    if last is not None:
      last = jax.tree.map(lambda l, p: jnp.where(do | burning, f32(p), l), last, params)
    return BEMAState(ema, theta0, new_t, count, last)

  def value(self, state: BEMAState, params):
    """The bias-corrected average at the last update (the raw weights during the burn-in)."""
    alpha = self._base(state.t) ** (-self.eta)
    at = params if state.last is None else state.last
    out = jax.tree.map(lambda e, p, p0: alpha * (p.astype(jnp.float32) - p0) + e, state.ema, at, state.theta0)
    return jax.tree.map(lambda o, p: jnp.where(state.count > 0, o, p.astype(jnp.float32)).astype(p.dtype), out, params)


class Averages:
  """Several weight averages kept side by side (config weight_ema.kind = 'ema,bema'), each updated from the
  same raw weights, so raw, EMA and BEMA weights of one run are evaluated together. The state is a dict
  {kind: state}; a single kind keeps its bare state (checkpoints of one-kind runs keep their layout)."""

  def __init__(self, members: Dict[str, Any]):
    self.members = dict(members)
    self.names = list(self.members)
    self.kind = ",".join(self.names)

  def _single(self):
    return len(self.members) == 1

  def init(self, params, decay=None):
    if self._single():
      return self.members[self.names[0]].init(params, decay)
    return {k: m.init(params, decay) for k, m in self.members.items()}

  def update(self, state, params, step):
    if self._single():
      return self.members[self.names[0]].update(state, params, step)
    return {k: m.update(state[k], params, step) for k, m in self.members.items()}

  def member_state(self, state, name: str):
    return state if self._single() else state[name]

  def value(self, state, params, name: Optional[str] = None):
    """The weights of average `name` (default: the first kind)."""
    name = self.names[0] if name is None else name
    if name not in self.members:
      raise ValueError(f"weights {name!r}: this run keeps {', '.join(self.names)}.")
    return self.members[name].value(self.member_state(state, name), params)


def parse_kinds(kind) -> list:
  """'ema,bema' -> ['ema', 'bema']; 'ema,bema_0,bema_500' -> ['ema', 'bema_0', 'bema_500']; 'none' -> []."""
  kinds = [k.strip() for k in str(kind).split(",") if k.strip()]
  return [] if kinds == ["none"] else kinds


def validate_weight_ema(cfg: ml_collections.ConfigDict) -> None:
  kinds = parse_kinds(cfg.kind)
  accepted = (
      f"one of {', '.join(EMA_KINDS)}, or several averages comma-separated, e.g. 'ema,bema' "
      "('bema_<tau>': a BEMA with burn-in tau, e.g. 'ema,bema_0,bema_1000')"
  )
  known = lambda k: (k in EMA_KINDS and k != "none") or BEMA_TAU_KIND.fullmatch(k)
  if str(cfg.kind).strip() != "none" and (not kinds or not all(map(known, kinds)) or len(set(kinds)) != len(kinds)):
    config_error("weight_ema.kind", cfg.kind, accepted)
  if not (isinstance(cfg.every, int) and cfg.every >= 1):
    config_error("weight_ema.every", cfg.every, "an integer >= 1")
  if "ema" in kinds and not 0 < cfg.decay < 1:
    config_error("weight_ema.decay", cfg.decay, "a decay in (0, 1), e.g. 0.999")
  if any(k.startswith("bema") for k in kinds):
    if not cfg.rho > 0 or not cfg.gamma > 0:
      config_error("weight_ema.rho/gamma", (cfg.rho, cfg.gamma), "positive values (defaults 10, 1)")
    if not cfg.kappa >= 0 or not cfg.eta >= 0:
      config_error("weight_ema.kappa/eta", (cfg.kappa, cfg.eta), "non-negative exponents (defaults 0.5, 0.2)")
    burn_in = cfg.get("burn_in", 0)
    if not (isinstance(burn_in, int) and not isinstance(burn_in, bool) and burn_in >= 0):
      config_error("weight_ema.burn_in", burn_in, "an integer >= 0 (optimizer steps before BEMA's theta_0)")


def make_weight_ema(cfg: ml_collections.ConfigDict):
  """Averages over the kinds in cfg.kind ('ema', 'bema', 'ema,bema', 'bema_<tau>', ...), or None for
  kind='none'."""
  validate_weight_ema(cfg)
  members = {}
  for k in parse_kinds(cfg.kind):
    if k == "ema":
      members[k] = WeightEMA(cfg.decay, cfg.every)
    else:
      tau = BEMA_TAU_KIND.fullmatch(k)
      burn_in = int(tau.group(1)) if tau else int(cfg.get("burn_in", 0))
      members[k] = BEMA(cfg.kappa, cfg.eta, cfg.gamma, cfg.rho, cfg.every, burn_in)
  return Averages(members) if members else None


def default_weight_ema_config(kind: str = "ema") -> ml_collections.ConfigDict:
  """kind: none | ema | bema | bema_<tau> | several comma-separated ('ema,bema'). decay: the debiased EMA's.
  kappa, eta, gamma, rho: BEMA's schedules (the BEMA paper's defaults); burn_in: BEMA's tau in optimizer
  steps (a 'bema_<tau>' member uses its own tau)."""
  return ml_collections.ConfigDict(
      dict(kind=kind, decay=0.999, every=1, kappa=0.5, eta=0.2, gamma=1.0, rho=10.0, burn_in=0)
  )
