"""Loss and gradients of one training step on a (data 2, fsdp 2, seq 2) mesh of 8 forced CPU devices
versus one device, for the EMA LM and the GPT. Prints one JSON line per model with the largest
relative differences (driven by tests/test_multihost.py)."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ema_jax import sharding  # noqa: E402
from ema_jax.models import ema_lm, transformer  # noqa: E402
from ema_jax.tasks.lm import token_nll  # noqa: E402


def batch(seed, b=8, t=32, vocab=257):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab - 1, size=(b, t + 1)).astype(np.int32)
  tokens[rng.uniform(size=tokens.shape) < 0.06] = vocab - 1  # document boundaries, some on shard edges
  tokens[0, 16] = vocab - 1
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  resets = inputs == vocab - 1
  seg = np.cumsum(resets, axis=1) - resets[:, :1]
  return dict(
      inputs=inputs,
      targets=targets,
      resets=resets,
      segment_ids=seg.astype(np.int32),
      mask=np.ones_like(inputs, np.float32),
  )


def loss_and_grads(model, b):
  graphdef, params = nnx.split(model, nnx.Param)

  def f(params, b):
    s, n = token_nll(nnx.merge(graphdef, params), b, rngs=None, train=False)
    return s / n

  return jax.value_and_grad(f)(params, b)


def compare(name, model):
  b = batch(0)
  ref_loss, ref_grads = jax.jit(lambda b: loss_and_grads(model, b))(b)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, seq=2)))
  graphdef, params = nnx.split(model, nnx.Param)
  p_shard = sharding.state_shardings(params, mesh)
  params = jax.device_put(params, p_shard)
  with jax.set_mesh(mesh):
    gb = sharding.put_local_batch(b, mesh, shard_seq=True)
    fn = jax.jit(lambda p, b: loss_and_grads(nnx.merge(graphdef, p), b), in_shardings=(p_shard, None))
    loss, grads = fn(params, gb)
  # Per leaf, relative to the leaf's scale, floored at 1e-3 of the largest gradient: some gradients are
  # exactly zero in theory (a key bias under softmax) and only rounding noise in practice.
  scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(ref_grads))
  rel = lambda x, y: float(jnp.max(jnp.abs(x - y)) / max(float(jnp.max(jnp.abs(y))), 1e-3 * scale))
  grad_err = max(rel(x, y) for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
  sharded_leaves = sum(1 for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated)
  print(
      json.dumps(
          dict(
              model=name,
              loss=float(loss),
              ref_loss=float(ref_loss),
              loss_rel=abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
              grad_rel=grad_err,
              devices=jax.device_count(),
              sharded_params=sharded_leaves,
              input_sharding=str(gb["inputs"].sharding.spec),
          )
      ),
      flush=True,
  )


def main():
  # Widths chosen so some parameters exceed the FSDP size threshold and get sharded.
  emalm = ema_lm.EMALM(ema_lm.preset("tiny", width=128, ffn_hidden=512), rngs=nnx.Rngs(0))
  compare("ema_lm", emalm)
  hist = ema_lm.EMALM(ema_lm.preset("tiny", predictor="attention_history"), rngs=nnx.Rngs(1))
  compare("ema_lm_attention_history", hist)
  gpt = transformer.GPT(transformer.preset("tiny", context_len=32), rngs=nnx.Rngs(2))
  compare("gpt", gpt)


if __name__ == "__main__":
  main()
