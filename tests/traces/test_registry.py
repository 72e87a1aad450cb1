"""Adding a trace method is three edits: a ScanMethod member, its function and its table entry. A toy
method registered through exactly those three runs through every entry point that takes its kind, with
gradients, against float64 loops."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax import traces
from ema_jax.nn import EMATraces, SelectiveTraces
from ema_jax.traces import ema, kernels


@contextlib.contextmanager
def enum_member(name, value):
  """ScanMethod with one more member, as one more line in its class body gives (taken out afterwards)."""
  cls = kernels.ScanMethod
  member = str.__new__(cls, value)
  member._name_, member._value_ = name, value
  cls._member_map_[name] = member
  cls._value2member_map_[value] = member
  cls._member_names_.append(name)
  try:
    yield member
  finally:
    cls._member_names_.remove(name)
    del cls._member_map_[name], cls._value2member_map_[value]


def toy_kernel(a, b, h0, breaks, reverse, chunk_size):
  """h_t = a_t h_{t-1} + b_t as a Python loop over time, written out in the traced program."""
  shape = jnp.broadcast_shapes(a.shape, b.shape)
  a, b = jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)
  if breaks is not None:
    a = a * kernels.breaks_mask(breaks, a.ndim, a.dtype)
  h = jnp.zeros((shape[0],) + shape[2:], b.dtype) if h0 is None else h0
  outs = [None] * shape[1]
  for t in reversed(range(shape[1])) if reverse else range(shape[1]):
    h = a[:, t] * h + b[:, t]
    outs[t] = h
  return jnp.stack(outs, axis=1), h


def toy_closed_form(x_BTD, alpha_KE, h0_BKD, resets_BT, chunk_size, rate_grad):
  """Raw EMA traces [B, T, K, D] as a Python loop (no custom VJP: autodiff differentiates the loop)."""
  a_KE = 1.0 - alpha_KE
  h, outs = h0_BKD, []
  for t in range(x_BTD.shape[1]):
    keep = 1.0 if resets_BT is None else (1.0 - resets_BT[:, t].astype(h.dtype))[:, None, None]
    h = a_KE * h * keep + alpha_KE * x_BTD[:, t, None, :].astype(h.dtype)
    outs.append(h)
  return jnp.stack(outs, axis=1)


def loop(a, b, h0, resets, reverse=False):
  """float64 reference of the recurrence (a reset at t cuts t - 1 -> t forward, t -> t - 1 in reverse)."""
  shape = np.broadcast_shapes(a.shape, b.shape)
  a, b = np.broadcast_to(np.float64(a), shape).copy(), np.broadcast_to(np.float64(b), shape)
  h, out = np.float64(h0), np.zeros(shape)
  for t in reversed(range(shape[1])) if reverse else range(shape[1]):
    cut = resets[:, t] if not reverse else (resets[:, t + 1] if t + 1 < shape[1] else np.zeros(shape[0], bool))
    h = np.where(cut.reshape((-1,) + (1,) * (len(shape) - 2)), 0.0, a[:, t] * h) + b[:, t]
    out[:, t] = h
  return out, h


def test_a_toy_linear_scan_method_runs_everywhere(monkeypatch):
  rng = np.random.default_rng(0)
  a = rng.uniform(0.2, 0.99, size=(2, 13, 3, 4)).astype(np.float32)
  b = rng.normal(size=(2, 13, 3, 4)).astype(np.float32)
  h0 = rng.normal(size=(2, 3, 4)).astype(np.float32)
  resets = rng.uniform(size=(2, 13)) < 0.2
  with enum_member("TOY", "toy") as toy:  # 1. the member
    monkeypatch.setitem(kernels.KERNELS, toy, kernels.Kernel(toy_kernel))  # 2. the function, 3. its entry
    assert "toy" in kernels.scan_methods() and "toy" in ema.ema_methods()
    for reverse in (False, True):
      h, h_last = traces.linear_scan(a, b, h0, resets=resets, reverse=reverse, method="toy")
      ref, ref_last = loop(a, b, h0, resets, reverse)
      np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(h_last, ref_last, rtol=1e-5, atol=1e-5)
    # The custom VJP (the reverse recurrence through the same kernel) gives sequential's gradients.
    grads = {}
    for m in ("toy", "sequential"):
      loss = lambda a, b, h0, m=m: jnp.sum(jnp.square(traces.linear_scan(a, b, h0, resets=resets, method=m)[0]))
      grads[m] = jax.grad(loss, (0, 1, 2))(a, b, h0)
    for g_toy, g_seq in zip(grads["toy"], grads["sequential"]):
      np.testing.assert_allclose(g_toy, g_seq, rtol=1e-5, atol=1e-5)
    # EMA traces (x broadcast over K) and selective traces take it by name, as do their layers.
    x = b[:, :, 0]
    h, _ = traces.ema_traces(x, (0.5, 0.1, 0.02), resets=resets, method="toy")
    want, _ = traces.ema_traces(x, (0.5, 0.1, 0.02), resets=resets, method="sequential")
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)
    h, _ = traces.selective_traces(x, 1.0 - a, resets=resets, method=toy)
    want, _ = traces.selective_traces(x, 1.0 - a, resets=resets, method="sequential")
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)
    EMATraces(4, method="toy")
    SelectiveTraces(4, method="toy", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`method`='toy'"):
    traces.linear_scan(a, b, method="toy")  # gone with its member


def test_a_toy_closed_form_runs_in_ema_traces(monkeypatch):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 11, 4)).astype(np.float32)
  h0 = rng.normal(size=(2, 3, 4)).astype(np.float32)
  resets = rng.uniform(size=(2, 11)) < 0.2
  alphas = jnp.asarray(rng.uniform(0.05, 0.9, size=(3, 4)), jnp.float32)  # per channel, learned
  with enum_member("TOY_CLOSED", "toy_closed") as toy:  # 1. the member
    entry = ema.ClosedForm(toy_closed_form, default_chunk=4, per_channel=True)
    monkeypatch.setitem(ema.CLOSED_FORMS, toy, entry)  # 2. the function, 3. its entry
    assert "toy_closed" in ema.ema_methods() and "toy_closed" not in kernels.scan_methods()
    results = {}
    for m in ("toy_closed", "sequential"):
      f = lambda x, al, h0, m=m: traces.ema_traces(x, al, h0, resets=resets, bias_correction=True, method=m)
      results[m] = f(x, alphas, h0), jax.grad(lambda *args, f=f: jnp.sum(jnp.square(f(*args)[0])), (0, 1, 2))(
          x, alphas, h0
      )
    (h, h_last), grads = results["toy_closed"]
    (want, want_last), want_grads = results["sequential"]
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_last, want_last, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="accepted: auto, associative"):
      traces.linear_scan(x, x, method="toy_closed")  # a closed form is ema_traces' own
