"""The trace core: linear recurrences h_t = a_t h_{t-1} + b_t and the EMA traces built on them.

  kernels.py       the method enum (ScanMethod: one name per method), the linear-scan kernels, their table
  scan.py          linear_scan: validation, dispatch, the custom VJP (the reverse recurrence), `step`, auto
  closed_form.py   'blocked': EMA traces of constant rates in closed form inside chunks (custom VJP)
  fused.py         'fused': the same closed form as one batched matmul per output (rates shared over D)
  ema.py           ema_traces and ema_step: K EMA traces of one input; the closed forms' table; auto
  selective.py     selective_traces and selective_step: a write rate per token, timescale and channel
  seq_parallel.py  the same over the mesh's `seq` axis (jax.shard_map); import it on its own

The public API is exported here. Adding a linear-scan method: a ScanMethod member, its kernel and its
kernels.KERNELS entry; a closed form for constant rates: a member, its function and its ema.CLOSED_FORMS
entry.
"""

from ema_jax.traces.kernels import (
    DEFAULT_BLOCK,
    DEFAULT_CHUNK,
    KERNELS,
    Kernel,
    ScanMethod,
    combine,
    entering_states,
    parse_method,
    scan_methods,
)
from ema_jax.traces.scan import linear_scan, step
from ema_jax.traces.fused import DEFAULT_FUSED_CHUNK
from ema_jax.traces.ema import (
    AUTO_CONSTANT_RATES,
    CLOSED_FORMS,
    PAPER_ALPHAS,
    ClosedForm,
    TraceState,
    auto_method,
    check_alphas,
    debias_factor,
    ema_methods,
    ema_step,
    ema_traces,
    init_state,
    token_counts,
)
from ema_jax.traces.selective import selective_methods, selective_step, selective_traces

__all__ = [
    "AUTO_CONSTANT_RATES",
    "CLOSED_FORMS",
    "DEFAULT_BLOCK",
    "DEFAULT_CHUNK",
    "DEFAULT_FUSED_CHUNK",
    "KERNELS",
    "PAPER_ALPHAS",
    "ClosedForm",
    "Kernel",
    "ScanMethod",
    "TraceState",
    "auto_method",
    "check_alphas",
    "combine",
    "debias_factor",
    "ema_methods",
    "ema_step",
    "ema_traces",
    "entering_states",
    "init_state",
    "linear_scan",
    "parse_method",
    "scan_methods",
    "selective_methods",
    "selective_step",
    "selective_traces",
    "step",
    "token_counts",
]
