"""`fused_loss`: picks an implementation (reference, blockwise, pallas) and runs it, sharded under a mesh.

Owns argument checking, the Pallas dispatch (which kernel module for which platform), the shard_map wrapper
(tokens over data/fsdp, vocabulary over tensor) and the objective split.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from maxlm import losses
from maxlm.core.errors import ConfigError
from maxlm.kernels import blockwise, tiling

IMPLS = ("auto", "reference", "blockwise", "pallas")
# Platforms where "auto" picks the Pallas kernels. Empty until a hardware run validates them: the
# kernels pass interpret-mode tests and lower (Triton IR / Mosaic) on CPU, but have never run on a GPU or
# TPU, and the trainer's default must not depend on unvalidated kernels. Add "gpu" / "tpu" here only after
# benchmarks/device_check.py shows impl="pallas" correct on that machine AND faster than the blockwise plan
# (on GPU the Triton backward's fp32 atomics make that unlikely, docs/BENCHMARKS.md).
PALLAS_AUTO_PLATFORMS: tuple[str, ...] = ()
# Mesh axes (maxlm.core.sharding): tokens are split over these, the vocabulary over TENSOR_AXIS.
TOKEN_AXES = ("data", "fsdp")
TENSOR_AXIS = "tensor"


def _platform(mesh) -> str:
  if mesh is not None:
    return mesh.devices.flat[0].platform
  return jax.default_backend()


def _device_kind(mesh) -> str:
  """The chip the kernels compile for (jax's device_kind, "TPU v5 lite", ...): the mesh's, else the default one's."""
  device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
  return device.device_kind


def _plan_platform(platform: str) -> str:
  """The blockwise plan for a device platform: its own, or the GPU plan for any other accelerator."""
  return platform if platform in tiling.PLATFORMS else "gpu"


def resolve_impl(impl: str, mesh=None) -> str:
  """The implementation `impl` stands for on this platform: "auto" is pallas where validated, else blockwise."""
  if impl not in IMPLS:
    raise ConfigError(f"unknown fused_loss impl {impl!r}; valid: {list(IMPLS)}")
  if impl == "auto":
    return "pallas" if _platform(mesh) in PALLAS_AUTO_PLATFORMS else "blockwise"
  return impl


def _stats_fn(impl: str, platform: str, *, block_tokens, block_vocab, interpret, tile_plan, device_kind=None):
  """A function (hidden, w, labels, cost, ignore_index, vocab_axis) -> token stats for `impl`."""
  if impl == "blockwise":
    plan_platform = tiling.check_platform(tile_plan) if tile_plan is not None else _plan_platform(platform)

    def stats(hidden, w, labels, cost, ignore_index, vocab_axis):
      return blockwise.token_stats(hidden, w, labels, cost, ignore_index=ignore_index, block_tokens=block_tokens,
                                   block_vocab=block_vocab, vocab_axis=vocab_axis, platform=plan_platform)
    return stats
  if tile_plan is not None:
    raise ConfigError(f"fused_loss tile_plan={tile_plan!r} chooses a blockwise plan; impl={impl!r} has its own tiles")
  return _pallas_stats_fn(platform, block_tokens=block_tokens, block_vocab=block_vocab, interpret=interpret,
                          device_kind=device_kind)


def _pallas_kernel(platform: str, interpret) -> tuple[str, Any]:
  """(kernel "gpu" | "tpu", the interpret argument of pallas_call) for `platform` and the user's `interpret`.

  interpret None/False: the platform's own kernel, compiled; True: the platform's kernel emulated (the GPU one on a
  CPU, the lighter interpreter); "gpu" / "tpu": that kernel emulated. Pallas never falls back to another impl.
  """
  if interpret in (None, False):
    if platform not in ("gpu", "tpu"):
      raise ConfigError(
        f"fused_loss impl='pallas' has kernels for gpu and tpu, not {platform!r}: use impl='blockwise' (or 'auto'),"
        " or interpret=True (or 'gpu'/'tpu') to emulate a kernel (slow; for tests)")
    return platform, False
  if interpret is True or interpret in ("gpu", "tpu"):
    kernel = interpret if interpret is not True else ("tpu" if platform == "tpu" else "gpu")
    if kernel == "tpu":
      from jax.experimental.pallas import tpu as pltpu  # local: Pallas imports are heavy and backend-specific
      return kernel, pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
    return kernel, True
  raise ConfigError(f"fused_loss interpret must be None, False, True, 'gpu' or 'tpu', got {interpret!r}")


def _pallas_stats_fn(platform: str, *, block_tokens, block_vocab, interpret, device_kind):
  """token_stats through the Pallas kernel module of `platform` (or the one `interpret` emulates), its tiles
  planned for the chip `device_kind` (Mosaic sizes them to its VMEM)."""
  kernel, interpret_arg = _pallas_kernel(platform, interpret)
  # local: Pallas imports are heavy and backend-specific (the Triton module is GPU-only past jax 0.11)
  from maxlm.kernels import pallas_common
  if kernel == "gpu":
    from maxlm.kernels import pallas_gpu as module
  else:
    from maxlm.kernels import pallas_tpu as module

  def stats(hidden_NxD, w_DxV, labels_N, cost_VxE, ignore_index, vocab_axis):
    dtype = blockwise.compute_dtype(hidden_NxD, w_DxV)
    hidden_NxD, w_DxV = hidden_NxD.astype(dtype), w_DxV.astype(dtype)
    d_emb = None if cost_VxE is None else cost_VxE.shape[1]
    blocks = module.blocks(hidden_NxD.shape, w_DxV.shape, d_emb, dtype, block_tokens, block_vocab,
                           device_kind=device_kind)
    cfg = pallas_common.KernelConfig(backend=kernel, ignore_index=ignore_index, vocab_axis=vocab_axis,
                                     interpret=interpret_arg, **blocks)
    if cost_VxE is not None:
      cost_VxE = lax.stop_gradient(cost_VxE)
    return module.stats(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE)

  return stats


def fused_loss(hidden, lm_head, labels, *, objective: str = "ce", impl: str = "auto", cost_embedding=None,
               mesh=None, block_tokens: int | None = None, block_vocab: int | None = None,
               interpret: Any = None, tile_plan: str | None = None, **objective_kwargs):
  """(loss, metrics) of `objective` on hidden (N, d) @ lm_head (d, V) without building the logits.

  Equals maxlm.losses.compute(objective, hidden @ lm_head, labels, cost_embedding=..., **kwargs),
  with gradients for hidden and lm_head in their dtypes (cost_embedding is always stop-gradient).
  impl: "reference" (materialised fp32 logits), "blockwise" (pure JAX, any backend), "pallas"
  (GPU/TPU kernels; on CPU only in interpret mode, for tests: interpret=True emulates the GPU kernel there,
  "gpu" / "tpu" name the kernel), "auto" (pallas on the
  platforms in PALLAS_AUTO_PLATFORMS, blockwise elsewhere). Blockwise tiles follow the tile plan of the mesh's
  platform (kernels/tiling.py: cpu 1024 x 512 vocabulary-major; gpu/tpu 2048-4096 tokens x the whole local
  vocabulary, token-major); tile_plan="cpu"|"gpu"|"tpu" picks another platform's plan, and
  block_tokens/block_vocab override its sizes (any N, V work). Pallas kernels have their own tiles (Mosaic's
  sized to the VMEM of the mesh's TPU generation).
  The matmuls run in the promotion of hidden's and lm_head's dtypes with fp32 accumulation (EMO's similarity
  matmul too); softmax, logs and reductions run in fp32.
  mesh: a Mesh with axes ("data", "fsdp", "tensor"); with more than one device the fused impls run
  under shard_map with tokens split over data/fsdp and the head's vocabulary over tensor.
  Fused impls compute the entropy exactly: MiLe's reference-mode floor (1e-8) is not applied, a
  difference bounded by V * 1e-8 * ln(1e8) in H (docs/LOSSES.md).
  """
  impl = resolve_impl(impl, mesh)
  stats_kwargs, combine_kwargs = losses.split_objective_kwargs(objective, objective_kwargs)
  ignore_index = stats_kwargs["ignore_index"]
  if objective == "emo":
    if cost_embedding is None:
      raise ConfigError("fused_loss objective 'emo' needs cost_embedding (V, dE): set the cost embedding source")
  else:
    cost_embedding = None  # as maxlm.losses.compute: only emo reads it
  hidden, lm_head, labels = jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(labels)
  if hidden.ndim != 2 or lm_head.ndim != 2 or hidden.shape[1] != lm_head.shape[0]:
    raise ConfigError(f"fused_loss needs hidden (N, d) and lm_head (d, V); got {hidden.shape} and {lm_head.shape}")
  if labels.shape != hidden.shape[:1]:
    raise ConfigError(f"fused_loss labels must be (N,) = {hidden.shape[:1]}, got {labels.shape}")
  losses.check_labels(labels, lm_head.shape[1], ignore_index)
  if cost_embedding is not None and (cost_embedding.ndim != 2 or cost_embedding.shape[0] != lm_head.shape[1]):
    raise ConfigError(
      f"cost_embedding must be (V={lm_head.shape[1]}, dE), got {cost_embedding.shape}:"
      " use the output head of a model with the same vocabulary")

  if impl == "reference":
    logits_NxV = jnp.matmul(hidden, lm_head, preferred_element_type=jnp.float32)
    cost = None if cost_embedding is None else lax.stop_gradient(cost_embedding)
    return losses.compute(objective, logits_NxV, labels, cost_embedding=cost, **objective_kwargs)

  floor = stats_kwargs.get("entropy_floor", 0.0)
  if isinstance(floor, (int, float)) and floor > losses.REFERENCE_ENTROPY_FLOOR:
    raise ConfigError(
      f"fused_loss impl {impl!r} computes the entropy exactly; entropy_floor={floor} needs impl='reference'")
  stats_fn = _stats_fn(impl, _platform(mesh), block_tokens=block_tokens, block_vocab=block_vocab,
                       interpret=interpret, tile_plan=tile_plan,
                       device_kind=_device_kind(mesh) if impl == "pallas" else None)

  if mesh is None or mesh.size == 1:
    stats = stats_fn(hidden, lm_head, labels, cost_embedding, ignore_index, None)
    return losses.combine(objective, stats, **combine_kwargs)
  return _sharded(stats_fn, mesh, hidden, lm_head, labels, cost_embedding, objective, ignore_index,
                  combine_kwargs)


def _sharded(stats_fn, mesh, hidden, lm_head, labels, cost_embedding, objective, ignore_index, combine_kwargs):
  """shard_map: each device holds its tokens and its vocabulary slice of the head (never gathered)."""
  token_axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names)
  vocab_axes = (TENSOR_AXIS,) if TENSOR_AXIS in mesh.axis_names else ()
  n_token_shards = 1
  for a in token_axes:
    n_token_shards *= mesh.shape[a]
  n_vocab_shards = mesh.shape[TENSOR_AXIS] if vocab_axes else 1
  if hidden.shape[0] % n_token_shards or lm_head.shape[1] % n_vocab_shards:
    raise ConfigError(
      f"fused_loss under mesh {dict(mesh.shape)}: N={hidden.shape[0]} must divide by {n_token_shards} "
      f"(data*fsdp) and V={lm_head.shape[1]} by {n_vocab_shards} (tensor); pad the batch or vocabulary")
  tok = token_axes if token_axes else None
  voc = vocab_axes[0] if vocab_axes else None

  def local(hidden_NxD, w_DxV, labels_N, cost_VxE):
    # Tokens are replicated over the vocabulary shards and the head over the token shards: marking
    # them varying makes autodiff psum d hidden over tensor and d lm_head over data/fsdp.
    hidden_NxD = blockwise.mark_varying(hidden_NxD, frozenset(vocab_axes))
    w_DxV = blockwise.mark_varying(w_DxV, frozenset(token_axes))
    stats = stats_fn(hidden_NxD, w_DxV, labels_N, cost_VxE, ignore_index, voc)
    return losses.combine(objective, stats, psum_axes=token_axes or None, **combine_kwargs)

  in_specs = (P(tok, None), P(None, voc), P(tok), None if cost_embedding is None else P(voc, None))
  args = (hidden, lm_head, labels, cost_embedding)
  if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    # Explicit axes: shard_map takes inputs only in its in_specs layout (Auto axes reshard implicitly).
    args = tuple(None if a is None else jax.sharding.reshard(a, jax.sharding.NamedSharding(mesh, s))
                 for a, s in zip(args, in_specs))
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()))
  return fn(*args)
