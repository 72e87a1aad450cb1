"""The rules of a rerun: what a resume may change, and what it must refuse before writing anything.

- A rerun resumes the newest readable checkpoint; its data position must be the checkpoint's step.
- `steps` below the newest checkpoint is refused (evaluating the newer weights as the lower step would
  relabel them).
- With --allow_config_change, a field either takes effect from the resumed step or is refused
  (CHANGEABLE_ON_RESUME); without it, any difference outside checkpoint.SAFE_TO_CHANGE is refused.
- A workdir without checkpoints is guarded by its config.json; a finished run is reported, not redone.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import jax
from etils import epath

from ema_jax import checkpoint as ckpt_lib
from ema_jax import errors, optim
from ema_jax import workdir as workdir_lib
from ema_jax.errors import DataStateError

# Fields that --allow_config_change accepts on resume, each of which takes effect from the resumed step:
# the optimizer is rebuilt from the config, the weight averages' python settings likewise and their decay
# (data in the state) is reset from the config, and the model's graph and its non-trained state (e.g.
# traced dropout rates) come from the config. Other fields define the data stream or the random streams
# held in the state (seed, batch_size, task, data): changing them is a new run, not a resume.
CHANGEABLE_ON_RESUME = ("optim.", "weight_ema.", "model.")  # except fields of the initialisation (*init*)


def restore_data(it, data_state, step: int) -> None:
  if not isinstance(data_state, dict) or not data_state:
    raise DataStateError(
        f"the checkpoint at step {step} holds no data position ({data_state!r}); its "
        f"data/metadata was damaged or edited. Resume from another checkpoint or train in a "
        f"new workdir."
    )
  it.set_state(data_state)
  consumed = getattr(it, "step", None)
  if isinstance(consumed, int) and consumed != step:
    raise DataStateError(
        f"the checkpoint at step {step} holds a data position at batch {consumed}; a run "
        f"consumes one batch per step, so its data/metadata was damaged or edited."
    )


def check_run_config(workdir: str, config_json: Dict[str, Any], allow_config_change: bool) -> None:
  """A workdir without checkpoints may still hold another run's metrics (one killed before its first
  checkpoint, or one that keeps none): its config.json must match before they are cut back."""
  path = epath.Path(workdir) / workdir_lib.CONFIG_FILE
  if not path.exists():
    return
  try:
    saved = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserError(f"{path} is not valid JSON ({e}); move it away to start a new run here.") from e
  diffs = ckpt_lib.config_differences(saved, config_json)
  if diffs and not allow_config_change:
    lines = "\n".join(f"  {k}: saved {a!r}, now {b!r}" for k, a, b in diffs[:20])
    raise errors.ConfigMismatchError(
        f"{workdir} holds the records of a run with another config (its config.json; no checkpoint); "
        f"nothing was changed in it. Differing fields:\n{lines}\nEither train in a new workdir "
        f"(--workdir), or start over here on purpose with --allow_config_change."
    )


def report_finished(eval_path, checkpointer, is_main) -> Dict[str, Any]:
  """A rerun of a finished run: nothing to train or write; prints the final table again."""
  saved = json.loads(eval_path.read_text())
  if is_main:
    if saved.get("table"):
      print(saved["table"], flush=True)
    print(f"this run is finished (step {saved.get('step')}); its final evaluation is {eval_path}.", flush=True)
  if checkpointer is not None:
    checkpointer.close()
  out = workdir_lib.eval_row(saved.get("results", {}))
  out["status"] = "done"
  return out


def check_resume(workdir, config, config_json, checkpointer, step: int) -> None:
  """Refuses, before anything is written, a resume that could not do what the config says."""
  if step > config.steps:
    raise errors.UserError(
        f"config.steps={config.steps} is below the newest checkpoint of {workdir} (step {step}): this run "
        f"has already trained past it, so there is nothing to train and an evaluation at step "
        f"{config.steps} would be of the step-{step} weights; nothing was changed. Rerun with "
        f"--config.steps={step} or more, or evaluate an older checkpoint with eval.py --step."
    )
  saved = checkpointer.read_config(step)
  fixed = [(k, a, b) for k, a, b in ckpt_lib.config_differences(saved, config_json) if not changeable(k)]
  if fixed:
    lines = "\n".join(f"  {k}: saved {a!r}, now {b!r}" for k, a, b in fixed[:20])
    raise errors.ConfigMismatchError(
        f"{workdir} holds checkpoints (step {step}) of a run with another config, and these fields cannot "
        f"change on a resume even with --allow_config_change (they define the data stream, the random "
        f"streams held in the checkpoint, or only the initialisation, which a resume does not redo; "
        f"{', '.join(f + '*' for f in CHANGEABLE_ON_RESUME)} other than *init* fields, and "
        f"{', '.join(ckpt_lib.SAFE_TO_CHANGE)}, can); nothing was changed in it:\n{lines}\nTrain this "
        f"config in a new workdir (--workdir)."
    )


def changeable(field: str) -> bool:
  """Whether --allow_config_change may change `field` on a resume (and it then takes effect)."""
  return field.startswith(CHANGEABLE_ON_RESUME) and "init" not in field.rsplit(".", 1)[-1]


def apply_config(setup, state):
  """The restored state with the parts that the config sets rather than training: the model's
  non-trained state (e.g. traced dropout rates) and the weight averages' decay, from a fresh init of the
  current config (so a --allow_config_change of them takes effect from the resumed step)."""
  fresh = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.key(setup.config.seed))
  state = dict(state, other=fresh["other"])
  if state.get("ema") is not None:
    is_state = lambda x: isinstance(x, (optim.EMAState, optim.BEMAState))
    state["ema"] = jax.tree.map(
        lambda old, new: old._replace(decay=new.decay) if isinstance(old, optim.EMAState) else old,
        state["ema"],
        fresh["ema"],
        is_leaf=is_state,
    )
  return state
