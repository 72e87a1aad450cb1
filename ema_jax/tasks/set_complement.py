"""Set complement ("Learning What's Missing", 2025): predict the uniform distribution over the tokens absent from a set.

Train on set sizes up to config.task.train_max_size (L_train); evaluate at every size 1..N-1 on fixed
batches, reporting per size and as in-range (s <= L_train) / out-of-range (s > L_train) means:
  kl            KL(target || p), target uniform over the N - s absent tokens
  tv            total variation 1/2 sum |target - p|
  invalid_mass  probability on tokens present in the input
  precision     min / max probability over the valid (absent) tokens, 1 = exactly uniform
  logit_gap     mean valid logit - mean invalid logit
  top1_valid    the most likely token is absent from the input
and the same at a fitted temperature (t_kl, t_tv, ...: the logits divided by one scalar T per set of
weights, fitted to minimise the in-range cross-entropy on a held-out check set drawn with seed
eval_seed + 1; ema_jax/temperature.py), so that an effect of the weights on length generalization can be
told from a mere sharpening of the output. Raw weights at their own T are the "sharpening only" control.
Also what no temperature can change, the attention of the prediction over the set (the paper's mechanism
is its dispersion), for both models:
  attn_entropy     entropy (nats) of the attention weights that make the prediction, mean over heads: the
                   decoder's last set token over the s set tokens, the query model's query over the set
                   and itself (s + 1 positions)
  attn_dispersion  attn_entropy / log(positions attended): 1 = uniform, 0 = on one position

config.model.kind picks the model: 'decoder' (ema_jax/models/set_decoder.py, the paper's causal model,
trained on every prefix of each set at once, evaluated at the last set position) or 'query'
(ema_jax/models/set_transformer.py, an appended query token reads the set, trained on whole sets).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ema_jax.data import set_complement as data
from ema_jax.models import set_decoder
from ema_jax.tasks import set_complement_theory as theory
from ema_jax.models.set_transformer import (
    DROPOUT_SITES,
    NORMS,
    POSITIONS,
    SetTransformer,
    SetTransformerConfig,
    flops_per_example,
    parse_dropout_on,
)
from ema_jax import length_report, temperature
from ema_jax.errors import config_error, is_int
from ema_jax.tasks.base import EvalContext, StepBatchIterator, Task
from ema_jax.tasks.set_complement_metrics import (
    METRICS,
    PLOT_METRICS,
    TABLE_METRICS,
    batch_present,
    complement_metrics,
    format_table,
    format_temperature_control,
    plot_per_size,
)

MAX_BALANCE_TOKENS = 256  # the balance report evaluates N (N - 1) length-2 inputs; skipped above this N
MODEL_KINDS = ("decoder", "query")  # set_decoder.py (the paper's model), set_transformer.py
CHECK_SEED_OFFSET = 1  # the temperature's check set: seed eval_seed + 1, as the sweep's plateau check
# ----------------------------------------------------------------------------------------------- iterator


class SetComplementIterator(StepBatchIterator):
  """Endless training batches: process p of P takes rows [p b, (p + 1) b) of the step's global batch,
  so the stream does not depend on the process count; the state is the step counter only."""

  def __init__(
      self,
      *,
      seed: int,
      num_tokens: int,
      min_size: int,
      max_size: int,
      length: int,
      global_batch: int,
      process_index: int = 0,
      process_count: int = 1,
      dist: str = "uniform",
  ):
    if global_batch % process_count:
      raise ValueError(
          f"SetComplementIterator: batch_size={global_batch} is not divisible by "
          f"process_count={process_count}; use a multiple of {process_count}."
      )
    self.kw = dict(num_tokens=num_tokens, min_size=min_size, max_size=max_size, length=length, dist=dist)
    self.seed, self.global_batch = int(seed), int(global_batch)
    self.local_batch = global_batch // process_count
    self.rows = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)
    self.step = 0

  def __next__(self) -> Dict[str, np.ndarray]:
    # Drawing the whole global batch on every process costs little here (sets of <= N tokens) and
    # makes the stream independent of the process layout.
    out = data.train_batch(self.seed, self.step, 0, self.global_batch, **self.kw)
    self.step += 1
    return {k: v[self.rows] for k, v in out.items()}


# ------------------------------------------------------------------------------------------------- task


def model_config(config: ml_collections.ConfigDict):
  """A SetDecoderConfig (model.kind 'decoder') or a SetTransformerConfig ('query')."""
  m = config.model
  if m.get("kind", "query") == "decoder":
    return set_decoder.SetDecoderConfig(
        num_tokens=int(config.task.num_tokens),
        embed_dim=int(m.embed_dim),
        value_dim=int(m.value_dim),
        num_heads=int(m.num_heads),
        dropout=float(m.dropout),
        dropout_on=parse_dropout_on(m.dropout_on),
        traced_dropout=bool(m.get("traced_dropout", False)),
    )
  return SetTransformerConfig(
      num_tokens=int(config.task.num_tokens),
      embed_dim=int(m.embed_dim),
      value_dim=int(m.value_dim),
      num_heads=int(m.num_heads),
      norm=m.norm,
      positions=m.positions,
      dropout=float(m.dropout),
      dropout_on=parse_dropout_on(m.dropout_on),
      traced_dropout=bool(m.get("traced_dropout", False)),
  )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the task and model fields; raises ValueError naming the field, its value and what would work."""
  t, m = config.task, config.model
  n = t.num_tokens
  if not (is_int(n) and n >= 2):
    config_error("task.num_tokens", n, "an integer >= 2 (the number of set tokens N)")
  if not (is_int(t.train_max_size) and 1 <= t.train_max_size <= n - 1):
    config_error(
        "task.train_max_size",
        t.train_max_size,
        f"an integer in [1, num_tokens - 1 = {n - 1}] so that " "longer sets remain for evaluation",
    )
  if not (is_int(t.train_min_size) and 1 <= t.train_min_size <= t.train_max_size):
    config_error("task.train_min_size", t.train_min_size, f"an integer in [1, train_max_size = {t.train_max_size}]")
  if t.train_size_dist not in data.SIZE_DISTRIBUTIONS:
    config_error("task.train_size_dist", t.train_size_dist, f"one of {data.SIZE_DISTRIBUTIONS}")
  if t.max_len is not None and not (is_int(t.max_len) and t.train_max_size <= t.max_len <= n - 1):
    config_error(
        "task.max_len",
        t.max_len,
        f"None or an integer in [train_max_size = {t.train_max_size}, "
        f"num_tokens - 1 = {n - 1}] (the padded length of training rows)",
    )
  if not (is_int(t.eval_examples) and t.eval_examples >= 1):
    config_error("task.eval_examples", t.eval_examples, "a positive integer (examples per set size)")
  if not is_int(t.eval_seed):
    config_error("task.eval_seed", t.eval_seed, "an integer")
  if t.eval_sizes is not None:
    sizes = list(t.eval_sizes) if isinstance(t.eval_sizes, (list, tuple)) else None
    if not sizes or not all(is_int(s) and 1 <= s <= n - 1 for s in sizes) or len(set(sizes)) != len(sizes):
      config_error(
          "task.eval_sizes",
          t.eval_sizes,
          f"None (every size 1..{n - 1}) or a non-empty list of distinct " f"integers in [1, {n - 1}]",
      )
  for f in ("embed_dim", "value_dim"):
    if not (is_int(m[f]) and m[f] >= 1):
      config_error(f"model.{f}", m[f], "a positive integer")
  if not (
      is_int(m.num_heads) and m.num_heads >= 1 and m.embed_dim % m.num_heads == 0 and m.value_dim % m.num_heads == 0
  ):
    divisors = [h for h in range(1, m.embed_dim + 1) if m.embed_dim % h == 0 and m.value_dim % h == 0]
    config_error(
        "model.num_heads",
        m.num_heads,
        f"a common divisor of embed_dim={m.embed_dim} and " f"value_dim={m.value_dim}: one of {divisors}",
    )
  if not (isinstance(m.dropout, (int, float)) and 0.0 <= m.dropout < 1.0):
    config_error("model.dropout", m.dropout, "a rate in [0, 1)")
  try:
    sites = parse_dropout_on(m.dropout_on)
  except TypeError:
    sites = None
  if sites is None or not all(s in DROPOUT_SITES for s in sites):
    config_error("model.dropout_on", m.dropout_on, f"a subset of {DROPOUT_SITES} (a tuple or a comma-separated string)")
  if not isinstance(m.get("traced_dropout", False), bool):
    config_error("model.traced_dropout", m.traced_dropout, "a bool (dropout rates held in the model's state)")
  kind = m.get("kind", "query")
  if kind not in MODEL_KINDS:
    config_error("model.kind", kind, f"one of {MODEL_KINDS}")
  if kind == "decoder":
    # The paper's model has no norm and no positions (set_decoder.py).
    for f, ok in (("norm", "none"), ("positions", "none")):
      if m.get(f, ok) != ok:
        config_error(f"model.{f}", m[f], f"{ok!r} with model.kind='decoder' (or use model.kind='query')")
  if m.norm not in NORMS:
    config_error("model.norm", m.norm, f"one of {NORMS} (no LayerNorm, on the attention inputs, on the residual sum)")
  if m.positions not in POSITIONS:
    config_error("model.positions", m.positions, f"one of {POSITIONS}")
  if not (is_int(config.batch_size) and config.batch_size >= 1):
    config_error("batch_size", config.batch_size, "a positive integer (the global batch)")
  if not (is_int(config.steps) and config.steps >= 1):
    config_error("steps", config.steps, "a positive integer")


def set_logits(model, batch, *, full_forward: bool = False, **kwargs):
  """Logits [B, N] for each row's whole set: the decoder's last set position, the query model's readout.

  The decoder computes only that position's query (SetDecoder.last_forward; the same bits as the full
  forward's row at the evaluation's shape of the default config) unless full_forward=True, which reads the
  row from the full forward: for results whose bits predate last_forward and must reproduce to the bit at
  other shapes (the sweep's runs, merged across reruns; the balance report)."""
  if isinstance(model, set_decoder.SetDecoder):
    return model.last_logits(batch["tokens"], batch["mask"], full_forward=full_forward, **kwargs)
  return model(batch["tokens"], batch["mask"], **kwargs)


def balance_logits(model, batch):
  """set_logits for the balance report (set_complement_theory.displacement_stats, inputs of length 1 and
  2): the decoder's full forward, so the reports keep their bits (at L = 2 last_forward differs from it in
  the last bits); at these lengths it costs nothing."""
  return set_logits(model, batch, full_forward=True)


def prefix_loss(model, batch, num_tokens: int, **kwargs):
  """The decoder's all-prefix loss: mean over valid (row, position) pairs of the complement cross-entropy
  of prefix t_1..t_i, whose target is uniform over the tokens absent from it; and the metrics' means."""
  logits_BLN = model(batch["tokens"], batch["mask"], **kwargs)
  b, length, n = logits_BLN.shape
  present_BLN = set_decoder.prefix_present(batch["tokens"], batch["mask"], num_tokens)
  # Every prefix has <= L <= N - 1 tokens, so each row has an absent token, padded positions included.
  m = complement_metrics(logits_BLN.reshape(b * length, n), present_BLN.reshape(b * length, n))
  w_BL = jnp.asarray(batch["mask"]).astype(jnp.float32).reshape(-1)
  mean = lambda v: (w_BL * v).sum() / jnp.maximum(w_BL.sum(), 1.0)
  return {k: mean(m[k]) for k in ("ce", "kl", "invalid_mass", "top1_valid")}


def _eval_metrics(graphdef, state, batch, num_tokens, beta, full_forward: bool = False):
  """Means over the batch of the metrics as-is, at inverse temperature beta (t_*), and of the attention.
  full_forward: see set_logits."""
  model = nnx.merge(graphdef, state)
  logits_BN = set_logits(model, batch, deterministic=True, full_forward=full_forward)
  present_BN = batch_present(batch, num_tokens)
  out = {k: jnp.mean(v) for k, v in complement_metrics(logits_BN, present_BN).items()}
  out.update({f"t_{k}": jnp.mean(v) for k, v in complement_metrics(logits_BN * beta, present_BN).items()})
  if hasattr(model, "last_attention"):
    # The decoder's last set token attends over the s set tokens, the query model's query over them and
    # itself (one column more than the padded set): s or s + 1 positions.
    # (The decoder's fast path shares its one last_forward with set_logits above: XLA computes it once.)
    a_BHS = model.last_attention(batch["tokens"], batch["mask"], **({"full_forward": True} if full_forward else {}))
    entropy_B = -(a_BHS * jnp.log(jnp.where(a_BHS > 0, a_BHS, 1.0))).sum(-1).mean(-1)
    extra = a_BHS.shape[-1] - batch["mask"].shape[-1]
    size_B = jnp.asarray(batch["mask"]).astype(jnp.float32).sum(-1) + extra
    out["attn_entropy"] = jnp.mean(entropy_B)
    out["attn_dispersion"] = jnp.mean(jnp.where(size_B > 1, entropy_B / jnp.log(jnp.maximum(size_B, 2.0)), 1.0))
  return out


def _check_logits(graphdef, state, batch, num_tokens, full_forward: bool = False):
  """(logits [B, N], uniform targets over the absent tokens [B, N]) of the check set. full_forward: see
  set_logits."""
  model = nnx.merge(graphdef, state)
  logits_BN = set_logits(model, batch, deterministic=True, full_forward=full_forward)
  valid_BN = 1.0 - batch_present(batch, num_tokens)
  return logits_BN, valid_BN / valid_BN.sum(-1, keepdims=True)


@jax.jit
def _ce_moments(logits_BN, target_BN, beta):
  """(cross-entropy, d/d beta, d2/d beta2) of softmax(beta logits) against the targets, batch means: a
  global reduction, so every process fits the same temperature (temperature.fit)."""
  z = logits_BN.astype(jnp.float32)
  p = jax.nn.softmax(beta * z, axis=-1)
  ez_p, ez_t = (p * z).sum(-1), (target_BN * z).sum(-1)
  ce = jax.nn.logsumexp(beta * z, axis=-1) - beta * ez_t
  var = jnp.maximum((p * z * z).sum(-1) - ez_p**2, 0.0)
  return jnp.stack([ce.mean(), (ez_p - ez_t).mean(), var.mean()])


class SetComplementTask(Task):
  """Data, single-layer attention model, complement cross-entropy and per-size evaluation."""

  EVAL_LENGTHS_FIELD = "eval_sizes"

  def __init__(self, config: ml_collections.ConfigDict, workdir: Optional[str] = None):
    super().__init__(config, workdir)
    self._eval_fn = jax.jit(_eval_metrics, static_argnums=(0, 3))
    self._check_fn = jax.jit(_check_logits, static_argnums=(0, 3))
    self._eval_batches = None
    self._check_batch = None

  @property
  def num_tokens(self) -> int:
    return int(self.config.task.num_tokens)

  @property
  def train_max_size(self) -> int:
    return int(self.config.task.train_max_size)

  @property
  def max_len(self) -> int:
    t = self.config.task
    return int(t.train_max_size if t.max_len is None else t.max_len)

  def eval_sizes(self):
    t = self.config.task
    return list(range(1, self.num_tokens)) if t.eval_sizes is None else sorted(int(s) for s in t.eval_sizes)

  def validate(self) -> None:
    validate_config(self.config)

  @property
  def is_decoder(self) -> bool:
    return self.config.model.get("kind", "query") == "decoder"

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    if self.is_decoder:
      return set_decoder.SetDecoder(model_config(self.config), rngs=rngs)
    return SetTransformer(model_config(self.config), rngs=rngs)

  def train_iterator(self, process_index: int, process_count: int) -> StepBatchIterator:
    t = self.config.task
    return SetComplementIterator(
        seed=int(self.config.seed),
        num_tokens=self.num_tokens,
        min_size=int(t.train_min_size),
        max_size=self.train_max_size,
        length=self.max_len,
        global_batch=int(self.config.batch_size),
        process_index=process_index,
        process_count=process_count,
        dist=t.train_size_dist,
    )

  def loss(self, model, batch, *, rngs=None, train: bool):
    if self.is_decoder:
      m = prefix_loss(model, batch, self.num_tokens, deterministic=not train, rngs=rngs)
      return m["ce"], {"loss": m["ce"], "kl": m["kl"], "invalid_mass": m["invalid_mass"], "top1_valid": m["top1_valid"]}
    logits_BN = model(batch["tokens"], batch["mask"], deterministic=not train, rngs=rngs)
    m = complement_metrics(logits_BN, batch_present(batch, self.num_tokens))
    loss = jnp.mean(m["ce"])
    return loss, {
        "loss": loss,
        "kl": jnp.mean(m["kl"]),
        "invalid_mass": jnp.mean(m["invalid_mass"]),
        "top1_valid": jnp.mean(m["top1_valid"]),
    }

  def _local_eval_batches(self, ctx: EvalContext):
    """{size: process-local numpy rows}; every size padded to N - 1 so the forward compiles once."""
    t = self.config.task
    n_ex, pc, pi = int(t.eval_examples), ctx.process_count, ctx.process_index
    if n_ex % pc:
      raise ValueError(f"config.task.eval_examples={n_ex}: expected a multiple of process_count={pc}.")
    if self._eval_batches is None or self._eval_batches[0] != (pi, pc):
      rows = slice(pi * n_ex // pc, (pi + 1) * n_ex // pc)
      batches = {}
      for s in self.eval_sizes():
        full = data.eval_batch(int(t.eval_seed), s, n_ex, num_tokens=self.num_tokens, length=self.num_tokens - 1)
        batches[s] = {k: v[rows] for k, v in full.items()}
      self._eval_batches = ((pi, pc), batches)
    return self._eval_batches[1]

  def _local_check_batches(self, ctx: EvalContext):
    """The temperature's check set: every in-range size, seed eval_seed + 1, process-local rows; one
    batch per size, of the evaluation batches' shape (rows padded to N - 1)."""
    t = self.config.task
    n_ex, pc, pi = int(t.eval_examples), ctx.process_count, ctx.process_index
    if self._check_batch is None or self._check_batch[0] != (pi, pc):
      rows = slice(pi * n_ex // pc, (pi + 1) * n_ex // pc)
      parts = []
      for s in range(int(t.train_min_size), self.train_max_size + 1):
        full = data.eval_batch(
            int(t.eval_seed) + CHECK_SEED_OFFSET, s, n_ex, num_tokens=self.num_tokens, length=self.num_tokens - 1
        )
        parts.append({k: v[rows] for k, v in full.items()})
      self._check_batch = ((pi, pc), parts)
    return self._check_batch[1]

  def fit_temperature(self, model: nnx.Module, ctx: EvalContext) -> float:
    """The one logit temperature of these weights (in-range cross-entropy on the check set).

    The check set's forward runs one size at a time, in batches of the evaluation's shape: the rows'
    logits are the same bits as from one batch of all sizes (a row's forward does not depend on the
    batch), and faster on a CPU, where one batch of all sizes' 4,096 x 63 x 63 attention weights does
    not fit the caches."""
    graphdef, state = nnx.split(model)
    pieces = [
        self._check_fn(graphdef, state, ctx.put_batch(b), self.num_tokens) for b in self._local_check_batches(ctx)
    ]
    logits_BN = jnp.concatenate([p[0] for p in pieces])
    target_BN = jnp.concatenate([p[1] for p in pieces])
    return temperature.fit(lambda beta: jax.device_get(_ce_moments(logits_BN, target_BN, jnp.float32(beta))))

  def evaluate(self, model: nnx.Module, ctx: EvalContext) -> Dict[str, Any]:
    graphdef, state = nnx.split(model)
    temp = self.fit_temperature(model, ctx)
    beta = jnp.float32(1.0 / temp)
    metrics = METRICS
    per_size = {m: [] for m in metrics}
    sizes = []
    outs = []
    for s, local in self._local_eval_batches(ctx).items():
      # Dispatched for every size before any is read back: one host round trip, not one per size.
      outs.append(self._eval_fn(graphdef, state, ctx.put_batch(local), self.num_tokens, beta))
      sizes.append(s)
    for out in jax.device_get(outs):
      for m in metrics:
        per_size[m].append(float(out[m]))
    result = length_report.range_means(sizes, per_size, self.train_max_size, metrics)
    result["temperature"] = temp
    result["per_size"] = {"size": sizes, **per_size}
    if self.num_tokens <= MAX_BALANCE_TOKENS:
      # The theory's balance conditions at lengths 1 and 2 (set_complement_theory.py).
      balance = theory.displacement_stats(model, self.num_tokens, balance_logits)
      result["balance"] = balance
      result.update({f"balance/{k}": v for k, v in balance.items() if isinstance(v, float)})
    result["info"] = {
        "train_max_size": self.train_max_size,
        "num_tokens": self.num_tokens,
        "eval_examples": int(self.config.task.eval_examples),
    }
    return result

  def summarize(self, results: Dict[str, Dict[str, Any]], step: int, workdir: Optional[str]) -> str:
    kinds = [k for k, r in results.items() if r and "per_size" in r]
    if not kinds:
      return ""
    present = lambda names: tuple(m for m in names if all(m in results[k]["per_size"] for k in kinds))
    text = format_table(results, kinds, self.train_max_size, step, metrics=present(TABLE_METRICS))
    text += "\n" + format_temperature_control(results, kinds)
    balance = theory.format_balance({k: results[k] for k in kinds})
    if balance:
      text = text + "\n" + balance
    if workdir:
      plot_per_size(results, kinds, self.train_max_size, os.path.join(workdir, "plots"), step, present(PLOT_METRICS))
    return text

  def seq_len(self) -> Optional[int]:
    return self.max_len

  def tokens_per_example(self) -> int:
    return self.max_len + (0 if self.is_decoder else 1)  # the query model appends its query token

  def flops_per_token(self) -> Optional[float]:
    flops = set_decoder.flops_per_example if self.is_decoder else flops_per_example
    return flops(model_config(self.config), self.max_len) / self.tokens_per_example()


TASK = SetComplementTask
