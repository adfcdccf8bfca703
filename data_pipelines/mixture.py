"""Domain mixture weights: inline `data.weights`, a named preset (`pile`), a YAML file, or proportional to the
token counts of the store; validated against the store's domains and normalised.
"""

from __future__ import annotations

import importlib.resources
import math
import os

import yaml

from maxlm.core.errors import DataError


def _load_yaml_weights(text: str, where: str) -> dict:
  try:
    weights = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise DataError(f"mixture file {where} is not valid YAML: {e}") from None
  if not isinstance(weights, dict) or not weights:
    raise DataError(f"mixture file {where} must be a mapping {{domain: weight}}.")
  return weights


def preset_weights(mixture: str) -> dict:
  """`pile` (configs/data/pile.yaml shipped with maxlm), another preset name, or a YAML file path."""
  preset = importlib.resources.files("maxlm.configs") / "data" / f"{mixture}.yaml"
  if "/" not in mixture and not mixture.endswith((".yaml", ".yml")) and preset.is_file():
    return _load_yaml_weights(preset.read_text(), f"configs/data/{mixture}.yaml")
  if not os.path.isfile(mixture):
    raise DataError(f"data.mixture {mixture!r} is neither a preset (e.g. pile) nor a YAML file of "
                    "{domain: weight}; leave it empty to mix in proportion to token counts.")
  with open(mixture, encoding="utf-8") as f:
    return _load_yaml_weights(f.read(), mixture)


def resolve_weights(cfg, domain_tokens: dict[str, int]) -> dict[str, float]:
  """Normalised {domain: weight} over domains with positive weight, in sorted domain order."""
  weights = dict(cfg.weights or {})
  where = "data.weights"
  if not weights and cfg.mixture:
    weights, where = preset_weights(cfg.mixture), f"data.mixture={cfg.mixture}"
  if not weights:
    weights, where = {d: n for d, n in domain_tokens.items() if n > 0}, "the store's token counts"
  known = sorted(domain_tokens)
  unknown = sorted(str(d) for d in weights if d not in domain_tokens)
  if unknown:
    raise DataError(f"{where} names domains not in the store: {unknown}. Known domains: {known}. Fix the names, "
                    "or give data.weights for the domains you have.")
  clean = {}
  for d, w in weights.items():
    try:
      w = float(w)
    except (TypeError, ValueError):
      raise DataError(f"{where}: weight of {d!r} must be a number, got {w!r}") from None
    if not math.isfinite(w) or w < 0:
      raise DataError(f"{where}: weight of {d!r} must be finite and >= 0, got {w}")
    if w > 0:
      if domain_tokens[d] <= 0:
        raise DataError(f"{where}: domain {d!r} has weight {w} but no training tokens in the store.")
      clean[d] = w
  total = sum(clean.values())
  if total <= 0:
    raise DataError(f"{where}: all weights are zero; give at least one domain a positive weight.")
  return {d: clean[d] / total for d in sorted(clean)}
