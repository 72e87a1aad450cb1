"""The model registry: the sequence models that tasks, probes, export and generate build by name.

  entry = models.sequence_model("ema_lm")      # module, config class, model class
  cfg = models.make_config(config.model, vocab_size=V)   # preset + overrides -> the model's config
  model = entry.model_cls(cfg, rngs=nnx.Rngs(0))

Each registered module has `preset(name, **overrides)`, `param_count(config)` and
`flops_per_token(config, seq_len)`. Adding a model: write its module with those three and its config
dataclass, and add one line to SEQUENCE_MODELS. The task-specific models (set complement, roles, the
Hebbian model) are built by their own tasks.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

# kind -> (module under ema_jax.models, config class, model class)
SEQUENCE_MODELS = {
    "ema_lm": ("ema_lm", "EMALMConfig", "EMALM"),
    "aggregator": ("aggregator", "AggregatorConfig", "Aggregator"),
    "gpt": ("transformer", "GPTConfig", "GPT"),
}
MODEL_KINDS = tuple(SEQUENCE_MODELS)
NON_MODEL_FIELDS = ("kind", "preset")  # config.model fields that are not the model config's own


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  kind: str
  module: Any
  config_cls: type
  model_cls: type


def sequence_model(kind: str, where: str = "config.model.kind") -> ModelEntry:
  """The registry entry of `kind`; a ValueError naming the known kinds otherwise."""
  if kind not in SEQUENCE_MODELS:
    raise ValueError(f"{where}={kind!r}; accepted: {', '.join(MODEL_KINDS)}.")
  mod_name, cfg_name, cls_name = SEQUENCE_MODELS[kind]
  module = importlib.import_module(f"ema_jax.models.{mod_name}")
  return ModelEntry(kind, module, getattr(module, cfg_name), getattr(module, cls_name))


def make_config(model: Mapping[str, Any], defaults: Mapping[str, Any] = None, **fields):
  """The model config of a config.model mapping (kind, optional preset, the config's fields): `defaults`
  below the mapping's own fields (e.g. a GPT's context_len from the task), `fields` above them (e.g.
  vocab_size from the tokenizer), all above the preset. Lists become tuples. A ValueError names the
  config's fields when one is unknown."""
  entry = sequence_model(model["kind"])
  own = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.items() if k not in NON_MODEL_FIELDS}
  own = {**dict(defaults or {}), **own, **fields}
  try:
    if model.get("preset"):
      return entry.module.preset(model["preset"], **own)
    return entry.config_cls(**own)
  except TypeError as e:
    names = ", ".join(f.name for f in dataclasses.fields(entry.config_cls))
    raise ValueError(f"config.model: {e} (fields of {entry.config_cls.__name__}: {names}).") from None
