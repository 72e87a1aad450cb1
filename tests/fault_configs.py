"""Small configs of real tasks for the fault tests (checkpoint corruption, signals, several processes)."""

import importlib.util
import json
import os

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
VOLATILE = ("steps_per_s", "tokens_per_s", "mfu")

# Overrides as train.py flags, so the same settings serve in-process and subprocess runs.
SET_COMPLEMENT = dict(
    steps=40,
    batch_size=32,
    checkpoint_every=10,
    keep_checkpoints=10,
    log_every=3,
    eval_every=20,
    **{
        "optim.warmup_steps": 5,
        "task.num_tokens": 12,
        "task.train_max_size": 4,
        "task.eval_examples": 16,
        "model.embed_dim": 16,
        "model.value_dim": 16,
    },
)
LM = dict(
    steps=20,
    batch_size=8,
    checkpoint_every=10,
    keep_checkpoints=10,
    log_every=3,
    eval_every=0,
    **{
        "optim.warmup_steps": 2,
        "task.seq_len": 32,
        "task.eval_batch_size": 8,
        "data.eval_max_tokens": 1024,
        "model.width": 32,
        "model.num_blocks": 1,
    },
)


def _load_config_module(path):
  spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config(path: str, preset=None, **overrides):
  """The config of configs/<path>[:preset] with dotted overrides applied (in-process runs)."""
  c = _load_config_module(path).get_config(preset)
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return c


def flags(**overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def read_metrics(workdir):
  """{step: {metric: value}} without the timing fields; a duplicated (step, metric) is an error."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      step = row.pop("step")
      for k, v in row.items():
        if k in VOLATILE:
          continue
        assert k not in rows.setdefault(step, {}), f"step {step}: {k} logged twice"
        rows[step][k] = v
  return rows


def read_eval(workdir, step):
  with open(os.path.join(workdir, f"eval_{step}.json")) as f:
    return json.load(f)["results"]
