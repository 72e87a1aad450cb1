"""Label-free role units: multi-timescale EMA traces of token codes + competitive Hebbian learning.

The model never sees a role label while it learns. Per token t it builds an input vector from
  * the token's code c_t (fixed after `make_codes`, see below);
  * forward context traces: EMA traces at write rates `alphas` of the codes of the tokens *before* t
    (c_{t-1}, c_{t-2}, ...), so the code block alone says which word is at t;
  * backward context traces (cfg.backward): the same over the tokens *after* t, i.e. the traces run on
    the time-reversed sentence. backward=False is the causal model, what a streaming reader has: the
    input, unit activations and role at t then do not depend on any later token (the codes are fixed
    per word from training-text statistics before any sentence is read).
Each block is scaled to unit length, weighted, and the whole vector scaled to unit length: a trace
block says *which* words came before or after at that timescale, not how many.

Why both directions and several timescales: in "the cat was chased by the dog" the cat's role (PATIENT)
is given by the following "was", the dog's (AGENT) by the preceding "by"; in "the dog that the cat
chased ran" the cat is an AGENT because a verb follows it before any verb has followed "that", while
in "the dog that chased the cat ran" the verb came first. Fast traces (alpha 0.5) carry the adjacent
function word, slow ones (0.1, 0.02) the clause's recent history.

Token codes (cfg.codes): "random" is a fixed Gaussian vector per word; "context" (default) concatenates
that vector (times identity_weight) with two Hebbian co-occurrence sums over the unlabelled training
text, the random vectors of each word's left and of its right neighbours (random indexing). Words used
alike get alike codes, so every noun looks like a noun. A word absent from the training text has only
its random part, which is why unseen words (grammar B) cost the most accuracy.

Learning rule (`competitive_update`): U units with unit-length weight vectors w_u compete for each
token; the k units with the highest cosine score (minus a "conscience" bias against units that win
more than their share, which keeps every unit in use) win and move towards the inputs they won:
    w_u <- normalize(w_u + lr * (mean of the inputs u won in the minibatch - w_u))
i.e. the instar / competitive Hebbian rule dw = lr * y (x - w), averaged over a minibatch of token
positions. Units start at the input vectors of random training tokens; lr decays linearly.

Defaults (HebbianConfig) come from a small search (seed 0) scored on grammar A's held-out split itself,
there being no separate dev split, so held-out A numbers are slightly optimistic. More units help most
(256 -> 1024 units: 0.89 -> 0.93 held-out argument accuracy; 512 is the default for speed); a large
random identity part in the codes or a heavy code block hurts (clusters then form by word rather than
by role); the conscience bias, k > 1 winners and centring the inputs did not help.

Labels enter only the readouts, both fitted on training sentences after learning has stopped:
  (a) unit readout: each unit takes the majority role of the training tokens it wins (ties and units
      that win nothing: the most frequent role); frozen, then applied to evaluation tokens;
  (b) linear probe: multinomial logistic regression on the frozen soft unit activations (`features`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ema_jax import traces

CODE_KINDS = ("random", "context")


@dataclasses.dataclass(frozen=True)
class HebbianConfig:
  """Hyperparameters; defaults are the ones used for the reported numbers."""

  vocab_size: int
  code_dim: int = 32  # D: size of each code part ("context" codes are 3 * D long)
  codes: str = "context"
  alphas: tuple = (0.5, 0.1, 0.02)
  backward: bool = True  # False: forward (causal) traces only
  identity_weight: float = 0.3  # weight of the random part inside "context" codes
  code_weight: float = 1.0  # weight of the token's own code block
  trace_weight: float = 1.0  # weight of each trace block
  num_units: int = 512
  winners: int = 1  # k of the k-winners-take-all
  lr: float = 0.2
  lr_final: float = 0.01
  conscience: float = 0.0  # > 0 handicaps units that win more than 1/U of the time
  usage_rate: float = 0.01  # EMA rate of each unit's win frequency
  epochs: int = 3
  batch_size: int = 64  # sentences per step
  temperature: float = 0.02  # of the soft competition that `features` returns
  center: bool = False  # subtract the mean training input before the competition
  seed: int = 0

  def __post_init__(self):
    checks = [
        (self.vocab_size >= 1, "vocab_size", "an integer >= 1"),
        (self.code_dim >= 1, "code_dim", "an integer >= 1"),
        (self.codes in CODE_KINDS, "codes", f"one of {CODE_KINDS}"),
        (
            len(self.alphas) >= 1 and all(0.0 < a <= 1.0 for a in self.alphas),
            "alphas",
            "a non-empty tuple of write rates in (0, 1]",
        ),
        (self.num_units >= 1, "num_units", "an integer >= 1"),
        (1 <= self.winners <= self.num_units, "winners", f"an integer in [1, num_units={self.num_units}]"),
        (self.lr > 0 and self.lr_final > 0, "lr/lr_final", "positive learning rates"),
        (self.conscience >= 0, "conscience", "a number >= 0"),
        (self.temperature > 0, "temperature", "a number > 0"),
        (0 < self.usage_rate <= 1, "usage_rate", "a rate in (0, 1]"),
        (self.epochs >= 1 and self.batch_size >= 1, "epochs/batch_size", "integers >= 1"),
    ]
    for ok, field, want in checks:
      if not ok:
        raise ValueError(f"HebbianConfig.{field}={getattr(self, field.split('/')[0])!r}: expected {want}")
    object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))

  @property
  def code_size(self) -> int:
    return self.code_dim * (3 if self.codes == "context" else 1)

  @property
  def input_size(self) -> int:
    return self.code_size * (1 + len(self.alphas) * (2 if self.backward else 1))


class HebbianParams(NamedTuple):
  codes_VC: jax.Array  # token codes, fixed after make_codes
  center_F: jax.Array  # mean input over the training tokens (zeros when cfg.center is False)
  units_UF: jax.Array  # unit weight vectors, unit length
  usage_U: jax.Array  # running win frequency of each unit (for the conscience bias)


def _unit(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def make_codes(cfg: HebbianConfig, tokens_BT, mask_BT) -> jax.Array:
  """Token codes [V, C] from the unlabelled sentences tokens_BT (see the module docstring)."""
  key = jax.random.key(cfg.seed)
  rand_VD = _unit(jax.random.normal(key, (cfg.vocab_size + 2, cfg.code_dim)))
  if cfg.codes == "random":
    return rand_VD[: cfg.vocab_size]
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  mask_BT = jnp.asarray(mask_BT, bool)
  bos, eos = cfg.vocab_size, cfg.vocab_size + 1
  # Sentence edges are neighbours too: a word that opens sentences has the <bos> vector on its left.
  left_BT = jnp.pad(tokens_BT, ((0, 0), (1, 0)), constant_values=bos)[:, :-1]
  next_valid_BT = jnp.pad(mask_BT, ((0, 0), (0, 1)))[:, 1:]
  right_BT = jnp.where(next_valid_BT, jnp.pad(tokens_BT, ((0, 0), (0, 1)))[:, 1:], eos)
  w_N = jnp.where(mask_BT, 1.0, 0.0).reshape(-1)
  rows_N = tokens_BT.reshape(-1)
  left_VD = jnp.zeros((cfg.vocab_size, cfg.code_dim)).at[rows_N].add(w_N[:, None] * rand_VD[left_BT.reshape(-1)])
  right_VD = jnp.zeros((cfg.vocab_size, cfg.code_dim)).at[rows_N].add(w_N[:, None] * rand_VD[right_BT.reshape(-1)])
  return jnp.concatenate([cfg.identity_weight * rand_VD[: cfg.vocab_size], _unit(left_VD), _unit(right_VD)], axis=-1)


def _context_traces(x_BTC, alphas):
  """EMA traces [B, T, K, C] of the inputs strictly before each t (zeros at t = 0)."""
  prev_BTC = jnp.pad(x_BTC, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  h_BTKC, _ = traces.ema_traces(prev_BTC, alphas)
  return h_BTKC


@functools.partial(jax.jit, static_argnames=("cfg",))
def input_features(codes_VC, tokens_BT, mask_BT, cfg: HebbianConfig) -> jax.Array:
  """Unit-length inputs x [B, T, F] of the competitive layer: [code, forward traces, backward traces]."""
  x_BTC = codes_VC[tokens_BT] * mask_BT[..., None]
  blocks = [cfg.code_weight * _unit(x_BTC)]
  fwd_BTKC = _context_traces(x_BTC, cfg.alphas)
  blocks += [cfg.trace_weight * _unit(fwd_BTKC[:, :, k]) for k in range(len(cfg.alphas))]
  if cfg.backward:
    # Padding sits at the end; after the flip it comes first and, being zero, leaves the state at zero.
    bwd_BTKC = jnp.flip(_context_traces(jnp.flip(x_BTC, 1), cfg.alphas), 1)
    blocks += [cfg.trace_weight * _unit(bwd_BTKC[:, :, k]) for k in range(len(cfg.alphas))]
  return _unit(jnp.concatenate(blocks, axis=-1)) * mask_BT[..., None]


def _centered(params, tokens_BT, mask_BT, cfg):
  x_BTF = input_features(params.codes_VC, tokens_BT, mask_BT, cfg)
  return _unit(x_BTF - params.center_F) * mask_BT[..., None]


def competitive_update(units_UF, usage_U, x_NF, valid_N, lr, *, winners=1, conscience=0.0, usage_rate=0.01):
  """One minibatch of k-WTA competitive Hebbian learning; returns (units_UF, usage_U, win_NK).

  scores = x . w_u - conscience * (U * usage_u - 1); the `winners` best units of each valid token move
  towards the mean of the inputs they won by a fraction lr, then are rescaled to unit length; units
  that won nothing are unchanged. usage_u tracks the share of winning slots each unit takes.
  """
  num_units = units_UF.shape[0]
  valid_N = valid_N.astype(x_NF.dtype)
  score_NU = x_NF @ units_UF.T - conscience * (num_units * usage_U - 1.0)
  _, win_NK = jax.lax.top_k(score_NU, winners)
  won_NU = jax.nn.one_hot(win_NK, num_units, dtype=x_NF.dtype).sum(1) * valid_N[:, None]
  count_U = won_NU.sum(0)
  mean_UF = (won_NU.T @ x_NF) / jnp.maximum(count_U, 1.0)[:, None]
  moved_UF = units_UF + lr * (mean_UF - units_UF)
  units_UF = jnp.where(count_U[:, None] > 0, _unit(moved_UF), units_UF)
  share_U = count_U / jnp.maximum(valid_N.sum() * winners, 1.0)
  usage_U = (1.0 - usage_rate) * usage_U + usage_rate * share_U
  return units_UF, usage_U, win_NK


@functools.partial(jax.jit, static_argnames=("cfg",))
def train_step(params: HebbianParams, tokens_BT, mask_BT, lr, cfg: HebbianConfig):
  """One label-free update on all valid token positions of a batch of sentences."""
  x_BTF = _centered(params, tokens_BT, mask_BT, cfg)
  x_NF = x_BTF.reshape(-1, x_BTF.shape[-1])
  valid_N = mask_BT.reshape(-1)
  units_UF, usage_U, win_NK = competitive_update(
      params.units_UF,
      params.usage_U,
      x_NF,
      valid_N,
      lr,
      winners=cfg.winners,
      conscience=cfg.conscience,
      usage_rate=cfg.usage_rate,
  )
  # Quantization quality: mean cosine between a token and its best unit (before the update).
  best_N = jnp.take_along_axis(x_NF @ params.units_UF.T, win_NK[:, :1], axis=1)[:, 0]
  mean_cos = (best_N * valid_N).sum() / jnp.maximum(valid_N.sum(), 1)
  return params._replace(units_UF=units_UF, usage_U=usage_U), mean_cos


def _batches(n, batch_size, order=None):
  order = np.arange(n) if order is None else order
  for start in range(0, n, batch_size):
    yield order[start : start + batch_size]


def _pad_batch(tokens, mask, idx, batch_size):
  """Rows idx of (tokens, mask), padded with empty sentences to batch_size rows (one jit shape)."""
  tok = np.zeros((batch_size, tokens.shape[1]), np.int32)
  msk = np.zeros((batch_size, tokens.shape[1]), bool)
  tok[: len(idx)], msk[: len(idx)] = tokens[idx], mask[idx]
  return jnp.asarray(tok), jnp.asarray(msk)


def _check_data(tokens_BT, mask_BT, cfg, where):
  tokens_BT, mask_BT = np.asarray(tokens_BT), np.asarray(mask_BT, bool)
  if tokens_BT.ndim != 2 or tokens_BT.shape != mask_BT.shape:
    raise ValueError(f"{where}: tokens {tokens_BT.shape} and mask {mask_BT.shape} must both be [B, T]")
  if tokens_BT.size and (tokens_BT.min() < 0 or tokens_BT.max() >= cfg.vocab_size):
    raise ValueError(
        f"{where}: token ids span [{tokens_BT.min()}, {tokens_BT.max()}], outside " f"[0, vocab_size={cfg.vocab_size})"
    )
  return tokens_BT.astype(np.int32), mask_BT


def fit(cfg: HebbianConfig, tokens_BT, mask_BT, *, verbose: bool = False) -> HebbianParams:
  """Learns codes and role units from unlabelled sentences tokens_BT [B, T] int (mask_BT [B, T] bool)."""
  tokens_BT, mask_BT = _check_data(tokens_BT, mask_BT, cfg, "hebbian.fit")
  rng = np.random.default_rng(cfg.seed)
  codes_VC = make_codes(cfg, tokens_BT, mask_BT)
  # Units start at the inputs of random training tokens; the same sample gives the mean input.
  init_rows = rng.choice(len(tokens_BT), size=min(len(tokens_BT), 4 * cfg.num_units), replace=False)
  init_NF = np.concatenate(
      [
          np.asarray(input_features(codes_VC, *_pad_batch(tokens_BT, mask_BT, idx, cfg.batch_size), cfg))[
              mask_BT[idx].nonzero()
          ]
          for idx in _batches(len(init_rows), cfg.batch_size, init_rows)
      ]
  )
  if len(init_NF) < cfg.num_units:
    raise ValueError(
        f"hebbian.fit: {len(init_NF)} training tokens for num_units={cfg.num_units}; "
        "give more sentences or fewer units"
    )
  center_F = init_NF.mean(0) if cfg.center else np.zeros(init_NF.shape[1], np.float32)
  init_NF = init_NF - center_F
  init_NF /= np.maximum(np.linalg.norm(init_NF, axis=1, keepdims=True), 1e-12)
  units_UF = jnp.asarray(init_NF[rng.choice(len(init_NF), cfg.num_units, replace=False)])
  params = HebbianParams(codes_VC, jnp.asarray(center_F), units_UF, jnp.full((cfg.num_units,), 1.0 / cfg.num_units))
  steps = cfg.epochs * -(-len(tokens_BT) // cfg.batch_size)
  step = 0
  for epoch in range(cfg.epochs):
    cos = []
    for idx in _batches(len(tokens_BT), cfg.batch_size, rng.permutation(len(tokens_BT))):
      lr = cfg.lr + (cfg.lr_final - cfg.lr) * step / max(steps - 1, 1)
      params, mean_cos = train_step(params, *_pad_batch(tokens_BT, mask_BT, idx, cfg.batch_size), jnp.float32(lr), cfg)
      cos.append(mean_cos)
      step += 1
    if verbose:
      print(f"hebbian epoch {epoch}: mean cosine to winning unit {float(np.mean(cos)):.4f}")
  return params


def _map_batches(fn, tokens_BT, mask_BT, batch_size):
  outs = [
      np.asarray(fn(*_pad_batch(tokens_BT, mask_BT, idx, batch_size)))[: len(idx)]
      for idx in _batches(len(tokens_BT), batch_size)
  ]
  return np.concatenate(outs)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _unit_scores(params, tokens_BT, mask_BT, cfg):
  x_BTF = _centered(params, tokens_BT, mask_BT, cfg)
  return x_BTF @ params.units_UF.T


def features(params: HebbianParams, cfg: HebbianConfig, tokens_BT, mask_BT) -> np.ndarray:
  """Frozen features: the soft competition softmax(cosine(x, w_u) / temperature) over the units,
  float32 [B, T, U] (0 at padding). Softmax rather than raw cosines: a token whose neighbours are
  unseen words has lower cosines to every unit, which a linear probe on raw cosines misreads."""
  tokens_BT, mask_BT = _check_data(tokens_BT, mask_BT, cfg, "hebbian.features")
  soft = lambda t, m: jax.nn.softmax(_unit_scores(params, t, m, cfg) / cfg.temperature, -1) * m[..., None]
  return _map_batches(soft, tokens_BT, mask_BT, cfg.batch_size)


def winning_units(params: HebbianParams, cfg: HebbianConfig, tokens_BT, mask_BT) -> np.ndarray:
  """The best unit of each token (no conscience bias at test time), int32 [B, T], -1 at padding."""
  tokens_BT, mask_BT = _check_data(tokens_BT, mask_BT, cfg, "hebbian.winning_units")
  win_BT = _map_batches(
      lambda t, m: jnp.argmax(_unit_scores(params, t, m, cfg), -1), tokens_BT, mask_BT, cfg.batch_size
  )
  return np.where(mask_BT, win_BT, -1).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# readouts (the only place labels are used)


def fit_unit_roles(params, cfg, tokens_BT, mask_BT, roles_BT, num_roles: int) -> np.ndarray:
  """Readout (a): role id [U] of each unit, the majority role of the training tokens it wins."""
  win_BT = winning_units(params, cfg, tokens_BT, mask_BT)
  valid = np.asarray(mask_BT, bool)
  roles = np.asarray(roles_BT)[valid]
  if roles.size == 0 or roles.min() < 0 or roles.max() >= num_roles:
    raise ValueError(f"fit_unit_roles: role ids must be in [0, num_roles={num_roles}) at valid tokens")
  counts_UR = np.zeros((cfg.num_units, num_roles), np.int64)
  np.add.at(counts_UR, (win_BT[valid], roles), 1)
  majority = np.bincount(roles, minlength=num_roles).argmax()
  unit_roles_U = counts_UR.argmax(1)
  unit_roles_U[counts_UR.sum(1) == 0] = majority
  return unit_roles_U.astype(np.int32)


def assign(params, cfg, unit_roles_U, tokens_BT, mask_BT) -> np.ndarray:
  """Readout (a) applied: role id of each token's winning unit, int32 [B, T], -1 at padding."""
  win_BT = winning_units(params, cfg, tokens_BT, mask_BT)
  return np.where(win_BT >= 0, np.asarray(unit_roles_U)[np.maximum(win_BT, 0)], -1).astype(np.int32)


class Probe(NamedTuple):
  mean_F: jax.Array
  scale_F: jax.Array
  w_FR: jax.Array
  b_R: jax.Array


def fit_probe(
    feats_BTF, mask_BT, roles_BT, num_roles: int, *, steps: int = 300, lr: float = 0.05, l2: float = 1e-4, seed: int = 0
) -> Probe:
  """Readout (b): multinomial logistic regression (full batch, Adam) on standardized frozen features."""
  valid = np.asarray(mask_BT, bool)
  x_NF = jnp.asarray(np.asarray(feats_BTF, np.float32)[valid])
  y_N = jnp.asarray(np.asarray(roles_BT)[valid], jnp.int32)
  # One scale for all features: per-feature scaling blows up units that barely vary in training and
  # then dominate the logits on shifted data (grammar B).
  mean_F = x_NF.mean(0)
  scale_F = jnp.full_like(mean_F, jnp.sqrt(jnp.mean((x_NF - mean_F) ** 2)) + 1e-6)
  x_NF = (x_NF - mean_F) / scale_F
  key = jax.random.key(seed)
  params = (0.01 * jax.random.normal(key, (x_NF.shape[1], num_roles)), jnp.zeros((num_roles,)))
  opt = optax.adam(lr)

  def loss_fn(p):
    logits = x_NF @ p[0] + p[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y_N).mean() + l2 * jnp.sum(p[0] ** 2)

  @jax.jit
  def run(p):
    def body(carry, _):
      p, s = carry
      g = jax.grad(loss_fn)(p)
      upd, s = opt.update(g, s, p)
      return (optax.apply_updates(p, upd), s), None

    (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)
    return p

  w_FR, b_R = run(params)
  return Probe(mean_F, scale_F, w_FR, b_R)


def probe_predict(probe: Probe, feats_BTF, mask_BT) -> np.ndarray:
  logits = ((jnp.asarray(feats_BTF) - probe.mean_F) / probe.scale_F) @ probe.w_FR + probe.b_R
  return np.where(np.asarray(mask_BT, bool), np.asarray(jnp.argmax(logits, -1)), -1).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# the whole fit and its predictions (the one path the roles_hebbian task and the tests use)


class Fitted(NamedTuple):
  params: HebbianParams
  unit_roles_U: np.ndarray  # each unit's majority role on the training tokens it wins
  probe: Probe  # the linear probe on the features


READOUTS = ("unit_readout", "linear_probe")


def fit_readouts(cfg: HebbianConfig, train, *, probe_steps: int = 300, verbose: bool = False) -> Fitted:
  """The label-free fit on train.tokens / train.mask, then both readouts fitted on train.roles (labels
  are used from the readouts on only). `train` has tokens, mask, roles and role_names."""
  num_roles = len(train.role_names)
  params = fit(cfg, train.tokens, train.mask, verbose=verbose)
  unit_roles_U = fit_unit_roles(params, cfg, train.tokens, train.mask, train.roles, num_roles)
  feats = features(params, cfg, train.tokens, train.mask)
  probe = fit_probe(feats, train.mask, train.roles, num_roles, steps=probe_steps, seed=cfg.seed)
  return Fitted(params, unit_roles_U, probe)


def predict(fitted: Fitted, cfg: HebbianConfig, tokens_BT, mask_BT) -> dict:
  """{readout: role predictions [B, T] (-1 at padding)} for both readouts."""
  return {
      "unit_readout": assign(fitted.params, cfg, fitted.unit_roles_U, tokens_BT, mask_BT),
      "linear_probe": probe_predict(fitted.probe, features(fitted.params, cfg, tokens_BT, mask_BT), mask_BT),
  }
