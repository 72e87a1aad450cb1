"""The copy / recall / selective-copy / filtering probes (ema_jax/data/probes.py) as a trainer task.

config.task.probe picks the probe; config.task.train_size is its size in training (string length for copy
and selective copy, key-value pairs for recall, stream length for filtering) and config.task.eval_sizes
the sizes evaluated after training, usually beyond train_size. The model is any LM of the LM task
(config.model.kind: ema_lm with fixed or selective traces, gpt, aggregator) over the probe vocabulary.
Training data is generated on the fly, deterministic in (seed, step) and independent of the process layout
(each process takes its rows of the step's global batch). The loss is the cross-entropy of the answer tokens
only; evaluation reports exact-match accuracy of the answers (per token and per sequence) at every
evaluation size, on held-out batches of task.eval_seed, with the model reading its own inputs (teacher
forcing: the accuracy of predicting every answer token given the correct ones before it).
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

from ema_jax.data import probes as data
from ema_jax.errors import config_error, is_int
from ema_jax.tasks.base import EvalContext, StepBatchIterator, Task
from ema_jax.tasks.lm import _NON_MODEL_FIELDS, _model_module

MODEL_KINDS = ("ema_lm", "gpt", "aggregator")


def make_batch(t: ml_collections.ConfigDict, size: int, seed: int, step: int, batch: int) -> Dict[str, np.ndarray]:
  vocab = data.Vocab(int(t.symbols))
  if t.probe == "copy":
    return data.copy_batch(seed, step, batch, size, vocab)
  if t.probe == "recall":
    return data.recall_batch(seed, step, batch, size, int(t.queries), vocab)
  if t.probe == "selective_copy":
    return data.selective_copy_batch(seed, step, batch, size, int(t.span_factor) * size, vocab)
  return data.filtering_batch(seed, step, batch, size, vocab, noise=float(t.noise))


def sequence_length(t: ml_collections.ConfigDict, size: int) -> int:
  """Length of the model's input rows for a probe size."""
  if t.probe == "copy":
    return 2 * size
  if t.probe == "recall":
    return 2 * size + 3 * int(t.queries)
  if t.probe == "selective_copy":
    return int(t.span_factor) * size + size
  return size


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
    out = make_batch(self.t, int(self.t.train_size), self.seed, self.step, self.global_batch)
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


def _predictions(graphdef, state, inputs):
  return jnp.argmax(nnx.merge(graphdef, state)(inputs, deterministic=True), -1)


class ProbesTask(Task):
  EVAL_LENGTHS_FIELD = "eval_sizes"

  def __init__(self, config: ml_collections.ConfigDict, workdir: Optional[str] = None):
    super().__init__(config, workdir)
    self._predict = jax.jit(_predictions, static_argnums=0)

  def validate(self) -> None:
    t, m = self.config.task, self.config.model
    if t.probe not in data.PROBES:
      config_error("task.probe", t.probe, f"one of {data.PROBES}")
    for f in ("symbols", "train_size", "queries", "span_factor", "eval_batch_size", "eval_batches"):
      if not (is_int(t[f]) and t[f] >= 1):
        config_error(f"task.{f}", t[f], "a positive integer")
    sizes = list(t.eval_sizes or [])
    if not sizes or not all(is_int(s) and s >= 1 for s in sizes):
      config_error("task.eval_sizes", t.eval_sizes, "a non-empty list of positive sizes, e.g. [8, 16, 32]")
    if t.probe == "recall" and max(sizes + [t.train_size]) > t.symbols:
      config_error("task.eval_sizes", t.eval_sizes, f"pair counts <= symbols={t.symbols} (recall keys are distinct)")
    if not 0 <= t.noise < 1:
      config_error("task.noise", t.noise, "a probability in [0, 1)")
    if m.kind not in MODEL_KINDS:
      config_error("model.kind", m.kind, f"one of {MODEL_KINDS}")
    self.model_config()

  def model_config(self):
    m = self.config.model
    module, cfg_cls, _ = _model_module(m.kind)
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items() if k not in _NON_MODEL_FIELDS}
    fields["vocab_size"] = data.Vocab(int(self.config.task.symbols)).size
    if m.kind == "gpt":
      longest = max(
          sequence_length(self.config.task, s)
          for s in [self.config.task.train_size] + list(self.config.task.eval_sizes)
      )
      fields.setdefault("context_len", longest)
    try:
      return module.preset(m.preset, **fields) if m.get("preset") else cfg_cls(**fields)
    except TypeError as e:
      raise ValueError(f"config.model: {e}.") from None

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    _, _, model_cls = _model_module(self.config.model.kind)
    return model_cls(self.model_config(), rngs=rngs)

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
    per = {"size": [], "token_accuracy": [], "sequence_accuracy": []}
    for size in sorted(int(s) for s in t.eval_sizes):
      tok = seq = 0.0
      for i in range(int(t.eval_batches)):
        b = make_batch(t, size, int(t.eval_seed), i, n)
        local = {k: v[rows] for k, v in b.items()}
        pred = self._predict(graphdef, state, ctx.put_batch(local)["inputs"])
        # Predictions of the global batch (every process's rows), scored on every process alike.
        pred = np.asarray(multihost_utils.process_allgather(pred, tiled=True)) if pc > 1 else np.asarray(pred)
        acc = data.accuracy(pred, b)
        tok += acc["token_accuracy"] / int(t.eval_batches)
        seq += acc["sequence_accuracy"] / int(t.eval_batches)
      per["size"].append(size)
      per["token_accuracy"].append(tok)
      per["sequence_accuracy"].append(seq)
    out: Dict[str, Any] = {"per_size": per}
    train = int(t.train_size)
    for name, sel in (("in_range", lambda s: s <= train), ("out_of_range", lambda s: s > train)):
      idx = [i for i, s in enumerate(per["size"]) if sel(s)]
      if idx:
        for k in ("token_accuracy", "sequence_accuracy"):
          out[f"{name}/{k}"] = float(np.mean([per[k][i] for i in idx]))
    return out

  def summarize(self, results: Dict[str, Dict[str, Any]], step: int, workdir: Optional[str]) -> str:
    t = self.config.task
    lines = [f"probe {t.probe}, step {step} (trained at size {t.train_size}; '*' = beyond): answer accuracy"]
    names = [k for k, r in results.items() if r and "per_size" in r]
    if not names:
      return ""
    lines.append(f"{'size':>6}" + "".join(f"{n + ' tok':>12}{n + ' seq':>12}" for n in names))
    sizes = results[names[0]]["per_size"]["size"]
    for i, s in enumerate(sizes):
      mark = "*" if s > int(t.train_size) else " "
      row = "".join(
          f"{results[n]['per_size']['token_accuracy'][i]:>12.3f}{results[n]['per_size']['sequence_accuracy'][i]:>12.3f}"
          for n in names
      )
      lines.append(f"{s:>5}{mark}" + row)
    return "\n".join(lines)

  def seq_len(self) -> Optional[int]:
    return sequence_length(self.config.task, int(self.config.task.train_size))

  def tokens_per_example(self) -> int:
    return self.seq_len()


TASK = ProbesTask
