"""The device order of maxlm's meshes, on fake devices carrying what real ones carry (TPU coordinates, slice and
process indices), as mesh_utils' own tests do: topology-aware placement, and the hybrid ICI x DCN mesh of
mesh.slices with the slices along the data axis."""

import dataclasses

import jax
import numpy as np
import pytest

from maxlm.core import sharding
from maxlm.core.config import load_config
from maxlm.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int = 0
  slice_index: int = 0
  coords: tuple = (0, 0, 0)
  core_on_chip: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"


def tpu_v4_cube(slice_index: int = 0, first_id: int = 0, hosts: int = 2) -> list[FakeDevice]:
  """A 2x2x2 v4 slice (8 chips, one core each), 4 chips per host; listed in id order, where ids do not follow the
  torus (as a list of devices from another process order would not)."""
  coords = [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
  order = [0, 3, 5, 6, 1, 2, 4, 7]  # neighbours in the list are rarely neighbours on the torus
  return [FakeDevice(first_id + i, process_index=slice_index * hosts + i // (8 // hosts), slice_index=slice_index,
                     coords=coords[c]) for i, c in enumerate(order)]


def _torus_neighbours(a: FakeDevice, b: FakeDevice) -> bool:
  return sum(abs(p - q) for p, q in zip(a.coords, b.coords)) == 1


def test_tpu_mesh_follows_the_torus_not_the_device_list():
  devices = tpu_v4_cube()
  grid = sharding.device_grid((1, 4, 2), devices)
  assert grid.shape == (1, 4, 2) and sorted(d.id for d in grid.flat) == list(range(8))
  # Tensor peers (the fastest axis, the most traffic) are torus neighbours; a plain reshape of the list is not.
  assert all(_torus_neighbours(grid[0, i, 0], grid[0, i, 1]) for i in range(4))
  plain = np.asarray(devices, dtype=object).reshape(1, 4, 2)
  assert not all(_torus_neighbours(plain[0, i, 0], plain[0, i, 1]) for i in range(4))


def test_gpu_mesh_is_in_global_device_id_order():
  devices = [FakeDevice(i, process_index=i // 4, platform="gpu", device_kind="NVIDIA H100") for i in (4, 5, 6, 7, 0,
                                                                                                        1, 2, 3)]
  grid = sharding.device_grid((2, 4, 1), devices)
  assert [d.id for d in grid.flat] == list(range(8))


def test_cpu_devices_without_coordinates_are_reshaped_in_order():
  grid = sharding.device_grid((2, 2, 1), jax.devices()[:1] * 4)
  assert grid.shape == (2, 2, 1)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  assert mesh.shape == {"data": 1, "fsdp": 1, "tensor": 1}


def test_multislice_tpu_puts_the_slices_along_data():
  # Slice 1's devices listed first: the mesh still starts with slice 0, and each slice keeps its torus layout.
  devices = tpu_v4_cube(slice_index=1, first_id=8) + tpu_v4_cube(slice_index=0)
  grid = sharding.device_grid((4, 2, 2), devices, slices=2)
  assert grid.shape == (4, 2, 2)
  assert {d.slice_index for d in grid[:2].flat} == {0} and {d.slice_index for d in grid[2:].flat} == {1}
  # Only the data axis crosses slices: every fsdp/tensor group lies inside one slice.
  for i in range(4):
    assert len({d.slice_index for d in grid[i].flat}) == 1
  assert all(_torus_neighbours(grid[i, j, 0], grid[i, j, 1]) for i in range(4) for j in range(2))


def test_multinode_gpu_groups_consecutive_processes_into_slices():
  # 2 nodes x 4 GPUs, one process per GPU (SLURM's default): no slice index, so the 8 processes form 2 groups of 4.
  devices = [FakeDevice(i, process_index=i, slice_index=None, platform="gpu", device_kind="NVIDIA H100")
             for i in range(8)]
  grid = sharding.device_grid((2, 2, 2), devices, slices=2)
  assert {d.process_index for d in grid[0].flat} == {0, 1, 2, 3}
  assert {d.process_index for d in grid[1].flat} == {4, 5, 6, 7}
  # One process per node with 4 devices each: a process is a slice.
  devices = [FakeDevice(i, process_index=i // 4, slice_index=None, platform="cpu", device_kind="cpu")
             for i in range(8)]
  grid = sharding.device_grid((4, 2, 1), devices, slices=2)
  assert {d.process_index for d in grid[:2].flat} == {0} and {d.process_index for d in grid[2:].flat} == {1}


def test_slices_that_the_devices_cannot_form_are_a_config_error():
  devices = [FakeDevice(i, process_index=i // 2, slice_index=None, platform="cpu", device_kind="cpu")
             for i in range(6)]
  with pytest.raises(ConfigError, match="mesh.slices = 2.*3 process"):
    sharding.device_grid((6, 1, 1), devices, slices=2)
  with pytest.raises(ConfigError, match="mesh.slices = 4 must divide mesh.data = 6"):
    sharding.device_grid((6, 1, 1), devices, slices=4)


def test_config_checks_slices_against_data():
  cfg = load_config("demo", ["mesh.slices=2", "mesh.data=2", "train.global_batch=8"], num_devices=4)
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.slices) == (2, 2, 2)
  with pytest.raises(ConfigError, match="mesh.slices = 2 .*must divide mesh.data = 1"):
    load_config("demo", ["mesh.slices=2"], num_devices=4)
  with pytest.raises(ConfigError, match="mesh.slices"):
    load_config("demo", ["mesh.slices=0"])
