"""Grammatical-role metrics shared by the label-free Hebbian model and the supervised BiGRU tagger."""

from __future__ import annotations

from typing import Sequence

import numpy as np

ARGUMENT_ROLES = ("AGENT", "PATIENT", "RECIPIENT", "OBL")


def evaluate(pred_BT, roles_BT, depth_BT, mask_BT, role_names: Sequence[str]) -> dict:
  """Accuracy overall, on argument tokens (gold role in ARGUMENT_ROLES), per gold role (recall), its
  unweighted mean (macro), and per depth over all tokens and over argument tokens; with token counts."""
  valid = np.asarray(mask_BT, bool)
  pred, gold, depth = np.asarray(pred_BT)[valid], np.asarray(roles_BT)[valid], np.asarray(depth_BT)[valid]
  correct = pred == gold
  is_arg = np.isin(gold, [i for i, n in enumerate(role_names) if n in ARGUMENT_ROLES])

  def acc(sel):
    return float(correct[sel].mean()) if sel.any() else float("nan")

  per_role = {n: acc(gold == i) for i, n in enumerate(role_names) if (gold == i).any()}
  depths = sorted(set(depth.tolist()))
  return {
      "accuracy": acc(np.ones_like(correct)),
      "argument_accuracy": acc(is_arg),
      "macro_accuracy": float(np.mean(list(per_role.values()))) if per_role else float("nan"),
      "per_role": per_role,
      "per_depth": {int(d): acc(depth == d) for d in depths},
      "per_depth_arguments": {int(d): acc((depth == d) & is_arg) for d in depths if (is_arg & (depth == d)).any()},
      "count": int(valid.sum()),
      "count_per_role": {n: int((gold == i).sum()) for i, n in enumerate(role_names)},
      "count_per_depth": {int(d): int((depth == d).sum()) for d in depths},
  }


def majority_predictions(train_roles_BT, train_mask_BT, mask_BT) -> np.ndarray:
  """The majority-class baseline: the most frequent training role at every valid token."""
  majority = np.bincount(np.asarray(train_roles_BT)[np.asarray(train_mask_BT, bool)]).argmax()
  return np.where(np.asarray(mask_BT, bool), majority, -1).astype(np.int32)
