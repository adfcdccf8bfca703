"""The one cache of built (jitted) functions: keyed by a model section and the static arguments of the build, so a
series of checkpoints of one run, a run and its HF export, or repeated calls compile once; least recently used out.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Hashable

# Model fields read only when weights are initialised: two models differing in them trace the same forward.
INIT_ONLY_FIELDS = ("init_std", "param_dtype")


def model_key(model_cfg) -> tuple:
  """What of a model section (maxlm.core.config.ModelConfig) shapes a traced forward: every field but INIT_ONLY."""
  return tuple((f.name, getattr(model_cfg, f.name)) for f in dataclasses.fields(model_cfg)
               if f.name not in INIT_ONLY_FIELDS)


class CompileCache:
  """build(model_cfg, *static) -> function, kept per (model_key(model_cfg), *static); at most `size` entries.

  The builder gets a copy of the model section it is keyed by, so it may read only fields model_key covers (it is
  shared by every model with that key) and nothing the caller mutates later."""

  def __init__(self, build: Callable[..., Any], size: int = 8):
    self.build = build
    self.size = size
    self.entries: collections.OrderedDict[tuple, Any] = collections.OrderedDict()

  def __call__(self, model_cfg, *static: Hashable) -> Any:
    key = (model_key(model_cfg),) + static
    if key in self.entries:
      self.entries.move_to_end(key)
      return self.entries[key]
    fn = self.build(dataclasses.replace(model_cfg), *static)
    self.entries[key] = fn
    if len(self.entries) > self.size:
      self.entries.popitem(last=False)
    return fn
