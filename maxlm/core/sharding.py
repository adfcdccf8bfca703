"""All sharding decisions: the (data, fsdp, tensor) mesh and the one table mapping logical axes to it.

Weights carry logical axis names from the model; activations are constrained with `constrain` inside `activate`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxlm.core.errors import ConfigError

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
    "positions": None,  # a learned position table's rows (GPT-2): its hidden dimension shards as "embed"
    "norm": None,  # norm scales and biases along the hidden dimension: replicated
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

_ACTIVE_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar("maxlm_mesh", default=None)


def make_mesh(shape: Sequence[int], devices: Optional[Sequence[jax.Device]] = None, slices: int = 1) -> Mesh:
  """A (data, fsdp, tensor) mesh; tensor varies fastest so tensor-parallel peers share a host/NVLink island.
  Devices are placed by `device_grid` (topology-aware; `slices` > 1: a hybrid ICI x DCN mesh, slices along data);
  `devices` may be another target's compile-only devices (maxlm.core.targets)."""
  grid = device_grid(shape, list(devices if devices is not None else jax.devices()), slices)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def device_grid(shape: Sequence[int], devices: Sequence[Any], slices: int = 1) -> np.ndarray:
  """The devices laid out as `shape` (data, fsdp, tensor). Accelerators go through mesh_utils, which orders them by
  their topology (TPU torus coordinates, GPU global ids); devices without coordinates (CPU) are reshaped in order.
  With `slices` > 1 the data axis spans that many granules joined by the data-centre network (DCN): TPU slices
  (devices' slice_index), else groups of processes (multi-node GPU: one granule per node's processes); each granule
  holds data / slices rows of the mesh, laid out by its own topology, and only data-parallel traffic crosses DCN."""
  shape, devices = [int(s) for s in shape], list(devices)
  if shape.count(-1) == 1:  # an unresolved fill (a config not finalized for a device count), as numpy's reshape does
    shape[shape.index(-1)] = len(devices) // max(1, -math.prod(shape))
  shape = tuple(shape)
  if math.prod(shape) != len(devices):
    raise ValueError(f"a mesh of shape {shape} needs {math.prod(shape)} devices, got {len(devices)}")
  if slices == 1:
    return _ici_grid(shape, devices)
  if shape[0] % slices:
    raise ConfigError(f"mesh.slices = {slices} must divide mesh.data = {shape[0]}: slices are joined along the data "
                      "axis (set mesh.data to a multiple of mesh.slices)")
  ici = (shape[0] // slices, *shape[1:])
  granules = _granules(devices, slices)
  if granules is None:
    return mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices, allow_split_physical_axes=True)
  return np.concatenate([_ici_grid(ici, g) for g in granules], axis=0)


def _ici_grid(shape: tuple, devices: list) -> np.ndarray:
  if devices[0].platform == "cpu":
    return np.asarray(devices, dtype=object).reshape(shape)
  return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def _granules(devices: list, slices: int) -> Optional[list]:
  """None where the devices carry `slices` distinct slice_index values (TPU multislice: mesh_utils' own hybrid mesh
  groups them); else the devices in `slices` equal groups of consecutive processes, each group sorted by device id."""
  slice_ids = {getattr(d, "slice_index", None) for d in devices}
  if len(slice_ids) == slices and None not in slice_ids:
    return None
  processes = sorted({d.process_index for d in devices})
  counts = [sum(d.process_index == p for d in devices) for p in processes]
  if len(processes) % slices:
    found = f"{len(slice_ids)} TPU slice(s)" if None not in slice_ids else "no TPU slice index"
    raise ConfigError(f"mesh.slices = {slices}, but the devices show {found} and {len(processes)} process(es), which "
                      f"do not split into {slices} equal groups: set mesh.slices to the number of TPU slices or nodes "
                      "(1 on a single slice or node)")
  per = len(processes) // slices
  groups = [[d for d in devices if d.process_index in processes[i * per:(i + 1) * per]] for i in range(slices)]
  if len({len(g) for g in groups}) > 1:
    raise ConfigError(f"mesh.slices = {slices}: the processes' device counts {counts} do not split evenly")
  return [sorted(g, key=lambda d: d.id) for g in groups]


def logical_to_spec(axes: Optional[Sequence[Optional[str]]]) -> P:
  """PartitionSpec of logical axis names through RULES; a mesh axis mapped by two dimensions is a ValueError (it
  can shard only one: the rules table or the axis names are wrong)."""
  if axes is None:
    return P()
  spec, used = [], {}
  for name in axes:
    if name is not None and name not in RULES:
      raise ValueError(f"logical axis {name!r} has no rule in maxlm.core.sharding.RULES")
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


def fits(shape: Sequence[int], spec: P, mesh: Mesh) -> bool:
  """Whether every dimension of `shape` divides over the mesh axes `spec` puts on it."""
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if dim % math.prod(mesh.shape[a] for a in names):
      return False
  return True


def param_shardings(abstract: Any, logical_specs: Any, mesh: Mesh) -> Any:
  """NamedShardings of a weight tree by its logical axes, except that a leaf some mesh axis does not divide stays
  replicated (a checkpoint read on a mesh other than its own: fewer devices, or sizes that do not divide)."""

  def one(a, spec):
    mesh_spec = logical_to_spec(tuple(spec))
    return NamedSharding(mesh, mesh_spec if fits(a.shape, mesh_spec, mesh) else P())

  return jax.tree.map(one, abstract, logical_specs, is_leaf=_is_spec)


def with_shardings(abstract: Any, shardings: Any, dtype=None) -> Any:
  """A tree of ShapeDtypeStructs carrying `shardings` (and `dtype`, when given): where a tree should live, as
  put_host_tree and maxlm.pretrained.load(abstract=...) take it."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), abstract, shardings)


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


def process_rows(mesh: Mesh, global_rows: int) -> tuple[int, ...]:
  """The rows of a global batch of `global_rows` that this process's devices hold in the (data, fsdp) layout,
  sorted: what this process loads. Processes whose devices differ only along tensor (tensor peers) hold the same
  rows; with tensor inside a process, the processes hold disjoint blocks."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows, 1))
  return tuple(sorted({r for index in index_map.values() for r in range(*index[0].indices(global_rows))}))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray], global_rows: Optional[int] = None) -> dict[str, jax.Array]:
  """Assembles each process's rows of the batch (`process_rows`, in order) into one global array of `global_rows`
  rows sharded over (data, fsdp). Without `global_rows` jax infers it (right only when no rows are shared)."""
  return {k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, v.ndim), v, None if global_rows is None else (global_rows, *v.shape[1:]))
          for k, v in local.items()}


def put_host(array: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
  """A host array placed shard by shard under `target.sharding` (each process supplies only its own shards)."""
  array = np.asarray(array, dtype=target.dtype)
  if array.shape != tuple(target.shape):
    raise ValueError(f"host array of shape {array.shape} does not fit {target.shape}")
  return jax.make_array_from_callback(array.shape, target.sharding, lambda index: array[index])


def put_host_tree(tree: Any, abstract: Any) -> Any:
  """A tree of host arrays placed as `abstract` (a matching tree of ShapeDtypeStructs with shardings) says: each leaf
  cast to its dtype and built shard by shard, each process supplying only its own shards. The one way maxlm puts a
  checkpoint's weights on a mesh (maxlm.pretrained.load(abstract=...) reads a run's shards in place instead).
  A leaf that is already a device array is resharded on the devices instead."""

  def put(x, target):
    if isinstance(x, jax.Array):
      if tuple(x.shape) != tuple(target.shape):
        raise ValueError(f"array of shape {x.shape} does not fit {target.shape}")
      return jax.device_put(x.astype(target.dtype), target.sharding)
    return put_host(x, target)

  return jax.tree.map(put, tree, abstract)


def put_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host batch (every process holds all of it) split over (data, fsdp) along its first axis."""
  array = np.asarray(array)
  return put_host(array, jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=batch_sharding(mesh, array.ndim)))


def put_replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array (the same on every process) replicated on every device of `mesh`."""
  array = np.asarray(array)
  return put_host(array, jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=replicated(mesh)))


def single_device_mesh() -> Mesh:
  """The (1, 1, 1) mesh of this process's first device: code that takes a mesh runs unsharded on it."""
  return make_mesh((1, 1, 1), jax.local_devices()[:1])
