"""Planning without running: the analytic per-device memory plan of `--dry-run` and the peak FLOP/s MFU divides by.

Nothing here allocates model-sized arrays; the planner works for any device count from any machine.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import types

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


@dataclasses.dataclass(frozen=True)
class Keeps:
  """What one XLA compiler keeps live at a train step's peak beside the state and the layer inputs saved for the
  backward, counted in buffers of known sizes (per device). Each row is fitted to that compiler's peaks over the
  paper presets and their variants (fewer tokens per chip, tensor parallelism, remat=dots, XLA attention) so that
  every plan comes within 12% of its compiled peak (docs/BENCHMARKS.md, "The plan beside the compilers"). The fp32
  gradients of a gathered layer or head take no count of their own: both compilers reduce-scatter them as they are
  produced."""
  hidden: float  # (tokens, d) compute-dtype buffers: one layer's recomputed forward and its gradients
  projections: float  # (tokens, (q + 2 kv) / tensor) compute-dtype buffers: q, k, v and their gradients
  mlp: float  # (tokens, ffn / tensor) compute-dtype buffers: gate, up, their product and gradients
  splash_lanes: float  # fp32 (tokens, heads / tensor, 128 lanes) buffers: splash attention's residuals (TPU)
  scores: float  # fp32 (sequences, heads / tensor, T, T) buffers: XLA attention's scores and probabilities
  head: float  # gathered (d, V / tensor) heads (and untied embeddings) in the compute dtype
  layer: float  # one layer's gathered weights in the compute dtype (the next layer's prefetched beside it)
  chunk: float  # fp32 (chunk tokens, V / tensor) tiles of the blockwise loss


KEEPS = {
    "gpu": Keeps(hidden=6, projections=2, mlp=2, splash_lanes=0, scores=3, head=1, layer=1, chunk=1),
    "tpu": Keeps(hidden=5, projections=0, mlp=3, splash_lanes=4.5, scores=2, head=2, layer=3, chunk=0),
}
KEEPS["cpu"] = KEEPS["gpu"]  # no measured CPU row: XLA's GPU compiler's is the nearest
# The GPU a plan assumes when it is given no device (a CPU host planning for a cluster): an H100, whose compute
# capability decides cuDNN attention's head-dim limit.
REFERENCE_GPU = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def planned_attention(cfg: Config, platform: str, device=None) -> str:
  """The attention backend the step runs for `platform` (model.attention, `auto` resolved as kernels.attention
  resolves it for the target device)."""
  from maxlm.kernels import attention  # pylint: disable=import-outside-toplevel
  m = cfg.model
  if m.attention != "auto":
    return m.attention
  d = model_lib.Dims.of(m)
  seq, dtype = cfg.train.seq_len, jnp.dtype(m.compute_dtype)
  q = jax.ShapeDtypeStruct((1, seq, d.heads, d.head_dim), dtype)
  k = jax.ShapeDtypeStruct((1, seq, d.kv_heads, d.head_dim), dtype)
  if platform == "gpu" and device is None:
    device = REFERENCE_GPU
  return attention.auto_backend(platform, device, q, k)[0]  # the config keeps kv heads divisible by mesh.tensor


def _working(cfg: Config, platform: str, attention: str, tensor: int, tokens: float) -> dict[str, float]:
  """Per-device bytes of what the compiled step keeps beside the state and the saved layer inputs (Keeps)."""
  from maxlm.kernels import tiling  # pylint: disable=import-outside-toplevel
  keep = KEEPS[platform]
  d = model_lib.Dims.of(cfg.model)
  c = jnp.dtype(cfg.model.compute_dtype).itemsize
  heads = d.heads / tensor
  per_token = c * (keep.hidden * d.hidden + keep.projections * (d.heads + 2 * d.kv_heads) * d.head_dim / tensor
                   + keep.mlp * d.ffn / tensor)
  if attention == "splash":
    per_token += keep.splash_lanes * heads * 128 * 4
  elif attention != "cudnn":  # XLA's attention (and maxlm's CPU attention) hold (T, T) scores per head
    per_token += keep.scores * heads * cfg.train.seq_len * 4
  layer_params = sum(math.prod(shape) for shape, _, _ in model_lib.layer_weights(cfg.model).values()) / tensor
  top = model_lib.top_weights(cfg.model)
  head_params = sum(math.prod(top[n][0]) for n in ("embed", "lm_head") if n in top) / tensor
  if cfg.loss.impl == "reference":  # fp32 logits, softmax and their gradient
    loss = 3 * tokens * d.vocab / tensor * 4
  else:
    block_tokens, block_vocab, _ = tiling.platform_blocks(platform, max(int(tokens), 1), d.vocab // tensor)
    loss = keep.chunk * min(block_tokens, tokens) * block_vocab * 4
  # A scan that runs u layers per iteration lets the compiler overlap their backward passes: u working sets at once.
  unrolled = min(cfg.model.scan_unroll, cfg.model.layers) if cfg.model.scan_layers else 1
  return {"layer activations": unrolled * tokens * per_token,
          "gathered weights": c * (keep.layer * layer_params + keep.head * head_params), "loss chunk": loss}


def memory_estimate(cfg: Config, num_devices: int, platform: str | None = None, device=None) -> dict:
  """Analytic per-device bytes of a train step on `platform` (this host's when None): params (trainable and frozen),
  optimizer state and gradients of the trainable params, the layer inputs saved under the remat policy, and what the
  platform's compiler keeps beside them at the peak (KEEPS: one layer's activations and gradients, gathered weights,
  the loss's chunk)."""
  platform = platform or jax.default_backend()
  d = model_lib.Dims.of(cfg.model)
  data, fsdp, tensor = mesh_shape(cfg.mesh, num_devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  _, model_abstract, model_specs = model_lib.abstract_model(cfg.model)
  n_params = model_lib.param_count(model_abstract)
  view = registry.param_view(cfg)
  trainable, trainable_specs = view.trainable(model_abstract, model_specs)
  trainable_specs = jax.tree.map(tuple, trainable_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  c_bytes = jnp.dtype(cfg.model.compute_dtype).itemsize
  params = _tree_bytes(trainable, trainable_specs, sizes)
  opt = 2 * _tree_bytes(trainable, trainable_specs, sizes, itemsize=4)  # Adam moments in fp32
  grads = _tree_bytes(trainable, trainable_specs, sizes, itemsize=4)
  if cfg.train.microbatches > 1:
    grads *= 2  # the fp32 sum over microbatches beside one microbatch's gradients
  for entry in registry.frozen_entries(cfg).values():  # frozen entries: EMO's cost embedding, a LoRA base
    params += _tree_bytes(entry.abstract, entry.logical_axes, sizes)
  tokens = cfg.train.global_batch // cfg.train.microbatches * cfg.train.seq_len / (data * fsdp)
  q, kv = d.heads * d.head_dim / tensor, d.kv_heads * d.head_dim / tensor
  saved_per_token = {"none": (4 * d.hidden + 2 * q + 2 * kv + 3 * d.ffn / tensor),
                     "dots": (q + 2 * kv + 2 * d.hidden + 2 * d.ffn / tensor),
                     "dots_no_batch": (q + 2 * kv + 2 * d.hidden + 2 * d.ffn / tensor),
                     "full": d.hidden}[cfg.model.remat]
  saved = tokens * d.layers * saved_per_token * c_bytes
  attention = planned_attention(cfg, platform, device)
  working = _working(cfg, platform, attention, tensor, tokens)
  activations = saved + sum(working.values())
  total = params + opt + grads + activations
  return {"params": params, "optimizer": opt, "gradients": grads, "activations": activations, "total": total,
          "saved": saved, "working": working, "platform": platform, "attention": attention,
          "param_count": n_params, "trainable_count": model_lib.param_count(trainable),
          "mesh": (data, fsdp, tensor), "tokens_per_device": tokens}


def activation_parts(est: dict) -> dict[str, float]:
  """The plan's activations by part: the layer inputs saved for the backward, then what the compiler keeps beside
  them (Keeps)."""
  return {"saved layer inputs": est["saved"], **est["working"]}


def dry_run_report(cfg: Config, num_devices: int, platforms: tuple[str, ...] | None = None) -> str:
  """The `--dry-run` plan: for this host's platform, or, on a CPU host (which plans for a cluster), for an H100-class
  GPU and a TPU side by side."""
  host = jax.default_backend()
  platforms = platforms or ((host,) if host in KEEPS and host != "cpu" else ("gpu", "tpu"))
  devices = {p: jax.devices()[0] if p == host else None for p in platforms}
  ests = {p: memory_estimate(cfg, num_devices, p, devices[p]) for p in platforms}
  est = ests[platforms[0]]
  gib = 2 ** 30
  data, fsdp, tensor = est["mesh"]
  columns = lambda key: "".join(f"{ests[p][key] / gib:12.2f} GiB" for p in platforms)  # noqa: E731
  lines = [
      f"model: {cfg.model.family}, {est['param_count']:,} parameters ({est['param_count'] / 1e9:.3f}B)"
      + (f", {est['trainable_count']:,} trainable" if est["trainable_count"] != est["param_count"] else ""),
      f"mesh: data={data} fsdp={fsdp} tensor={tensor} ({num_devices} devices); "
      f"{est['tokens_per_device']:,.0f} tokens per device per microbatch, remat={cfg.model.remat}",
      "per-device memory plan (analytic: the state, the layer inputs saved for the backward, and what XLA's compiler "
      "for the platform keeps beside them, maxlm.state.plan.KEEPS; within 15% of the compiled peaks of the paper "
      "presets on their targets, docs/BENCHMARKS.md; --topology=SLICE compiles the real step for a TPU slice or GPU "
      "cluster and reports its peak):",
      "              " + "".join(f"{_platform_label(p, ests[p], devices[p]):>16s}" for p in platforms),
      f"  params      {columns('params')}   ({cfg.model.param_dtype})",
      f"  optimizer   {columns('optimizer')}   (AdamW moments, fp32)",
      f"  gradients   {columns('gradients')}",
      f"  activations {columns('activations')}   ({cfg.model.compute_dtype})",
      f"  total       {columns('total')}",
  ]
  for p in platforms:
    lines.append(f"  {_platform_label(p, ests[p], devices[p])} activations: "
                 + ", ".join(f"{k} {v / gib:.2f}" for k, v in activation_parts(ests[p]).items()))
  return "\n".join(lines)


def _platform_label(platform: str, est: dict, device) -> str:
  name = device.device_kind if device is not None else "H100" if platform == "gpu" else platform
  return f"{name} ({est['attention']})"
