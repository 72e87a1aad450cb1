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

`python -m ema_jax.tasks.roles --hebbian W1,W2 --bigru W3,W4 --out_dir results/roles` gathers finished
runs (the eval_<step>.json files of this task and of roles_hebbian) into results.md, results.json and
depth.png; ratios Hebbian / BiGRU are paired by seed (same sentences). See results/roles/README.md.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ema_jax.data import conllu, grammar
from ema_jax.models import hebbian
from ema_jax.models.bigru import BiGRUConfig, BiGRUTagger, flops_per_token
from ema_jax.errors import config_error, is_int
from ema_jax.tasks.base import EvalContext, StepBatchIterator, Task

SOURCES = ("grammar", "ud")
EVAL_SPLITS = {"grammar": ("heldout", "transfer", "transfer_struct"), "ud": ("dev", "test")}
SPLIT_TITLES = {"heldout": "held-out A", "transfer": "A -> B transfer", "transfer_struct": "B constructions, A words",
                "dev": "UD dev", "test": "UD test", "train": "train"}
ARGUMENT_ROLES = hebbian.ARGUMENT_ROLES
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




# -------------------------------------------------------------------------------------------------- data


def resolve_ud_dir(ud_dir: str) -> str:
  """An existing directory for config.task.ud_dir (relative: to the working directory, else to the repo
  root); raises FileNotFoundError naming the field and what is missing."""
  files = [f"en_ewt-ud-{s}.conllu" for s in ("train", "dev", "test")]
  tried = [ud_dir] if os.path.isabs(ud_dir) else [os.path.abspath(ud_dir),
                                                   os.path.normpath(os.path.join(REPO_ROOT, ud_dir))]
  for path in dict.fromkeys(tried):
    if all(os.path.isfile(os.path.join(path, f)) for f in files):
      return path
  raise FileNotFoundError(
      f"config.task.ud_dir={ud_dir!r}: UD English EWT not found (looked for {', '.join(files)} in "
      f"{' and '.join(dict.fromkeys(tried))}). Point --config.task.ud_dir at a directory holding the "
      f"UD_English-EWT .conllu files, or use the grammar presets (configs/roles.py:hebbian / :bigru), "
      f"which need no data.")


def load_data(task_cfg: ml_collections.ConfigDict, seed: int) -> Dict[str, Any]:
  """{'train': RoleData/DepData, <eval split>: ...} for config.task (see the module docstring)."""
  t = task_cfg
  if t.source == "grammar":
    splits = grammar.make_splits(t.n_train, t.n_heldout, t.n_transfer, seed=seed, max_len=t.max_len,
                                 train_grammar=t.train_grammar, transfer_grammar=t.transfer_grammar)
    if t.structure_split:
      train_spec = grammar.GRAMMARS[t.train_grammar]
      spec = dataclasses.replace(grammar.GRAMMARS[t.transfer_grammar], lexicon=train_spec.lexicon,
                                 name=f"{t.transfer_grammar}_words{train_spec.lexicon}")
      train_words = frozenset(tuple(grammar.VOCAB[i] for i in row[row != grammar.PAD_ID])
                              for row in splits["train"].tokens)
      splits["transfer_struct"] = grammar.to_arrays(grammar.sample_sentences(
          spec, t.n_transfer, seed + 2_000_003, max_len=t.max_len, exclude=train_words), t.max_len)
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
  """hebbian.evaluate (accuracy, argument accuracy, per role, per depth) plus the deep accuracies:
  over all tokens and over argument tokens at depth >= deep_depth, with their counts."""
  out = hebbian.evaluate(pred_BT, data.roles, data.depth, data.mask, data.role_names)
  valid = np.asarray(data.mask, bool)
  pred, gold, depth = np.asarray(pred_BT)[valid], np.asarray(data.roles)[valid], np.asarray(data.depth)[valid]
  is_arg = np.isin(gold, [i for i, n in enumerate(data.role_names) if n in ARGUMENT_ROLES])
  deep = depth >= deep_depth
  acc = lambda sel: float((pred == gold)[sel].mean()) if sel.any() else float("nan")
  out.update(deep_accuracy=acc(deep), deep_argument_accuracy=acc(deep & is_arg),
             shallow_argument_accuracy=acc(~deep & is_arg), count_arguments=int(is_arg.sum()),
             count_deep_arguments=int((deep & is_arg).sum()), deep_depth=int(deep_depth))
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
  pred = hebbian.majority_predictions(train.roles, train.mask, data.mask)
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
  head = ["model", "split", "acc", "arg acc"] + [r[:5] for r in roles] + [
      "deep arg (n)", "majority"]
  lines = [title] if title else []
  table = [head]
  for name, split, d, maj in rows:
    table.append([name, split, f"{d['accuracy']:.4f}", f"{d['argument_accuracy']:.4f}"]
                 + [f"{d['per_role'].get(r, float('nan')):.4f}" for r in roles]
                 + [f"{d['deep_argument_accuracy']:.4f} ({d['count_deep_arguments']})", f"{maj:.4f}"])
  widths = [max(len(r[i]) for r in table) for i in range(len(head))]
  lines += ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in table]
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


def model_config(config: ml_collections.ConfigDict, vocab_size: int, unk_id: int, num_roles: int
                 ) -> BiGRUConfig:
  m = config.model
  return BiGRUConfig(vocab_size=vocab_size, num_roles=num_roles, unk_id=unk_id, embed_dim=int(m.embed_dim),
                     hidden=int(m.hidden), num_layers=int(m.num_layers), dropout=float(m.dropout),
                     word_dropout=float(m.word_dropout))


# ---------------------------------------------------------------------------------------------- iterator


class SentenceIterator(StepBatchIterator):
  """Endless shuffled epochs over the training sentences; batch `step` holds the global rows
  step * B ... (step + 1) * B - 1 of the concatenated epoch permutations (each drawn from (seed, epoch)),
  of which this process takes its contiguous share. The state is the step counter alone."""

  def __init__(self, arrays: Mapping[str, np.ndarray], *, seed: int, global_batch: int,
               process_index: int = 0, process_count: int = 1):
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
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTR.astype(jnp.float32),
                                                          jnp.maximum(roles_BT, 0))
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
      self._data = dict(splits=data, unk_id=unk_id, vocab_size=vocab_size,
                        unseen_tokens={k: int((d.mask & ~seen_V[raw[k].tokens]).sum()) for k, d in raw.items()})
    return self._data

  def model_config(self) -> BiGRUConfig:
    d = self.data
    return model_config(self.config, d["vocab_size"], d["unk_id"], len(d["splits"]["train"].role_names))

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return BiGRUTagger(self.model_config(), rngs=rngs)

  def train_iterator(self, process_index: int, process_count: int) -> StepBatchIterator:
    train = self.data["splits"]["train"]
    return SentenceIterator({"tokens": train.tokens, "roles": train.roles, "mask": train.mask},
                            seed=int(self.config.seed), global_batch=int(self.config.batch_size),
                            process_index=process_index, process_count=process_count)

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
      tok[:rows.stop - start], msk[:rows.stop - start] = tokens_BT[rows], mask_BT[rows]
      local = slice(pi * bs // pc, (pi + 1) * bs // pc)
      batch = {"tokens": tok[local], "mask": msk[local]}
      batch = ctx.put_batch(batch) if ctx is not None else {k: jnp.asarray(v) for k, v in batch.items()}
      pred = self._predict(graphdef, state, batch["tokens"], batch["mask"])
      if pc > 1:
        from jax.experimental import multihost_utils
        pred = multihost_utils.process_allgather(pred, tiled=True)
      out.append(np.asarray(pred)[:rows.stop - start])
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
    out["info"] = {"source": self.config.task.source, "seed": int(self.config.seed),
                   "unseen_tokens": self.data["unseen_tokens"],
                   "sentences": {k: len(v) for k, v in splits.items()}}
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


# --------------------------------------------------------------------------------- comparison of runs

MODELS = {"hebbian_unit_readout": ("hebbian", "unit_readout", "Hebbian, unit readout"),
          "hebbian_linear_probe": ("hebbian", "linear_probe", "Hebbian, linear probe"),
          "bigru": ("bigru", "raw", "BiGRU (supervised)")}
HEBBIAN_MODELS = ("hebbian_unit_readout", "hebbian_linear_probe")
PAPER = {"within_A_ratio": 96.0, "transfer_B": 61.8, "deep": 84.0}


def latest_eval(workdir: str) -> Dict[str, Any]:
  """The eval_<step>.json with the largest step in a workdir."""
  paths = glob.glob(os.path.join(workdir, "eval_*.json"))
  if not paths:
    raise FileNotFoundError(f"{workdir}: no eval_<step>.json (has the run finished?)")
  path = max(paths, key=lambda p: int(os.path.basename(p)[5:-5]))
  with open(path) as f:
    return json.load(f)


def _flat(details: Mapping[str, Any]) -> Dict[str, float]:
  """The numbers of one role_metrics dict that the comparison reports, flat."""
  out = {k: details[k] for k in ("accuracy", "argument_accuracy", "macro_accuracy", "deep_argument_accuracy",
                                 "shallow_argument_accuracy", "count_arguments", "count_deep_arguments")}
  out.update({f"role/{r}": v for r, v in details["per_role"].items()})
  out.update({f"depth_arg/{k}": v for k, v in details["per_depth_arguments"].items()})
  out.update({f"count_depth/{k}": v for k, v in details["count_per_depth"].items()})
  return out


def _stats(values: Sequence[float]) -> Optional[Dict[str, Any]]:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if not len(v):
    return None
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v)),
          "values": v.tolist()}


def gather(hebbian_dirs: Sequence[str], bigru_dirs: Sequence[str], walltimes: Mapping[str, float] = {}
           ) -> Dict[str, Any]:
  """Per model (MODELS) and split: mean / sd over runs of each metric, the runs' seeds, steps and wall
  times; and the Hebbian / BiGRU ratios, paired by seed (same sentences), as mean / sd."""
  runs = {"hebbian": [(w, latest_eval(w)) for w in hebbian_dirs], "bigru": [(w, latest_eval(w)) for w in bigru_dirs]}
  seed = lambda ev: ev.get("config", {}).get("seed")
  out: Dict[str, Any] = {"models": {}, "ratios": {}, "runs": {}}
  per_seed: Dict[str, Dict[Any, Dict[str, Dict[str, float]]]] = {}
  for model, (kind, key, _) in MODELS.items():
    if not runs[kind]:
      continue
    splits: Dict[str, Dict[str, list]] = {}
    for w, ev in runs[kind]:
      res = ev["results"][key]
      for split, d in res["details"].items():
        flat = _flat(d)
        flat["majority_accuracy"] = res.get(f"{split}/majority_accuracy")
        per_seed.setdefault(model, {}).setdefault(_seed_of(w, ev), {})[split] = flat
        for k, v in flat.items():
          splits.setdefault(split, {}).setdefault(k, []).append(v)
    out["models"][model] = {s: {k: _stats(v) for k, v in vals.items()} for s, vals in splits.items()}
  for kind, items in runs.items():
    out["runs"][kind] = [{"workdir": w, "seed": _seed_of(w, ev), "step": ev["step"],
                          "wall_seconds": walltimes.get(os.path.basename(os.path.normpath(w)),
                                                        ev.get("wall_seconds"))} for w, ev in items]
  if "bigru" in per_seed:
    for model in HEBBIAN_MODELS:
      if model not in per_seed:
        continue
      ratios: Dict[str, Dict[str, list]] = {}
      for s, by_split in per_seed[model].items():
        ref = per_seed["bigru"].get(s)
        if ref is None:
          continue
        for split, flat in by_split.items():
          for k, v in flat.items():
            r = ref.get(split, {}).get(k)
            if k.startswith("count") or r is None or v is None or not r > 0:
              continue
            ratios.setdefault(split, {}).setdefault(k, []).append(v / r)
      out["ratios"][model] = {sp: {k: _stats(v) for k, v in vals.items()} for sp, vals in ratios.items()}
  return out


def _seed_of(workdir, ev):
  for res in ev["results"].values():
    if "seed" in res.get("info", {}):
      return res["info"]["seed"]
  if "seed" in ev.get("config", {}):
    return ev["config"]["seed"]
  raise ValueError(f"{workdir}: its eval json records no seed (results.<name>.info.seed)")


def _pct(s: Optional[Mapping[str, Any]], digits: int = 1) -> str:
  if not s:
    return "-"
  if s["n"] == 1:
    return f"{100 * s['mean']:.{digits}f}"
  return f"{100 * s['mean']:.{digits}f} ± {100 * s['std']:.{digits}f}"


ROW_METRICS = (("accuracy", "accuracy (all tokens)"), ("argument_accuracy", "argument accuracy"),
               ("role/VERB", "VERB recall"), ("role/AGENT", "AGENT recall"), ("role/PATIENT", "PATIENT recall"),
               ("role/RECIPIENT", "RECIPIENT recall"), ("role/OBL", "OBL recall"),
               ("shallow_argument_accuracy", "arguments at depth 0-1"),
               ("deep_argument_accuracy", "deep arguments (depth >= 2)"))


def comparison_table(summary: Mapping[str, Any], splits: Sequence[str]) -> str:
  """Markdown: one row per (split, metric); the three models, then the paired Hebbian/BiGRU ratios."""
  models = [m for m in MODELS if m in summary["models"]]
  ratio_models = [m for m in HEBBIAN_MODELS if m in summary["ratios"]]
  head = ["split", "metric"] + [MODELS[m][2] for m in models] + [
      f"ratio {MODELS[m][2].split(', ')[1]} / BiGRU" for m in ratio_models]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for split in splits:
    for key, label in ROW_METRICS:
      cells = [summary["models"][m].get(split, {}).get(key) for m in models]
      if not any(cells):
        continue
      if key == "deep_argument_accuracy":
        n = summary["models"][models[0]][split].get("count_deep_arguments")
        label += f" (n = {n['mean']:.0f})" if n and n["n"] == 1 else (
            f" (n ≈ {n['mean']:.0f} per seed)" if n else "")
      row = [SPLIT_TITLES.get(split, split), label] + [_pct(c, 2 if "bigru" == m else 1)
                                                        for c, m in zip(cells, models)]
      row += [_pct(summary["ratios"][m].get(split, {}).get(key)) + ("%" if summary["ratios"][m].get(
          split, {}).get(key) else "") for m in ratio_models]
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def headline_table(summary: Mapping[str, Any]) -> str:
  """The paper's three numbers beside ours (grammar runs)."""
  m, r = summary["models"], summary["ratios"]
  g = lambda model, split, key: _pct(m.get(model, {}).get(split, {}).get(key))
  rat = lambda model, split, key: _pct(r.get(model, {}).get(split, {}).get(key)) + "%"
  lines = ["| claim | paper | ours: Hebbian, unit readout | ours: Hebbian, linear probe | ours: BiGRU |",
           "|---|---|---|---|---|"]
  lines.append(f"| Hebbian / BiGRU within grammar A (held-out sentences), all tokens | 96% | "
               f"{rat('hebbian_unit_readout', 'heldout', 'accuracy')} | "
               f"{rat('hebbian_linear_probe', 'heldout', 'accuracy')} | 100% (reference) |")
  lines.append(f"| same, argument tokens only | - | {rat('hebbian_unit_readout', 'heldout', 'argument_accuracy')} | "
               f"{rat('hebbian_linear_probe', 'heldout', 'argument_accuracy')} | 100% (reference) |")
  lines.append(f"| transfer A -> B, accuracy (all tokens) | 61.8 | {g('hebbian_unit_readout', 'transfer', 'accuracy')} | "
               f"{g('hebbian_linear_probe', 'transfer', 'accuracy')} | {g('bigru', 'transfer', 'accuracy')} |")
  lines.append(f"| B's constructions with A's words (no new words), accuracy | - | "
               f"{g('hebbian_unit_readout', 'transfer_struct', 'accuracy')} | "
               f"{g('hebbian_linear_probe', 'transfer_struct', 'accuracy')} | {g('bigru', 'transfer_struct', 'accuracy')} |")
  lines.append(f"| transfer A -> B, argument accuracy | - | {g('hebbian_unit_readout', 'transfer', 'argument_accuracy')} | "
               f"{g('hebbian_linear_probe', 'transfer', 'argument_accuracy')} | {g('bigru', 'transfer', 'argument_accuracy')} |")
  for split in EVAL_SPLITS["grammar"]:
    lines.append(f"| deeply embedded arguments (depth >= 2), {SPLIT_TITLES[split]} | 84 (above BiGRU) | "
                 f"{g('hebbian_unit_readout', split, 'deep_argument_accuracy')} | "
                 f"{g('hebbian_linear_probe', split, 'deep_argument_accuracy')} | "
                 f"{g('bigru', split, 'deep_argument_accuracy')} |")
  return "\n".join(lines)


def plot_depth(summaries: Mapping[str, Mapping[str, Any]], path: str, min_tokens: int = 50) -> str:
  """Argument accuracy against embedding depth, one panel per split, mean ± sd over seeds; depths with
  fewer than min_tokens tokens (all roles) in the split are left out."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [(name, split) for name, s in summaries.items() for split in EVAL_SPLITS[name]
            if any(split in s["models"].get(m, {}) for m in MODELS)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=90, squeeze=False)
  for ax, (name, split) in zip(axes[0], panels):
    for model, (_, _, label) in MODELS.items():
      stats = summaries[name]["models"].get(model, {}).get(split)
      if not stats:
        continue
      depths = sorted(int(k.split("/")[1]) for k in stats if k.startswith("depth_arg/") and stats[k]
                      and (stats.get(f"count_depth/{k.split('/')[1]}") or {"mean": 0})["mean"] >= min_tokens)
      mean = [100 * stats[f"depth_arg/{d}"]["mean"] for d in depths]
      sd = [100 * stats[f"depth_arg/{d}"]["std"] for d in depths]
      ax.errorbar(depths, mean, yerr=sd, marker="o", capsize=3, label=label)
      ax.set_xticks(depths)
    ax.set_title(SPLIT_TITLES.get(split, split) + f" (depths with >= {min_tokens} tokens)", fontsize=9)
    ax.set_xlabel("embedding depth")
    ax.set_ylabel("argument accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def read_walltimes(path: Optional[str]) -> Dict[str, float]:
  """{run name: seconds} from lines 'NAME rc=0 wall_s=SECONDS ...' (results/roles/README.md's loop)."""
  out = {}
  if path and os.path.exists(path):
    with open(path) as f:
      for line in f:
        parts = dict(p.split("=", 1) for p in line.split()[1:3] if "=" in p)
        if "wall_s" in parts:
          out[line.split()[0]] = float(parts["wall_s"])
  return out


def ablation_table(entries: Sequence[str]) -> str:
  """Markdown rows for runs given as 'LABEL=WORKDIR[,WORKDIR...]': every readout / weights (raw, not the
  weight EMA) of each, mean ± sd over the workdirs."""
  cols = [(sp, k) for sp in EVAL_SPLITS["grammar"]
          for k in ("accuracy", "argument_accuracy", "deep_argument_accuracy")]
  short = {"accuracy": "acc", "argument_accuracy": "arg acc", "deep_argument_accuracy": "deep arg acc"}
  lines = ["| run | seeds | readout | " + " | ".join(f"{SPLIT_TITLES[sp]}: {short[k]}" for sp, k in cols) + " |",
           "|---|---|---|" + "---|" * len(cols)]
  for entry in entries:
    label, _, workdirs = entry.partition("=")
    evals = [latest_eval(w) for w in workdirs.split(",") if w]
    seeds = ",".join(str(_seed_of(w, ev)) for w, ev in zip(workdirs.split(","), evals))
    for name, res in evals[0]["results"].items():
      if name == "ema" or "details" not in res:
        continue
      cells = [_pct(_stats([ev["results"][name]["details"][sp][k] for ev in evals]))
               if sp in res["details"] else "-" for sp, k in cols]
      lines.append(f"| {label} | {seeds} | {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description="Gathers finished role runs into results.json, results.md and "
                              "depth.png (see results/roles/README.md).")
  for name in ("hebbian", "bigru", "hebbian_ud", "bigru_ud"):
    p.add_argument(f"--{name}", default="", help=f"comma-separated workdirs of {name} runs")
  p.add_argument("--ablation", action="append", default=[],
                 help="LABEL=WORKDIR[,WORKDIR...] of grammar runs for the ablation table (repeatable)")
  p.add_argument("--walltimes", default=None, help="file of 'NAME rc=.. wall_s=..' lines")
  p.add_argument("--out_dir", required=True)
  a = p.parse_args(argv)
  dirs = lambda s: [w for w in s.split(",") if w]
  wall = read_walltimes(a.walltimes)
  summaries = {"grammar": gather(dirs(a.hebbian), dirs(a.bigru), wall)}
  if a.hebbian_ud or a.bigru_ud:
    summaries["ud"] = gather(dirs(a.hebbian_ud), dirs(a.bigru_ud), wall)
  os.makedirs(a.out_dir, exist_ok=True)
  with open(os.path.join(a.out_dir, "results.json"), "w") as f:
    json.dump(summaries, f, indent=1)
  md = ["# Role assignment: label-free Hebbian traces vs a supervised BiGRU", "",
        "Written by `python -m ema_jax.tasks.roles` (commands in README.md). Accuracies in %, mean ± sd over "
        "seeds (sd with n - 1); 'ratio' = Hebbian / BiGRU computed per seed on the same sentences, then "
        "averaged. Arguments = gold AGENT, PATIENT, RECIPIENT (and OBL on UD); deep = embedding depth >= 2. "
        "Hebbian readouts: 'unit readout' = majority role of each unit's training tokens; 'linear probe' = "
        "logistic regression on the frozen unit activations. BiGRU: raw weights (the weight EMA is in the "
        "eval JSONs).", "",
        "## Headline: the paper's numbers beside ours (grammar A / B)", "", headline_table(summaries["grammar"]),
        "", "## Grammar: held-out A, A -> B transfer, B's constructions with A's words", "",
        comparison_table(summaries["grammar"], EVAL_SPLITS["grammar"])]
  if "ud" in summaries:
    md += ["", "## UD English EWT (one run each)", "", comparison_table(summaries["ud"], EVAL_SPLITS["ud"])]
  if a.ablation:
    md += ["", "## Ablations (grammar; mean ± sd over the seeds listed)", "",
           ablation_table(a.ablation)]
  md += ["", "## Runs", "", "| model | data | seed | workdir | steps | wall time (s) |", "|---|---|---|---|---|---|"]
  for data, s in summaries.items():
    for kind, items in s["runs"].items():
      for r in items:
        w = r["wall_seconds"]
        md.append(f"| {kind} | {data} | {r['seed']} | {r['workdir']} | {r['step']} | "
                  f"{'-' if w is None else f'{w:.0f}'} |")
  with open(os.path.join(a.out_dir, "results.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  plot_depth(summaries, os.path.join(a.out_dir, "depth.png"))
  print("\n".join(md))


if __name__ == "__main__":
  main()
