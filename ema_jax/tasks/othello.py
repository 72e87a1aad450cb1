"""OthelloGPT length generalisation: train on the first L_train moves, evaluate legality at every position.

Data: random legal Othello games (ema_jax.data.othello), generated once and cached with a checksum in
config.task.data_dir (default: <workdir>/othello_data, or ~/.cache/ema_jax/othello for runs without a workdir).
Tokens 1..60 are the playable squares, 0 is padding.

Training (the standard OthelloGPT objective): the inputs are the first L_train = config.task.train_len
moves of a game, tokens[:, :L_train], and the target at each input position is the next move, so
the last input position is scored against move L_train + 1. Cross-entropy on the actual next move; targets
past a game's end (padding) are masked. Since each move is uniform over the legal moves, the
cross-entropy's minimiser is the uniform distribution over the legal set.

Positions: position p = 1..59 is the prediction made after the first p moves (the model's output at token
index p - 1), scored against the legal set after moves 1..p (ema_jax.data.othello.legal_move_masks row
p - 1). Training covers p <= L_train; the GPT's learned position embeddings exist for all 59 positions,
but those at indices >= L_train never receive a gradient (they keep their initial values): p > L_train is
the length-generalisation question.

Evaluation on the validation games (the first config.task.eval_games of them), at every position where a
next move exists, averaged over games per position and then over positions within each region
(in_range: p <= L_train, out_of_range: p > L_train):
  legal_mass   probability on the legal moves (chance, uniform over the 60 squares: |legal| / 60)
  top1_legal   the most likely token (of all 61, padding included) is a legal move
  kl           KL(uniform over legal || p), the excess next-move cross-entropy over the optimum; the
               other direction KL(p || uniform) is infinite as soon as p puts any mass on an illegal move
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ema_jax.data import othello as data
from ema_jax.data import othello_dataset
from ema_jax.models.transformer import DTYPES, GPT, NORM_POSITIONS, GPTConfig, flops_per_token
from ema_jax import length_report
from ema_jax.errors import config_error, is_int
from ema_jax.tasks.base import EvalContext, StepBatchIterator, Task

MAX_POSITION = data.MAX_MOVES - 1  # 59 predictions per game (nothing follows move 60)
METRICS = ("legal_mass", "top1_legal", "kl")
METRIC_LABELS = {
    "legal_mass": "probability on legal moves",
    "top1_legal": "top-1 legal rate",
    "kl": "KL(uniform over legal || p)",
}
SHORT = {"legal_mass": "mass", "top1_legal": "top1", "kl": "KL"}
LOG_SCALE = ("kl",)


def default_data_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ema_jax", "othello")


# ------------------------------------------------------------------------------------------------ metrics


def legal_move_metrics(logits_BTV: jax.Array, legal_BTV: jax.Array) -> Dict[str, jax.Array]:
  """Per-prediction metrics [B, T] of logits against legal-move sets (float32).

  Rows with an empty legal set (game over, padding) get finite placeholder values; mask them with
  legal_BTV.any(-1).
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  legal_BTV = legal_BTV.astype(jnp.float32)
  n_legal_BT = legal_BTV.sum(-1)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  mass_BT = (jnp.exp(logp_BTV) * legal_BTV).sum(-1)
  top_BT = jnp.argmax(logits_BTV, -1)
  top1_BT = jnp.take_along_axis(legal_BTV, top_BT[..., None], axis=-1)[..., 0]
  safe_n_BT = jnp.maximum(n_legal_BT, 1.0)
  kl_BT = -(legal_BTV * logp_BTV).sum(-1) / safe_n_BT - jnp.log(safe_n_BT)
  return {"legal_mass": mass_BT, "top1_legal": top1_BT, "kl": kl_BT}


def next_move_loss(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Mean cross-entropy over the non-padding targets (token 0 = no next move)."""
  mask_BT = (targets_BT > 0).astype(jnp.float32)
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
  return (ce_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def region_means(
    positions: Sequence[int], per_position: Mapping[str, Sequence[float]], train_len: int
) -> Dict[str, float]:
  """In-range (p <= train_len) and out-of-range means of every metric (length_report.range_means)."""
  return length_report.range_means(positions, per_position, train_len, METRICS)


# ----------------------------------------------------------------------------------------------- iterator


class OthelloIterator(StepBatchIterator):
  """Epochs over the training games, reshuffled per epoch from (seed, epoch); the state is the step.

  Batches: inputs int32 [b, L_train] = the first L_train moves, targets int32 [b, L_train] = the next
  moves (0 past the end of a game), b = global_batch // process_count rows of the global batch.
  """

  def __init__(
      self,
      tokens_NT: np.ndarray,
      *,
      train_len: int,
      seed: int,
      global_batch: int,
      process_index: int = 0,
      process_count: int = 1,
  ):
    if global_batch % process_count:
      raise ValueError(
          f"OthelloIterator: batch_size={global_batch} is not divisible by "
          f"process_count={process_count}; use a multiple of {process_count}."
      )
    if tokens_NT.shape[0] < global_batch:
      raise ValueError(
          f"config.batch_size={global_batch} exceeds the {tokens_NT.shape[0]} training games; "
          f"use a smaller batch or more games (config.task.num_games)."
      )
    self.window_NT = np.ascontiguousarray(tokens_NT[:, : train_len + 1], dtype=np.int32)
    self.seed, self.global_batch = int(seed), int(global_batch)
    self.local_batch = global_batch // process_count
    self.offset = process_index * self.local_batch
    self.batches_per_epoch = tokens_NT.shape[0] // global_batch
    self.step = 0
    self._perm = (None, None)

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm = (epoch, rng.permutation(self.window_NT.shape[0]))
    return self._perm[1]

  def __next__(self) -> Dict[str, np.ndarray]:
    epoch, k = divmod(self.step, self.batches_per_epoch)
    start = k * self.global_batch + self.offset
    rows = self._permutation(epoch)[start : start + self.local_batch]
    window = self.window_NT[rows]
    self.step += 1
    return {"inputs": window[:, :-1], "targets": window[:, 1:]}


# ------------------------------------------------------------------------------------------------- config


def num_val_games(config: ml_collections.ConfigDict) -> int:
  t = config.task
  return int(round(int(t.num_games) * float(t.val_fraction)))


def eval_positions(config: ml_collections.ConfigDict):
  t = config.task
  if t.eval_lengths is None:
    return list(range(1, MAX_POSITION + 1))
  return sorted(int(p) for p in t.eval_lengths)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the task and model fields; raises ValueError naming the field, its value and what would work."""
  t, m = config.task, config.model
  if not (is_int(t.num_games) and t.num_games >= 2):
    config_error("task.num_games", t.num_games, "an integer >= 2 (training plus validation games)")
  if not (isinstance(t.val_fraction, (int, float)) and 0.0 < t.val_fraction < 1.0):
    config_error("task.val_fraction", t.val_fraction, "a fraction in (0, 1)")
  n_val = num_val_games(config)
  if not 1 <= n_val < t.num_games:
    config_error(
        "task.val_fraction",
        t.val_fraction,
        f"a fraction that leaves at least one validation and one "
        f"training game out of num_games={t.num_games} (it gives {n_val} validation games)",
    )
  if not (is_int(t.data_seed) and t.data_seed >= 0):
    config_error("task.data_seed", t.data_seed, "a non-negative integer (seeds the game generator)")
  if t.data_dir is not None and not (isinstance(t.data_dir, str) and t.data_dir):
    config_error("task.data_dir", t.data_dir, "None (the default cache directory) or a directory path")
  if not (is_int(t.train_len) and 1 <= t.train_len <= MAX_POSITION):
    config_error(
        "task.train_len",
        t.train_len,
        f"an integer in [1, {MAX_POSITION}]: the number of moves fed "
        f"in training (the last one is scored against move train_len + 1)",
    )
  if not (is_int(t.eval_games) and 1 <= t.eval_games <= n_val):
    config_error(
        "task.eval_games",
        t.eval_games,
        f"an integer in [1, {n_val}] (the validation games: " f"num_games * val_fraction)",
    )
  if not (is_int(t.eval_batch_size) and t.eval_batch_size >= 1):
    config_error("task.eval_batch_size", t.eval_batch_size, "a positive integer")
  if t.eval_lengths is not None:
    lengths = list(t.eval_lengths) if isinstance(t.eval_lengths, (list, tuple)) else None
    if (
        not lengths
        or not all(is_int(p) and 1 <= p <= MAX_POSITION for p in lengths)
        or len(set(lengths)) != len(lengths)
    ):
      config_error(
          "task.eval_lengths",
          t.eval_lengths,
          f"None (every position 1..{MAX_POSITION}) or a non-empty "
          f"list of distinct positions in [1, {MAX_POSITION}]",
      )
  for f in ("num_layers", "num_heads", "width", "mlp_ratio"):
    if not (is_int(m[f]) and m[f] >= 1):
      config_error(f"model.{f}", m[f], "a positive integer")
  if m.width % m.num_heads:
    config_error("model.num_heads", m.num_heads, f"a divisor of model.width={m.width}")
  longest = max([t.train_len] + eval_positions(config))
  if not (is_int(m.context_len) and m.context_len >= longest):
    config_error(
        "model.context_len",
        m.context_len,
        f"an integer >= {longest} (the longest input: train_len and "
        f"the evaluated positions; {MAX_POSITION} covers every position)",
    )
  if not (isinstance(m.dropout, (int, float)) and 0.0 <= m.dropout < 1.0):
    config_error("model.dropout", m.dropout, "a rate in [0, 1)")
  if m.dtype not in DTYPES:
    config_error("model.dtype", m.dtype, f"one of {DTYPES}")
  if m.get("norm_position", "pre") not in NORM_POSITIONS:
    config_error("model.norm_position", m.norm_position, "'pre' (GPT-2) or 'post' (GPT-1, the paper's OthelloGPT)")
  if not (is_int(config.batch_size) and 1 <= config.batch_size <= t.num_games - n_val):
    config_error("batch_size", config.batch_size, f"an integer in [1, {t.num_games - n_val}] (the training games)")


def model_config(config: ml_collections.ConfigDict) -> GPTConfig:
  m = config.model
  return GPTConfig(
      vocab_size=data.VOCAB_SIZE,
      context_len=int(m.context_len),
      num_layers=int(m.num_layers),
      num_heads=int(m.num_heads),
      width=int(m.width),
      mlp_ratio=int(m.mlp_ratio),
      dropout=float(m.dropout),
      dtype=m.dtype,
      norm_position=m.get("norm_position", "pre"),  # configs saved before the field existed were pre-norm
  )


# ------------------------------------------------------------------------------------------------- task


def _eval_sums(graphdef, state, batch):
  """Per-position sums over the batch of each metric, and the number of scored games [T]."""
  model = nnx.merge(graphdef, state)
  logits_BTV = model(batch["inputs"], deterministic=True)
  legal_BTV = batch["legal"]
  valid_BT = legal_BTV.any(-1).astype(jnp.float32)
  per = legal_move_metrics(logits_BTV, legal_BTV)
  out = {k: (v * valid_BT).sum(0) for k, v in per.items()}
  out["games"] = valid_BT.sum(0)
  out["chance_mass"] = (legal_BTV.sum(-1) * valid_BT).sum(0) / (data.VOCAB_SIZE - 1)
  return out


class OthelloTask(Task):
  """Random legal Othello games, the GPT decoder, next-move cross-entropy, legality at every position."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: Optional[str] = None):
    super().__init__(config, workdir)
    self._eval_fn = jax.jit(_eval_sums, static_argnums=(0,))
    self._games = None
    self._eval_batches = None

  @property
  def train_len(self) -> int:
    return int(self.config.task.train_len)

  def data_dir(self) -> str:
    if self.config.task.data_dir:
      return self.config.task.data_dir
    return os.path.join(self.workdir, "othello_data") if self.workdir else default_data_dir()

  def games(self):
    """(train, val) OthelloGames, generated on first use and cached on disk with a checksum."""
    if self._games is None:
      t = self.config.task
      self._games = othello_dataset.load_or_generate(
          self.data_dir(), int(t.num_games), int(t.data_seed), float(t.val_fraction)
      )
    return self._games

  def validate(self) -> None:
    validate_config(self.config)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return GPT(model_config(self.config), rngs=rngs)

  def train_iterator(self, process_index: int, process_count: int) -> StepBatchIterator:
    train, _ = self.games()
    return OthelloIterator(
        train.tokens(),
        train_len=self.train_len,
        seed=int(self.config.seed),
        global_batch=int(self.config.batch_size),
        process_index=process_index,
        process_count=process_count,
    )

  def loss(self, model, batch, *, rngs=None, train: bool):
    logits_BTV = model(batch["inputs"], deterministic=not train, rngs=rngs)
    loss = next_move_loss(logits_BTV, batch["targets"])
    return loss, {"next_move_ce": loss}

  def _local_eval_batches(self, ctx: EvalContext):
    """Process-local numpy batches {inputs [b, T], legal [b, T, 61]}, T = the longest evaluated position.

    The evaluated games are padded to a multiple of eval_batch_size with empty rows (no legal moves, so
    they are never scored), so every batch has the same shape and the forward compiles once.
    """
    t = self.config.task
    key = (
        ctx.process_index,
        ctx.process_count,
        int(t.eval_games),
        int(t.eval_batch_size),
        max(eval_positions(self.config)),
    )
    if self._eval_batches is None or self._eval_batches[0] != key:
      _, val = self.games()
      n, pc, pi = int(t.eval_games), ctx.process_count, ctx.process_index
      length = key[-1]
      batch = int(t.eval_batch_size)
      if batch % pc:
        raise ValueError(f"config.task.eval_batch_size={batch}: expected a multiple of process_count={pc}.")
      tokens = val.tokens()[:n, :length]
      legal = data.legal_move_masks(val.moves[:n])[:, :length]
      padded = -(-n // batch) * batch
      tokens = np.pad(tokens, ((0, padded - n), (0, 0)))
      legal = np.pad(legal, ((0, padded - n), (0, 0), (0, 0)))
      local = batch // pc
      batches = []
      for start in range(0, padded, batch):
        rows = slice(start + pi * local, start + (pi + 1) * local)
        batches.append({"inputs": tokens[rows], "legal": legal[rows]})
      self._eval_batches = (key, batches)
    return self._eval_batches[1]

  def evaluate(self, model: nnx.Module, ctx: EvalContext) -> Dict[str, Any]:
    graphdef, state = nnx.split(model)
    totals = None
    for local in self._local_eval_batches(ctx):
      out = jax.device_get(self._eval_fn(graphdef, state, ctx.put_batch(local)))
      out = {k: np.asarray(v, np.float64) for k, v in out.items()}
      totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
    positions = [p for p in eval_positions(self.config) if totals["games"][p - 1] > 0]
    idx = np.asarray(positions) - 1
    games = totals["games"][idx]
    per_position = {"position": positions}
    for m in METRICS:
      per_position[m] = (totals[m][idx] / games).tolist()
    per_position["chance_mass"] = (totals["chance_mass"][idx] / games).tolist()
    per_position["games"] = games.astype(int).tolist()
    result = region_means(positions, per_position, self.train_len)
    result["per_position"] = per_position
    result["info"] = {
        "train_len": self.train_len,
        "eval_games": int(self.config.task.eval_games),
        "positions_trained": f"1..{self.train_len}",
    }
    return result

  def summarize(self, results: Dict[str, Dict[str, Any]], step: int, workdir: Optional[str]) -> str:
    kinds = [k for k, r in results.items() if r and "per_position" in r]
    if not kinds:
      return ""
    text = format_table(results, kinds, self.train_len, step)
    if workdir:
      plot_per_position(results, kinds, self.train_len, os.path.join(workdir, "plots"), step)
    return text

  def seq_len(self) -> Optional[int]:
    return self.train_len

  def tokens_per_example(self) -> int:
    return self.train_len

  def flops_per_token(self) -> Optional[float]:
    return flops_per_token(model_config(self.config), self.train_len)


TASK = OthelloTask


# --------------------------------------------------------------------------------------- tables and plots


def format_table(results, kinds, train_len: int, step: int, metrics=METRICS) -> str:
  return length_report.format_table(
      results,
      kinds,
      per_key="per_position",
      length_key="position",
      train_len=train_len,
      metrics=metrics,
      short=SHORT,
      title=(
          f"othello, step {step} (trained positions 1..{train_len}; '*' = beyond; chance = "
          f"mass of uniform over 60 squares)"
      ),
      length_header="pos",
      fmt=lambda v: f"{v:.4f}",
      max_rows=20,
      margin=1,
      extra_column=("chance", "chance_mass", lambda v: f"{v:.4f}"),
  )


def plot_per_position(
    results, kinds, train_len: int, out_dir: str, step: Optional[int] = None, metrics=METRICS, prefix: str = "othello"
) -> list:
  """One PNG per metric against position, trained range shaded, one line per weights kind."""

  def chance(ax, m):
    if m == "legal_mass":
      pp = results[kinds[0]]["per_position"]
      ax.plot(pp["position"], pp["chance_mass"], color="0.5", linestyle=":", label="uniform over 60")

  return length_report.plot_per_length(
      results,
      kinds,
      per_key="per_position",
      length_key="position",
      train_len=train_len,
      metrics=metrics,
      labels=METRIC_LABELS,
      log_scale=LOG_SCALE,
      out_dir=out_dir,
      prefix=prefix,
      xlabel="position p (moves seen)",
      shade_label="trained positions",
      step=step,
      markersize=3,
      reference=chance,
  )
