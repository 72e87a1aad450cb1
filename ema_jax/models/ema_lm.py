"""EMA-only language model ("EMA Is Not All You Need", 2026): no attention over tokens, only EMA traces.

Each block reads its input through multi-timescale EMA traces of the *past* and works on how
surprising the present is:

    u_t   = norm(x_t)                                   the block's input (pre-norm)
    h_t,k = EMA_k(u_{<t})                               K traces (write rates 0.5, 0.1, 0.02) of the tokens
                                                        before t: the traces of u are shifted by one step,
                                                        zero at t = 0 and at every document start
    u^_t  = predictor(h_t)                              a guess of the present from the past
    e_t   = u_t - u^_t                                  prediction error: the only way u_t enters the block
    x_t  <- x_t + W_mix [e_t; h_t,1; ...; h_t,K] + b    context mix: the error next to the traces it came
                                                        from, one linear map (K + 1) D -> D
    x_t  <- x_t + TopKFFN(norm(x_t))                    sparse FFN, k = round(fraction * hidden) units per token

then a final norm and the output head (tied to the token embedding by default).

Predictors (config.predictor), and exactly what each one sees at position t:
  * 'linear' (the paper's): u^_t = W [h_t,1; ...; h_t,K] + b. Sees the K trace vectors of step t, nothing else.
  * 'attention' (the paper's ablation): one query, from the concatenated traces [h_t,1; ...; h_t,K], attends
    over K keys/values made from the K trace vectors h_t,k (each plus a learned, input-independent
    timescale embedding so the heads can tell the timescales apart). Sees the same K vectors as 'linear'.
  * 'attention_history' (beyond the paper): causal softmax attention over the trace stacks of the whole
    window: query from [h_t,1..K], keys/values from [h_s,1..K] for every s <= t in the same document.
    Since h_s summarises u_{<s}, this sees u_{<t} and never u_t; but the sequence of trace stacks can be
    inverted (u_{s-1} = (h_s - (1 - a) h_{s-1}) / a), so it may undo the compression the traces impose.

Causality: u_t reaches the residual stream only through e_t at position t; every path to another
position s > t goes through traces (or, for 'attention_history', trace stacks) at s, which hold u_{<s}.
Documents: resets_BT[t] = True zeroes every trace before t and, via segment ids, blocks history
attention across documents, so each document is modelled as if it started the window.

Dropout (config.dropout): on the token embeddings, on the mix and FFN outputs before they are added to
the residual stream, and on the attention weights of the attention predictors; never inside the traces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ema_jax.nn.attention import MultiHeadAttention, causal_segment_mask, dropout_rngs, resolve_documents
from ema_jax.nn.ffn import TopKFFN
from ema_jax.nn.selective_layer import SelectiveTraces
from ema_jax.nn.trace_layer import EMATraces
from ema_jax.nn.window_attention import WindowAttention
from ema_jax import traces as traces_lib

from ema_jax.models import lm_head
from ema_jax.models.ema_lm_config import (  # the config, presets and FLOP count live there; public here too
    DTYPES,
    NORMS,
    PREDICTORS,
    PRESETS,
    TRACE_KINDS,
    EMALMConfig,
    flops_per_token,
    preset,
)

__all__ = [
    "DTYPES",
    "EMALM",
    "EMALMConfig",
    "NORMS",
    "PREDICTORS",
    "PRESETS",
    "TRACE_KINDS",
    "flops_per_token",
    "param_count",
    "preset",
]


def make_norm(kind: str, features: int, *, eps: float, dtype, rngs: nnx.Rngs):
  if kind == "layernorm":
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, rngs=rngs)
  return nnx.RMSNorm(features, epsilon=eps, dtype=dtype, rngs=rngs)


def _residual_init(num_blocks: int):
  # Output maps into the residual stream shrink with depth (GPT-2: 1 / sqrt(2 L)); two per block.
  return nnx.initializers.variance_scaling(1.0 / (2 * num_blocks), "fan_in", "truncated_normal")


class TracePredictor(nnx.Module):
  """Past traces h [B, T, K, D] -> guess of the present input [B, T, D]; see the module docstring."""

  def __init__(self, cfg: EMALMConfig, *, rngs: nnx.Rngs):
    d, k, dt = cfg.width, cfg.num_timescales, cfg.compute_dtype
    self.kind = cfg.predictor
    self.dtype = dt
    if self.kind == "linear":
      self.linear = nnx.Linear(k * d, d, dtype=dt, rngs=rngs)
    elif self.kind == "attention":
      self.timescale_embed = nnx.Param(nnx.initializers.normal(cfg.init_std)(rngs.params(), (k, d)))
      self.attention = MultiHeadAttention(
          cfg.heads, k * d, d, qk_features=d, v_features=d, out_features=d, dropout=cfg.dropout, dtype=dt, rngs=rngs
      )
    else:
      self.attention = MultiHeadAttention(
          cfg.heads, k * d, k * d, qk_features=d, v_features=d, out_features=d, dropout=cfg.dropout, dtype=dt, rngs=rngs
      )

  def __call__(self, h_BTKD, *, segment_ids_BT=None, deterministic: bool = True, rngs=None):
    b, t, k, d = h_BTKD.shape
    h_BTF = h_BTKD.reshape(b, t, k * d)
    if self.kind == "linear":
      return self.linear(h_BTF)
    if self.kind == "attention":
      kv_BTKD = h_BTKD + self.timescale_embed[...].astype(h_BTKD.dtype)
      y_BT1D = self.attention(h_BTF[:, :, None, :], kv_BTKD, deterministic=deterministic, rngs=rngs)
      return y_BT1D[:, :, 0, :]
    # Key s holds u_{<s}; s <= t (include_self) therefore covers exactly u_{<t}.
    mask_B1TT = causal_segment_mask(t, segment_ids_BT, include_self=True)
    return self.attention(h_BTF, mask=mask_B1TT, deterministic=deterministic, rngs=rngs)


class EMABlock(nnx.Module):
  """One EMA LM block: past traces, prediction, error, context mix, top-k FFN, residuals."""

  def __init__(self, cfg: EMALMConfig, *, rngs: nnx.Rngs):
    d, k, dt = cfg.width, cfg.num_timescales, cfg.compute_dtype
    norm = dict(eps=cfg.norm_eps, dtype=dt, rngs=rngs)
    self.norm_in = make_norm(cfg.norm, d, **norm)
    # EMATraces validates its rates with NumPy; keep that concrete when the model is built under a
    # trace (nnx.eval_shape, a jitted init).
    with jax.ensure_compile_time_eval():
      if cfg.trace_kind == "selective":
        self.traces = SelectiveTraces(d, cfg.alphas, method=cfg.trace_method, rngs=rngs)
      else:
        self.traces = EMATraces(d, cfg.alphas, learn=cfg.trace_learn, method=cfg.trace_method)
    self.predictor = TracePredictor(cfg, rngs=rngs)
    if cfg.window:
      self.local = WindowAttention(
          d,
          cfg.heads,
          cfg.window,
          dropout=cfg.dropout,
          dtype=dt,
          out_kernel_init=_residual_init(cfg.num_blocks),
          rngs=rngs,
      )
    self.window = cfg.window
    self.mix = nnx.Linear((k + 1) * d, d, dtype=dt, kernel_init=_residual_init(cfg.num_blocks), rngs=rngs)
    self.norm_ffn = make_norm(cfg.norm, d, **norm)
    self.ffn = TopKFFN(
        d,
        cfg.ffn_hidden,
        cfg.ffn_k,
        activation=cfg.ffn_activation,
        dtype=dt,
        out_kernel_init=_residual_init(cfg.num_blocks),
        rngs=rngs,
    )
    self.dropout = nnx.Dropout(cfg.dropout)

  def past_traces(self, u_BTD, *, resets_BT=None):
    """h [B, T, K, D] with h_t the traces of u_{<t}: zero at t = 0 and where resets_BT is True."""
    h_BTKD, _ = self.traces(u_BTD, resets_BT=resets_BT)
    h_BTKD = jnp.concatenate([jnp.zeros_like(h_BTKD[:, :1]), h_BTKD[:, :-1]], axis=1)
    if resets_BT is not None:
      h_BTKD = jnp.where(resets_BT[:, :, None, None], jnp.zeros((), h_BTKD.dtype), h_BTKD)
    return h_BTKD

  def predict(self, u_BTD, *, resets_BT=None, segment_ids_BT=None, deterministic: bool = True, rngs=None):
    """(past traces h [B, T, K, D], prediction u^ [B, T, D]) for the block input u = norm_in(x)."""
    h_BTKD = self.past_traces(u_BTD, resets_BT=resets_BT)
    uhat_BTD = self.predictor(h_BTKD, segment_ids_BT=segment_ids_BT, deterministic=deterministic, rngs=rngs)
    return h_BTKD, uhat_BTD

  def __call__(self, x_BTD, *, resets_BT=None, segment_ids_BT=None, deterministic: bool = True, rngs=None):
    b, t, d = x_BTD.shape
    u_BTD = self.norm_in(x_BTD)
    h_BTKD, uhat_BTD = self.predict(
        u_BTD, resets_BT=resets_BT, segment_ids_BT=segment_ids_BT, deterministic=deterministic, rngs=rngs
    )
    e_BTD = u_BTD - uhat_BTD.astype(u_BTD.dtype)
    mix_in_BTF = jnp.concatenate([e_BTD, h_BTKD.reshape(b, t, -1).astype(e_BTD.dtype)], axis=-1)
    x_BTD = x_BTD + self.dropout(self.mix(mix_in_BTF), deterministic=deterministic, rngs=rngs)
    if self.window:
      local_BTD = self.local(u_BTD, segment_ids_BT=segment_ids_BT, deterministic=deterministic, rngs=rngs)
      x_BTD = x_BTD + self.dropout(local_BTD, deterministic=deterministic, rngs=rngs)
    x_BTD = x_BTD + self.dropout(self.ffn(self.norm_ffn(x_BTD)), deterministic=deterministic, rngs=rngs)
    return x_BTD

  def init_cache(self, batch: int, dtype, max_len=None) -> dict:
    cache = dict(traces=self.traces.init_state(batch))
    if self.window:
      cache["local"] = self.local.init_cache(batch, dtype)
    if self.predictor.kind == "attention_history":
      # Every past trace stack, slot s holding position s: this predictor's state grows with the context.
      k_d = self.predictor.attention.key.in_features
      cache["history"] = jnp.zeros((batch, max_len, k_d), dtype)
    return cache

  def _history_predict(self, history_BSF, h_BKD, t_B, start_B):
    """'attention_history' at one position: (history with h_t written at slot t, prediction [B, D]).
    Positions past the history's length get NaN predictions (a jitted step cannot raise)."""
    b, s = history_BSF.shape[:2]
    rows = jnp.arange(b)
    history_BSF = history_BSF.at[rows, jnp.minimum(t_B, s - 1)].set(h_BKD.reshape(b, -1).astype(history_BSF.dtype))
    pos_S = jnp.arange(s)
    mask_B11S = ((pos_S[None] <= t_B[:, None]) & (pos_S[None] >= start_B[:, None]))[:, None, None]
    uhat_BD = self.predictor.attention(h_BKD.reshape(b, 1, -1), history_BSF, mask=mask_B11S)[:, 0]
    return history_BSF, jnp.where((t_B < s)[:, None], uhat_BD, jnp.nan)

  def step(self, cache: dict, x_BD, *, reset_B, t_B, start_B):
    """One token (decoding, deterministic): (new cache, x [B, D]); equals __call__ at that position.

    The predictor sees the trace state before this token (the traces of u_{<t}), zeroed at a document
    start; the state then takes u_t in. 'attention_history' also keeps every past trace stack (its cache
    grows with the context, up to the max_len it was made with).
    """
    b, d = x_BD.shape
    u_BD = self.norm_in(x_BD)
    h_BKD = jnp.where(reset_B[:, None, None], 0.0, cache["traces"].h).astype(u_BD.dtype)
    new = dict(traces=self.traces.step(cache["traces"], u_BD, reset_B=reset_B)[0])
    if self.predictor.kind == "attention_history":
      new["history"], uhat_BD = self._history_predict(cache["history"], h_BKD, t_B, start_B)
    else:
      uhat_BD = self.predictor(h_BKD[:, None])[:, 0]
    e_BD = u_BD - uhat_BD.astype(u_BD.dtype)
    x_BD = x_BD + self.mix(jnp.concatenate([e_BD, h_BKD.reshape(b, -1).astype(e_BD.dtype)], axis=-1))
    if self.window:
      new["local"], local_BD = self.local.step(cache["local"], u_BD, t_B, start_B)
      x_BD = x_BD + local_BD
    x_BD = x_BD + self.ffn(self.norm_ffn(x_BD[:, None]))[:, 0]
    return new, x_BD

  def prefill(self, x_BTD, *, resets_BT, segment_ids_BT, last_B, max_len=None):
    """__call__ (deterministic) that also returns the decoding cache after the token at last_B [B].

    The traces run on u in float32, so the state kept is the float32 state decode_step would carry (the
    block's own h is that cast to the compute dtype, as in __call__). For the hybrid, slot j of the window
    holds the latest position p <= last_B with p % W == j, as decode_step would have left it.
    """
    b, t, d = x_BTD.shape
    u_BTD = self.norm_in(x_BTD)
    h32_BTKD, _ = self.traces(u_BTD.astype(jnp.float32), resets_BT=resets_BT)
    rows = jnp.arange(b)
    counts_BT = traces_lib.token_counts(resets_BT, b, t)
    cache = dict(traces=traces_lib.TraceState(h32_BTKD[rows, last_B], counts_BT[rows, last_B]))
    h_BTKD = h32_BTKD.astype(u_BTD.dtype)
    h_BTKD = jnp.concatenate([jnp.zeros_like(h_BTKD[:, :1]), h_BTKD[:, :-1]], axis=1)
    if resets_BT is not None:
      h_BTKD = jnp.where(resets_BT[:, :, None, None], jnp.zeros((), h_BTKD.dtype), h_BTKD)
    uhat_BTD = self.predictor(h_BTKD, segment_ids_BT=segment_ids_BT)
    if self.predictor.kind == "attention_history":
      # Slots past a row's prompt hold padding; decode_step overwrites slot t before it attends to it.
      cache["history"] = jnp.pad(h_BTKD.reshape(b, t, -1), ((0, 0), (0, max_len - t), (0, 0)))
    e_BTD = u_BTD - uhat_BTD.astype(u_BTD.dtype)
    x_BTD = x_BTD + self.mix(jnp.concatenate([e_BTD, h_BTKD.reshape(b, t, -1).astype(e_BTD.dtype)], axis=-1))
    if self.window:
      x_BTD = x_BTD + self.local(u_BTD, segment_ids_BT=segment_ids_BT)
      w = self.window
      slot_W = jnp.arange(w)
      pos_BW = last_B[:, None] - (last_B[:, None] - slot_W[None]) % w
      inputs_BWD = jnp.take_along_axis(u_BTD, jnp.clip(pos_BW, 0, t - 1)[:, :, None], axis=1)
      inputs_BWD = jnp.where((pos_BW >= 0)[:, :, None], inputs_BWD, jnp.zeros((), inputs_BWD.dtype))
      cache["local"] = dict(inputs=inputs_BWD, pos=jnp.where(pos_BW >= 0, pos_BW, -1).astype(jnp.int32))
    x_BTD = x_BTD + self.ffn(self.norm_ffn(x_BTD))
    return cache, x_BTD


class EMALM(nnx.Module):
  """Token ids [B, T] -> float32 logits [B, T, V]; see the module docstring for the block."""

  def __init__(self, config: EMALMConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    dt = cfg.compute_dtype
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.width, dtype=dt, embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs
    )
    self.blocks = nnx.List([EMABlock(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
    self.norm_out = make_norm(cfg.norm, cfg.width, eps=cfg.norm_eps, dtype=dt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = lm_head.untied_head(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, inputs_BT, *, resets_BT=None, segment_ids_BT=None, deterministic: bool = True, rngs=None):
    """inputs_BT int [B, T]; resets_BT bool [B, T] (True: inputs[t] starts a document) and/or
    segment_ids_BT int [B, T] (one id per document; either is derived from the other). rngs: nnx.Rngs
    or a PRNG key, needed when deterministic=False and dropout > 0. Returns float32 logits [B, T, V]."""
    cfg = self.config
    inputs_BT = jnp.asarray(inputs_BT)
    if inputs_BT.ndim != 2 or not jnp.issubdtype(inputs_BT.dtype, jnp.integer):
      raise ValueError(
          f"EMALM: `inputs_BT` has shape {inputs_BT.shape} and dtype {inputs_BT.dtype}; "
          f"expected integer token ids [B, T]."
      )
    resets_BT, segment_ids_BT = resolve_documents(inputs_BT.shape, resets_BT, segment_ids_BT, where="EMALM")
    if cfg.predictor != "attention_history" and not cfg.window:
      segment_ids_BT = None
    rngs = dropout_rngs(rngs, not deterministic and cfg.dropout > 0, where="EMALM")
    x_BTD = self.dropout(self.embed(inputs_BT), deterministic=deterministic, rngs=rngs)
    for block in self.blocks:
      x_BTD = block(x_BTD, resets_BT=resets_BT, segment_ids_BT=segment_ids_BT, deterministic=deterministic, rngs=rngs)
    return self.logits(self.norm_out(x_BTD))

  def logits(self, x_BTD):
    return lm_head.logits(self.config, self.embed, getattr(self, "head", None), x_BTD)

  def init_cache(self, batch: int, max_len=None) -> dict:
    """Decoding state of `batch` sequences at position 0: per block the trace state (K D float32) and,
    for the hybrid, the last W block inputs; its size does not depend on the context length. Only
    predictor='attention_history' needs max_len (room for that many positions of past trace stacks)."""
    self._check_max_len(max_len, "init_cache")
    return dict(
        blocks=[blk.init_cache(batch, self.config.compute_dtype, max_len) for blk in self.blocks],
        t=jnp.zeros((batch,), jnp.int32),  # position of the next token
        start=jnp.zeros((batch,), jnp.int32),  # position where the current document started
    )

  def _check_max_len(self, max_len, where, at_least=1):
    if self.config.predictor != "attention_history":
      return
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < at_least:
      raise ValueError(
          f"EMALM.{where}: `max_len`={max_len!r}; predictor='attention_history' keeps every past trace stack, "
          f"so give the longest context to decode (an integer >= {at_least}: prompt plus new tokens)."
      )

  def decode_step(self, cache: dict, token_B, *, reset_B=None):
    """One token per sequence: (new cache, float32 logits [B, V] for the next token), deterministic.

    Feeding tokens 0..T-1 one by one gives the logits of __call__ on [B, T] at every position (resets_B
    True where a token starts a document, as resets_BT). Works with fixed and selective traces, every
    predictor and the hybrid's window; constant memory and time per token except 'attention_history',
    whose cache holds every past trace stack.
    """
    token_B = jnp.asarray(token_B)
    b = token_B.shape[0]
    reset_B = jnp.zeros((b,), bool) if reset_B is None else jnp.asarray(reset_B, bool)
    t_B = cache["t"]
    start_B = jnp.where(reset_B, t_B, cache["start"])
    x_BD = self.embed(token_B)
    blocks = []
    for blk, c in zip(self.blocks, cache["blocks"]):
      c, x_BD = blk.step(c, x_BD, reset_B=reset_B, t_B=t_B, start_B=start_B)
      blocks.append(c)
    logits_BV = self.logits(self.norm_out(x_BD)[:, None])[:, 0]
    return dict(blocks=blocks, t=t_B + 1, start=start_B), logits_BV

  def prefill(self, inputs_BT, *, resets_BT=None, lengths_B=None, max_len=None):
    """A prompt in one parallel pass: (cache, float32 logits [B, T, V]), deterministic.

    The logits are __call__'s; the cache is the one decode_step would hold after feeding the tokens one
    by one (trace states from the scan, the hybrid's last W block inputs). lengths_B int [B] (default T):
    row b's prompt is inputs_BT[b, :lengths_B[b]], right-padded, and its cache is taken after its own last
    token, so padding never reaches it. max_len (prompt plus new tokens) sizes the trace-stack history of
    predictor='attention_history' and is unused otherwise: the EMA LM has no positional limit.
    """
    cfg = self.config
    inputs_BT = jnp.asarray(inputs_BT)
    if inputs_BT.ndim != 2 or not jnp.issubdtype(inputs_BT.dtype, jnp.integer):
      raise ValueError(
          f"EMALM.prefill: `inputs_BT` has shape {inputs_BT.shape} and dtype {inputs_BT.dtype}; "
          f"expected integer token ids [B, T]."
      )
    b, t = inputs_BT.shape
    self._check_max_len(max_len, "prefill", at_least=t)
    resets_BT, segment_ids_BT = resolve_documents(inputs_BT.shape, resets_BT, None, where="EMALM.prefill")
    if not cfg.window and cfg.predictor != "attention_history":
      segment_ids_BT = None
    lengths_B = jnp.full((b,), t, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
    last_B = jnp.clip(lengths_B - 1, 0, t - 1)
    x_BTD = self.embed(inputs_BT)
    blocks = []
    for blk in self.blocks:
      c, x_BTD = blk.prefill(x_BTD, resets_BT=resets_BT, segment_ids_BT=segment_ids_BT, last_B=last_B, max_len=max_len)
      blocks.append(c)
    start_B = jnp.zeros((b,), jnp.int32)
    if resets_BT is not None:
      start_BT = jax.lax.cummax(jnp.where(resets_BT, jnp.arange(t, dtype=jnp.int32)[None], 0), axis=1)
      start_B = jnp.take_along_axis(start_BT, last_B[:, None], axis=1)[:, 0]
    return dict(blocks=blocks, t=lengths_B, start=start_B), self.logits(self.norm_out(x_BTD))


def param_count(config: EMALMConfig) -> int:
  """Number of trainable parameters (tied embeddings counted once), from shapes only: no allocation."""
  return lm_head.param_count(lambda: EMALM(config, rngs=nnx.Rngs(0)))
