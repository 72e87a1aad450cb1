"""The paper's decoder model (ema_jax/models/set_decoder.py) against float64 NumPy references, and its
all-prefix training through the set-complement task."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax import trainer
from ema_jax.data import set_complement as data
from ema_jax.models.set_decoder import SetDecoder, SetDecoderConfig
from ema_jax.tasks.base import EvalContext
from ema_jax.tasks.set_complement import SetComplementTask
from ema_jax.tasks.set_complement_metrics import complement_metrics
from helpers import REPO

ROOT = Path(REPO)
CTX = EvalContext(
    put_batch=lambda b: {k: jnp.asarray(v) for k, v in b.items()}, process_index=0, process_count=1, workdir=None
)


def decoder_config(**edits):
  spec = importlib.util.spec_from_file_location("sc_config", ROOT / "configs" / "set_complement.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.kind = "decoder"
  c.steps, c.batch_size = 10, 8
  c.task.num_tokens, c.task.train_max_size, c.task.eval_examples = 8, 3, 8
  c.model.embed_dim = c.model.value_dim = 8
  c.model.num_heads = 1
  for k, v in edits.items():
    node = c
    *parents, last = k.split(".")
    for p in parents:
      node = node[p]
    node[last] = v
  return c


def closed_form(model: SetDecoder, tokens):
  """f(t) = B[t_s] + sum_i a(t_s, t_i) D[t_i] in float64 from the model's weights (one head)."""
  w = lambda layer: np.asarray(layer.kernel.value, np.float64)
  e = np.asarray(model.embed.embedding.value, np.float64)
  u = w(model.unembed)
  b_mat, d_mat = e @ u, e @ w(model.value) @ w(model.attn_out) @ u
  q, k = e @ w(model.query), e @ w(model.key)
  last = tokens[-1]
  scores = np.array([q[last] @ k[t] for t in tokens]) / np.sqrt(q.shape[1])
  a = np.exp(scores - scores.max())
  a /= a.sum()
  return b_mat[last] + sum(a_i * d_mat[t] for a_i, t in zip(a, tokens))


def test_logits_equal_closed_form():
  n = 10
  model = SetDecoder(SetDecoderConfig(num_tokens=n, embed_dim=6, value_dim=5), rngs=nnx.Rngs(3))
  rng = np.random.default_rng(0)
  b = data.sample_sets(rng, n, rng.integers(1, n, size=12), n - 1)
  logits_BLN = np.asarray(model(b["tokens"], b["mask"]), np.float64)
  last_BN = np.asarray(model.last_logits(b["tokens"], b["mask"]), np.float64)
  for row, (toks, s) in enumerate(zip(b["tokens"], b["sizes"])):
    for i in range(1, s + 1):  # every prefix is a set: position i - 1 is the model of t_1..t_i
      np.testing.assert_allclose(logits_BLN[row, i - 1], closed_form(model, toks[:i]), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(last_BN[row], logits_BLN[row, s - 1], rtol=1e-6, atol=1e-6)


def test_causal_and_blind_to_padding():
  n = 9
  model = SetDecoder(SetDecoderConfig(num_tokens=n, embed_dim=8, value_dim=8, num_heads=2), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  b = data.sample_sets(rng, n, np.full(6, 8), 8)
  base = np.asarray(model(b["tokens"], b["mask"]))
  for j in range(1, 8):  # replace the token at position j: positions < j must not move
    edited = b["tokens"].copy()
    edited[:, j] = (edited[:, j] + 1 + rng.integers(0, n - 1, size=6)) % n
    out = np.asarray(model(edited, b["mask"]))
    np.testing.assert_array_equal(out[:, :j], base[:, :j])
    assert np.abs(out[:, j] - base[:, j]).max() > 0
  # A shorter row padded to the same length: the padding never reaches its set positions.
  short = data.sample_sets(rng, n, np.full(6, 3), 8)
  cut = np.asarray(model(short["tokens"][:, :3], short["mask"][:, :3]))
  np.testing.assert_allclose(np.asarray(model(short["tokens"], short["mask"]))[:, :3], cut, rtol=1e-6, atol=1e-6)


def test_all_prefix_loss_is_mean_of_per_prefix_losses():
  c = decoder_config(**{"task.num_tokens": 7, "task.train_max_size": 5})
  task = SetComplementTask(c)
  task.validate()
  model = task.build_model(nnx.Rngs(params=2))
  batch = {k: jnp.asarray(v) for k, v in next(task.train_iterator(0, 1)).items()}
  loss, metrics = task.loss(model, batch, rngs=None, train=False)
  per_prefix, kls = [], []
  for toks, s in zip(np.asarray(batch["tokens"]), np.asarray(batch["sizes"])):
    for i in range(1, s + 1):  # the prefix t_1..t_i alone, run as its own sequence
      logits = np.asarray(model(toks[None, :i], np.ones((1, i), bool))[0, -1], np.float64)
      logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
      absent = [t for t in range(7) if t not in set(toks[:i].tolist())]
      per_prefix.append(-np.mean(logp[absent]))
      kls.append(per_prefix[-1] - np.log(len(absent)))
  np.testing.assert_allclose(float(loss), np.mean(per_prefix), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), np.mean(kls), rtol=1e-4, atol=1e-6)


def test_evaluation_reads_the_last_set_position():
  c = decoder_config()
  task = SetComplementTask(c)
  model = task.build_model(nnx.Rngs(params=0))
  r = task.evaluate(model, CTX)
  b = data.eval_batch(c.task.eval_seed, 5, 8, num_tokens=8, length=7)
  present = jnp.asarray(data.present_tokens(b["tokens"], b["mask"], 8))
  direct = complement_metrics(model(b["tokens"][:, :5], b["mask"][:, :5])[:, -1], present)
  np.testing.assert_allclose(r["per_size"]["kl"][4], float(direct["kl"].mean()), rtol=1e-5)


@pytest.mark.parametrize(
    "field,value",
    [("model.norm", "pre"), ("model.positions", "learned"), ("model.kind", "x")],
)
def test_decoder_refuses_what_it_does_not_implement(field, value):
  c = decoder_config(**{field: value})
  with pytest.raises(ValueError, match=field):
    SetComplementTask(c).validate()


@pytest.mark.slow
def test_short_training_run_lowers_in_range_kl(tmp_path):
  c = decoder_config(
      **{"task.num_tokens": 12, "task.train_max_size": 4, "task.eval_examples": 32, "task.eval_sizes": [1, 2, 3, 4, 6]}
  )
  c.model.embed_dim = c.model.value_dim = 12
  c.steps, c.batch_size = 300, 32
  c.optim.lr, c.optim.warmup_steps = 1e-2, 10
  c.log_every, c.eval_every, c.checkpoint_every = 100, 300, 300
  task = SetComplementTask(c)
  start = task.evaluate(task.build_model(nnx.Rngs(params=c.seed)), CTX)
  out = trainer.train(c, str(tmp_path))
  assert out["status"] == "done"
  with open(tmp_path / "eval_300.json") as f:
    end = json.load(f)["results"]["raw"]
  assert end["in_range/kl"] < 0.25 * start["in_range/kl"], (start["in_range/kl"], end["in_range/kl"])


def test_traced_dropout_rates_equal_constant_rates():
  """Rates held in the state (the sweep's vmapped runs) drop exactly what the same constant rates drop."""
  tokens = jnp.asarray([[0, 3, 5, 8, 8], [7, 1, 2, 4, 6]])
  mask = tokens < 8
  const = SetDecoder(SetDecoderConfig(8, 8, 8, dropout=0.3, dropout_on=("attention", "output")), rngs=nnx.Rngs(0))
  traced = SetDecoder(
      SetDecoderConfig(8, 8, 8, dropout=0.3, dropout_on=("attention", "output"), traced_dropout=True), rngs=nnx.Rngs(0)
  )
  np.testing.assert_allclose(traced.dropout_rates.value, [0.3, 0.0, 0.3])  # attention, embedding, output
  a = const(tokens, mask, deterministic=False, rngs=nnx.Rngs(dropout=5))
  b = traced(tokens, mask, deterministic=False, rngs=nnx.Rngs(dropout=5))
  np.testing.assert_array_equal(a, b)
  traced.dropout_rates.value = jnp.zeros(3)  # rate 0 everywhere is the deterministic model
  np.testing.assert_array_equal(
      traced(tokens, mask, deterministic=False, rngs=nnx.Rngs(dropout=5)), traced(tokens, mask)
  )


def test_last_forward_is_the_full_forwards_row_bit_for_bit():
  """The evaluation's shape (N = D = 64, rows padded to L = 63, 256 rows, jitted as the evaluation runs
  it): last_forward's logits and attention are the full forward's row at the last set token, to the bit,
  for every size 1..63; so evaluations read the same numbers as before it existed. With dropout active
  last_logits is the full forward's row."""
  n = 64
  model = SetDecoder(SetDecoderConfig(num_tokens=n, embed_dim=64, value_dim=64), rngs=nnx.Rngs(5))
  b = data.sample_sets(np.random.default_rng(2), n, np.arange(256) % (n - 1) + 1, n - 1)
  graphdef, state = nnx.split(model)

  @jax.jit
  def both(state, tokens, mask):
    m = nnx.merge(graphdef, state)
    logits_BLN, probs_BHLL = m._forward(tokens)
    last_B = jnp.asarray(mask).sum(1) - 1
    full = (
        jnp.take_along_axis(logits_BLN, last_B[:, None, None], axis=1)[:, 0],
        jnp.take_along_axis(probs_BHLL, last_B[:, None, None, None], axis=2)[:, :, 0],
    )
    return full, m.last_forward(tokens, mask)

  (full_logits, full_probs), (logits, probs) = jax.device_get(both(state, b["tokens"], b["mask"]))
  assert logits.shape == (256, n) and probs.shape == (256, 1, n - 1)
  np.testing.assert_array_equal(logits, full_logits)
  np.testing.assert_array_equal(probs, full_probs)
  assert (probs[b["sizes"] < n - 1][:, 0, -1] == 0).all()  # nothing past the set
  # Dropout on the attention weights: the training forward's row (the key decides the mask).
  noisy = SetDecoder(
      SetDecoderConfig(num_tokens=n, embed_dim=64, value_dim=64, dropout=0.5, dropout_on=("attention",)),
      rngs=nnx.Rngs(5),
  )
  rows = np.asarray(noisy(b["tokens"], b["mask"], deterministic=False, rngs=nnx.Rngs(dropout=7)))
  last = np.asarray(noisy.last_logits(b["tokens"], b["mask"], deterministic=False, rngs=nnx.Rngs(dropout=7)))
  np.testing.assert_array_equal(last, rows[np.arange(256), b["sizes"] - 1])
  assert np.abs(last - np.asarray(noisy.last_logits(b["tokens"], b["mask"]))).max() > 1e-3  # dropout did act
