"""Trees of arrays by path: flat {'params/layers/q_proj': leaf} maps and the readable difference of two of them."""

from __future__ import annotations

from typing import Any

import jax


def key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flat_tree(tree) -> dict[str, Any]:
  """{'params/layers/q_proj': leaf}: optax namedtuples and orbax's dict form of them flatten to the same keys."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(key_name(k) for k in path): leaf for path, leaf in leaves}


def describe_mismatch(expected: dict[str, Any], found: dict[str, Any], limit: int = 8) -> list[str]:
  """Human-readable differences between two flat {key: shaped} maps (what the run expects vs the checkpoint)."""
  # Parameters first: they name the model change behind a mismatch; optimizer moments only repeat it.
  expected = dict(sorted(expected.items(), key=lambda kv: not kv[0].startswith("params")))
  problems = []
  missing = [k for k in expected if k not in found]
  extra = [k for k in found if k not in expected]
  if missing:
    problems.append(f"missing from the checkpoint: {', '.join(missing[:limit])}"
                    + (f" (+{len(missing) - limit} more)" if len(missing) > limit else ""))
  if extra:
    problems.append(f"in the checkpoint but not in this run: {', '.join(extra[:limit])}"
                    + (f" (+{len(extra) - limit} more)" if len(extra) > limit else ""))
  shapes = [f"{k}: run {tuple(expected[k].shape)} vs checkpoint {tuple(found[k].shape)}"
            for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
  if shapes:
    problems.append("shape mismatch: " + "; ".join(shapes[:limit])
                    + (f" (+{len(shapes) - limit} more)" if len(shapes) > limit else ""))
  return problems
