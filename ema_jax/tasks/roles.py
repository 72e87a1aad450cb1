"""Grammatical role assignment with a supervised BiGRU tagger (the baseline of the Hebbian role model).

Data (config.task.source):
  grammar  synthetic grammar A (ema_jax/data/grammar.py): train on A, evaluate on held-out A sentences
           ('heldout'), on grammar B ('transfer': half the content words unseen, other construction
           frequencies, one level deeper embedding) and on B's constructions written with A's words only
           ('transfer_struct', config.task.structure_split), which separates the cost of new
           constructions from the cost of new words. config.seed also draws the sentences.
  ud       UD English EWT (ema_jax/data/conllu.py) from config.task.ud_dir: train -> 'dev', 'test'.

Metrics per evaluation split (role_metrics): token accuracy; argument accuracy (gold AGENT, PATIENT,
RECIPIENT, OBL); recall per role; accuracy per embedding depth, over all tokens and over arguments;
deep argument accuracy (arguments at depth >= config.task.deep_depth); the majority-class baseline.

Words never seen in training are mapped to the UNK embedding (config.task.unseen_to_unk), which word
dropout trains: the usual treatment of a closed training vocabulary, so the baseline is not handicapped
by untrained random embeddings on grammar B.

experiments/roles_report.py gathers finished runs of this task and of roles_hebbian into results tables
(see results/roles/README.md).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ema_jax.data import conllu, grammar
from ema_jax import role_metrics as role_metrics_lib
from ema_jax.models.bigru import BiGRUConfig, BiGRUTagger, flops_per_token
from ema_jax.errors import config_error, is_int
from ema_jax.tasks.base import EvalContext, StepBatchIterator, Task

SOURCES = ("grammar", "ud")
EVAL_SPLITS = {"grammar": ("heldout", "transfer", "transfer_struct"), "ud": ("dev", "test")}
SPLIT_TITLES = {
    "heldout": "held-out A",
    "transfer": "A -> B transfer",
    "transfer_struct": "B constructions, A words",
    "dev": "UD dev",
    "test": "UD test",
    "train": "train",
}
ARGUMENT_ROLES = role_metrics_lib.ARGUMENT_ROLES
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -------------------------------------------------------------------------------------------------- data


def resolve_ud_dir(ud_dir: str) -> str:
  """An existing directory for config.task.ud_dir (relative: to the working directory, else to the repo
  root); raises FileNotFoundError naming the field and what is missing."""
  files = [f"en_ewt-ud-{s}.conllu" for s in ("train", "dev", "test")]
  tried = (
      [ud_dir]
      if os.path.isabs(ud_dir)
      else [os.path.abspath(ud_dir), os.path.normpath(os.path.join(REPO_ROOT, ud_dir))]
  )
  for path in dict.fromkeys(tried):
    if all(os.path.isfile(os.path.join(path, f)) for f in files):
      return path
  raise FileNotFoundError(
      f"config.task.ud_dir={ud_dir!r}: UD English EWT not found (looked for {', '.join(files)} in "
      f"{' and '.join(dict.fromkeys(tried))}). Point --config.task.ud_dir at a directory holding the "
      f"UD_English-EWT .conllu files, or use the grammar presets (configs/roles.py:hebbian / :bigru), "
      f"which need no data."
  )


def load_data(task_cfg: ml_collections.ConfigDict, seed: int) -> Dict[str, Any]:
  """{'train': RoleData/DepData, <eval split>: ...} for config.task (see the module docstring)."""
  t = task_cfg
  if t.source == "grammar":
    splits = grammar.make_splits(
        t.n_train,
        t.n_heldout,
        t.n_transfer,
        seed=seed,
        max_len=t.max_len,
        train_grammar=t.train_grammar,
        transfer_grammar=t.transfer_grammar,
    )
    if t.structure_split:
      train_spec = grammar.GRAMMARS[t.train_grammar]
      spec = dataclasses.replace(
          grammar.GRAMMARS[t.transfer_grammar],
          lexicon=train_spec.lexicon,
          name=f"{t.transfer_grammar}_words{train_spec.lexicon}",
      )
      train_words = frozenset(
          tuple(grammar.VOCAB[i] for i in row[row != grammar.PAD_ID]) for row in splits["train"].tokens
      )
      splits["transfer_struct"] = grammar.to_arrays(
          grammar.sample_sentences(spec, t.n_transfer, seed + 2_000_003, max_len=t.max_len, exclude=train_words),
          t.max_len,
      )
    return splits
  data = conllu.load_ud(resolve_ud_dir(t.ud_dir), max_len=t.max_len, min_count=t.ud_min_count)
  limits = {"train": t.ud_train_sentences, "dev": t.ud_eval_sentences, "test": t.ud_eval_sentences}
  return {k: (_take(v, limits[k]) if limits[k] else v) for k, v in data.items()}


def eval_splits(task_cfg) -> tuple:
  """The evaluation splits of config.task, in table order."""
  if task_cfg.source == "grammar" and not task_cfg.structure_split:
    return tuple(s for s in EVAL_SPLITS["grammar"] if s != "transfer_struct")
  return EVAL_SPLITS[task_cfg.source]


def _take(d, n):
  return dataclasses.replace(d, tokens=d.tokens[:n], roles=d.roles[:n], depth=d.depth[:n], mask=d.mask[:n])


def unk_id_and_vocab_size(source: str, vocab: Sequence[str]):
  """UD has its own UNK (id 1); the grammar vocabulary has none, so one row is added at the end."""
  if source == "ud":
    return conllu.UNK_ID, len(vocab)
  return len(vocab), len(vocab) + 1


def map_unseen(tokens_BT, mask_BT, seen_V, unk_id):
  """tokens with every id absent from training (seen_V False) replaced by unk_id."""
  tokens_BT = np.asarray(tokens_BT)
  return np.where(np.asarray(mask_BT) & ~seen_V[tokens_BT], unk_id, tokens_BT).astype(np.int32)


# ----------------------------------------------------------------------------------------------- metrics


def role_metrics(pred_BT, data, deep_depth: int = 2) -> Dict[str, Any]:
  """role_metrics_lib.evaluate (accuracy, argument accuracy, per role, per depth) plus the deep accuracies:
  over all tokens and over argument tokens at depth >= deep_depth, with their counts."""
  out = role_metrics_lib.evaluate(pred_BT, data.roles, data.depth, data.mask, data.role_names)
  valid = np.asarray(data.mask, bool)
  pred, gold, depth = np.asarray(pred_BT)[valid], np.asarray(data.roles)[valid], np.asarray(data.depth)[valid]
  is_arg = np.isin(gold, [i for i, n in enumerate(data.role_names) if n in ARGUMENT_ROLES])
  deep = depth >= deep_depth
  acc = lambda sel: float((pred == gold)[sel].mean()) if sel.any() else float("nan")
  out.update(
      deep_accuracy=acc(deep),
      deep_argument_accuracy=acc(deep & is_arg),
      shallow_argument_accuracy=acc(~deep & is_arg),
      count_arguments=int(is_arg.sum()),
      count_deep_arguments=int((deep & is_arg).sum()),
      deep_depth=int(deep_depth),
  )
  return out


SCALARS = ("accuracy", "argument_accuracy", "macro_accuracy", "deep_argument_accuracy", "deep_accuracy")


def split_results(details: Mapping[str, Dict[str, Any]], majority: Mapping[str, float]) -> Dict[str, Any]:
  """{<split>/<metric>: scalar (logged), 'details': {split: role_metrics}} for one set of predictions."""
  out: Dict[str, Any] = {}
  for split, res in details.items():
    for k in SCALARS:
      out[f"{split}/{k}"] = res[k]
    out[f"{split}/majority_accuracy"] = majority[split]
  out["details"] = dict(details)
  return out


def majority_accuracy(train, data) -> float:
  pred = role_metrics_lib.majority_predictions(train.roles, train.mask, data.mask)
  return float((pred == data.roles)[np.asarray(data.mask, bool)].mean())


def format_table(results: Mapping[str, Dict[str, Any]], title: str = "") -> str:
  """One row per (readout or weights, split): accuracy, argument accuracy, recall per role, deep."""
  rows = []
  roles = None
  for name, res in results.items():
    for split, d in res.get("details", {}).items():
      roles = roles or [r for r in d["per_role"] if r != "OTHER"]
      rows.append((name, split, d, res.get(f"{split}/majority_accuracy", float("nan"))))
  if not rows:
    return ""
  head = ["model", "split", "acc", "arg acc"] + [r[:5] for r in roles] + ["deep arg (n)", "majority"]
  lines = [title] if title else []
  table = [head]
  for name, split, d, maj in rows:
    table.append(
        [name, split, f"{d['accuracy']:.4f}", f"{d['argument_accuracy']:.4f}"]
        + [f"{d['per_role'].get(r, float('nan')):.4f}" for r in roles]
        + [f"{d['deep_argument_accuracy']:.4f} ({d['count_deep_arguments']})", f"{maj:.4f}"]
    )
  widths = [max(len(r[i]) for r in table) for i in range(len(head))]
  lines += ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ config


def validate_task_config(config: ml_collections.ConfigDict, *, check_files: bool = True) -> None:
  """Checks config.task (shared by the BiGRU and Hebbian tasks)."""
  t = config.task
  if t.source not in SOURCES:
    config_error("task.source", t.source, f"one of {SOURCES}")
  if not (is_int(t.max_len) and t.max_len >= 3):
    config_error("task.max_len", t.max_len, "an integer >= 3 (padded sentence length)")
  if not (is_int(t.deep_depth) and t.deep_depth >= 1):
    config_error("task.deep_depth", t.deep_depth, "an integer >= 1 (arguments this deep count as deeply embedded)")
  if not (is_int(t.eval_batch_size) and t.eval_batch_size >= 1):
    config_error("task.eval_batch_size", t.eval_batch_size, "a positive integer")
  if t.source == "grammar":
    for f in ("n_train", "n_heldout", "n_transfer"):
      if not (is_int(t[f]) and t[f] >= 1):
        config_error(f"task.{f}", t[f], "a positive number of sentences")
    if not isinstance(t.structure_split, bool):
      config_error("task.structure_split", t.structure_split, "True or False")
    for f in ("train_grammar", "transfer_grammar"):
      if t[f] not in grammar.GRAMMARS:
        config_error(f"task.{f}", t[f], f"one of {tuple(grammar.GRAMMARS)}")
  else:
    for f in ("ud_train_sentences", "ud_eval_sentences"):
      if not (is_int(t[f]) and t[f] >= 0):
        config_error(f"task.{f}", t[f], "0 (all sentences) or a positive number of sentences")
    if not (is_int(t.ud_min_count) and t.ud_min_count >= 1):
      config_error("task.ud_min_count", t.ud_min_count, "an integer >= 1")
    if check_files:
      resolve_ud_dir(t.ud_dir)


def model_config(config: ml_collections.ConfigDict, vocab_size: int, unk_id: int, num_roles: int) -> BiGRUConfig:
  m = config.model
  return BiGRUConfig(
      vocab_size=vocab_size,
      num_roles=num_roles,
      unk_id=unk_id,
      embed_dim=int(m.embed_dim),
      hidden=int(m.hidden),
      num_layers=int(m.num_layers),
      dropout=float(m.dropout),
      word_dropout=float(m.word_dropout),
  )


# ---------------------------------------------------------------------------------------------- iterator


class SentenceIterator(StepBatchIterator):
  """Endless shuffled epochs over the training sentences; batch `step` holds the global rows
  step * B ... (step + 1) * B - 1 of the concatenated epoch permutations (each drawn from (seed, epoch)),
  of which this process takes its contiguous share. The state is the step counter alone."""

  def __init__(
      self,
      arrays: Mapping[str, np.ndarray],
      *,
      seed: int,
      global_batch: int,
      process_index: int = 0,
      process_count: int = 1,
  ):
    if global_batch % process_count:
      raise ValueError(f"config.batch_size={global_batch} is not divisible by process_count={process_count}.")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self.n = len(next(iter(self.arrays.values())))
    self.seed, self.global_batch = int(seed), int(global_batch)
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.step = 0
    self._perms: Dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.clear()
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    return self._perms[epoch]

  def rows(self, step: int) -> np.ndarray:
    k = step * self.global_batch + self.offset + np.arange(self.local)
    return np.array([self._perm(int(e))[p] for e, p in zip(k // self.n, k % self.n)], np.int64)

  def __next__(self) -> Dict[str, np.ndarray]:
    idx = self.rows(self.step)
    self.step += 1
    return {k: v[idx] for k, v in self.arrays.items()}


# -------------------------------------------------------------------------------------------------- task


def masked_cross_entropy(logits_BTR, roles_BT, mask_BT):
  """(mean cross-entropy over real tokens, accuracy over real tokens), float32."""
  mask_BT = mask_BT.astype(jnp.float32)
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTR.astype(jnp.float32), jnp.maximum(roles_BT, 0))
  n = jnp.maximum(mask_BT.sum(), 1.0)
  acc = ((jnp.argmax(logits_BTR, -1) == roles_BT) * mask_BT).sum() / n
  return (ce_BT * mask_BT).sum() / n, acc


def _predict(graphdef, state, tokens_BT, mask_BT):
  model = nnx.merge(graphdef, state)
  return jnp.argmax(model(tokens_BT, mask_BT, deterministic=True), -1).astype(jnp.int32)


class RolesTask(Task):
  """BiGRU role tagger: masked cross-entropy, evaluation on held-out/transfer (grammar) or dev/test (UD)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: Optional[str] = None):
    super().__init__(config, workdir)
    self._data = None
    self._predict = jax.jit(_predict, static_argnums=0)

  def validate(self) -> None:
    validate_task_config(self.config)
    m = self.config.model
    for f in ("embed_dim", "hidden", "num_layers"):
      if not (is_int(m[f]) and m[f] >= 1):
        config_error(f"model.{f}", m[f], "a positive integer")
    for f in ("dropout", "word_dropout"):
      if not (isinstance(m[f], (int, float)) and 0.0 <= m[f] < 1.0):
        config_error(f"model.{f}", m[f], "a rate in [0, 1)")

  @property
  def data(self) -> Dict[str, Any]:
    """Splits with unseen words mapped to UNK (when configured), built once."""
    if self._data is None:
      t = self.config.task
      raw = load_data(t, int(self.config.seed))
      train = raw["train"]
      unk_id, vocab_size = unk_id_and_vocab_size(t.source, train.vocab)
      seen_V = np.zeros(vocab_size, bool)
      seen_V[np.unique(train.tokens[train.mask])] = True
      seen_V[unk_id] = True
      data = {}
      for k, d in raw.items():
        if t.unseen_to_unk and k != "train":
          d = dataclasses.replace(d, tokens=map_unseen(d.tokens, d.mask, seen_V, unk_id))
        data[k] = d
      self._data = dict(
          splits=data,
          unk_id=unk_id,
          vocab_size=vocab_size,
          unseen_tokens={k: int((d.mask & ~seen_V[raw[k].tokens]).sum()) for k, d in raw.items()},
      )
    return self._data

  def model_config(self) -> BiGRUConfig:
    d = self.data
    return model_config(self.config, d["vocab_size"], d["unk_id"], len(d["splits"]["train"].role_names))

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return BiGRUTagger(self.model_config(), rngs=rngs)

  def train_iterator(self, process_index: int, process_count: int) -> StepBatchIterator:
    train = self.data["splits"]["train"]
    return SentenceIterator(
        {"tokens": train.tokens, "roles": train.roles, "mask": train.mask},
        seed=int(self.config.seed),
        global_batch=int(self.config.batch_size),
        process_index=process_index,
        process_count=process_count,
    )

  def loss(self, model, batch, *, rngs=None, train: bool):
    logits_BTR = model(batch["tokens"], batch["mask"], deterministic=not train, rngs=rngs)
    loss, acc = masked_cross_entropy(logits_BTR, batch["roles"], batch["mask"])
    return loss, {"accuracy": acc}

  def predict(self, model: nnx.Module, tokens_BT, mask_BT, ctx: Optional[EvalContext] = None) -> np.ndarray:
    """Role ids [N, T] (-1 at padding), in batches of config.task.eval_batch_size rows."""
    graphdef, state = nnx.split(model)
    pc = 1 if ctx is None else ctx.process_count
    pi = 0 if ctx is None else ctx.process_index
    bs = int(self.config.task.eval_batch_size)
    bs += (-bs) % pc
    n, T = tokens_BT.shape
    out = []
    for start in range(0, n, bs):
      tok = np.zeros((bs, T), np.int32)
      msk = np.zeros((bs, T), bool)
      rows = slice(start, min(start + bs, n))
      tok[: rows.stop - start], msk[: rows.stop - start] = tokens_BT[rows], mask_BT[rows]
      local = slice(pi * bs // pc, (pi + 1) * bs // pc)
      batch = {"tokens": tok[local], "mask": msk[local]}
      batch = ctx.put_batch(batch) if ctx is not None else {k: jnp.asarray(v) for k, v in batch.items()}
      pred = self._predict(graphdef, state, batch["tokens"], batch["mask"])
      if pc > 1:
        from jax.experimental import multihost_utils

        pred = multihost_utils.process_allgather(pred, tiled=True)
      out.append(np.asarray(pred)[: rows.stop - start])
    pred = np.concatenate(out) if out else np.zeros((0, T), np.int32)
    return np.where(np.asarray(mask_BT, bool), pred, -1).astype(np.int32)

  def evaluate(self, model: nnx.Module, ctx: EvalContext) -> Dict[str, Any]:
    splits = self.data["splits"]
    train, deep = splits["train"], int(self.config.task.deep_depth)
    details, majority = {}, {}
    for name in eval_splits(self.config.task):
      d = splits[name]
      details[name] = role_metrics(self.predict(model, d.tokens, d.mask, ctx), d, deep)
      majority[name] = majority_accuracy(train, d)
    out = split_results(details, majority)
    out["info"] = {
        "source": self.config.task.source,
        "seed": int(self.config.seed),
        "unseen_tokens": self.data["unseen_tokens"],
        "sentences": {k: len(v) for k, v in splits.items()},
    }
    return out

  def summarize(self, results: Dict[str, Dict[str, Any]], step: int, workdir: Optional[str]) -> str:
    return format_table(results, f"roles (BiGRU, {self.config.task.source}), step {step}")

  def seq_len(self) -> Optional[int]:
    return int(self.config.task.max_len)

  def tokens_per_example(self) -> int:
    return int(self.config.task.max_len)

  def flops_per_token(self) -> Optional[float]:
    return flops_per_token(self.model_config())


TASK = RolesTask
