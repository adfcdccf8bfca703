"""Planning without running: the analytic per-device memory plan of `--dry-run` and the peak FLOP/s MFU divides by.

Nothing here allocates model-sized arrays; the planner works for any device count from any machine.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp

from maxlm.state import registry
from maxlm import model as model_lib
from maxlm.core.config import Config, mesh_shape
from maxlm.core.cpu_peak import cpu_peak_flops

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (CPUs) use a measured matmul peak instead.
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "gh200": 989e12, "b200": 2250e12, "a100": 312e12,
    "a800": 312e12, "l40s": 362e12, "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5p": 459e12, "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


@functools.lru_cache(maxsize=None)
def peak_flops_per_device() -> tuple[float, str]:
  """(peak FLOP/s, source): the datasheet dense bf16 peak for known accelerators; on a CPU its nominal fp32 peak
  (cores x clock x FMA width: the same figure whatever the load, core.cpu_peak) shared by its devices, or
  MAXLM_PEAK_FLOPS; a matmul measured now only where neither is known."""
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return flops, f"{kind} datasheet bf16"
  if jax.devices()[0].platform == "cpu":
    flops, source = cpu_peak_flops()
    if flops:
      devices = jax.local_device_count()  # simulated CPU devices share the cores
      return flops / devices, source + (f", / {devices} devices" if devices > 1 else "")
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(5):  # best of five: the machine's capability, not its momentary load
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best, f"{kind} fp32 matmul measured at start-up (lower under load)"


def _shards(axes, mesh_sizes: dict) -> int:
  """How many ways an array with these logical axes is split over the mesh (sharding.RULES)."""
  from maxlm.core.sharding import logical_to_spec  # pylint: disable=import-outside-toplevel
  count = 1
  for part in logical_to_spec(tuple(axes)):
    for axis in (part,) if isinstance(part, str) else (part or ()):
      count *= mesh_sizes[axis]
  return count


def _tree_bytes(abstract, logical_specs, mesh_sizes: dict, itemsize=None) -> float:
  """Per-device bytes of a tree of ShapeDtypeStructs sharded by its logical axes."""
  total = 0.0
  leaves = jax.tree.leaves(abstract)
  specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, tuple) or x is None)
  for leaf, axes in zip(leaves, specs):
    size = itemsize or jnp.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * size / _shards(axes or (), mesh_sizes)
  return total


def memory_estimate(cfg: Config, num_devices: int) -> dict[str, float]:
  """Analytic per-device bytes: params (trainable and frozen), optimizer state and gradients of the trainable
  params, and activations under the remat policy."""
  d = model_lib.Dims.of(cfg.model)
  data, fsdp, tensor = mesh_shape(cfg.mesh, num_devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  _, model_abstract, model_specs = model_lib.abstract_model(cfg.model)
  n_params = model_lib.param_count(model_abstract)
  trainable, trainable_specs = registry.param_view(cfg).trainable(model_abstract, model_specs)
  trainable_specs = jax.tree.map(tuple, trainable_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  c_bytes = jnp.dtype(cfg.model.compute_dtype).itemsize
  params = _tree_bytes(trainable, trainable_specs, sizes)
  opt = 2 * _tree_bytes(trainable, trainable_specs, sizes, itemsize=4)  # Adam moments in fp32
  grads = _tree_bytes(trainable, trainable_specs, sizes, itemsize=4)
  for entry in registry.frozen_entries(cfg).values():  # frozen entries: EMO's cost embedding, a LoRA base
    params += _tree_bytes(entry.abstract, entry.logical_axes, sizes)
  tokens = cfg.train.global_batch // cfg.train.microbatches * cfg.train.seq_len / (data * fsdp)
  q, kv = d.heads * d.head_dim / tensor, d.kv_heads * d.head_dim / tensor
  ffn = d.ffn / tensor
  layer_working = (4 * d.hidden + 2 * q + 2 * kv + 3 * ffn) * c_bytes  # everything one layer's backward holds
  saved = {"none": layer_working, "dots": (q + 2 * kv + d.hidden + 2 * ffn + d.hidden) * c_bytes,
           "dots_no_batch": (q + 2 * kv + d.hidden + 2 * ffn + d.hidden) * c_bytes,
           "full": d.hidden * c_bytes}[cfg.model.remat]
  activations = tokens * (d.layers * saved + layer_working)
  if cfg.loss.impl == "reference":
    activations += tokens * d.vocab / tensor * 4 * 3  # fp32 logits, softmax and their gradient
  total = params + opt + grads + activations
  return {"params": params, "optimizer": opt, "gradients": grads, "activations": activations, "total": total,
          "param_count": n_params, "trainable_count": model_lib.param_count(trainable),
          "mesh": (data, fsdp, tensor), "tokens_per_device": tokens}


def dry_run_report(cfg: Config, num_devices: int) -> str:
  est = memory_estimate(cfg, num_devices)
  gib = 2 ** 30
  data, fsdp, tensor = est["mesh"]
  lines = [
      f"model: {cfg.model.family}, {est['param_count']:,} parameters ({est['param_count'] / 1e9:.3f}B)"
      + (f", {est['trainable_count']:,} trainable" if est["trainable_count"] != est["param_count"] else ""),
      f"mesh: data={data} fsdp={fsdp} tensor={tensor} ({num_devices} devices); "
      f"{est['tokens_per_device']:,.0f} tokens per device per microbatch, remat={cfg.model.remat}",
      "per-device memory estimate (analytic, a lower bound: XLA's temporaries come on top; the paper presets' "
      "compiled peaks are 1.0-2.0x it, docs/BENCHMARKS.md; --topology=SLICE compiles the real step for that target "
      "and reports its peak):",
      f"  params      {est['params'] / gib:9.2f} GiB ({cfg.model.param_dtype})",
      f"  optimizer   {est['optimizer'] / gib:9.2f} GiB (AdamW moments, fp32)",
      f"  gradients   {est['gradients'] / gib:9.2f} GiB",
      f"  activations {est['activations'] / gib:9.2f} GiB ({cfg.model.compute_dtype})",
      f"  total       {est['total'] / gib:9.2f} GiB",
  ]
  return "\n".join(lines)
