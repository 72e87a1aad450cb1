"""Selective traces on a (data 2, seq 4) mesh of 8 forced CPU devices versus one device: values, final
states and gradients w.r.t. x and the rates. Prints one JSON line (driven by tests/traces/test_selective.py)."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from ema_jax import sharding, traces  # noqa: E402
from ema_jax.traces import seq_parallel  # noqa: E402

rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(4, 32, 6)), jnp.float32)
rates = jnp.asarray(rng.uniform(0.02, 0.98, size=(4, 32, 3, 6)), jnp.float32)
resets = rng.uniform(size=(4, 32)) < 0.08
resets[0, 8] = resets[1, 16] = True  # on shard edges
resets = jnp.asarray(resets)
w = jnp.asarray(rng.normal(size=(4, 32, 3, 6)), jnp.float32)
wl = jnp.asarray(rng.normal(size=(4, 3, 6)), jnp.float32)


def loss(fn, x, r):
  h, last = fn(x, r)
  return jnp.sum(h * w) + jnp.sum(last * wl), (h, last)


ref = jax.jit(
    jax.value_and_grad(
        lambda x, r: loss(lambda a, b: traces.selective_traces(a, b, resets=resets), x, r), (0, 1), has_aux=True
    )
)
(_, (h_ref, last_ref)), g_ref = ref(x, rates)
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, seq=4)))
with jax.set_mesh(mesh):
  par = jax.jit(
      jax.value_and_grad(
          lambda x, r: loss(lambda a, b: seq_parallel.auto_selective_traces(a, b, resets), x, r), (0, 1), has_aux=True
      )
  )
  (_, (h, last)), g = par(x, rates)
rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
print(
    json.dumps(
        dict(
            h=rel(h, h_ref),
            last=rel(last, last_ref),
            dx=rel(g[0], g_ref[0]),
            drates=rel(g[1], g_ref[1]),
            devices=jax.device_count(),
        )
    )
)
