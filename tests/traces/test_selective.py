"""selective_traces (input-dependent write rates) against a float64 NumPy loop; gradients, decoding steps,
resets, and the fixed-rate special case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ema_jax import traces
from helpers import TESTS_DIR, selective_loop


def inputs(seed, shape=(2, 13, 3), k=3, shared=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  r = rng.uniform(0.01, 0.99, size=shape[:2] + (k, 1 if shared else shape[2])).astype(np.float32)
  h0 = rng.normal(size=(shape[0], k, shape[2])).astype(np.float32)
  resets = rng.uniform(size=shape[:2]) < 0.2
  return x, r, h0, resets


@pytest.mark.parametrize("method", [str(m) for m in traces.selective_methods()])
@pytest.mark.parametrize("shared", [False, True])
def test_matches_float64_loop(method, shared):
  x, r, h0, resets = inputs(0, shared=shared)
  for h0_, resets_ in ((None, None), (h0, resets)):
    h, h_last = traces.selective_traces(
        x, r, h0_, resets=None if resets_ is None else jnp.asarray(resets_), method=method, chunk_size=4
    )
    ref, ref_last = selective_loop(x, r, h0_, resets_)
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_last, ref_last, rtol=1e-5, atol=1e-5)
    assert h.dtype == jnp.float32 and h_last.dtype == jnp.float32


def test_fixed_rates_equal_ema_traces():
  x, _, h0, resets = inputs(1)
  alphas = jnp.asarray([0.5, 0.1, 0.02])
  r = jnp.broadcast_to(alphas[None, None, :, None], x.shape[:2] + (3, 1))
  got, got_last = traces.selective_traces(x, r, h0, resets=jnp.asarray(resets))
  want, want_last = traces.ema_traces(x, alphas, h0, resets=jnp.asarray(resets), method="sequential")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_last, want_last, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["associative", "sequential", "chunked", "unrolled"])
def test_check_grads_x_rates_h0(method):
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, 3))
    r = rng.uniform(0.05, 0.95, size=(2, 9, 2, 3))
    h0 = rng.normal(size=(2, 2, 3))
    resets = jnp.asarray(rng.uniform(size=(2, 9)) < 0.25)
    f = lambda x, r, h0: traces.selective_traces(x, r, h0, resets=resets, method=method, chunk_size=4)[0]
    check_grads(f, (x, r, h0), order=1, modes=("rev",))
    # ... and against autodiff of the float64 loop written with jnp (an independent path).
    w = rng.normal(size=(2, 9, 2, 3))

    def loop_loss(x, r, h0):
      h, outs = h0, []
      for t in range(x.shape[1]):
        h = jnp.where(resets[:, t, None, None], 0.0, h)
        h = (1 - r[:, t]) * h + r[:, t] * x[:, t, None, :]
        outs.append(h)
      return jnp.sum(jnp.stack(outs, 1) * w)

    scan_loss = lambda x, r, h0: jnp.sum(f(x, r, h0) * w)
    for a, b in zip(jax.grad(scan_loss, (0, 1, 2))(x, r, h0), jax.grad(loop_loss, (0, 1, 2))(x, r, h0)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_step_equals_scan():
  x, r, h0, resets = inputs(3)
  h_scan, _ = traces.selective_traces(x, r, h0, resets=jnp.asarray(resets))
  h = jnp.asarray(h0)
  for t in range(x.shape[1]):
    h, out = traces.selective_step(h, x[:, t], r[:, t], reset=jnp.asarray(resets[:, t]))
    np.testing.assert_allclose(out, h_scan[:, t], rtol=1e-5, atol=1e-6)


def test_low_precision_input_keeps_float32_state():
  x, r, _, _ = inputs(4)
  h, h_last = traces.selective_traces(jnp.asarray(x, jnp.bfloat16), r)
  ref, ref_last = selective_loop(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), r)
  assert h.dtype == jnp.bfloat16 and h_last.dtype == jnp.float32
  np.testing.assert_allclose(h_last, ref_last, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
  x, r, h0, _ = inputs(5)
  with pytest.raises(ValueError, match="rates_BTKD"):
    traces.selective_traces(x, r[:, :-1])
  with pytest.raises(ValueError, match="rates_BTKD"):
    traces.selective_traces(x, r[..., :2])
  with pytest.raises(ValueError, match="h0"):
    traces.selective_traces(x, r, h0[:, :2])
  with pytest.raises(ValueError, match="method"):
    traces.selective_traces(x, r, method="fused")
  with pytest.raises(ValueError, match="chunk_size"):
    traces.selective_traces(x, r, chunk_size=0)


def test_sequence_sharded_equals_unsharded():
  """8 forced CPU devices in a subprocess (XLA_FLAGS must be set before JAX starts): mesh data 2 x seq 4,
  resets on shard edges; values, final states and gradients w.r.t. x and the rates."""
  import json
  import os
  import subprocess
  import sys

  worker = os.path.join(TESTS_DIR, "selective_seq_worker.py")
  out = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=1800, check=True)
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["devices"] == 8
  for k in ("h", "last", "dx", "drates"):
    assert res[k] < 1e-5, (k, res)
