"""Accelerator targets by name: Cloud TPU slices (v4-N, v5e-N, v5p-N, v6e-N) and GPU clusters (h100-N, h200-N, a100-N),
their chips, hosts, HBM and (TPU) VMEM, and their compile-only devices (jax.experimental.topologies).

Parsing needs no compiler; `devices()` needs the target's compiler (maxlm.core.compilers) importable.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from typing import Optional

from maxlm.core.errors import ConfigError

GIB = 2 ** 30
MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  topology_prefix: str  # libtpu's topology_name prefix
  device_kind: str  # what its devices report (compile-only and real)
  cores_per_chip: int  # the accelerator type's N counts TensorCores (v4, v5p: 2 per chip, megacore) or chips
  chip_config: str  # "megacore": one JAX device per chip
  torus_dims: int
  hbm_bytes: int
  vmem_bytes: int  # physical VMEM per TensorCore (what libtpu's compiler allocates against)
  aliases: tuple = ()  # other device_kind spellings of the generation


# HBM from the Cloud TPU system-architecture pages; VMEM from libtpu's own compile errors (v4 "Used 32.00M of 16.00M
# vmem", v5e/v6e size=134217728, v5p size=67108864), matching jax's pallas tpu_info table.
TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", "TPU v4", 2, "megacore", 3, 32 * GIB, 16 * MIB),
    "v5e": TpuGeneration("v5e", "TPU v5 lite", 1, "default", 2, 16 * GIB, 128 * MIB, ("TPU v5e",)),
    "v5p": TpuGeneration("v5", "TPU v5", 2, "megacore", 3, 95 * GIB, 64 * MIB, ("TPU v5p",)),
    "v6e": TpuGeneration("v6e", "TPU v6 lite", 1, "default", 2, 32 * GIB, 128 * MIB, ("TPU v6e",)),
}


@dataclasses.dataclass(frozen=True)
class GpuModel:
  target_file: str  # XLA GPU target description under maxlm/core/gpu_targets/
  device_kind: str
  hbm_bytes: int  # the description's device_memory_size (what the compiler plans against)


GPUS_PER_HOST = 8
GPU_MODELS = {
    "h100": GpuModel("h100_sxm.txtpb", "NVIDIA H100 80GB HBM3", 84942979072),
    "h200": GpuModel("h200.txtpb", "NVIDIA H200 141GB HBM3e", 151397597184),
    "a100": GpuModel("a100_sxm_80.txtpb", "NVIDIA A100-SXM4-80GB", 85100068864),
}

# Slice shapes in chips, as Cloud TPU builds them: 2D for v5e / v6e, 3D tori for v4 / v5p.
_TPU_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_TPU_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
           256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
CHIPS_PER_TPU_HOST = 4  # a host holds 2x2 chips (chips_per_host_bounds (2, 2, 1))


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given, lower case: "v5p-128", "h100-16"
  platform: str  # "tpu" | "gpu"
  model: str  # "v5p", "h100", ...
  chips: int  # JAX devices (one per chip: megacore on v4 / v5p)
  hosts: int
  topology: str  # libtpu's topology_name ("v5:4x4x4") or the CUDA "slices x hosts x gpus_per_host"
  device_kind: str
  hbm_bytes: int
  vmem_bytes: Optional[int] = None
  slices: int = 1  # TPU slices joined by the data-centre network (DCN); chips and hosts count all of them

  def topology_kwargs(self) -> dict:
    """Arguments of jax.experimental.topologies.get_topology_desc for this target."""
    if self.platform == "tpu":
      gen = TPU_GENERATIONS[self.model]
      bounds = (2, 2, 1) if self.chips // self.slices >= CHIPS_PER_TPU_HOST else (1, 1, 1)
      return {"topology_name": self.topology, "platform": "tpu", "chip_config_name": gen.chip_config,
              "chips_per_host_bounds": bounds, **({"num_slices": self.slices} if self.slices > 1 else {})}
    return {"platform": "cuda", "topology": self.topology, "target_config": gpu_target_description(self.model)}

  def devices(self) -> list:
    """The target's compile-only devices (needs its compiler importable: libtpu, or the CUDA plugin)."""
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    devices = list(topologies.get_topology_desc(**self.topology_kwargs()).devices)
    if len(devices) != self.chips:
      raise ValueError(f"{self.name}: the compiler built {len(devices)} devices for {self.topology}, not {self.chips}")
    return devices


def _slice_error(name: str, why: str) -> ConfigError:
  return ConfigError(f"--topology={name}: {why}. Targets: " + ", ".join(f"{g}-N" for g in TPU_GENERATIONS) +
                     " (Cloud TPU accelerator types; v4/v5p N counts TensorCores, 2 per chip; SLICESx before one: "
                     "that many slices joined by DCN, e.g. 2xv5p-128), " +
                     ", ".join(f"{g}-N" for g in GPU_MODELS) + f" (N GPUs, {GPUS_PER_HOST} per host), e.g. v5p-128, "
                     "v5e-16, h100-64")


def parse(name: str) -> Target:
  """The target a slice name names ("v5p-128", "h100-64"; "2xv5p-128": two TPU slices joined by DCN); a ConfigError
  listing valid names for anything else."""
  m = re.fullmatch(r"(?:([0-9]+)x)?([a-z0-9]+)-([0-9]+)", name.strip().lower())
  if not m:
    raise _slice_error(name, "not of the form MODEL-N or SLICESxMODEL-N")
  slices, model, n = int(m.group(1) or 1), m.group(2), int(m.group(3))
  if n < 1 or slices < 1:
    raise _slice_error(name, "N and SLICES must be at least 1")
  one = _one_slice(name, model, n)
  if slices == 1:
    return one
  if one.platform != "tpu":
    raise _slice_error(name, f"SLICESx names TPU slices joined by DCN; a GPU cluster is {model}-N with all its GPUs")
  return dataclasses.replace(one, chips=one.chips * slices, hosts=one.hosts * slices, slices=slices)


def _one_slice(name: str, model: str, n: int) -> Target:
  if model in TPU_GENERATIONS:
    gen = TPU_GENERATIONS[model]
    shapes = _TPU_3D if gen.torus_dims == 3 else _TPU_2D
    chips, rest = divmod(n, gen.cores_per_chip)
    if rest or chips not in shapes:
      valid = ", ".join(f"{model}-{c * gen.cores_per_chip}" for c in shapes)
      raise _slice_error(name, f"no {model} slice has {n} {'TensorCores' if gen.cores_per_chip > 1 else 'chips'}; "
                               f"{model} slices: {valid}")
    topology = f"{gen.topology_prefix}:{'x'.join(map(str, shapes[chips]))}"
    return Target(name.lower(), "tpu", model, chips, max(1, chips // CHIPS_PER_TPU_HOST), topology,
                  gen.device_kind, gen.hbm_bytes, gen.vmem_bytes)
  if model in GPU_MODELS:
    gpu = GPU_MODELS[model]
    if n > GPUS_PER_HOST and n % GPUS_PER_HOST:
      raise _slice_error(name, f"more than {GPUS_PER_HOST} GPUs come in whole hosts of {GPUS_PER_HOST}")
    hosts, per_host = (1, n) if n <= GPUS_PER_HOST else (n // GPUS_PER_HOST, GPUS_PER_HOST)
    return Target(name.lower(), "gpu", model, n, hosts, f"1x{hosts}x{per_host}", gpu.device_kind, gpu.hbm_bytes)
  raise _slice_error(name, f"unknown model {model!r}")


def gpu_target_description(model: str) -> str:
  """XLA's GPU target description (GpuTargetConfigProto text) shipped with maxlm for a GPU model."""
  return importlib.resources.files("maxlm.core").joinpath("gpu_targets", GPU_MODELS[model].target_file).read_text()


def tpu_generation(device_kind: str) -> Optional[TpuGeneration]:
  """The TPU generation of a device_kind ("TPU v5 lite", "TPU v4", ...); None for anything else."""
  kind = device_kind.strip().lower()
  for gen in TPU_GENERATIONS.values():
    if kind in (k.lower() for k in (gen.device_kind, *gen.aliases)):
      return gen
  return None


def tpu_vmem_bytes(device_kind: str) -> Optional[int]:
  """Physical VMEM per TensorCore of a TPU device_kind (what a Pallas kernel's tiles must fit); None when unknown."""
  gen = tpu_generation(device_kind)
  return gen.vmem_bytes if gen else None


def mesh_platform(mesh) -> str:
  """The platform of a mesh's devices, "gpu" for CUDA / ROCm ones: what decides kernels, including when compiling
  on a CPU host for another target (jax.default_backend() is then "cpu")."""
  platform = mesh.devices.flat[0].platform
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform
