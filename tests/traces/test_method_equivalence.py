"""Every method of ema_traces, read from its registry (ema_methods(): 'auto', the closed forms, the linear
scans), against one float64 loop on the same cases: odd and one-token lengths, chunks that do and do not
divide T, resets at chunk edges, h0, bias correction with start counts, alpha = 1, rates per timescale
or per channel. A method added to the registry is checked here without editing this file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ema_jax.traces import ema, ema_traces
from helpers import ema_loop, make_resets, per_channel_rates, rel_err

PAPER = (0.5, 0.1, 0.02)
# shape (B, T, D), rates (a tuple, "channel" or "channel1": [K, D] with one rate 1), chunk, resets, bias,
# h0, start_count
CASES = [
    ((2, 1, 4), PAPER, 8, False, False, False, None),  # T = 1
    ((2, 1, 4), PAPER, 8, True, True, True, 3),
    ((3, 37, 5), PAPER, 8, True, False, True, None),  # odd T, not a multiple of the chunk
    ((2, 33, 3), (0.3,), 4, False, True, False, None),  # K = 1
    ((2, 64, 6), (1.0, 0.1), 16, True, True, True, None),  # alpha = 1, T a multiple of the chunk
    ((2, 29, 4), PAPER, 5, True, True, True, np.array([0, 7])),  # start_count per row
    ((1, 257, 8), PAPER, 32, False, True, True, 2),  # scalar start_count
    ((2, 40, 3), PAPER, 1, True, True, True, None),  # chunk of one token
    ((2, 20, 3), PAPER, 64, True, False, False, None),  # chunk longer than T
    ((2, 45, 6), "channel", 8, True, True, True, None),  # a rate per timescale and channel
    ((3, 19, 5), "channel1", 4, False, False, True, None),  # per channel, one of them alpha = 1
    ((2, 300, 4), "channel", 8, True, True, False, 5),
]


def _takes(method, rates_per_channel: bool) -> bool:
  closed = ema.CLOSED_FORMS.get(method)
  return closed is None or closed.per_channel or not rates_per_channel


@pytest.mark.parametrize("method", [str(m) for m in ema.ema_methods()])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_method_equals_the_float64_loop(method, case):
  shape, rates, chunk, resets, bias, with_h0, start = CASES[case]
  if not _takes(ema.ScanMethod(method), isinstance(rates, str)):
    pytest.skip(f"{method} takes rates shared over D only")
  rng = np.random.default_rng(sum(shape) + chunk)
  bsz, t_len, d = shape
  x = rng.normal(size=shape).astype(np.float32)
  alphas = per_channel_rates(rng, 3, d, with_one=rates == "channel1") if isinstance(rates, str) else rates
  k = len(alphas)
  r = make_resets(rng, bsz, t_len, min(chunk, t_len)) if resets else None
  h0 = rng.normal(size=(bsz, k, d)).astype(np.float32) if with_h0 else None
  h, h_last = ema_traces(
      x, alphas, h0, resets=r, bias_correction=bias, start_count=start, method=method, chunk_size=chunk
  )
  ref, ref_last = ema_loop(x, alphas, h0, r, bias, start)
  assert h.shape == (bsz, t_len, k, d) and h.dtype == jnp.float32 and h_last.dtype == jnp.float32
  assert rel_err(h, ref) < 1e-5
  assert rel_err(h_last, ref_last) < 1e-5


CLOSED_FORMS = [str(m) for m in ema.CLOSED_FORMS]


@pytest.mark.parametrize("method", CLOSED_FORMS)
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
def test_closed_forms_in_low_precision(method, dtype, tol):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 200, 8)), dtype)
  r = make_resets(rng, 2, 200, 8)
  h, h_last = ema_traces(x, PAPER, resets=r, bias_correction=True, method=method)
  assert h.dtype == dtype and h_last.dtype == jnp.float32
  # Reference on the rounded inputs: float32 accumulation leaves only the output rounding.
  ref, ref_last = ema_loop(np.asarray(x.astype(jnp.float32)), PAPER, resets=r, bias_correction=True)
  assert rel_err(h.astype(jnp.float32), ref) < tol
  assert rel_err(h_last, ref_last) < 1e-5


@pytest.mark.parametrize("method", CLOSED_FORMS)
def test_closed_forms_under_jit_and_vmap(method):
  """Values and gradients (x, h0) of a vmapped, jitted call equal the loop and the unbatched gradient."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 2, 21, 4)), jnp.float32)  # [V, B, T, D]
  r = jnp.asarray(rng.uniform(size=(3, 2, 21)) < 0.2)
  h0 = jnp.asarray(rng.normal(size=(3, 2, 3, 4)), jnp.float32)
  f = lambda x, r, h0: ema_traces(x, PAPER, h0, resets=r, bias_correction=True, method=method, chunk_size=8)
  h_v, last_v = jax.jit(jax.vmap(f))(x, r, h0)
  for i in range(3):
    ref, ref_last = ema_loop(x[i], PAPER, h0[i], np.asarray(r[i]), True)
    assert rel_err(h_v[i], ref) < 1e-5 and rel_err(last_v[i], ref_last) < 1e-5
  w = jnp.asarray(rng.normal(size=h_v.shape), jnp.float32)
  loss = lambda x, r, h0, w: jnp.sum(f(x, r, h0)[0] * w)
  g_v = jax.jit(jax.vmap(jax.grad(loss, (0, 2))))(x, r, h0, w)
  for i in range(3):
    g_i = jax.grad(loss, (0, 2))(x[i], r[i], h0[i], w[i])
    for a, b in zip(g_v, g_i):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)
