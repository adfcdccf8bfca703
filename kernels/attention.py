"""Attention backends behind `model.attention`: XLA and cuDNN through jax.nn.dot_product_attention, splash on TPU.

Owns the backend dispatch and the splash kernel's wiring: causal and document (segment-id) masks, GQA layout, mesh.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from maxlm.core import targets
from maxlm.core.errors import ConfigError

BACKENDS = ("auto", "xla", "cudnn", "splash")
# Splash tiles: the largest of these dividing the sequence (Mosaic needs kv blocks of whole 128-lane vregs).
SPLASH_BLOCKS = (512, 256, 128)
# Mesh axes the batch and the heads are split over (maxlm.core.sharding's rules for activations).
BATCH_AXES = ("data", "fsdp")
HEADS_AXIS = "tensor"

_log = logging.getLogger(__name__)
_warned: set[str] = set()  # each warning once per process, not once per trace


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, backend: str = "auto", mask_Bx1xTxT=None, segment_ids_BxT=None,
              platform: str | None = None, mesh=None, causal: bool = True):
  """Self-attention with grouped KV heads (N query heads, K kv heads, N % K == 0), scaled by 1/sqrt(H); causal, or
  bidirectional with `causal=False` (model.causal, masked-LM encoders) in every backend.

  backend: "auto" (`auto_backend`: `cpu_attention` on CPU, splash on TPU and cuDNN flash attention on NVIDIA GPUs
  where they apply, else XLA's with one warning saying why), "xla", "cudnn", or "splash" (the Pallas TPU kernel; TPU
  interpret mode on CPU, for tests); the platform is the mesh's devices' (a compile for another target included).
  Document masking: segment_ids_BxT
  (tokens attend only within their segment) or an equivalent boolean mask_Bx1xTxT (seg_q == seg_k).
  mesh: with more than one device, splash runs per shard under shard_map (batch over data/fsdp, heads over tensor).
  """
  if backend not in BACKENDS:
    raise ConfigError(f"unknown model.attention {backend!r}; valid: {list(BACKENDS)}")
  device = mesh.devices.flat[0] if mesh is not None else None
  if platform is None:  # the mesh's devices decide, also when compiling on a CPU host for another target
    platform = targets.mesh_platform(mesh) if mesh is not None else jax.default_backend()
  if backend == "auto":
    backend, why = auto_backend(platform, device, q_BxTxNxH, k_BxTxKxH, mesh)
    if why:
      _warn_once(f"model.attention=auto runs XLA's attention on {platform}: {why}")
  if backend == "splash" and not _splash_fits(q_BxTxNxH, k_BxTxKxH):
    # A prompt's prefill has any length: it takes JAX's attention (training shapes are checked by the config).
    _warn_once(f"model.attention=splash needs self-attention over a multiple of 128 positions; q {q_BxTxNxH.shape}, "
               f"k {k_BxTxKxH.shape} run jax.nn.dot_product_attention instead")
    backend = "cpu" if platform == "cpu" else "xla"
  if backend == "splash":
    if segment_ids_BxT is None and mask_Bx1xTxT is not None:
      segment_ids_BxT = segment_ids_from_mask(mask_Bx1xTxT)
    return splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=segment_ids_BxT, platform=platform,
                            mesh=mesh, causal=causal)
  if mask_Bx1xTxT is None and segment_ids_BxT is not None:
    mask_Bx1xTxT = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
  if backend == "cpu":
    return cpu_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT=mask_Bx1xTxT, causal=causal)
  impl = {"auto": None, "xla": "xla", "cudnn": "cudnn"}[backend]
  # cuDNN takes is_causal=False as its NO_MASK type with the document mask as given: bidirectional there too.
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT, is_causal=causal,
                                      implementation=impl, scale=1.0 / math.sqrt(q_BxTxNxH.shape[-1]))


def auto_backend(platform: str, device, q_BxTxNxH, k_BxTxKxH, mesh=None) -> tuple[str, str]:
  """(backend, why not a kernel) of model.attention=auto: "cpu" (cpu_attention) on CPU, splash on TPU and cuDNN flash
  attention on NVIDIA GPUs wherever they apply (causal, document masks, GQA), else XLA's attention with the reason.
  Decided from the target device (its kind, compute capability), not from the host jax runs on."""
  if platform == "cpu":
    return "cpu", ""
  if platform == "tpu":
    if not _splash_fits(q_BxTxNxH, k_BxTxKxH):
      return "xla", (f"splash needs self-attention over a multiple of {SPLASH_BLOCKS[-1]} positions; q "
                      f"{q_BxTxNxH.shape}, k {k_BxTxKxH.shape}")
    shards = mesh.shape[HEADS_AXIS] if mesh is not None and HEADS_AXIS in mesh.axis_names else 1
    if k_BxTxKxH.shape[2] % shards:
      return "xla", f"splash shards whole kv heads: {k_BxTxKxH.shape[2]} kv heads do not divide mesh.tensor={shards}"
    return "splash", ""
  if platform == "gpu":
    why = cudnn_unfit(device, q_BxTxNxH, k_BxTxKxH)
    return ("xla", why) if why else ("cudnn", "")
  return "xla", f"no attention kernel for {platform}"


# cuDNN flash attention's head-dim limit (jax's check_is_flash_attention): 256 from Hopper (9.0) on, else 128.
CUDNN_MAX_HEAD_DIM, CUDNN_MAX_HEAD_DIM_HOPPER = 128, 256
CUDNN_DTYPES = ("bfloat16", "float16")


def compute_capability(device) -> tuple[int, int] | None:
  """An NVIDIA device's compute capability: its own attribute (compile-only devices have it too), else from its kind."""
  cap = getattr(device, "compute_capability", None)
  if cap:
    return tuple(int(x) for x in str(cap).split(".")[:2])
  kind = getattr(device, "device_kind", "").upper()
  for names, value in ((("H100", "H200", "H800", "GH200"), (9, 0)), (("B200", "GB200"), (10, 0)),
                       (("A100", "A800", "A10", "A40", "L40"), (8, 0))):
    if any(n in kind for n in names):
      return value
  return None


def cudnn_unfit(device, q_BxTxNxH, k_BxTxKxH) -> str:
  """Why cuDNN flash attention does not take these operands on `device` ("" when it does)."""
  cap = compute_capability(device) if device is not None else None
  if cap is None:
    return f"no NVIDIA compute capability known for {getattr(device, 'device_kind', 'this device')!r}"
  if cap < (8, 0):
    return f"cuDNN flash attention needs compute capability 8.0 or later, not {cap[0]}.{cap[1]}"
  dtype = jnp.dtype(q_BxTxNxH.dtype).name
  if dtype not in CUDNN_DTYPES:
    return f"cuDNN flash attention takes bfloat16 or float16, not {dtype} (model.compute_dtype)"
  head_dim = q_BxTxNxH.shape[-1]
  limit = CUDNN_MAX_HEAD_DIM_HOPPER if cap >= (9, 0) else CUDNN_MAX_HEAD_DIM
  if head_dim > limit or head_dim % 8:
    return (f"cuDNN flash attention on compute capability {cap[0]}.{cap[1]} takes head dims up to {limit} in steps "
            f"of 8, not {head_dim}")
  if q_BxTxNxH.shape[1] % 2 or k_BxTxKxH.shape[1] % 2:
    return f"cuDNN's masked training attention needs even lengths, not {q_BxTxNxH.shape[1]} x {k_BxTxKxH.shape[1]}"
  return ""


def cpu_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxT=None, causal: bool = True):
  """Causal (or, `causal=False`, bidirectional) attention in the layout XLA's CPU backend runs fastest: heads-major
  (B, K, G, T, H) operands, the 1/sqrt(H) folded into q, the causal and document masks one additive bias, softmax
  in fp32 with its max held constant. The same function as jax.nn.dot_product_attention's XLA path (to fp32
  rounding); its forward and backward ran 1.4x (one core) to 1.5x (two cores) faster at the demo shape
  (docs/BENCHMARKS.md)."""
  B, T, N, H = q_BxTxNxH.shape
  S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  q = (q_BxTxNxH * jnp.asarray(1.0 / math.sqrt(H), q_BxTxNxH.dtype)).reshape(B, T, K, N // K, H)
  q_BxKxGxTxH = q.transpose(0, 2, 3, 1, 4)
  k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
  visible = jnp.tril(jnp.ones((T, S), bool)) if causal else jnp.ones((T, S), bool)  # as is_causal
  if mask_Bx1xTxT is not None:
    visible = visible & mask_Bx1xTxT
  bias = jnp.where(visible, 0.0, -1e30).astype(jnp.float32).reshape(-1, 1, 1, T, S)
  logits = jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH, k_BxKxSxH, preferred_element_type=jnp.float32) + bias
  logits = logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))  # every row sees its own position
  e = jnp.exp(logits)
  probs = (e / e.sum(-1, keepdims=True)).astype(v_BxSxKxH.dtype)
  o_BxKxGxTxH = jnp.einsum("bkgts,bksh->bkgth", probs, v_BxKxSxH)
  return o_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _splash_fits(q_BxTxNxH, k_BxTxKxH) -> bool:
  return q_BxTxNxH.shape[1] == k_BxTxKxH.shape[1] and q_BxTxNxH.shape[1] % SPLASH_BLOCKS[-1] == 0


def _warn_once(message: str):
  if message not in _warned:
    _log.warning(message)
    _warned.add(message)


def segment_ids_from_mask(mask_Bx1xTxT):
  """Segment ids equivalent to a document mask seg_q == seg_k: each token's id is the first position of its
  segment (the first True of its row). Exact for any mask that is an equivalence relation of positions."""
  return jnp.argmax(mask_Bx1xTxT[:, 0], axis=-1).astype(jnp.int32)


def splash_block(seq_len: int) -> int:
  for block in SPLASH_BLOCKS:
    if seq_len % block == 0:
      return block
  raise ConfigError(
    f"model.attention=splash needs train.seq_len a multiple of 128 (the TPU lane width), got {seq_len}:"
    f" use {max(128, seq_len // 128 * 128)} or {(seq_len // 128 + 1) * 128}, or model.attention=xla")


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, seq_len: int, block: int, interpret: bool, causal: bool = True):
  """The splash kernel for causal (or full, bidirectional) self-attention of `heads` heads (the mask info is built
  once, in numpy)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  one = splash_mask.CausalMask if causal else splash_mask.FullMask
  mask = splash_mask.MultiHeadMask([one((seq_len, seq_len)) for _ in range(heads)])
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  interpret_arg = False
  if interpret:
    from jax.experimental.pallas import tpu as pltpu
    interpret_arg = pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
  # Concrete mask-info arrays: the kernel is cached across traces, so nothing in it may be a tracer.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret_arg)


def _splash_interpret(platform: str) -> bool:
  if platform == "tpu":
    return False
  if platform == "cpu":
    _warn_once("model.attention=splash on CPU runs the TPU kernel in interpret mode: correct but slow (tests)")
    return True
  raise ConfigError(f"model.attention=splash is the Pallas TPU kernel and has no {platform} lowering:"
                    " on GPU use model.attention=cudnn (or auto)")


def splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, segment_ids_BxT=None, platform: str | None = None,
                     mesh=None, block: int | None = None, causal: bool = True):
  """Causal or (causal=False) bidirectional attention, document-masked with segment ids, through the Pallas TPU
  splash kernel.

  block: the q/kv tile (default: the largest of SPLASH_BLOCKS dividing T)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

  B, T, N, H = q_BxTxNxH.shape
  K = k_BxTxKxH.shape[2]
  if k_BxTxKxH.shape[1] != T or N % K:
    raise ValueError(f"splash self-attention needs q (B, T, N, H) and k/v (B, T, K, H) with N % K == 0; got "
                     f"{q_BxTxNxH.shape} and {k_BxTxKxH.shape}")
  block = block or splash_block(T)
  interpret = _splash_interpret(platform or jax.default_backend())
  # Splash takes unscaled logits: fold 1/sqrt(H) into q (jax.nn.dot_product_attention scales the logits).
  q_BxNxTxH = (q_BxTxNxH * (1.0 / math.sqrt(H))).astype(q_BxTxNxH.dtype).transpose(0, 2, 1, 3)
  k_BxKxTxH, v_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)
  with_segments = segment_ids_BxT is not None

  def local(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT):
    # Query head n reads kv head n // (N / K), as jax.nn.dot_product_attention's GQA does.
    kernel = _splash_kernel(q_BxNxTxH.shape[1], T, block, interpret, causal)

    def one(args):
      q, k, v, s = args
      return kernel(q, k, v) if s is None else kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))

    args = (q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT)
    # On TPU the batch folds into the kernel's grid (vmap); the TPU interpret mode cannot batch a kernel
    # (jax 0.10: its grid and dimension semantics disagree under vmap), so there rows run one after another.
    return jax.lax.map(one, args) if interpret else jax.vmap(one)(args)

  seg = segment_ids_BxT.astype(jnp.int32) if with_segments else None
  if mesh is None or mesh.size == 1:
    out_BxNxTxH = local(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, seg)
  else:
    out_BxNxTxH = _sharded(local, mesh, q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, seg)
  return out_BxNxTxH.transpose(0, 2, 1, 3)


def _sharded(local, mesh, q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, seg_BxT):
  """The kernel per shard: a pallas_call has no partitioning rule, so it runs under shard_map."""
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
  heads = HEADS_AXIS if HEADS_AXIS in mesh.axis_names else None
  n_heads_shards = mesh.shape[heads] if heads else 1
  if k_BxKxTxH.shape[1] % n_heads_shards:
    raise ConfigError(f"model.attention=splash under mesh.tensor={n_heads_shards} needs the kv heads "
                      f"({k_BxKxTxH.shape[1]}) divisible by it")
  head_spec = P(batch, heads, None, None)
  in_specs = (head_spec, head_spec, head_spec, None if seg_BxT is None else P(batch, None))
  # Interpret mode's grid loop trips shard_map's varying-axes check; the kernel is per-shard by construction.
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=head_spec, check_vma=False)
  return fn(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, seg_BxT)
