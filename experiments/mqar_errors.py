"""Where a trained model's MQAR errors lie: python -m experiments.mqar_errors --workdir W [--step S]
[--pairs 8] [--sequences 2048] [--seed 777] [--weights raw] [--out F.json]

Draws fresh MQAR sequences (seed --seed, not the training or check seeds) at one size, reads the model's
argmax answer at every query and reports the accuracy by query position and by the queried pair's index,
and how many wrong answers are another pair's value of the same sequence (a key confused with another
key) rather than any other token. Used for the GPT's MQAR check (results/probes/README.md).
"""

import json
import sys

import numpy as np
from absl import app, flags


def define_flags():
  """The command-line flags, defined only when the module runs as a script (tests import it)."""
  global _WORKDIR, _STEP, _PAIRS, _SEQUENCES, _SEED, _WEIGHTS, _OUT
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a probes run (configs/probes.py recall).")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  _PAIRS = flags.DEFINE_integer("pairs", 8, "Key-value pairs per sequence.")
  _SEQUENCES = flags.DEFINE_integer("sequences", 2048, "Sequences drawn.")
  _SEED = flags.DEFINE_integer("seed", 777, "Seed of the drawn sequences.")
  _WEIGHTS = flags.DEFINE_string("weights", "raw", "raw, ema or bema (what the run kept).")
  _OUT = flags.DEFINE_string("out", None, "Write the report as JSON here.")


def error_report(pred_BT, batch, pairs: int) -> dict:
  """Accuracy of argmax answers by query position and pair index; wrong answers that are another pair's value."""
  m = batch["answer_mask"] > 0
  rows, pos = np.nonzero(m)
  correct = pred_BT[rows, pos] == batch["targets"][rows, pos]
  keys = batch["inputs"][:, 0 : 2 * pairs : 2]
  values = batch["inputs"][:, 1 : 2 * pairs : 2]
  pair = np.argmax(keys[rows] == batch["inputs"][rows, pos][:, None], axis=1)
  wrong = ~correct
  other_value = (values[rows[wrong]] == pred_BT[rows[wrong], pos[wrong]][:, None]).any(1)
  by = lambda v, edges: [
      dict(lo=int(lo), hi=int(hi), n=int(s.sum()), accuracy=float(correct[s].mean()))
      for lo, hi in zip(edges[:-1], edges[1:])
      for s in [(v >= lo) & (v < hi)]
      if s.any()
  ]
  t = batch["inputs"].shape[1]
  return dict(
      answers=int(len(correct)),
      accuracy=float(correct.mean()),
      wrong=int(wrong.sum()),
      wrong_is_another_pairs_value=int(other_value.sum()),
      by_query_position=by(pos, np.linspace(2 * pairs, t, 7).astype(int)),
      by_pair_index=by(pair, np.arange(pairs + 1)),
  )


def main(argv):
  del argv
  import jax

  from ema_jax import checkpoint as ckpt_lib
  from ema_jax import evaluation, trainer
  from ema_jax.data import probes as pdata

  ck = ckpt_lib.Checkpointer(_WORKDIR.value, keep=10**6, async_save=False)
  try:
    step = evaluation.resolve_step(ck, _STEP.value, _WORKDIR.value)
    cfg = evaluation.load_config(_WORKDIR.value, step, "data=-1", (), None)
    if cfg.task.get("probe") != "recall":
      sys.exit(
          f"experiments.mqar_errors: {_WORKDIR.value} is a {cfg.task.get('probe')!r} run; a 'recall' (MQAR) run is needed."
      )
    setup = trainer.build(cfg, workdir=_WORKDIR.value)
    state, _, _ = ck.restore(step, setup.abstract_state)
  finally:
    ck.close()
  model = trainer.make_model(setup, state, _WEIGHTS.value)
  t = cfg.task
  p = _PAIRS.value
  batch = pdata.mqar_batch(
      _SEED.value, 0, _SEQUENCES.value, p, int(t.seq_per_pair) * p, int(t.vocab_size), float(t.power_a)
  )
  fwd = jax.jit(lambda x: model(x).argmax(-1))
  pred = np.concatenate([np.asarray(fwd(batch["inputs"][i : i + 256])) for i in range(0, len(batch["inputs"]), 256)])
  report = dict(workdir=_WORKDIR.value, step=step, weights=_WEIGHTS.value, pairs=p, seed=_SEED.value)
  report.update(error_report(pred, batch, p))
  print(json.dumps(report, indent=1))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("workdir")
  app.run(main)
