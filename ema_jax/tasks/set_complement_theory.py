"""The set-complement paper's theoretical quantities, measured on a trained model.

"Learning What's Missing" (arXiv 2510.08341) proves that a single-layer attention-only model with
"balanced logit displacement at lengths 1 and 2" generalises to longer sets, with a precision that falls as
softmax spreads attention over more tokens. The paper's formal definition could not be read here (only its
abstract and model formula were available), so this module measures the reading that follows from the
model formula f(t) = B[t_s] + sum_i a(t_s, t_i) D[t_i] and says so wherever it reports it:

  displacement of token y under input t:   delta_t(y) = mean_{z valid} f(t)_z - f(t)_y
  (how far the logit of y sits below the valid tokens' mean; > 0 for the tokens the input holds).

  Balanced at length 1: delta_(x)(x) is the same for every token x (small coefficient of variation) and the
  valid tokens' logits are level (their spread small against the displacement).
  Balanced at length 2: for every ordered pair (x, y), the two held tokens are displaced by the same amount
  (the earlier token x as much as the last token y, whose direct path B[y] also acts), the same for all pairs,
  with level valid logits.

Exact balance makes every valid token equally likely and every held token equally suppressed; how far a
trained model is from it is reported as numbers, and `balanced` applies tolerances of ours (BALANCE_TOL).
Every length-1 set (N inputs) and every length-2 ordered pair (N (N - 1) inputs) is evaluated, in float32
on the model's own forward pass (any set-complement model kind), with the same result on every process of a
multi-process run.
"""

from __future__ import annotations

import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

BALANCE_TOL = 0.1  # relative tolerance for each balance condition (ours)
_CHUNK = 4096  # inputs per forward call


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef, set_logits, state, tokens_BL):
  """set_logits of the merged model: one compilation per (model structure, input shape), shared by every
  evaluation of a run (a jit built per call compiled anew each time: two compilations per weights per eval)."""
  return set_logits(nnx.merge(graphdef, state), dict(tokens=tokens_BL, mask=jnp.ones_like(tokens_BL, bool)))


def _logits(model, tokens_BL: np.ndarray, set_logits) -> np.ndarray:
  """[B, N] float64 logits of every row, the same on every process: the host rows are identical on all
  processes (replicated inputs of one jitted call), the model may be sharded across them, and the result is
  gathered to every process."""
  graphdef, state = nnx.split(model)
  out = []
  for i in range(0, tokens_BL.shape[0], _CHUNK):
    logits = _forward(graphdef, set_logits, state, np.asarray(tokens_BL[i : i + _CHUNK], np.int32))
    if jax.process_count() > 1:
      logits = multihost_utils.process_allgather(logits, tiled=True)
    out.append(np.asarray(logits, np.float64))
  return np.concatenate(out, 0)


def displacement_stats(model, num_tokens: int, set_logits) -> Dict[str, Any]:
  """Displacements at lengths 1 and 2 and the balance verdict; `set_logits(model, batch)` gives [B, N]."""
  n = num_tokens
  # Length 1: every token.
  t1 = np.arange(n)[:, None]
  f1 = _logits(model, t1, set_logits)  # [N, N]
  held1 = np.eye(n, dtype=bool)
  valid_mean1 = np.where(held1, 0.0, f1).sum(1) / (n - 1)
  d1 = valid_mean1 - f1[np.arange(n), np.arange(n)]  # [N]
  spread1 = np.where(held1, np.nan, f1)
  spread1 = np.nanstd(spread1, axis=1)  # valid-logit spread per input
  # Length 2: every ordered pair (x, y), y the last token.
  x, y = np.nonzero(~np.eye(n, dtype=bool))
  t2 = np.stack([x, y], 1)
  f2 = _logits(model, t2, set_logits)  # [P, N]
  rows = np.arange(len(x))
  held2 = np.zeros_like(f2, bool)
  held2[rows, x] = held2[rows, y] = True
  valid_mean2 = np.where(held2, 0.0, f2).sum(1) / (n - 2) if n > 2 else np.zeros(len(x))
  d2_first = valid_mean2 - f2[rows, x]
  d2_last = valid_mean2 - f2[rows, y]
  spread2 = np.nanstd(np.where(held2, np.nan, f2), axis=1) if n > 2 else np.zeros(len(x))

  cv = lambda v: float(np.std(v) / abs(np.mean(v))) if np.mean(v) != 0 else float("inf")
  d2_all = np.concatenate([d2_first, d2_last])
  out = dict(
      delta1_mean=float(d1.mean()),
      delta1_cv=cv(d1),
      valid_spread1_rel=float(spread1.mean() / max(abs(d1.mean()), 1e-12)),
      delta2_first_mean=float(d2_first.mean()),
      delta2_last_mean=float(d2_last.mean()),
      delta2_cv=cv(d2_all),
      delta2_first_over_last=float(d2_first.mean() / d2_last.mean()) if d2_last.mean() != 0 else float("inf"),
      valid_spread2_rel=float(spread2.mean() / max(abs(d2_all.mean()), 1e-12)),
      delta2_over_delta1=float(d2_all.mean() / d1.mean()) if d1.mean() != 0 else float("inf"),
  )
  conditions = dict(
      displaced=out["delta1_mean"] > 0 and out["delta2_first_mean"] > 0 and out["delta2_last_mean"] > 0,
      uniform_length1=out["delta1_cv"] < BALANCE_TOL,
      level_valid_length1=out["valid_spread1_rel"] < BALANCE_TOL,
      uniform_length2=out["delta2_cv"] < BALANCE_TOL,
      first_equals_last=abs(out["delta2_first_over_last"] - 1.0) < BALANCE_TOL,
      level_valid_length2=out["valid_spread2_rel"] < BALANCE_TOL,
  )
  out["conditions"] = {k: bool(v) for k, v in conditions.items()}
  out["balanced"] = float(all(conditions.values()))  # 1.0 / 0.0, a scalar the metrics files keep
  return out


def format_balance(results: Dict[str, Dict[str, Any]]) -> str:
  """One line per weights kind: the verdict and the numbers behind it."""
  lines = []
  for kind, r in results.items():
    b = (r or {}).get("balance")
    if not b:
      continue
    failed = [k for k, ok in b["conditions"].items() if not ok]
    lines.append(
        f"{kind}: balanced logit displacement at lengths 1, 2 (our reading, tol {BALANCE_TOL:g}): "
        f"{'yes' if b['balanced'] else 'no (' + ', '.join(failed) + ')'}; "
        f"delta1 {b['delta1_mean']:.3g} (cv {b['delta1_cv']:.2g}), delta2 first/last "
        f"{b['delta2_first_mean']:.3g}/{b['delta2_last_mean']:.3g} (cv {b['delta2_cv']:.2g}), "
        f"valid spread / delta {b['valid_spread1_rel']:.2g}, {b['valid_spread2_rel']:.2g}"
    )
  return "\n".join(lines)
