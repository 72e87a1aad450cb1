"""The method 'native' (ema_jax/traces/native.py, the compiled CPU kernel ema_traces_cpu.cc) against the
float64 loop and float64 gradients: segments chained within a row (forced small here) and one per row,
rates shared and per channel, resets, h0, bfloat16 input, channel counts that do and do not fill a vector
or a 64-channel block; the fallback to 'blocked'; selective traces through the same kernel file. (Its values on the shared cases: test_method_equivalence.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ema_jax import traces
from ema_jax.traces import closed_form, ema_traces, native
from helpers import ema_loop, make_resets, per_channel_rates, rel_err, selective_loop

pytestmark = pytest.mark.skipif(not native.applies(jnp.float32), reason="needs one CPU device and g++")
PAPER = (0.5, 0.1, 0.02)

# (B, T, D), rates ("channel": [K, D]), resets, h0, segment bytes (small: several chained segments per row)
CASES = [
    ((1, 300, 16), PAPER, True, True, 64 * 16),  # 16-token segments, 19 of them, the last one shorter
    ((2, 97, 70), "channel", True, True, 4 * 70 * 16),  # D = 70: a vector tail and a partial 64-block
    ((1, 50, 3), (0.3, 1.0), False, True, 4 * 3 * 16),  # D below a vector; alpha = 1
    ((5, 40, 130), PAPER, True, False, 1 << 19),  # B >= ROWS: one segment per row
    ((2, 1, 8), PAPER, True, True, 1 << 19),  # T = 1
    ((3, 64, 256), "channel", True, True, 4 * 256 * 16),
]


def _case(i, dtype=np.float32):
  shape, rates, resets, with_h0, _ = CASES[i]
  rng = np.random.default_rng(40 + i)
  bsz, t_len, d = shape
  x = rng.normal(size=shape).astype(dtype)
  alphas = per_channel_rates(rng, 3, d) if rates == "channel" else rates
  k = len(alphas)
  r = make_resets(rng, bsz, t_len, min(16, t_len)) if resets else None
  h0 = rng.normal(size=(bsz, k, d)).astype(np.float32) if with_h0 else None
  return x, alphas, r, h0


def _float64_grads(loss, args, *rest):
  """jax.grad of loss(*args, *rest) w.r.t. args, in float64 (the reference), as NumPy arrays."""
  with jax.enable_x64(True):
    grads = jax.grad(loss, tuple(range(len(args))))(*(jnp.asarray(a, jnp.float64) for a in args), *rest)
    return [np.asarray(g) for g in grads]


def _assert_close(names, got, want, tol=1e-5):
  for name, a, b in zip(names, got, want):
    assert a.shape == b.shape, name
    assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("case", range(len(CASES)))
def test_values_equal_the_float64_loop(case, monkeypatch):
  monkeypatch.setattr(native, "SEGMENT_BYTES", CASES[case][4])
  x, alphas, r, h0 = _case(case)
  h, h_last = ema_traces(x, alphas, h0, resets=r, bias_correction=True, start_count=1, method="native")
  ref, ref_last = ema_loop(x, alphas, h0, r, True, 1)
  assert rel_err(h, ref) < 2e-6 and rel_err(h_last, ref_last) < 2e-6


@pytest.mark.parametrize("case", [0, 1, 2, 3, 5])
def test_gradients_equal_float64(case, monkeypatch):
  """dx, dh0 and the write rates' gradient against jax.grad of the sequential scan in float64."""
  monkeypatch.setattr(native, "SEGMENT_BYTES", CASES[case][4])
  x, alphas, r, h0 = _case(case)
  alphas = np.broadcast_to(np.asarray(alphas, np.float32).reshape(len(alphas), -1), (len(alphas), x.shape[2]))
  if CASES[case][1] != "channel":
    alphas = alphas[:, :1]
  rng = np.random.default_rng(case)
  w = rng.normal(size=x.shape[:2] + (alphas.shape[0], x.shape[2]))
  h0 = np.zeros((x.shape[0], alphas.shape[0], x.shape[2]), np.float32) if h0 is None else h0
  rj = None if r is None else jnp.asarray(r)

  def loss(x, alpha, h0, traces_fn, dtype):
    raw = traces_fn(x, alpha, h0, rj, 8, True)
    return jnp.vdot(raw.astype(dtype), jnp.asarray(w, dtype))

  got = jax.grad(loss, (0, 1, 2))(
      jnp.asarray(x), jnp.asarray(alphas), jnp.asarray(h0), native.native_traces, jnp.float32
  )
  _assert_close(
      ("x", "alpha", "h0"), got, _float64_grads(loss, (x, alphas, h0), closed_form.blocked_traces, jnp.float64)
  )


def test_bfloat16_input_and_gradient():
  x, alphas, r, h0 = _case(1)
  xb = jnp.asarray(x, jnp.bfloat16)
  h, _ = ema_traces(xb, alphas, h0, resets=r, method="native")
  ref, _ = ema_loop(np.asarray(xb, np.float32), alphas, h0, r)
  assert h.dtype == jnp.bfloat16 and rel_err(h, ref) < 1e-2  # the output is rounded to bfloat16
  g = jax.grad(lambda x: jnp.sum(ema_traces(x, alphas, h0, resets=r, method="native")[0].astype(jnp.float32)))(xb)
  g_ref = jax.grad(lambda x: jnp.sum(ema_traces(x, alphas, h0, resets=r, method="blocked")[0].astype(jnp.float32)))(xb)
  assert g.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=1e-2, atol=1e-2)


def test_the_numbers_do_not_depend_on_the_call():
  """Twice the same call, under jit and not, vmapped over a leading axis: the same bits (the segments are
  fixed by the shape, the float64 write-rate sums are added in a fixed order)."""
  x, alphas, r, h0 = _case(0)
  f = lambda x: ema_traces(x, alphas, h0, resets=r, method="native")[0]
  a, b, c = f(x), f(x), jax.jit(f)(x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  xs = np.stack([x, 2 * x])
  v = jax.vmap(lambda x: ema_traces(x, alphas, h0, resets=r, method="native")[0])(xs)
  np.testing.assert_array_equal(np.asarray(v[0]), np.asarray(a))


def test_falls_back_to_blocked_where_the_kernel_does_not_run():
  x, alphas, r, h0 = _case(1)
  blocked = ema_traces(x, alphas, h0, resets=r, method="blocked")[0]
  with native.KERNEL.enabled(False):
    jax.clear_caches()  # traced with the kernel on by an earlier test of this shape: trace again
    assert not native.applies(jnp.float32)
    off = ema_traces(x.copy(), alphas, h0, resets=r, method="native")[0]
  jax.clear_caches()
  np.testing.assert_array_equal(np.asarray(off), np.asarray(blocked))
  h16 = ema_traces(x.astype(np.float16), alphas, h0, resets=r, method="native")[0]  # float16: 'blocked'
  assert h16.dtype == jnp.float16


def test_auto_runs_the_kernel_with_constant_and_learned_rates():
  x, alphas, r, h0 = _case(5)
  auto = ema_traces(x, alphas, h0, resets=r, method="auto")[0]
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(ema_traces(x, alphas, h0, resets=r, method="native")[0]))
  learned = jax.jit(lambda a: ema_traces(x, a, h0, resets=r)[0])(jnp.asarray(alphas))
  np.testing.assert_allclose(np.asarray(learned), np.asarray(auto), rtol=1e-6, atol=1e-6)


# Selective traces: (B, T, D), K, rates shared over channels, resets, h0, segment bytes
SELECTIVE = [
    ((1, 200, 16), 3, False, True, True, 64 * 16),  # chained 16-token segments
    ((2, 90, 70), 2, True, True, True, 4 * 70 * 16),  # shared rates [B, T, K, 1], a vector tail
    ((5, 33, 8), 3, False, False, False, 1 << 19),  # one segment per row
]


def _selective_case(i):
  shape, k, shared, resets, with_h0, _ = SELECTIVE[i]
  rng = np.random.default_rng(60 + i)
  x = rng.normal(size=shape).astype(np.float32)
  r = rng.uniform(0.01, 0.99, size=shape[:2] + (k, 1 if shared else shape[2])).astype(np.float32)
  h0 = rng.normal(size=(shape[0], k, shape[2])).astype(np.float32) if with_h0 else None
  res = make_resets(rng, shape[0], shape[1], 16) if resets else None
  return x, r, h0, res


@pytest.mark.parametrize("case", range(len(SELECTIVE)))
def test_selective_values_and_gradients_equal_float64(case, monkeypatch):
  monkeypatch.setattr(native, "SEGMENT_BYTES", SELECTIVE[case][5])
  x, r, h0, res = _selective_case(case)
  rj = None if res is None else jnp.asarray(res)
  h, h_last = traces.selective_traces(x, r, h0, resets=rj, method="native")
  ref, ref_last = selective_loop(x, r, h0, res)
  assert rel_err(h, ref) < 2e-6 and rel_err(h_last, ref_last) < 2e-6
  w = np.random.default_rng(case).normal(size=h.shape)
  h0_ = np.zeros(h.shape[:1] + h.shape[2:], np.float32) if h0 is None else h0

  def loss(x, r, h0, method):
    out = traces.selective_traces(x, r, h0, resets=rj, method=method)[0]
    return jnp.vdot(out.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32), jnp.asarray(w, out.dtype))

  got = jax.grad(loss, (0, 1, 2))(jnp.asarray(x), jnp.asarray(r), jnp.asarray(h0_), "native")
  _assert_close(("x", "rates", "h0"), got, _float64_grads(loss, (x, r, h0_), "sequential"))


def test_selective_auto_runs_the_kernel_and_bfloat16():
  x, r, h0, res = _selective_case(0)
  rj = jnp.asarray(res)
  auto = traces.selective_traces(x, r, h0, resets=rj)[0]
  np.testing.assert_array_equal(
      np.asarray(auto), np.asarray(traces.selective_traces(x, r, h0, resets=rj, method="native")[0])
  )
  xb = jnp.asarray(x, jnp.bfloat16)
  hb = traces.selective_traces(xb, r, h0, resets=rj, method="native")[0]
  ref, _ = selective_loop(np.asarray(xb, np.float32), r, h0, res)
  assert hb.dtype == jnp.bfloat16 and rel_err(hb, ref) < 1e-2
  gb = jax.grad(
      lambda x: jnp.sum(traces.selective_traces(x, r, h0, resets=rj, method="native")[0].astype(jnp.float32))
  )(xb)
  assert gb.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(gb, np.float32)))
