"""Linear recurrences h_t = a_t * h_{t-1} + b_t over axis 1 of [B, T, ...] arrays.

One public function, `linear_scan`, with several methods that agree to float32 rounding:

  associative  jax.lax.associative_scan (log depth: the form for TPU/GPU)
  sequential   jax.lax.scan (one step per token: the reference and the decode path)
  chunked      inside chunks of C tokens the recurrence is a C x C decay matrix (a matmul); chunk
               summaries are combined by an associative scan; any T (padded internally)
  auto         picked per backend (see `auto_method`, numbers in benchmarks/scan_bench.py)

Methods are `ScanMethod` members; their strings ('auto', ...) are accepted wherever a method is.

`a` and `b` broadcast against each other, so a per-channel decay (a of shape [K, 1] for instance) or an
input shared across channels never costs a [B, T, ...] array in the chunked method. State and
accumulation are float32 whatever the input dtype; `h` comes back in b's dtype, `h_last` in float32.

Gradients come from a custom VJP: the cotangent of a linear recurrence obeys the same recurrence run
in the other direction, so the backward pass is one more scan instead of differentiating through the
associative tree (which would keep O(log T) copies of the state alive).

This module imports nothing from the project.
"""

from __future__ import annotations

import enum
import functools
import string
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


class ScanMethod(str, enum.Enum):
  """How a recurrence is evaluated. A str enum, so ScanMethod.AUTO == "auto"."""
  AUTO = "auto"
  ASSOCIATIVE = "associative"
  SEQUENTIAL = "sequential"
  CHUNKED = "chunked"
  FUSED = "fused"  # ema_traces only (one batched matmul per chunk, see traces.py); linear_scan refuses it

  def __str__(self):
    return self.value


METHODS = tuple(m.value for m in ScanMethod if m is not ScanMethod.FUSED)  # linear_scan's
DEFAULT_CHUNK = 32
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


# ----------------------------------------------------------------------------------------------
# validation


def parse_method(method, accepted, where: str) -> ScanMethod:
  """`method` (a ScanMethod or its string) as a ScanMethod, if it is one of `accepted`; else a ValueError."""
  try:
    parsed = ScanMethod(method)
  except ValueError:
    parsed = None
  if parsed is None or parsed not in accepted:
    raise ValueError(f"{where}: `method`={method!r}; accepted: {', '.join(map(str, accepted))}.")
  return parsed


def _check_dtype(name, x):
  if x.dtype not in [np.dtype(d) for d in _FLOAT_DTYPES]:
    raise ValueError(f"linear_scan: `{name}` has dtype {x.dtype}; accepted: float32, bfloat16, float16 (float64 when x64 is enabled).")


def _prepare(a, b, h0, resets, method, chunk_size):
  """Validates arguments at the boundary and returns (a, b, h0, resets, method) as arrays of rank >= 2
  and a ScanMethod."""
  method = parse_method(method, METHODS, "linear_scan")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"linear_scan: `chunk_size`={chunk_size!r}; accepted: a positive integer.")
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  _check_dtype("b", b)
  if a.dtype not in [np.dtype(d) for d in _FLOAT_DTYPES]:
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == bool:
      a = a.astype(_acc_dtype(b.dtype))
    else:
      _check_dtype("a", a)
  if b.ndim < 2:
    raise ValueError(f"linear_scan: `b` has shape {b.shape}; expected [B, T, ...] with time on axis 1.")
  if a.ndim > b.ndim:
    raise ValueError(f"linear_scan: `a` has shape {a.shape}, more dimensions than `b` {b.shape}.")
  a = a.reshape((1,) * (b.ndim - a.ndim) + a.shape)
  if a.shape[1] not in (1, b.shape[1]):
    raise ValueError(
        f"linear_scan: `a` has {a.shape[1]} steps on the time axis but `b` has {b.shape[1]}; "
        "give a time axis of length 1 (constant decay) or T.")
  try:
    out_shape = jnp.broadcast_shapes(a.shape, b.shape)
  except ValueError:
    raise ValueError(f"linear_scan: `a` {a.shape} and `b` {b.shape} do not broadcast together.") from None
  state_shape = (out_shape[0],) + tuple(out_shape[2:])
  if h0 is not None:
    h0 = jnp.asarray(h0)
    _check_dtype("h0", h0)
    try:
      ok = jnp.broadcast_shapes(h0.shape, state_shape) == state_shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"linear_scan: `h0` has shape {h0.shape}; expected {state_shape} ([B, ...] without time).")
    h0 = jnp.broadcast_to(h0.astype(_acc_dtype(b.dtype)), state_shape)
  if resets is not None:
    resets = jnp.asarray(resets)
    if resets.dtype != bool:
      raise ValueError(f"linear_scan: `resets` has dtype {resets.dtype}; expected bool [B, T].")
    if resets.ndim != 2 or resets.shape[1] != b.shape[1] or resets.shape[0] not in (1, out_shape[0]):
      raise ValueError(
          f"linear_scan: `resets` has shape {resets.shape}; expected [B, T] = [{out_shape[0]}, {b.shape[1]}].")
  return a, b, h0, resets, method


# ----------------------------------------------------------------------------------------------
# helpers


def _reduce_to(x, shape):
  """Sums a broadcast result back to `shape` (the reverse of broadcasting)."""
  extra = x.ndim - len(shape)
  axes = tuple(range(extra)) + tuple(
      i + extra for i, s in enumerate(shape) if s == 1 and x.shape[i + extra] != 1)
  if axes:
    x = jnp.sum(x, axis=axes, keepdims=True)
  return x.reshape(shape)


def _acc_dtype(dtype):
  """Accumulation dtype: float32 for float32/bfloat16/float16 inputs, float64 for float64."""
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _breaks_mask(breaks, ndim, dtype=jnp.float32):
  """[B, T] bool -> broadcastable [B, T, 1, ...] keep-mask (0 where coupling is cut)."""
  keep = jnp.logical_not(breaks).astype(dtype)
  return keep.reshape(keep.shape + (1,) * (ndim - 2))


def _shift_in_scan_order(x, reverse, fill):
  """Returns y with y[t] = x[t + 1] (forward) or x[t - 1] (reverse) along axis 1; `fill` at the edge."""
  pad = [(0, 0)] * x.ndim
  if reverse:
    pad[1] = (1, 0)
    return jnp.pad(x[:, :-1], pad, constant_values=fill)
  pad[1] = (0, 1)
  return jnp.pad(x[:, 1:], pad, constant_values=fill)


def combine(left, right):
  """The associative operator of h_t = a_t h_{t-1} + b_t on (a, b) pairs: `left`, then `right`.

  (a_l, b_l) then (a_r, b_r) maps h to a_r (a_l h + b_l) + b_r = (a_l a_r) h + (a_r b_l + b_r).
  Numerics: give it the accumulation dtype (float32; float64 under x64). Each output of a log-depth scan
  passes through O(log T) combines instead of T steps, so it agrees with the sequential loop to rounding,
  not bit for bit; products of decays with |a| <= 1 only shrink (towards zero, never overflowing).
  """
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def entering_states(a, b, h0, *, reverse: bool = False, method=ScanMethod.ASSOCIATIVE):
  """s_{n+1} = a_n s_n + b_n along axis 1 from s_0 = h0 (from the right for reverse).

  Returns (the state entering each step [B, N, ...], the final state [B, ...]): the carries of a chunked
  scan, whose steps are whole chunks. `method`: 'associative' (log depth) or 'sequential' (jax.lax.scan).
  No validation, custom VJP or dtype handling: a building block for code that differentiates it itself.
  """
  method = parse_method(method, (ScanMethod.ASSOCIATIVE, ScanMethod.SEQUENTIAL), "entering_states")
  if method is ScanMethod.SEQUENTIAL:
    def body(s, ab):
      return ab[0] * s + ab[1], s
    final, entering = jax.lax.scan(body, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse)
    return jnp.moveaxis(entering, 0, 1), final
  # h0 joins as an extra element of decay 0, so element n of the scan holds the state entering step n.
  zero = jnp.zeros_like(a[:, :1])
  if reverse:
    states = jax.lax.associative_scan(combine, (jnp.concatenate([a, zero], axis=1),
                                                jnp.concatenate([b, h0[:, None]], axis=1)),
                                      axis=1, reverse=True)[1]
    return states[:, 1:], states[:, 0]
  states = jax.lax.associative_scan(combine, (jnp.concatenate([zero, a], axis=1),
                                              jnp.concatenate([h0[:, None], b], axis=1)), axis=1)[1]
  return states[:, :-1], states[:, -1]


# ----------------------------------------------------------------------------------------------
# the three methods (forward in scan order; all work in float32)
#
# `breaks` [B, T] bool or None: True at t means h_{t-1} (in scan order) does not flow into h_t.


def _sequential(a, b, h0, breaks, reverse):
  out_shape = jnp.broadcast_shapes(a.shape, b.shape)
  state_shape = (out_shape[0],) + out_shape[2:]
  if h0 is None:
    h0 = jnp.zeros(state_shape, b.dtype)
  const_a = a.shape[1] == 1
  xs_b = jnp.moveaxis(b, 1, 0)
  xs_a = None if const_a else jnp.moveaxis(a, 1, 0)
  xs_k = None if breaks is None else jnp.moveaxis(breaks, 1, 0)
  a0 = a[:, 0] if const_a else None

  def body(h, xs):
    a_t, b_t, brk_t = xs
    a_t = a0 if a_t is None else a_t
    if brk_t is not None:
      a_t = a_t * jnp.logical_not(brk_t).astype(h.dtype).reshape(brk_t.shape + (1,) * (h.ndim - 1))
    h = a_t * h + b_t
    return h, h

  h_last, hs = jax.lax.scan(body, h0, (xs_a, xs_b, xs_k), reverse=reverse)
  return jnp.moveaxis(hs, 0, 1), h_last


def _associative(a, b, h0, breaks, reverse):
  out_shape = jnp.broadcast_shapes(a.shape, b.shape)
  if breaks is not None:
    a = a * _breaks_mask(breaks, a.ndim, a.dtype)
  # The scan combines along time only, so `a` needs a full time axis but may keep size-1 channel axes.
  a = jnp.broadcast_to(a, a.shape[:1] + (out_shape[1],) + a.shape[2:])
  b = jnp.broadcast_to(b, out_shape)
  if h0 is not None:
    # Fold the initial state into the first step (in scan order): b_0 <- b_0 + a_0 * h0.
    i = -1 if reverse else 0
    b = b.at[:, i].add(a[:, i] * h0)

  if reverse:
    # JAX reverses by flipping, so the forward combine applies unchanged.
    _, h = jax.lax.associative_scan(combine, (a, b), axis=1, reverse=True)
    return h, h[:, 0]
  _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
  return h, h[:, -1]


def _signed_log_parts(a):
  """Splits a into (log|a| with zeros replaced by 0, is_zero, is_negative) for products via cumsums."""
  is_zero = a == 0
  log_abs = jnp.log(jnp.where(is_zero, 1.0, jnp.abs(a)))
  return log_abs, is_zero, a < 0


def _chunked(a, b, h0, breaks, reverse, chunk_size):
  """Decay matrix inside chunks (einsum, i.e. a matmul for per-channel decays), associative across."""
  if reverse:
    flip = lambda x: None if x is None else jnp.flip(x, axis=1)
    h, h_last = _chunked(flip(a), flip(b), h0, flip(breaks), False, chunk_size)
    return jnp.flip(h, axis=1), h_last

  out_shape = jnp.broadcast_shapes(a.shape, b.shape)
  bsz, t_len = out_shape[0], out_shape[1]
  ch_shape = out_shape[2:]
  c = min(chunk_size, t_len)
  n = -(-t_len // c)
  pad = n * c - t_len
  const_a = a.shape[1] == 1

  def to_chunks(x, fill):
    if pad:
      widths = [(0, 0)] * x.ndim
      widths[1] = (0, pad)
      x = jnp.pad(x, widths, constant_values=fill)
    return x.reshape(x.shape[:1] + (n, c) + x.shape[2:])

  b_c = to_chunks(b, 0)            # [Bb, n, c, *b_ch]
  tt = jnp.arange(c)
  lower = tt[:, None] >= tt[None, :]                     # [c(t), c(s)] causal
  if const_a:
    a_ch = a[:, 0]                                        # [Ba, *a_ch]
    log_abs, is_zero, is_neg = _signed_log_parts(a_ch)
    steps = (tt[:, None] - tt[None, :]).astype(a.dtype)  # t - s
    expand = lambda x: x.reshape(x.shape[:1] + (1, 1) + x.shape[1:])
    steps_e = steps.reshape((1,) + steps.shape + (1,) * (a_ch.ndim - 1))
    # a^(t-s) for t >= s: exp((t-s) log|a|) with sign (-1)^(t-s) for negative a and 0^0 = 1.
    mag = jnp.exp(steps_e * expand(log_abs))
    mag = jnp.where(expand(is_zero), (steps_e == 0).astype(a.dtype), mag)
    odd = (jnp.abs(steps_e).astype(jnp.int32) % 2) == 1
    sign = jnp.where(jnp.logical_and(expand(is_neg), odd), -1.0, 1.0)
    lmat = jnp.where(lower.reshape((1,) + lower.shape + (1,) * (a_ch.ndim - 1)), mag * sign, 0.0)
    lmat = lmat[:, None]                                   # [Ba, 1(n), c, c, *a_ch]
    # carry-in factor a^(t+1) and chunk decay a^c
    pw = (tt + 1).astype(a.dtype).reshape((1, c) + (1,) * (a_ch.ndim - 1))
    pmag = jnp.where(a_ch[:, None] == 0, 0.0, jnp.exp(pw * log_abs[:, None]))
    podd = ((tt + 1) % 2 == 1).reshape(pw.shape)
    pfac = pmag * jnp.where(jnp.logical_and(is_neg[:, None], podd), -1.0, 1.0)
    pfac = pfac[:, None]                                   # [Ba, 1(n), c, *a_ch]
  else:
    a_c = to_chunks(a, 1.0)                                # [Ba, n, c, *a_ch]
    log_abs, is_zero, is_neg = _signed_log_parts(a_c)
    cl = jnp.cumsum(log_abs, axis=2)
    cz = jnp.cumsum(is_zero.astype(jnp.int32), axis=2)
    cn = jnp.cumsum(is_neg.astype(jnp.int32), axis=2)
    # prod_{r=s+1..t} a_r = exp(cl_t - cl_s) * (-1)^(cn_t - cn_s), zero if a zero lies in (s, t].
    d_log = cl[:, :, :, None] - cl[:, :, None, :]
    same = (cz[:, :, :, None] == cz[:, :, None, :])
    odd = ((cn[:, :, :, None] - cn[:, :, None, :]) % 2) == 1
    lower_e = lower.reshape((1, 1) + lower.shape + (1,) * (a_c.ndim - 3))
    ok = jnp.logical_and(lower_e, same)
    lmat = jnp.where(ok, jnp.exp(jnp.where(ok, d_log, 0.0)) * jnp.where(odd, -1.0, 1.0), 0.0)
    # prod_{r=0..t} a_r inside the chunk
    pfac = jnp.where(cz > 0, 0.0, jnp.exp(cl)) * jnp.where(cn % 2 == 1, -1.0, 1.0)

  if breaks is not None:
    # Segment structure inside each chunk: s flows into t only if no break lies in (s, t].
    br = to_chunks(breaks, False)                          # [Bk, n, c]
    seg = jnp.cumsum(br.astype(jnp.int32), axis=2)
    same_seg = (seg[:, :, :, None] == seg[:, :, None, :]).astype(a.dtype)  # [Bk, n, c, c]
    extra = lmat.ndim - 4
    lmat = lmat * same_seg.reshape(same_seg.shape + (1,) * extra)
    no_break_yet = (seg == 0).astype(a.dtype)          # [Bk, n, c]
    pfac = pfac * no_break_yet.reshape(no_break_yet.shape + (1,) * (pfac.ndim - 3))

  # Intra-chunk: h_local[t] = sum_s L[t, s] b[s] -- an einsum whose subscripts skip size-1 (broadcast)
  # axes so a shared decay or a shared input is never materialised at full size.
  nch = len(ch_shape)
  letters = iter(string.ascii_letters.replace("t", "").replace("s", "").replace("z", "").replace("n", ""))
  ch_letters = [next(letters) for _ in range(nch)]

  def subs(x, lead, time_letters):
    # x has shape [lead0, (n), *time, *ch]; returns subscripts, dropping size-1 axes, and squeezed x.
    out, keep = "", []
    dims = list(lead) + list(time_letters) + ch_letters
    for i, (letter, size) in enumerate(zip(dims, x.shape)):
      full = out_shape_l[letter]
      if size == full and (size != 1 or letter in time_letters):
        out += letter
        keep.append(i)
      elif size != 1:
        raise AssertionError((x.shape, dims))
    squeeze_axes = tuple(i for i in range(x.ndim) if i not in keep)
    return out, jnp.squeeze(x, axis=squeeze_axes) if squeeze_axes else x

  out_shape_l = {"z": bsz, "n": n, "t": c, "s": c}
  out_shape_l.update({l: s for l, s in zip(ch_letters, ch_shape)})
  l_sub, l_sq = subs(lmat, "zn", "ts")
  b_sub, b_sq = subs(b_c, "zn", "s")
  all_out = "znt" + "".join(ch_letters)
  o_sub = "".join(l for l in all_out if l in l_sub or l in b_sub)
  h_local = jnp.einsum(f"{l_sub},{b_sub}->{o_sub}", l_sq, b_sq,
                       precision=jax.lax.Precision.HIGHEST, preferred_element_type=b.dtype)
  h_local = h_local.reshape(tuple(out_shape_l[l] if l in o_sub else 1 for l in all_out))
  h_local = jnp.broadcast_to(h_local, (bsz, n, c) + tuple(ch_shape))

  # Across chunks: S_j = A_j S_{j-1} + end_j, S_{-1} = h0; chunk j starts from S_{j-1}.
  # (The last chunk's summary may include padding; it is never used as a carry.)
  end = h_local[:, :, -1]                                  # [B, n, *ch]
  a_chunk = pfac[:, :, -1]
  a_chunk = jnp.broadcast_to(a_chunk, a_chunk.shape[:1] + (n,) + a_chunk.shape[2:])
  if h0 is None:
    h0 = jnp.zeros((bsz,) + tuple(ch_shape), b.dtype)
  carry, _ = entering_states(a_chunk, end, h0)             # [B, n, *ch]: state entering each chunk
  h = h_local + pfac * carry[:, :, None]
  h = h.reshape((bsz, n * c) + tuple(ch_shape))[:, :t_len]
  return h, h[:, -1]


# ----------------------------------------------------------------------------------------------
# dispatch and custom VJP


def auto_method(t_len, backend=None) -> ScanMethod:
  """Fastest method per backend, from benchmarks/scan_bench.py (see README).

  cpu: 'sequential'. Measured on a 2-core CPU (shared, medians; `scan_bench.py --per-channel`) through
    ema_traces with [K, D] rates at (B, T, D, K) = (8, 2048, 256, 3), (1, 16384, 256, 3), (1, 65536, 256, 3):
    fastest forward everywhere, 3-5x ahead of 'chunked' forward and backward once page faults are out of
    the timing (--reuse-heap); with them 1.3-2.5x ahead, except forward+backward at (8, 2048, 256, 3),
    where 'associative' was 18% faster. (Rates shared over D take traces' 'fused' path instead.)
  gpu, tpu: unmeasured; 'chunked' (matmuls inside chunks, a log-depth scan across them) as designed.
  """
  if t_len <= 2:
    return ScanMethod.SEQUENTIAL
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return ScanMethod.SEQUENTIAL
  return ScanMethod.CHUNKED


def _run(a, b, h0, breaks, reverse, method, chunk_size):
  if method is ScanMethod.AUTO:
    method = auto_method(b.shape[1])
  acc = _acc_dtype(b.dtype)
  a = a.astype(acc)
  b = b.astype(acc)
  if method is ScanMethod.SEQUENTIAL:
    out_shape = jnp.broadcast_shapes(a.shape, b.shape)
    return _sequential(a, jnp.broadcast_to(b, out_shape), h0, breaks, reverse)
  if method is ScanMethod.ASSOCIATIVE:
    return _associative(a, b, h0, breaks, reverse)
  return _chunked(a, b, h0, breaks, reverse, chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _scan_vjp(a, b, h0, breaks, reverse, method, chunk_size, out_dtype):
  h, h_last = _run(a, b, h0, breaks, reverse, method, chunk_size)
  return h.astype(out_dtype), h_last


def _scan_fwd(a, b, h0, breaks, reverse, method, chunk_size, out_dtype):
  h, h_last = _run(a, b, h0, breaks, reverse, method, chunk_size)
  return (h.astype(out_dtype), h_last), (a, b, h0, breaks, h)


def _scan_bwd(reverse, method, chunk_size, out_dtype, res, cts):
  a, b, h0, breaks, h = res
  g_h, g_last = cts
  acc = _acc_dtype(b.dtype)
  g = jnp.asarray(g_h, acc)
  # The final state's cotangent joins the last output's (in scan order).
  last = 0 if reverse else -1
  g = g.at[:, last].add(jnp.broadcast_to(g_last, g[:, last].shape).astype(acc))
  # lambda_t = g_t + a_{t+1} lambda_{t+1}: the same recurrence in the other direction, with a and the
  # breaks shifted by one step (a constant decay needs no shift).
  a32 = a.astype(acc)
  a_bw = a32 if a.shape[1] == 1 else _shift_in_scan_order(a32, reverse, 1.0)
  br_bw = None if breaks is None else _shift_in_scan_order(breaks, reverse, False)
  lam, _ = _run(a_bw, g, None, br_bw, not reverse, method, chunk_size)
  # h_prev in scan order, h0 (or zero) before the first step.
  state0 = jnp.zeros_like(h[:, :1]) if h0 is None else h0[:, None]
  if reverse:
    h_prev = jnp.concatenate([h[:, 1:], state0], axis=1)
  else:
    h_prev = jnp.concatenate([state0, h[:, :-1]], axis=1)
  keep = None if breaks is None else _breaks_mask(breaks, h.ndim, acc)
  da_full = lam * h_prev if keep is None else lam * h_prev * keep
  da = _reduce_to(da_full, a.shape).astype(a.dtype)
  db = _reduce_to(lam, b.shape).astype(b.dtype)
  dh0 = None
  if h0 is not None:
    first = -1 if reverse else 0
    a_first = jnp.broadcast_to(a32[:, 0 if a.shape[1] == 1 else first], lam[:, first].shape)
    if keep is not None:
      a_first = a_first * keep[:, first]
    dh0 = (a_first * lam[:, first]).astype(h0.dtype)
  return da, db, dh0, None


_scan_vjp.defvjp(_scan_fwd, _scan_bwd)


def linear_scan(a, b, h0=None, *, reverse: bool = False, resets=None, method: str | ScanMethod = "auto",
                chunk_size: int = DEFAULT_CHUNK, custom_vjp: bool = True) -> Tuple[jax.Array, jax.Array]:
  """Solves h_t = a_t * h_{t-1} + b_t along axis 1.

  Args:
    a: decays, broadcastable against b ([B, T, ...], [1, 1, ...], [...] for a constant decay).
    b: inputs [B, T, ...] (float32, bfloat16 or float16); may itself broadcast over channel axes.
    h0: initial state [B, ...] (the state before the first step; zeros when None).
    reverse: run from t = T - 1 down to 0 (h_t = a_t * h_{t+1} + b_t; h0 is the state after T - 1).
    resets: [B, T] bool; True at t starts a new document at t: the state carried into t is dropped
      (for reverse=True, the state of t does not flow back into t - 1, so each document is scanned
      on its own in both directions).
    method: a ScanMethod or its string: 'auto', 'associative', 'sequential' or 'chunked'.
    chunk_size: chunk length of the 'chunked' method.
    custom_vjp: use the reverse-recurrence VJP (reverse mode only, as for any jax.custom_vjp). Set
      False for forward-mode autodiff (jax.jvp, jax.jacfwd), which then differentiates the method.

  Returns:
    (h, h_last): h with the broadcast shape of a and b, in b's dtype; h_last [B, ...] float32, the
    state after the last step in scan order.
  """
  a, b, h0, resets, method = _prepare(a, b, h0, resets, method, chunk_size)
  return _linear_scan(a, b, h0, resets, reverse, method, int(chunk_size), custom_vjp)


# Jitted so that eager calls compile once per shape; inside an outer jit it is simply inlined.
@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _linear_scan(a, b, h0, resets, reverse, method, chunk_size, custom_vjp):
  breaks = resets
  if resets is not None and reverse:
    breaks = _shift_in_scan_order(resets, reverse=False, fill=False)
  if breaks is not None:
    out_b = jnp.broadcast_shapes(a.shape, b.shape)[0]
    breaks = jnp.broadcast_to(breaks, (out_b, breaks.shape[1]))
  if not custom_vjp:
    h, h_last = _run(a, b, h0, breaks, reverse, method, chunk_size)
    return h.astype(b.dtype), h_last
  return _scan_vjp(a, b, h0, breaks, reverse, method, chunk_size, b.dtype)


def step(h, a_t, b_t, reset=None):
  """One token of the recurrence for decoding: returns a_t * h + b_t in float32 (float64 for x64).

  h: state [B, ...]; a_t, b_t broadcastable to it; reset: optional [B] bool dropping h first.
  """
  acc = _acc_dtype(jnp.result_type(h, b_t))
  h = jnp.asarray(h, acc)
  a_t = jnp.asarray(a_t, acc)
  if reset is not None:
    keep = jnp.logical_not(jnp.asarray(reset)).astype(acc)
    a_t = a_t * keep.reshape(keep.shape + (1,) * (h.ndim - 1))
  return a_t * h + jnp.asarray(b_t, acc)
