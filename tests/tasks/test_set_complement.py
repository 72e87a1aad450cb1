"""Set-complement data, model, loss, metrics, validation and evaluation against independent references."""

import importlib.util
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax import optim
from ema_jax.data import set_complement as data
from ema_jax.models.set_transformer import SetTransformer, SetTransformerConfig
from ema_jax.tasks.base import EvalContext, get_task
from ema_jax.tasks.set_complement import SetComplementTask
from ema_jax.tasks.set_complement_metrics import complement_metrics, range_summary
from helpers import REPO

ROOT = Path(REPO)


def load_config(arg=None):
  spec = importlib.util.spec_from_file_location("sc_config", ROOT / "configs" / "set_complement.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(**task):
  c = load_config()
  c.model.kind = "query"  # these tests are about the query model; tests/models/test_set_decoder.py has the decoder
  c.steps, c.batch_size = 10, 8
  c.task.num_tokens, c.task.train_max_size, c.task.eval_examples = 6, 2, 8
  c.model.embed_dim = c.model.value_dim = 8
  c.model.num_heads = 2
  for k, v in task.items():
    c.task[k] = v
  return c


def local_ctx(workdir=None):
  return EvalContext(
      put_batch=lambda b: {k: jnp.asarray(v) for k, v in b.items()}, process_index=0, process_count=1, workdir=workdir
  )


# ------------------------------------------------------------------------------------------------ data


def test_sets_are_distinct_tokens_with_sizes_in_range():
  n = 10
  for step in range(5):
    b = data.train_batch(3, step, 0, 64, num_tokens=n, min_size=2, max_size=7, length=8)
    assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (64, 8) and b["sizes"].dtype == np.int32
    assert b["sizes"].min() >= 2 and b["sizes"].max() <= 7
    for toks, mask, s in zip(b["tokens"], b["mask"], b["sizes"]):
      assert mask.sum() == s and mask[:s].all()
      assert len(set(toks[:s].tolist())) == s and toks[:s].min() >= 0 and toks[:s].max() < n
      assert (toks[s:] == data.pad_id(n)).all()
  sizes = data.train_batch(0, 0, 0, 4000, num_tokens=n, min_size=1, max_size=4, length=4)["sizes"]
  assert set(np.unique(sizes)) == {1, 2, 3, 4}
  assert np.allclose(np.bincount(sizes)[1:] / 4000, 0.25, atol=0.03)
  fixed = data.train_batch(0, 0, 0, 16, num_tokens=n, min_size=1, max_size=4, length=4, dist="fixed")
  assert (fixed["sizes"] == 4).all()


def test_order_is_random_and_sets_cover_the_vocabulary():
  b = data.train_batch(0, 0, 0, 2000, num_tokens=5, min_size=2, max_size=2, length=2, dist="fixed")
  assert (b["tokens"][:, 0] < b["tokens"][:, 1]).mean() == pytest.approx(0.5, abs=0.05)
  assert np.allclose(np.bincount(b["tokens"].ravel(), minlength=5) / b["tokens"].size, 0.2, atol=0.02)


def test_iterator_deterministic_resumable_and_per_process():
  task = SetComplementTask(tiny_config(train_max_size=4))
  a = task.train_iterator(0, 1)
  first = [next(a) for _ in range(5)]
  assert a.get_state() == {"step": 5}
  again = task.train_iterator(0, 1)
  for x in first:
    y = next(again)
    assert all(np.array_equal(x[k], y[k]) for k in x)
  resumed = task.train_iterator(0, 1)
  resumed.set_state(json.loads(json.dumps({"step": 3})))
  nb = next(resumed)
  assert all(np.array_equal(nb[k], first[3][k]) for k in first[3])
  p0, p1 = next(task.train_iterator(0, 2)), next(task.train_iterator(1, 2))
  assert p0["tokens"].shape[0] == task.config.batch_size // 2
  assert not np.array_equal(p0["tokens"], p1["tokens"])
  with pytest.raises(ValueError, match="process_count"):
    task.train_iterator(0, 3)


def test_eval_batches_fixed_and_independent_of_training_seed():
  a = data.eval_batch(7, 3, 16, num_tokens=6, length=5)
  b = data.eval_batch(7, 3, 16, num_tokens=6, length=5)
  assert np.array_equal(a["tokens"], b["tokens"]) and (a["sizes"] == 3).all()
  train = data.train_batch(7, 0, 0, 16, num_tokens=6, min_size=3, max_size=3, length=5)
  assert not np.array_equal(a["tokens"], train["tokens"])


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_against_hand_computed_values():
  p = np.array([[0.1, 0.3, 0.3, 0.3], [0.5, 0.1, 0.1, 0.3]])
  present = np.array([[1, 0, 0, 0], [0, 1, 1, 0]], np.float32)
  logits = np.log(p) + np.array([[2.0], [-1.0]])  # a shift per row changes nothing
  m = jax.device_get(complement_metrics(jnp.asarray(logits, jnp.float32), jnp.asarray(present)))
  np.testing.assert_allclose(m["kl"], [math.log(1 / 0.9), 0.5 * math.log(5 / 3)], rtol=1e-5)
  np.testing.assert_allclose(m["tv"], [0.1, 0.2], rtol=1e-5)
  np.testing.assert_allclose(m["invalid_mass"], [0.1, 0.2], rtol=1e-5)
  np.testing.assert_allclose(m["precision"], [1.0, 0.6], rtol=1e-5)
  np.testing.assert_allclose(m["logit_gap"], [math.log(3), 0.5 * math.log(15)], rtol=1e-5)
  np.testing.assert_allclose(m["ce"], m["kl"] + np.log([3, 2]), rtol=1e-5)
  np.testing.assert_array_equal(m["top1_valid"], [1, 1])
  bad = jax.device_get(complement_metrics(jnp.asarray([[5.0, 0, 0]]), jnp.asarray([[1.0, 0, 0]])))
  assert bad["top1_valid"][0] == 0


def test_range_summary_splits_at_train_max_size():
  per = {m: [1.0, 2.0, 3.0, 5.0] for m in ("kl", "tv", "invalid_mass", "precision", "logit_gap", "top1_valid")}
  out = range_summary([1, 2, 3, 4], per, 2)
  assert out["in_range/kl"] == 1.5 and out["out_of_range/kl"] == 4.0


def test_loss_equals_numpy_cross_entropy():
  c = tiny_config(num_tokens=5, train_max_size=3)
  task = SetComplementTask(c)
  model = task.build_model(nnx.Rngs(params=1))
  batch = next(task.train_iterator(0, 1))
  loss, metrics = task.loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, rngs=None, train=False)
  logits = np.asarray(model(batch["tokens"], batch["mask"]), np.float64)
  ref = []
  for row, toks, s in zip(logits, batch["tokens"], batch["sizes"]):
    logp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
    absent = [i for i in range(5) if i not in set(toks[:s].tolist())]
    ref.append(-np.mean(logp[absent]))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), np.mean(ref), rtol=1e-5)
  assert set(metrics) >= {"loss", "invalid_mass", "top1_valid"}


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("norm,heads", [("none", 1), ("pre", 2)])
def test_model_ignores_order_and_padding(norm, heads):
  cfg = SetTransformerConfig(num_tokens=12, embed_dim=16, value_dim=8, num_heads=heads, norm=norm)
  model = SetTransformer(cfg, rngs=nnx.Rngs(0))
  b = data.train_batch(0, 0, 0, 16, num_tokens=12, min_size=1, max_size=6, length=6)
  logits = model(b["tokens"], b["mask"])
  assert logits.shape == (16, 12) and logits.dtype == jnp.float32
  rng = np.random.default_rng(0)
  perm = b["tokens"].copy()
  for row, s in zip(perm, b["sizes"]):
    row[:s] = rng.permutation(row[:s])
  np.testing.assert_allclose(model(perm, b["mask"]), logits, atol=1e-5)
  longer = np.pad(b["tokens"], ((0, 0), (0, 5)), constant_values=cfg.pad_id)
  np.testing.assert_allclose(model(longer, np.pad(b["mask"], ((0, 0), (0, 5)))), logits, atol=1e-5)
  # Whatever sits in a padded slot is masked out.
  junk = np.where(b["mask"], b["tokens"], 3)
  np.testing.assert_allclose(model(junk, b["mask"]), logits, atol=1e-5)


def test_learned_positions_depend_on_order():
  cfg = SetTransformerConfig(num_tokens=8, embed_dim=8, value_dim=8, positions="learned")
  model = SetTransformer(cfg, rngs=nnx.Rngs(0))
  toks, mask = np.array([[1, 2, 3]]), np.ones((1, 3), bool)
  assert not np.allclose(model(toks, mask), model(toks[:, ::-1], mask))


def test_dropout_sites_and_determinism():
  b = data.train_batch(0, 0, 0, 8, num_tokens=10, min_size=3, max_size=5, length=5)
  for site in ("attention", "embedding", "output"):
    cfg = SetTransformerConfig(num_tokens=10, embed_dim=8, value_dim=8, dropout=0.5, dropout_on=site)
    model = SetTransformer(cfg, rngs=nnx.Rngs(0))
    det = model(b["tokens"], b["mask"])
    np.testing.assert_array_equal(model(b["tokens"], b["mask"], deterministic=True), det)
    k = jax.random.key(1)
    drop = model(b["tokens"], b["mask"], deterministic=False, rngs=k)
    assert not np.allclose(drop, det)
    np.testing.assert_array_equal(model(b["tokens"], b["mask"], deterministic=False, rngs=k), drop)
    # A traced rate of 0 is exactly the identity.
    zero = model(b["tokens"], b["mask"], deterministic=False, rngs=k, dropout_rates={site: jnp.float32(0)})
    np.testing.assert_array_equal(zero, det)
    with pytest.raises(ValueError, match="rngs"):
      model(b["tokens"], b["mask"], deterministic=False)


# ------------------------------------------------------------------------------------------------ validation


BAD = [
    (lambda c: c.task.update(num_tokens=1), "task.num_tokens", "1"),
    (lambda c: c.task.update(train_max_size=0), "task.train_max_size", "0"),
    (lambda c: c.task.update(train_max_size=6), "task.train_max_size", "6"),
    (lambda c: c.task.update(train_min_size=3), "task.train_min_size", "3"),
    (lambda c: c.task.update(train_size_dist="zipf"), "task.train_size_dist", "zipf"),
    (lambda c: c.task.update(max_len=1), "task.max_len", "1"),
    (lambda c: c.task.update(max_len=6), "task.max_len", "6"),
    (lambda c: c.task.update(eval_examples=0), "task.eval_examples", "0"),
    (lambda c: c.task.update(eval_sizes=[0, 2]), "task.eval_sizes", "[0, 2]"),
    (lambda c: c.task.update(eval_sizes=[2, 6]), "task.eval_sizes", "[2, 6]"),
    (lambda c: c.task.update(eval_sizes=[]), "task.eval_sizes", "[]"),
    (lambda c: c.model.update(dropout=-0.1), "model.dropout", "-0.1"),
    (lambda c: c.model.update(dropout=1.0), "model.dropout", "1.0"),
    (lambda c: c.model.update(dropout_on="attention,mlp"), "model.dropout_on", "mlp"),
    (lambda c: c.model.update(num_heads=3), "model.num_heads", "3"),
    (lambda c: c.model.update(value_dim=6, num_heads=4), "model.num_heads", "4"),
    (lambda c: c.model.update(embed_dim=0), "model.embed_dim", "0"),
    (lambda c: c.model.update(norm="sandwich"), "model.norm", "sandwich"),
    (lambda c: c.model.update(positions="sinusoidal"), "model.positions", "sinusoidal"),
]


@pytest.mark.parametrize("edit,field,value", BAD, ids=[f"{f}={v}" for _, f, v in BAD])
def test_validate_rejects_bad_configs(edit, field, value):
  c = tiny_config()
  SetComplementTask(c).validate()
  edit(c)
  with pytest.raises(ValueError) as e:
    SetComplementTask(c).validate()
  msg = str(e.value)
  assert f"config.{field}=" in msg and value in msg and "expected" in msg


@pytest.mark.parametrize("preset", ["default", "paper", "sweep"])
def test_presets_validate_and_build(preset):
  c = load_config(preset)
  for f in (
      "seed",
      "steps",
      "batch_size",
      "log_every",
      "eval_every",
      "checkpoint_every",
      "keep_checkpoints",
      "optim",
      "weight_ema",
      "mesh",
      "task",
      "model",
  ):
    assert f in c, f
  task = get_task(c)
  assert isinstance(task, SetComplementTask)
  task.validate()
  optim.make_optimizer(c.optim, c.steps)
  optim.make_weight_ema(c.weight_ema)
  with pytest.raises(ValueError, match="preset"):
    load_config("huge")


# ------------------------------------------------------------------------------------------------ evaluation


def test_evaluate_every_size_compiles_once_and_summarizes(tmp_path):
  c = tiny_config()
  task = SetComplementTask(c)
  task.validate()
  raw = task.build_model(nnx.Rngs(params=0))
  other = task.build_model(nnx.Rngs(params=1))
  # jit's cache is shared by every jit of the same function, so other tests' entries may be there too:
  # evaluating two sets of weights at every size must add exactly one program.
  before = task._eval_fn._cache_size()
  results = {"raw": task.evaluate(raw, local_ctx()), "ema": task.evaluate(other, local_ctx())}
  assert task._eval_fn._cache_size() - before <= 1
  r = results["raw"]
  assert r["per_size"]["size"] == [1, 2, 3, 4, 5]
  for m in ("kl", "tv", "invalid_mass", "precision", "logit_gap", "top1_valid"):
    assert len(r["per_size"][m]) == 5
    assert f"in_range/{m}" in r and f"out_of_range/{m}" in r
  np.testing.assert_allclose(r["in_range/kl"], np.mean(r["per_size"]["kl"][:2]), rtol=1e-6)
  json.dumps(results)
  # The per-size numbers match the metrics computed directly on the same batch.
  b = data.eval_batch(c.task.eval_seed, 4, 8, num_tokens=6, length=5)
  present = data.present_tokens(b["tokens"], b["mask"], 6)
  direct = complement_metrics(raw(b["tokens"], b["mask"]), jnp.asarray(present))
  np.testing.assert_allclose(r["per_size"]["kl"][3], float(direct["kl"].mean()), rtol=1e-5)
  table = task.summarize(results, 10, str(tmp_path))
  assert "KL:raw" in table and "KL:ema" in table and "5*" in table
  plots = sorted(os.listdir(tmp_path / "plots"))
  assert len(plots) == 8 and all(p.endswith(".png") for p in plots)  # base metrics, KL at T, dispersion
  assert all(os.path.getsize(tmp_path / "plots" / p) < 1_000_000 for p in plots)


@pytest.mark.parametrize("kind", ["query", "decoder"])
def test_temperature_control_and_attention_dispersion(kind):
  """The fitted temperature equals temperature.fit_temperature on the check set's logits (numpy, an
  independent path); t_kl is the KL of the logits divided by it; the dispersion is the entropy of the
  predicting attention over the log of the positions it covers, recomputed here from the scores."""
  from ema_jax import temperature
  from ema_jax.tasks import set_complement as sc

  c = tiny_config()
  c.model.kind = kind
  c.model.num_heads = 1
  task = SetComplementTask(c)
  model = task.build_model(nnx.Rngs(params=3))
  r = task.evaluate(model, local_ctx())
  check = [data.eval_batch(c.task.eval_seed + 1, s, 8, num_tokens=6, length=5) for s in (1, 2)]
  logits = np.concatenate([np.asarray(sc.set_logits(model, b)) for b in check])
  valid = np.concatenate([1.0 - data.present_tokens(b["tokens"], b["mask"], 6) for b in check])
  t_ref = temperature.fit_temperature(logits, valid / valid.sum(-1, keepdims=True))
  assert r["temperature"] == pytest.approx(t_ref, rel=1e-4)
  b = data.eval_batch(c.task.eval_seed, 4, 8, num_tokens=6, length=5)
  present = jnp.asarray(data.present_tokens(b["tokens"], b["mask"], 6))
  direct = complement_metrics(sc.set_logits(model, b) / r["temperature"], present)
  np.testing.assert_allclose(r["per_size"]["t_kl"][3], float(direct["kl"].mean()), rtol=1e-4)
  # Attention that makes the prediction, from the model's own projections (one head): the decoder's last
  # set token over the 4 set tokens; the query model's appended query over them and itself (5 positions).
  tokens = jnp.asarray(b["tokens"])
  if kind == "query":
    assert model.positions is None and model.norm is None  # tiny_config: the reference below has neither
    tokens = jnp.concatenate([tokens, jnp.full((8, 1), model.config.query_id, tokens.dtype)], axis=1)
  x = np.asarray(model.embed(tokens), np.float64)
  q, k = x @ np.asarray(model.query.kernel.value), x @ np.asarray(model.key.kernel.value)
  if kind == "query":
    attended, positions = [0, 1, 2, 3, 5], 5
    scores = np.einsum("bd,bsd->bs", q[:, 5], k[:, attended]) / np.sqrt(q.shape[-1])
  else:
    positions = 4
    scores = np.einsum("bd,bsd->bs", q[:, 3], k[:, :4]) / np.sqrt(q.shape[-1])
  a = np.exp(scores - scores.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  entropy = -(a * np.log(a)).sum(-1)
  np.testing.assert_allclose(r["per_size"]["attn_entropy"][3], entropy.mean(), rtol=1e-4)
  np.testing.assert_allclose(r["per_size"]["attn_dispersion"][3], (entropy / np.log(positions)).mean(), rtol=1e-4)
  if kind == "decoder":
    assert r["per_size"]["attn_dispersion"][0] == 1.0
