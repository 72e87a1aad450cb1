"""linear_scan (ema_jax/traces/scan.py, kernels.py) against a float64 NumPy loop, step-by-step decoding,
gradients and bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ema_jax.traces import kernels, linear_scan, scan
from helpers import rel_err, scan_loop

METHODS = [str(m) for m in kernels.scan_methods()]  # the registry: a new kernel is tested here too


CASES = [
    # (B, T, channels, decay kind, reverse, resets, h0)
    (2, 1, (3, 4), "const", False, False, False),
    (2, 1, (3, 4), "const", False, True, True),
    (3, 37, (3, 5), "const", False, True, True),
    (2, 33, (1, 4), "const", True, False, True),
    (2, 64, (2, 3), "const", True, True, True),
    (1, 131, (3, 8), "per_channel", False, False, False),
    (2, 45, (3, 4), "varying", False, True, True),
    (2, 45, (3, 4), "varying", True, True, False),
    (4, 17, (6,), "varying_signed", False, False, True),
    (2, 40, (4,), "varying_zeros", True, True, True),
]


def make_case(rng, bsz, t_len, ch, kind):
  b = rng.normal(size=(bsz, t_len) + ch).astype(np.float32)
  if kind == "const":
    a = rng.uniform(0.3, 0.999, size=(ch[0],) + (1,) * (len(ch) - 1)).astype(np.float32)
  elif kind == "per_channel":
    a = rng.uniform(0.3, 0.999, size=ch).astype(np.float32)
  elif kind == "varying":
    a = rng.uniform(0.0, 1.0, size=(bsz, t_len) + ch).astype(np.float32)
  elif kind == "varying_signed":
    a = rng.uniform(-1.0, 1.0, size=(bsz, t_len) + ch).astype(np.float32)
  else:
    a = rng.uniform(0.5, 1.0, size=(bsz, t_len) + ch).astype(np.float32)
    a[rng.uniform(size=a.shape) < 0.1] = 0.0
  return a, b


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}{c[3]}{'R' if c[4] else ''}")
def test_matches_float64_loop(method, case):
  bsz, t_len, ch, kind, reverse, with_resets, with_h0 = case
  rng = np.random.default_rng(hash(case) % 2**32)
  a, b = make_case(rng, bsz, t_len, ch, kind)
  resets = (rng.uniform(size=(bsz, t_len)) < 0.15) if with_resets else None
  h0 = rng.normal(size=(bsz,) + ch).astype(np.float32) if with_h0 else None
  h, h_last = linear_scan(a, b, h0, reverse=reverse, resets=resets, method=method, chunk_size=8)
  h_ref, last_ref = scan_loop(a, b, h0, reverse, resets)
  assert h.dtype == jnp.float32 and h_last.dtype == jnp.float32
  assert h.shape == h_ref.shape and h_last.shape == last_ref.shape
  assert rel_err(h, h_ref) < 1e-5
  assert rel_err(h_last, last_ref) < 1e-5


@pytest.mark.parametrize("method", ["chunked", "unrolled"])
@pytest.mark.parametrize("chunk", [1, 3, 8, 32, 200])
def test_chunk_sizes_any_length(chunk, method):
  rng = np.random.default_rng(chunk)
  for kind in ("const", "varying"):
    a, b = make_case(rng, 2, 77, (3, 4), kind)
    resets = rng.uniform(size=(2, 77)) < 0.1
    h0 = rng.normal(size=(2, 3, 4)).astype(np.float32)
    for reverse in (False, True):
      h, h_last = linear_scan(a, b, h0, resets=resets, reverse=reverse, method=method, chunk_size=chunk)
      ref, ref_last = scan_loop(a, b, h0, reverse=reverse, resets=resets)
      assert rel_err(h, ref) < 1e-5 and rel_err(h_last, ref_last) < 1e-5


@pytest.mark.slow
def test_unrolled_recursion_long_sequence():
  """T = 3000 with chunks of 4: four levels of chunk summaries, a partial chunk at every level."""
  rng = np.random.default_rng(11)
  for kind in ("const", "varying"):
    a, b = make_case(rng, 1, 3000, (2,), kind)
    resets = rng.uniform(size=(1, 3000)) < 0.002
    for reverse in (False, True):
      h, h_last = linear_scan(a, b, resets=resets, reverse=reverse, method="unrolled", chunk_size=4)
      ref, ref_last = scan_loop(a, b, reverse=reverse, resets=resets)
      assert rel_err(h, ref) < 1e-5 and rel_err(h_last, ref_last) < 1e-5


def test_broadcast_input_over_channels():
  """b shared over the K axis (as the traces use it) gives the full [B, T, K, D] result."""
  rng = np.random.default_rng(1)
  a = rng.uniform(0.5, 0.99, size=(1, 1, 3, 1)).astype(np.float32)
  b = rng.normal(size=(2, 29, 1, 6)).astype(np.float32)
  ref = scan_loop(a, b)[0]
  for method in METHODS:
    h, _ = linear_scan(a, b, method=method, chunk_size=8)
    assert h.shape == (2, 29, 3, 6)
    assert rel_err(h, ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_inputs(dtype, tol, method):
  rng = np.random.default_rng(3)
  a, b = make_case(rng, 2, 300, (3, 4), "const")
  b_lo = jnp.asarray(b).astype(dtype)
  h, h_last = linear_scan(a, b_lo, method=method)
  assert h.dtype == dtype and h_last.dtype == jnp.float32
  # Reference on the rounded inputs: the state accumulates in float32, so only the output rounding
  # (one bfloat16/float16 ulp) separates the two.
  h_ref, last_ref = scan_loop(a, np.asarray(b_lo.astype(jnp.float32)))
  assert rel_err(h.astype(jnp.float32), h_ref) < tol
  assert rel_err(h_last, last_ref) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_equals_step_by_step(reverse):
  rng = np.random.default_rng(4)
  a, b = make_case(rng, 3, 21, (2, 5), "varying")
  resets = rng.uniform(size=(3, 21)) < 0.2
  h0 = rng.normal(size=(3, 2, 5)).astype(np.float32)
  h, h_last = linear_scan(a, b, h0, resets=resets, reverse=reverse, method="associative")
  state = jnp.asarray(h0)
  order = range(20, -1, -1) if reverse else range(21)
  for t in order:
    reset = resets[:, t] if not reverse else (resets[:, t + 1] if t < 20 else np.zeros(3, bool))
    state = scan.step(state, a[:, t], b[:, t], reset=jnp.asarray(reset))
    np.testing.assert_allclose(state, h[:, t], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state, h_last, rtol=1e-5, atol=1e-6)


def test_state_carries_across_calls():
  """Scanning [0, T) in two pieces, passing h_last as h0, equals one scan."""
  rng = np.random.default_rng(5)
  a, b = make_case(rng, 2, 50, (3, 4), "const")
  h, _ = linear_scan(a, b)
  h1, s1 = linear_scan(a, b[:, :23])
  h2, _ = linear_scan(a, b[:, 23:], s1)
  np.testing.assert_allclose(np.concatenate([h1, h2], 1), h, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("method", ["associative", "sequential", "chunked", "unrolled"])
def test_check_grads(method):
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    b = rng.normal(size=(2, 11, 2, 3))
    a = rng.uniform(0.3, 0.9, size=(2, 1))
    av = rng.uniform(-0.9, 0.9, size=(2, 11, 2, 3))
    h0 = rng.normal(size=(2, 2, 3))
    resets = rng.uniform(size=(2, 11)) < 0.2
    for decay, reverse in ((a, False), (av, True)):
      f = lambda a, b, h0: linear_scan(a, b, h0, resets=resets, reverse=reverse, method=method, chunk_size=4)
      check_grads(f, (decay, b, h0), order=1, modes=("rev",))
      g = lambda a, b, h0: linear_scan(
          a, b, h0, resets=resets, reverse=reverse, method=method, chunk_size=4, custom_vjp=False
      )
      check_grads(g, (decay, b, h0), order=1, modes=("fwd", "rev"))


def _loss_weights(rng, shape, state_shape):
  return rng.normal(size=shape).astype(np.float32), rng.normal(size=state_shape).astype(np.float32)


@pytest.mark.parametrize("method", ["associative", "sequential", "chunked", "unrolled"])
@pytest.mark.parametrize("kind,reverse", [("const", False), ("const", True), ("varying", False), ("varying", True)])
def test_custom_vjp_matches_autodiff(method, kind, reverse):
  """Custom VJP == autodiff through the textbook associative scan == autodiff through a float64 loop."""
  rng = np.random.default_rng(7)
  a, b = make_case(rng, 2, 19, (3, 4), kind)
  resets = rng.uniform(size=(2, 19)) < 0.15
  h0 = rng.normal(size=(2, 3, 4)).astype(np.float32)
  w, wl = _loss_weights(rng, (2, 19, 3, 4), (2, 3, 4))

  def loss(a, b, h0, custom):
    h, hl = linear_scan(
        a,
        b,
        h0,
        reverse=reverse,
        resets=resets,
        method=method if custom else "associative",
        chunk_size=8,
        custom_vjp=custom,
    )
    return jnp.sum(h * w) + jnp.sum(hl * wl)

  g_custom = jax.grad(loss, (0, 1, 2))(a, b, h0, True)
  g_auto = jax.grad(loss, (0, 1, 2))(a, b, h0, False)
  for x, y in zip(g_custom, g_auto):
    assert x.shape == y.shape
    assert rel_err(x, np.asarray(y, np.float64)) < 1e-5

  # Autodiff through the float64 NumPy-style loop written with jax.numpy in x64.
  with jax.enable_x64(True):

    def loop_loss(a, b, h0):
      shape = jnp.broadcast_shapes(a.shape, b.shape)
      a_f = jnp.broadcast_to(a, shape)
      state, outs = h0, [None] * 19
      for t in (range(18, -1, -1) if reverse else range(19)):
        cut = resets[:, t] if not reverse else (resets[:, t + 1] if t < 18 else np.zeros(2, bool))
        a_t = jnp.where(cut[:, None, None], 0.0, a_f[:, t])
        state = a_t * state + b[:, t]
        outs[t] = state
      return jnp.sum(jnp.stack(outs, 1) * w) + jnp.sum(state * wl)

    g_ref = jax.grad(loop_loss, (0, 1, 2))(
        jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64), jnp.asarray(h0, jnp.float64)
    )
    for x, y in zip(g_custom, g_ref):
      assert rel_err(x, np.asarray(y)) < 1e-5


def test_vjp_under_jit_bfloat16():
  rng = np.random.default_rng(8)
  a, b = make_case(rng, 2, 64, (3, 4), "const")
  grad = jax.jit(jax.grad(lambda b: jnp.sum(linear_scan(a, b)[0].astype(jnp.float32) ** 2)))
  g = grad(jnp.asarray(b, jnp.bfloat16))
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_methods_as_enum_or_string():
  rng = np.random.default_rng(9)
  a, b = make_case(rng, 2, 13, (3,), "full")
  for m in kernels.scan_methods():
    h_enum, _ = linear_scan(a, b, method=m, chunk_size=4)
    h_str, _ = linear_scan(a, b, method=m.value, chunk_size=4)
    np.testing.assert_array_equal(np.asarray(h_enum), np.asarray(h_str))
  assert scan.auto_method(1024, "cpu") == "sequential" and scan.auto_method(1024, "tpu") == "chunked"


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method", ["associative", "sequential"])
def test_entering_states(method, reverse):
  rng = np.random.default_rng(10)
  a = rng.uniform(-1, 1, (2, 7, 3)).astype(np.float32)
  b = rng.normal(size=(2, 7, 3)).astype(np.float32)
  h0 = rng.normal(size=(2, 3)).astype(np.float32)
  entering, final = kernels.entering_states(
      jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0), reverse=reverse, method=method
  )
  h, _ = linear_scan(a, b, h0, reverse=reverse, method="sequential")
  # The state entering step t is h0 or the state after the step before it (in scan order).
  want = (
      np.concatenate([np.asarray(h)[:, 1:], h0[:, None]], 1)
      if reverse
      else np.concatenate([h0[:, None], np.asarray(h)[:, :-1]], 1)
  )
  np.testing.assert_allclose(np.asarray(entering), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(final), np.asarray(h)[:, 0 if reverse else -1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="fast"), "method"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(resets=np.zeros((2, 5), np.int32)), "resets"),
        (dict(resets=np.zeros((2, 4), bool)), "resets"),
        (dict(h0=np.zeros((2, 3), np.float32)), "h0"),
    ],
)
def test_bad_arguments(kwargs, match):
  a = np.full((3, 1), 0.5, np.float32)
  b = np.zeros((2, 5, 3, 4), np.float32)
  with pytest.raises(ValueError, match=match):
    linear_scan(a, b, **kwargs)


def test_bad_shapes_and_dtypes():
  with pytest.raises(ValueError, match="dtype"):
    linear_scan(np.float32(0.5), np.zeros((2, 5, 3), np.int32))
  with pytest.raises(ValueError, match="time axis"):
    linear_scan(np.zeros((2, 4, 3), np.float32), np.zeros((2, 5, 3), np.float32))
  with pytest.raises(ValueError, match="broadcast"):
    linear_scan(np.zeros((4,), np.float32), np.zeros((2, 5, 3), np.float32))
  with pytest.raises(ValueError, match="B, T"):
    linear_scan(np.float32(0.5), np.zeros((5,), np.float32))


def test_bad_method_lists_accepted_values():
  b = np.zeros((2, 5, 3), np.float32)
  with pytest.raises(ValueError, match="`method`='fast'; accepted: auto, associative, sequential, chunked, unrolled."):
    linear_scan(np.float32(0.5), b, method="fast")
  for closed_form in (kernels.ScanMethod.FUSED, "blocked"):  # ema_traces' closed forms for constant rates
    with pytest.raises(ValueError, match="accepted: auto, associative, sequential, chunked, unrolled"):
      linear_scan(np.float32(0.5), b, method=closed_form)
