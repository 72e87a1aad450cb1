"""The probes of ema_jax/data/probes.py (MQAR, selective copy, copy, filtering, recall_toy) as a trainer task.

config.task.probe picks the probe. Every run trains on a range of sizes: each step draws one size from
config.task.train_sizes (uniformly, deterministic in (seed, step); one size per batch, so each distinct
size compiles the step once), and evaluation runs at config.task.eval_sizes, inside the range and beyond
it. A size is, per probe: key-value pairs N for recall (MQAR; sequence length seq_per_pair x N) and
recall_toy, the whole input length T for selective copy (copy_tokens data tokens among noise, then as many
markers), the string length for copy and the stream length for filtering. The model is any LM of the LM
task (config.model.kind: ema_lm with fixed or selective traces, gpt, aggregator) over the probe's
vocabulary (config.task.vocab_size). Training data is generated on the fly, independent of the process
layout (each process takes its rows of the step's global batch). The loss is the cross-entropy of the
answer tokens only; evaluation reports exact-match accuracy of the answers (per token and per sequence)
at every evaluation size, on held-out batches of task.eval_seed, with the model reading the probe's inputs
(copy and recall_toy are teacher forced; MQAR, selective copy and filtering never show an answer).

The temperature control: one scalar T per set of weights, fitted (ema_jax/temperature.py) to minimise the
answer cross-entropy at the training sizes of a check set drawn with seed eval_seed + 1, and the answer
cross-entropy reported as-is (answer_ce) and at T (t_answer_ce). Accuracy is an argmax, which no
temperature changes: an accuracy verdict is the same at T, and answer_ce is what a sharpening moves.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from ema_jax import models
from ema_jax.data import probes as data
from ema_jax.errors import config_error, is_int
from ema_jax.tasks.base import EvalContext, StepBatchIterator, Task

MODEL_KINDS = models.MODEL_KINDS
# Separates the stream that picks each step's training size from the one that generates its batch.
_SIZE_STREAM = 0x512E


def toy_vocab(t: ml_collections.ConfigDict) -> data.Vocab:
  """The shared layout of copy, recall_toy and filtering inside task.vocab_size tokens."""
  return data.Vocab(int(t.vocab_size) - data.SPECIALS)


def make_batch(t: ml_collections.ConfigDict, size: int, seed: int, step: int, batch: int) -> Dict[str, np.ndarray]:
  if t.probe == "recall":
    return data.mqar_batch(
        seed, step, batch, size, sequence_length(t, size), int(t.vocab_size), power_a=float(t.power_a)
    )
  if t.probe == "selective_copy":
    return data.selective_copy_batch(seed, step, batch, size, int(t.copy_tokens), int(t.vocab_size))
  if t.probe == "copy":
    return data.copy_batch(seed, step, batch, size, toy_vocab(t))
  if t.probe == "recall_toy":
    return data.recall_toy_batch(seed, step, batch, size, int(t.queries), toy_vocab(t))
  return data.filtering_batch(seed, step, batch, size, toy_vocab(t), noise=float(t.noise))


def sequence_length(t: ml_collections.ConfigDict, size: int) -> int:
  """Length of the model's input rows for a probe size."""
  if t.probe == "recall":
    return int(t.seq_per_pair) * size
  if t.probe == "copy":
    return 2 * size
  if t.probe == "recall_toy":
    return 2 * size + 3 * int(t.queries)
  return size  # selective_copy (the whole input), filtering (the stream)


def train_size_at(t: ml_collections.ConfigDict, seed: int, step: int) -> int:
  """The size of step `step`'s training batch: uniform over the distinct task.train_sizes."""
  sizes = sorted({int(s) for s in t.train_sizes})
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step), _SIZE_STREAM]))
  return sizes[int(rng.integers(len(sizes)))]


def train_range(t: ml_collections.ConfigDict):
  return min(int(s) for s in t.train_sizes), max(int(s) for s in t.train_sizes)


class ProbeIterator(StepBatchIterator):
  """Process p of P takes rows [p b, (p + 1) b) of the step's global batch; the state is the step."""

  def __init__(self, t, seed: int, global_batch: int, process_index: int, process_count: int):
    if global_batch % process_count:
      raise ValueError(f"batch_size={global_batch} is not divisible by process_count={process_count}.")
    self.t, self.seed, self.global_batch = t, int(seed), int(global_batch)
    b = global_batch // process_count
    self.rows = slice(process_index * b, (process_index + 1) * b)
    self.step = 0

  def __next__(self) -> Dict[str, np.ndarray]:
    size = train_size_at(self.t, self.seed, self.step)
    out = make_batch(self.t, size, self.seed, self.step, self.global_batch)
    self.step += 1
    return {k: v[self.rows] for k, v in out.items()}


def answer_loss(model, batch, *, rngs=None, train: bool = False):
  """(mean answer cross-entropy, answer token accuracy), float32."""
  logits_BTV = model(batch["inputs"], deterministic=not train, rngs=rngs).astype(jnp.float32)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
  m_BT = batch["answer_mask"].astype(jnp.float32)
  n = jnp.maximum(m_BT.sum(), 1.0)
  hit_BT = (jnp.argmax(logits_BTV, -1) == batch["targets"]).astype(jnp.float32) * m_BT
  return (nll_BT * m_BT).sum() / n, hit_BT.sum() / n


def _predictions(graphdef, state, inputs, targets, answer_mask, beta):
  """(argmax predictions [B, T], answer NLL sum as-is, answer NLL sum at inverse temperature beta)."""
  logits_BTV = nnx.merge(graphdef, state)(inputs, deterministic=True).astype(jnp.float32)
  m_BT = answer_mask.astype(jnp.float32)
  nll = lambda z: (optax.softmax_cross_entropy_with_integer_labels(z, targets) * m_BT).sum()
  return jnp.argmax(logits_BTV, -1), nll(logits_BTV), nll(logits_BTV * beta)


def _logits(graphdef, state, inputs):
  return nnx.merge(graphdef, state)(inputs, deterministic=True).astype(jnp.float32)


class ProbesTask(Task):
  EVAL_LENGTHS_FIELD = "eval_sizes"

  def __init__(self, config: ml_collections.ConfigDict, workdir: Optional[str] = None):
    super().__init__(config, workdir)
    self._predict = jax.jit(_predictions, static_argnums=0)
    self._logits = jax.jit(_logits, static_argnums=0)

  def validate(self) -> None:
    t, m = self.config.task, self.config.model
    if t.probe not in data.PROBES:
      config_error("task.probe", t.probe, f"one of {data.PROBES}")
    for f in ("vocab_size", "queries", "seq_per_pair", "copy_tokens", "eval_batch_size", "eval_batches"):
      if not (is_int(t[f]) and t[f] >= 1):
        config_error(f"task.{f}", t[f], "a positive integer")
    for f, example in (("train_sizes", "[4, 8, 16]"), ("eval_sizes", "[4, 8, 16, 32, 64]")):
      sizes = list(t[f] or [])
      if not sizes or not all(is_int(s) and s >= 1 for s in sizes):
        config_error(f"task.{f}", t[f], f"a non-empty list of positive sizes, e.g. {example}")
    if t.probe in ("copy", "recall_toy", "filtering") and t.vocab_size <= data.SPECIALS:
      config_error("task.vocab_size", t.vocab_size, f"> {data.SPECIALS} ({t.probe}'s special tokens + symbols)")
    if not 0 <= t.noise < 1:
      config_error("task.noise", t.noise, "a probability in [0, 1)")
    if not t.power_a > 0:
      config_error("task.power_a", t.power_a, "a number > 0 (Zoology's 0.01; 1 = uniform query gaps)")
    # Every size must make a batch: one row of each, through the generators' own checks.
    for f in ("train_sizes", "eval_sizes"):
      for size in t[f]:
        try:
          make_batch(t, int(size), 0, 0, 1)
        except ValueError as e:
          config_error(f"task.{f}", list(t[f]), f"sizes the {t.probe} probe can make ({size}: {e})")
    if m.kind not in MODEL_KINDS:
      config_error("model.kind", m.kind, f"one of {MODEL_KINDS}")
    self.model_config()

  def model_config(self):
    m, t = self.config.model, self.config.task
    sizes = list(t.train_sizes) + list(t.eval_sizes)
    defaults = {"context_len": max(sequence_length(t, s) for s in sizes)} if m.kind == "gpt" else None
    return models.make_config(m, defaults, vocab_size=int(t.vocab_size))

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return models.sequence_model(self.config.model.kind).model_cls(self.model_config(), rngs=rngs)

  def train_iterator(self, process_index: int, process_count: int):
    return ProbeIterator(
        self.config.task, int(self.config.seed), int(self.config.batch_size), process_index, process_count
    )

  def loss(self, model, batch: Mapping[str, jax.Array], *, rngs=None, train: bool):
    loss, acc = answer_loss(model, batch, rngs=rngs, train=train)
    return loss, {"loss": loss, "answer_accuracy": acc}

  def evaluate(self, model: nnx.Module, ctx: EvalContext) -> Dict[str, Any]:
    t = self.config.task
    graphdef, state = nnx.split(model)
    n, pc, pi = int(t.eval_batch_size), ctx.process_count, ctx.process_index
    if n % pc:
      raise ValueError(f"config.task.eval_batch_size={n}: expected a multiple of process_count={pc}.")
    rows = slice(pi * n // pc, (pi + 1) * n // pc)
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)) if pc > 1 else np.asarray(x)
    temp = self.fit_temperature(graphdef, state, ctx, rows, gather)
    beta = jnp.float32(1.0 / temp)
    per = {k: [] for k in ("size", "token_accuracy", "sequence_accuracy", "answer_ce", "t_answer_ce")}
    for size in sorted(int(s) for s in t.eval_sizes):
      tok = seq = nll = t_nll = answers = 0.0
      for i in range(int(t.eval_batches)):
        b = make_batch(t, size, int(t.eval_seed), i, n)
        local = ctx.put_batch({k: v[rows] for k, v in b.items()})
        pred, s_nll, s_t_nll = self._predict(
            graphdef, state, local["inputs"], local["targets"], local["answer_mask"], beta
        )
        # Predictions of the global batch (every process's rows), scored on every process alike.
        acc = data.accuracy(gather(pred), b)
        tok += acc["token_accuracy"] / int(t.eval_batches)
        seq += acc["sequence_accuracy"] / int(t.eval_batches)
        nll, t_nll = nll + float(jax.device_get(s_nll)), t_nll + float(jax.device_get(s_t_nll))
        answers += float(b["answer_mask"].sum())
      per["size"].append(size)
      per["token_accuracy"].append(tok)
      per["sequence_accuracy"].append(seq)
      per["answer_ce"].append(nll / max(answers, 1.0))
      per["t_answer_ce"].append(t_nll / max(answers, 1.0))
    out: Dict[str, Any] = {"per_size": per, "temperature": temp}
    lo, hi = train_range(t)
    regions = (("shorter", lambda s: s < lo), ("in_range", lambda s: lo <= s <= hi), ("beyond", lambda s: s > hi))
    for name, sel in regions:
      idx = [i for i, s in enumerate(per["size"]) if sel(s)]
      if idx:
        for k in ("token_accuracy", "sequence_accuracy", "answer_ce", "t_answer_ce"):
          out[f"{name}/{k}"] = float(np.mean([per[k][i] for i in idx]))
    return out

  def fit_temperature(self, graphdef, state, ctx: EvalContext, rows, gather) -> float:
    """T minimising the answer cross-entropy over one batch of each training size of the check set
    (seed eval_seed + 1, never evaluated), every process's rows."""
    from ema_jax import temperature

    t = self.config.task
    z, y = [], []
    for size in sorted({int(s) for s in t.train_sizes}):
      b = make_batch(t, size, int(t.eval_seed) + 1, 0, int(t.eval_batch_size))
      logits = gather(self._logits(graphdef, state, ctx.put_batch({"inputs": b["inputs"][rows]})["inputs"]))
      m = b["answer_mask"] > 0
      z.append(logits[m])
      y.append(b["targets"][m])
    z, y = np.concatenate(z), np.concatenate(y)
    return temperature.fit_temperature(z, np.eye(z.shape[-1], dtype=np.float64)[y])

  def summarize(self, results: Dict[str, Dict[str, Any]], step: int, workdir: Optional[str]) -> str:
    t = self.config.task
    lo, hi = train_range(t)
    trained = {int(s) for s in t.train_sizes}
    lines = [
        f"probe {t.probe}, step {step} (trained at sizes {sorted(trained)}: '+'; '*' = beyond {hi}): answer accuracy"
    ]
    names = [k for k, r in results.items() if r and "per_size" in r]
    if not names:
      return ""
    lines.append(f"{'size':>6}" + "".join(f"{n + ' tok':>12}{n + ' seq':>12}" for n in names))
    sizes = results[names[0]]["per_size"]["size"]
    for i, s in enumerate(sizes):
      mark = "*" if s > hi else "+" if s in trained else " "
      row = "".join(
          f"{results[n]['per_size']['token_accuracy'][i]:>12.3f}{results[n]['per_size']['sequence_accuracy'][i]:>12.3f}"
          for n in names
      )
      lines.append(f"{s:>5}{mark}" + row)
    return "\n".join(lines)

  def seq_len(self) -> Optional[int]:
    """The longest training row (what the trainer checks against a sequence-sharded mesh)."""
    t = self.config.task
    return max(sequence_length(t, int(s)) for s in t.train_sizes)

  def tokens_per_example(self) -> int:
    """Mean training row length over the sizes drawn (for tokens/s)."""
    t = self.config.task
    sizes = sorted({int(s) for s in t.train_sizes})
    return int(round(np.mean([sequence_length(t, s) for s in sizes])))


TASK = ProbesTask
