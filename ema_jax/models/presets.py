"""Named model sizes: a config dataclass built from a preset's fields with any of them overridden."""

from typing import Any, Dict, Mapping, Type, TypeVar

C = TypeVar("C")


def from_preset(presets: Mapping[str, Dict[str, Any]], config_cls: Type[C], name: str, where: str, **overrides) -> C:
  """config_cls(**presets[name] updated with overrides); a ValueError naming the presets otherwise."""
  if name not in presets:
    raise ValueError(f"{where}: unknown preset {name!r}; accepted: {', '.join(presets)}.")
  return config_cls(**{**presets[name], **overrides})
