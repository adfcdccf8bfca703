"""All sharding decisions: the (data, fsdp, tensor) mesh and the one table mapping logical axes to it.

Weights carry logical axis names from the model; activations are constrained with `constrain` inside `activate`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Weights are sharded over fsdp along their model dimension and over tensor along
# heads / mlp / vocab; activations keep the batch over (data, fsdp) and their feature dims over tensor.
RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

_ACTIVE_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar("maxlm_mesh", default=None)


def make_mesh(shape: Sequence[int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; tensor varies fastest so tensor-parallel peers share a host/NVLink island."""
  devices = list(devices if devices is not None else jax.devices())
  grid = np.asarray(devices, dtype=object).reshape(tuple(shape))
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Optional[Sequence[Optional[str]]]) -> P:
  """PartitionSpec of logical axis names through RULES; a mesh axis mapped by two dimensions is a ValueError (it
  can shard only one: the rules table or the axis names are wrong)."""
  if axes is None:
    return P()
  spec, used = [], {}
  for name in axes:
    if name is not None and name not in RULES:
      raise ValueError(f"logical axis {name!r} has no rule in maxlm.sharding.RULES")
    mapped = RULES[name] if name is not None else None
    parts = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
    for a in parts:
      if a in used:
        raise ValueError(f"logical axes {tuple(axes)}: mesh axis {a!r} would shard both {used[a]!r} and {name!r}")
      used[a] = name
    spec.append(parts[0] if len(parts) == 1 else (parts or None))
  return P(*spec)


def _is_spec(x) -> bool:
  return isinstance(x, P)


def named_shardings(logical_specs: Any, mesh: Mesh) -> Any:
  """Maps a tree of logical PartitionSpecs (as nnx.get_partition_spec returns) to NamedShardings on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec))), logical_specs,
                      is_leaf=_is_spec)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh: Optional[Mesh]):
  """Within this context, `constrain` pins activations to `mesh`; outside it, `constrain` is a no-op."""
  token = _ACTIVE_MESH.set(mesh)
  try:
    yield mesh
  finally:
    _ACTIVE_MESH.reset(token)


def active_mesh() -> Optional[Mesh]:
  return _ACTIVE_MESH.get()


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  mesh = _ACTIVE_MESH.get()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes)))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's rows of the batch into one global array sharded over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}
