"""The methods of the trace core: one enum naming every method, the linear-scan kernels and their table.

Each kernel evaluates h_t = a_t * h_{t-1} + b_t along axis 1 (see the section comment below for the
signature); scan.py validates, dispatches through KERNELS and adds the custom VJP. Adding a linear-scan
method is three edits here: a ScanMethod member, its kernel, and its KERNELS entry. linear_scan,
selective_traces and ema_traces accept it from then on, and the custom VJP (the same recurrence run in
reverse over the cotangents) differentiates it. The closed forms of ema_traces for constant rates
('blocked', 'fused', 'native') are named here too; their table is ema.CLOSED_FORMS.

This module imports nothing from the project.
"""

from __future__ import annotations

import enum
import string
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class ScanMethod(str, enum.Enum):
  """How a recurrence is evaluated; one name per method. A str enum, so ScanMethod.AUTO == "auto"."""

  AUTO = "auto"  # picked per backend: scan.auto_method (any decays), ema.auto_method (constant rates)
  ASSOCIATIVE = "associative"
  SEQUENTIAL = "sequential"
  CHUNKED = "chunked"
  UNROLLED = "unrolled"
  BLOCKED = "blocked"  # ema_traces only: constant rates in closed form inside chunks (closed_form.py)
  FUSED = "fused"  # ema_traces only: the same closed form as one batched matmul (fused.py)
  NATIVE = "native"  # ema_traces only: constant rates through a compiled CPU kernel (native.py)

  def __str__(self):
    return self.value


DEFAULT_CHUNK = 32  # 'chunked'
# 'unrolled' and the closed form 'blocked' (benchmarks.scan_bench --reuse-heap, 2-core CPU, 2026-11-29: 8
# was the fastest training step of 4, 8 and 16 for constant rates at (8, 2048, 256, 3) and (1, 65536, 256, 3),
# and the chunk the selective-trace timings of 'unrolled' used).
DEFAULT_BLOCK = 8


class Kernel(NamedTuple):
  """A linear-scan method: kernel(a, b, h0, breaks, reverse, chunk_size) -> (h, h_last), and the chunk
  length it takes when none is given (None for a kernel that takes none)."""

  fn: Callable
  default_chunk: Optional[int] = None


def parse_method(method, accepted, where: str) -> ScanMethod:
  """`method` (a ScanMethod or its string) as a ScanMethod, if it is one of `accepted`; else a ValueError."""
  try:
    parsed = ScanMethod(method)
  except ValueError:
    parsed = None
  if parsed is None or parsed not in accepted:
    raise ValueError(f"{where}: `method`={method!r}; accepted: {', '.join(map(str, accepted))}.")
  return parsed


def scan_methods() -> tuple:
  """The methods of linear_scan and selective_traces: 'auto' and every KERNELS entry."""
  return (ScanMethod.AUTO, *KERNELS)


def acc_dtype(dtype):
  """Accumulation dtype: float32 for float32/bfloat16/float16 inputs, float64 for float64."""
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def breaks_mask(breaks, ndim, dtype=jnp.float32):
  """[B, T] bool -> broadcastable [B, T, 1, ...] keep-mask (0 where coupling is cut)."""
  keep = jnp.logical_not(breaks).astype(dtype)
  return keep.reshape(keep.shape + (1,) * (ndim - 2))


def shift_in_scan_order(x, reverse, fill):
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
    states = jax.lax.associative_scan(
        combine, (jnp.concatenate([a, zero], axis=1), jnp.concatenate([b, h0[:, None]], axis=1)), axis=1, reverse=True
    )[1]
    return states[:, 1:], states[:, 0]
  states = jax.lax.associative_scan(
      combine, (jnp.concatenate([zero, a], axis=1), jnp.concatenate([h0[:, None], b], axis=1)), axis=1
  )[1]
  return states[:, :-1], states[:, -1]


# ----------------------------------------------------------------------------------------------
# the kernels: kernel(a, b, h0, breaks, reverse, chunk_size) -> (h, h_last)
#
# Forward in scan order (from the right for reverse), in the accumulation dtype they are given (float32;
# float64 under x64). `a` and `b` broadcast against each other; h0 [B, ...] or None (zeros); `breaks`
# [B, T] bool or None: True at t means h_{t-1} (in scan order) does not flow into h_t. chunk_size: the
# chunk length of the kernels that cut time into chunks (ignored by the others).


def sequential(a, b, h0, breaks, reverse, chunk_size=None):
  """jax.lax.scan, one step per token: the reference and the decode path."""
  out_shape = jnp.broadcast_shapes(a.shape, b.shape)
  state_shape = (out_shape[0],) + out_shape[2:]
  if h0 is None:
    h0 = jnp.zeros(state_shape, b.dtype)
  const_a = a.shape[1] == 1
  xs_b = jnp.moveaxis(jnp.broadcast_to(b, out_shape), 1, 0)
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


def associative(a, b, h0, breaks, reverse, chunk_size=None):
  """jax.lax.associative_scan: log depth, the form for TPU/GPU."""
  out_shape = jnp.broadcast_shapes(a.shape, b.shape)
  if breaks is not None:
    a = a * breaks_mask(breaks, a.ndim, a.dtype)
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


def chunked(a, b, h0, breaks, reverse, chunk_size):
  """A C x C decay matrix inside chunks (an einsum, i.e. a matmul for per-channel decays); the chunk
  summaries combined by an associative scan; any T (padded inside)."""
  if reverse:
    flip = lambda x: None if x is None else jnp.flip(x, axis=1)
    h, h_last = chunked(flip(a), flip(b), h0, flip(breaks), False, chunk_size)
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

  b_c = to_chunks(b, 0)  # [Bb, n, c, *b_ch]
  tt = jnp.arange(c)
  lower = tt[:, None] >= tt[None, :]  # [c(t), c(s)] causal
  if const_a:
    a_ch = a[:, 0]  # [Ba, *a_ch]
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
    lmat = lmat[:, None]  # [Ba, 1(n), c, c, *a_ch]
    # carry-in factor a^(t+1) and chunk decay a^c
    pw = (tt + 1).astype(a.dtype).reshape((1, c) + (1,) * (a_ch.ndim - 1))
    pmag = jnp.where(a_ch[:, None] == 0, 0.0, jnp.exp(pw * log_abs[:, None]))
    podd = ((tt + 1) % 2 == 1).reshape(pw.shape)
    pfac = pmag * jnp.where(jnp.logical_and(is_neg[:, None], podd), -1.0, 1.0)
    pfac = pfac[:, None]  # [Ba, 1(n), c, *a_ch]
  else:
    a_c = to_chunks(a, 1.0)  # [Ba, n, c, *a_ch]
    log_abs, is_zero, is_neg = _signed_log_parts(a_c)
    cl = jnp.cumsum(log_abs, axis=2)
    cz = jnp.cumsum(is_zero.astype(jnp.int32), axis=2)
    cn = jnp.cumsum(is_neg.astype(jnp.int32), axis=2)
    # prod_{r=s+1..t} a_r = exp(cl_t - cl_s) * (-1)^(cn_t - cn_s), zero if a zero lies in (s, t].
    d_log = cl[:, :, :, None] - cl[:, :, None, :]
    same = cz[:, :, :, None] == cz[:, :, None, :]
    odd = ((cn[:, :, :, None] - cn[:, :, None, :]) % 2) == 1
    lower_e = lower.reshape((1, 1) + lower.shape + (1,) * (a_c.ndim - 3))
    ok = jnp.logical_and(lower_e, same)
    lmat = jnp.where(ok, jnp.exp(jnp.where(ok, d_log, 0.0)) * jnp.where(odd, -1.0, 1.0), 0.0)
    # prod_{r=0..t} a_r inside the chunk
    pfac = jnp.where(cz > 0, 0.0, jnp.exp(cl)) * jnp.where(cn % 2 == 1, -1.0, 1.0)

  if breaks is not None:
    # Segment structure inside each chunk: s flows into t only if no break lies in (s, t].
    br = to_chunks(breaks, False)  # [Bk, n, c]
    seg = jnp.cumsum(br.astype(jnp.int32), axis=2)
    same_seg = (seg[:, :, :, None] == seg[:, :, None, :]).astype(a.dtype)  # [Bk, n, c, c]
    extra = lmat.ndim - 4
    lmat = lmat * same_seg.reshape(same_seg.shape + (1,) * extra)
    no_break_yet = (seg == 0).astype(a.dtype)  # [Bk, n, c]
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
  h_local = jnp.einsum(
      f"{l_sub},{b_sub}->{o_sub}", l_sq, b_sq, precision=jax.lax.Precision.HIGHEST, preferred_element_type=b.dtype
  )
  h_local = h_local.reshape(tuple(out_shape_l[l] if l in o_sub else 1 for l in all_out))
  h_local = jnp.broadcast_to(h_local, (bsz, n, c) + tuple(ch_shape))

  # Across chunks: S_j = A_j S_{j-1} + end_j, S_{-1} = h0; chunk j starts from S_{j-1}.
  # (The last chunk's summary may include padding; it is never used as a carry.)
  end = h_local[:, :, -1]  # [B, n, *ch]
  a_chunk = pfac[:, :, -1]
  a_chunk = jnp.broadcast_to(a_chunk, a_chunk.shape[:1] + (n,) + a_chunk.shape[2:])
  if h0 is None:
    h0 = jnp.zeros((bsz,) + tuple(ch_shape), b.dtype)
  carry, _ = entering_states(a_chunk, end, h0)  # [B, n, *ch]: state entering each chunk
  h = h_local + pfac * carry[:, :, None]
  h = h.reshape((bsz, n * c) + tuple(ch_shape))[:, :t_len]
  return h, h[:, -1]


# ----------------------------------------------------------------------------------------------
# unrolled: the recurrence written out over the C steps of a chunk, so XLA fuses each pass into one loop
#
# Time is cut into N chunks of C steps. Three passes, each one XLA fusion with no intermediate array:
#   1. chunk summaries: the state after each chunk from zero, E_n (C steps of a_t * e + b_t written out,
#      all N chunks at once), and the chunk's decay A_n = prod a_t (a^C for a constant decay);
#   2. the state entering each chunk: the same recurrence at the chunk level, s_{n+1} = A_n s_n + E_n, solved
#      by this function again (so T = 65536 needs about log_C(T) levels, never a long jax.lax.scan);
#   3. the outputs: from the entering state, h_t = a_t h_{t-1} + b_t over the chunk's C steps, stacked in
#      place. XLA emits the stack as one loop that recomputes the short chain for each output element (on
#      average (C + 1) / 2 multiply-adds), so the output is written once, in its final layout.
# Each pass streams its input once; the chunk level is 1/C of the size. Any a and b that broadcast (a
# constant decay [1, 1, ...], a per-token decay [B, T, ...], an input shared over channels) stay as small
# as they are given. benchmarks.scan_bench times it against the other methods (selective traces: 'unrolled',
# 'blocked' in results before 2026-12-06).

UNROLLED_DIRECT = 16  # at most this many steps: written out in one pass, no chunk level


def _chunks_in_scan_order(x, n, c, fill, reverse):
  """[B, T, ...] -> [B, N, C, ...], padded with `fill` where it comes last in scan order (the end for a
  forward scan, the start for a reverse one), so padding can only change the final state. A time axis of
  length 1 (a constant decay) becomes [B, 1, 1, ...]."""
  t_len = x.shape[1]
  if t_len == 1:
    return x[:, :, None]
  if n * c != t_len:
    widths = [(0, 0)] * x.ndim
    widths[1] = (n * c - t_len, 0) if reverse else (0, n * c - t_len)
    x = jnp.pad(x, widths, constant_values=fill)
  return x.reshape(x.shape[:1] + (n, c) + x.shape[2:])


def unrolled(a, b, h0, breaks, reverse, chunk_size):
  """h_t = a_t h_{t-1} + b_t by the unrolled passes above; a and b broadcast, any T, either direction."""
  out_shape = jnp.broadcast_shapes(a.shape, b.shape)
  if breaks is not None:
    a = a * breaks_mask(breaks, a.ndim, a.dtype)
  if h0 is None:
    h0 = jnp.zeros((out_shape[0],) + tuple(out_shape[2:]), b.dtype)
  h = _unrolled_states(a, b, h0, reverse, max(2, int(chunk_size)))
  return h, h[:, 0 if reverse else -1]


def _unrolled_states(a, b, h0, reverse, c):
  out_shape = jnp.broadcast_shapes(a.shape, b.shape)
  bsz, t_len = out_shape[0], out_shape[1]
  full = lambda x: jnp.broadcast_to(x, (bsz,) + tuple(out_shape[2:]))
  const_a = a.shape[1] == 1
  if t_len <= max(c, UNROLLED_DIRECT):
    order = range(t_len - 1, -1, -1) if reverse else range(t_len)
    outs, h = [None] * t_len, h0
    for t in order:
      h = (a[:, 0] if const_a else a[:, t]) * h + b[:, t]
      outs[t] = full(h)
    return jnp.stack(outs, axis=1)
  n = -(-t_len // c)
  a_c = _chunks_in_scan_order(a, n, c, 1.0, reverse)
  b_c = _chunks_in_scan_order(b, n, c, 0.0, reverse)
  a_at = (lambda t: a_c[:, :, 0]) if const_a else (lambda t: a_c[:, :, t])
  order = list(range(c - 1, -1, -1) if reverse else range(c))
  # 1. chunk summaries
  end = b_c[:, :, order[0]]
  for t in order[1:]:
    end = a_at(t) * end + b_c[:, :, t]
  if const_a:
    decay = a_c[:, :, 0] ** c
  else:
    decay = a_at(order[0])
    for t in order[1:]:
      decay = decay * a_at(t)
  # 2. the state after each chunk (recursively), shifted by one chunk in scan order: the entering state
  after = _unrolled_states(decay, end, h0, reverse, c)
  if reverse:
    entering = jnp.concatenate([after[:, 1:], h0[:, None]], axis=1)
  else:
    entering = jnp.concatenate([h0[:, None], after[:, :-1]], axis=1)
  # 3. outputs
  outs, h = [None] * c, entering
  for t in order:
    h = a_at(t) * h + b_c[:, :, t]
    outs[t] = jnp.broadcast_to(h, (bsz, n) + tuple(out_shape[2:]))
  hs = jnp.stack(outs, axis=2).reshape((bsz, n * c) + tuple(out_shape[2:]))
  return hs[:, n * c - t_len :] if reverse else hs[:, :t_len]


KERNELS = {
    ScanMethod.ASSOCIATIVE: Kernel(associative),
    ScanMethod.SEQUENTIAL: Kernel(sequential),
    ScanMethod.CHUNKED: Kernel(chunked, DEFAULT_CHUNK),
    ScanMethod.UNROLLED: Kernel(unrolled, DEFAULT_BLOCK),
}
