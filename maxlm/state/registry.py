"""The one table of what a config adds to the train state: the parameter view (what is trained) and the frozen
entries beside it. A feature that changes either is a row here, not a branch elsewhere."""

from __future__ import annotations

from typing import Callable

from maxlm.core.config import Config
from maxlm.state import frozen, lora
from maxlm.state.frozen import FrozenEntry
from maxlm.state.views import IDENTITY, ParamView

# Features that add frozen entries, each a function of the config (an empty list when the feature is off).
FROZEN_PROVIDERS: tuple[Callable[[Config], list[FrozenEntry]], ...] = (frozen.emo_cost_embedding, lora.base_entries)


def param_view(cfg: Config) -> ParamView:
  """LoRA's view when adapters are on, else the decoder's weights themselves."""
  return lora.view(cfg) if cfg.lora.rank > 0 else IDENTITY


def frozen_entries(cfg: Config) -> dict[str, FrozenEntry]:
  """Every frozen entry the config asks for, by name."""
  out: dict[str, FrozenEntry] = {}
  for provider in FROZEN_PROVIDERS:
    for entry in provider(cfg):
      if entry.name in out:
        raise ValueError(f"two providers declare the frozen entry {entry.name!r}")
      out[entry.name] = entry
  return out
