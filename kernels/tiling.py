"""The tile plans of the fused loss, one per platform: block sizes, loop order, chunk counts and tail handling.

Blockwise plans for cpu / gpu / tpu, the Pallas Triton blocks and the Mosaic TPU kernel blocks all live here.
"""

from __future__ import annotations

import dataclasses

from maxlm.core import targets
from maxlm.core.errors import ConfigError

PLATFORMS = ("cpu", "gpu", "tpu")
# Loop orders of the blockwise path. vocab_major: vocabulary chunks outside, token chunks inside; d lm_head is
# written once per vocabulary chunk and d hidden accumulates in fp32 across them (the CPU plan: small tiles, the
# head gradient never held whole in fp32). token_major: token chunks outside; d hidden is written once per token
# chunk and d lm_head accumulates in fp32 across token chunks (the GPU/TPU plans: few, large matmuls).
VOCAB_MAJOR = "vocab_major"
TOKEN_MAJOR = "token_major"

# CPU, measured (docs/BENCHMARKS.md): a 1024 x 512 fp32 tile is 2 MB, small next to the 131 MB (d, V) head
# gradient at d=1024, V=32000, yet each tile matmul (1024 x d x 512) is big enough to run near peak on CPU.
DEFAULT_BLOCK_TOKENS = 1024
DEFAULT_BLOCK_VOCAB = 512
# GPU/TPU blockwise: token chunks with the whole local vocabulary, so that each of the three matmuls of a chunk
# (logits, d hidden, d lm_head) is one large library call (cuBLAS on GPU), as in Liger's fused linear CE and
# MaxText's vocabulary tiling. The chunk's fp32 logits are bounded by CHUNK_LOGITS_BYTES; the largest token
# count of TOKEN_CHOICES that fits is taken, and only a vocabulary too large for the smallest one is split.
TOKEN_CHOICES = {"gpu": (4096, 2048), "tpu": (4096, 2048, 1024)}
CHUNK_LOGITS_BYTES = {"gpu": 1 << 30, "tpu": 256 << 20}  # TPUs have less HBM per chip (16 GB on v5e)
VOCAB_ALIGN = 128  # a split vocabulary chunk stays a multiple of the MXU / tensor-core width

# Pallas Triton (GPU): power-of-two blocks. 64 x 128 tiles with 64-wide contraction chunks keep the fp32
# accumulator and both operand tiles in registers / shared memory at any d.
TRITON_BLOCKS = dict(block_tokens=64, block_vocab=128, block_d=64, block_e=64)
TRITON_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16

# Pallas Mosaic (TPU): token blocks of up to 1024 (few passes over the head), vocabulary blocks of a multiple of 128
# lanes, the whole contraction d in VMEM. The planner (tpu_kernel_blocks) takes the blocks that read least from HBM
# among those whose estimated VMEM (tpu_kernel_vmem) stays under TPU_VMEM_SAFETY of the chip's VMEM.
TPU_KERNEL_BLOCK_TOKENS = 1024
TPU_MIN_BLOCK_TOKENS = 8  # one sublane tile
TPU_VOCAB_CHOICES = (512, 256, 128)
MIB = 1 << 20
# VMEM per TensorCore comes from maxlm.core.targets' table of TPU generations: the limit libtpu's compiler enforces on a
# kernel whatever vmem_limit_bytes asks for (docs/BENCHMARKS.md, "Mosaic fused loss: VMEM per TPU generation").
# Any other kind (a newer chip, or a CPU emulating the kernel in interpret mode): the smallest, so the tiles fit.
TPU_VMEM_UNKNOWN_BYTES = min(gen.vmem_bytes for gen in targets.TPU_GENERATIONS.values())
# The estimate must stay under this fraction of the chip's VMEM: it bounds every measurement, with headroom for
# shapes that were not measured.
TPU_VMEM_SAFETY = 0.85
# Besides its double-buffered blocks, a kernel holds fp32 (block_tokens, block_vocab) tile temporaries (logits, exp,
# dz; EMO's similarities), a gradient kernel its fp32 matmul result before it is added to the output block, and
# Mosaic keeps some internal scratch. Fitted as an upper bound of the VMEM libtpu's compiler needs on v4, v5e, v5p
# and v6e (88 kernels; docs/BENCHMARKS.md); v4 and v5p need the most.
TPU_TILE_TEMPS = 4
TPU_TILE_TEMPS_EMO = 6
TPU_INTERNAL_SCRATCH_BYTES = MIB // 2


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(x: int, multiple: int) -> int:
  return cdiv(x, multiple) * multiple


def next_power_of_2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def is_power_of_2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Static tiling of an (N, V) logits matrix into (block_tokens, block_vocab) tiles, visited in `order`.

  Blocks are clamped to the array (a block never exceeds N or V). Clamped chunks: the last chunk of an axis
  starts at `size - block` so that a slice never leaves the array; the rows/columns it shares with the
  previous chunk are masked by `is_new`, so every token and vocabulary entry counts once. The token-major
  order instead runs `full_token_chunks` whole chunks and then one static tail of `tail_tokens` rows, so each
  row of d hidden is written exactly once, with no mask and no read-back.
  """
  n_tokens: int
  vocab: int
  block_tokens: int
  block_vocab: int
  order: str = VOCAB_MAJOR
  platform: str = "cpu"

  @property
  def token_chunks(self) -> int:
    return cdiv(self.n_tokens, self.block_tokens)

  @property
  def vocab_chunks(self) -> int:
    return cdiv(self.vocab, self.block_vocab)

  @property
  def full_token_chunks(self) -> int:
    return self.n_tokens // self.block_tokens

  @property
  def tail_tokens(self) -> int:
    return self.n_tokens - self.full_token_chunks * self.block_tokens

  def token_start(self, i):
    """Start row of token chunk i (traced or static): clamped so the block stays inside N."""
    return _clamped_start(i, self.block_tokens, self.n_tokens)

  def vocab_start(self, j):
    return _clamped_start(j, self.block_vocab, self.vocab)

  def chunk_logits_bytes(self) -> int:
    return self.block_tokens * self.block_vocab * 4

  def describe(self) -> str:
    return f"{self.platform}: {self.block_tokens} tokens x {self.block_vocab} vocab, {self.order}"


def _clamped_start(i, block, size):
  import jax.numpy as jnp  # local: tiling arithmetic must also work on Python ints
  if isinstance(i, int):
    return min(i * block, size - block)
  return jnp.minimum(i * block, size - block)


def check_platform(platform: str) -> str:
  if platform not in PLATFORMS:
    raise ConfigError(f"fused_loss tile_plan must be one of {list(PLATFORMS)}, got {platform!r}")
  return platform


def platform_blocks(platform: str, n_tokens: int, vocab: int) -> tuple[int, int, str]:
  """(block_tokens, block_vocab, order) of `platform`'s blockwise plan for N tokens and a local vocabulary V."""
  check_platform(platform)
  if platform == "cpu":
    return DEFAULT_BLOCK_TOKENS, DEFAULT_BLOCK_VOCAB, VOCAB_MAJOR
  budget = CHUNK_LOGITS_BYTES[platform]
  choices = TOKEN_CHOICES[platform]
  fitting = [bt for bt in choices if bt * vocab * 4 <= budget]
  if fitting:
    return fitting[0], vocab, TOKEN_MAJOR
  smallest = choices[-1]
  block_vocab = max(VOCAB_ALIGN, budget // (smallest * 4) // VOCAB_ALIGN * VOCAB_ALIGN)
  return smallest, block_vocab, TOKEN_MAJOR


def make_plan(n_tokens: int, vocab: int, *, platform: str = "cpu", block_tokens: int | None = None,
              block_vocab: int | None = None) -> TilePlan:
  """`platform`'s plan for N tokens x V (local) vocabulary; block_tokens / block_vocab override its sizes."""
  planned_tokens, planned_vocab, order = platform_blocks(platform, n_tokens, vocab)
  block_tokens = planned_tokens if block_tokens is None else block_tokens
  block_vocab = planned_vocab if block_vocab is None else block_vocab
  for name, value in (("block_tokens", block_tokens), ("block_vocab", block_vocab)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"fused_loss: {name} must be a positive int, got {value!r}")
  if n_tokens < 1 or vocab < 1:
    raise ConfigError(f"fused_loss: need at least one token and one vocabulary entry, got N={n_tokens}, V={vocab}")
  return TilePlan(n_tokens=n_tokens, vocab=vocab, block_tokens=min(block_tokens, n_tokens),
                  block_vocab=min(block_vocab, vocab), order=order, platform=platform)


# ----------------------------------------------------------------------------- Pallas kernels


def triton_blocks(n_tokens: int, d: int, vocab: int, d_emb: int | None, block_tokens=None, block_vocab=None):
  """Blocks of the Pallas Triton kernel: powers of two >= 16 (Triton's rule), never much larger than the array.

  A user block that is not a power of two is refused with the nearest valid choices (rounding silently would
  run a different tile than the one asked for).
  """
  for name, value in (("block_tokens", block_tokens), ("block_vocab", block_vocab)):
    if value is not None and (not isinstance(value, int) or not is_power_of_2(value) or value < TRITON_MIN_BLOCK):
      upper = max(TRITON_MIN_BLOCK, next_power_of_2(value)) if isinstance(value, int) and value > 0 else 64
      lower = max(TRITON_MIN_BLOCK, upper // 2)
      raise ConfigError(
        f"fused_loss impl='pallas' on GPU (Triton) needs {name} a power of two >= {TRITON_MIN_BLOCK}, got {value!r}:"
        f" use {' or '.join(str(c) for c in sorted({lower, upper}))}, or leave it unset for {TRITON_BLOCKS[name]}")

  def fit(want, size):
    return min(want, max(TRITON_MIN_BLOCK, next_power_of_2(size)))

  return dict(block_tokens=fit(block_tokens or TRITON_BLOCKS["block_tokens"], n_tokens),
              block_vocab=fit(block_vocab or TRITON_BLOCKS["block_vocab"], vocab),
              block_d=fit(TRITON_BLOCKS["block_d"], d),
              block_e=fit(TRITON_BLOCKS["block_e"], d_emb or 1))


def tpu_vmem_bytes(device_kind: str | None) -> int:
  """VMEM per TensorCore of the chip named by jax's `device_kind` ("TPU v4", "TPU v5 lite", ...)."""
  return targets.tpu_vmem_bytes(device_kind or "") or TPU_VMEM_UNKNOWN_BYTES


def vmem_block_bytes(rows: int, cols: int, itemsize: int) -> int:
  """VMEM of one (rows, cols) block: Mosaic lays it out in tiles of (8 * 4 / itemsize) sublanes x 128 lanes, so
  a (block_tokens, 1) column takes block_tokens x 128 words."""
  sublanes = 8 * max(1, 4 // itemsize)
  return round_up(rows, sublanes) * round_up(cols, 128) * itemsize


def tpu_kernel_vmem(block_tokens: int, block_vocab: int, d: int, d_emb: int | None, itemsize: int) -> dict[str, int]:
  """Estimated VMEM of each Mosaic fused-loss kernel ("fwd", "dh", "dw", as in pallas_tpu) at these blocks.

  Every input and output block twice (Pallas double-buffers them): hidden (bt, d), head (d, bv), labels (bt, 1),
  EMO's label rows (bt, dE) and cost rows (bv, dE) in the compute dtype; the forward's five (bt, 1) fp32 state
  columns; the backward's per-token columns (lse, coefficients, g_H, g_emo) and its fp32 gradient block, (bt, d)
  or (d, bv). Plus the temporaries (TPU_TILE_TEMPS(_EMO) fp32 tiles, the gradient matmul's fp32 result) and
  TPU_INTERNAL_SCRATCH_BYTES.
  """
  bt, bv = block_tokens, block_vocab
  d_pad = round_up(d, 128)
  col = vmem_block_bytes(bt, 1, 4)
  inputs = vmem_block_bytes(bt, d_pad, itemsize) + vmem_block_bytes(d_pad, bv, itemsize) + col
  n_bwd_cols = 4  # lse, coef_p, coef_y, g_H (an objective without an entropy term has one fewer)
  if d_emb:
    e_pad = round_up(d_emb, 128)
    inputs += vmem_block_bytes(bt, e_pad, itemsize) + vmem_block_bytes(bv, e_pad, itemsize)
    n_bwd_cols += 1  # g_emo
  temps = (TPU_TILE_TEMPS_EMO if d_emb else TPU_TILE_TEMPS) * vmem_block_bytes(bt, bv, 4) + TPU_INTERNAL_SCRATCH_BYTES
  dh_block, dw_block = vmem_block_bytes(bt, d_pad, 4), vmem_block_bytes(d_pad, bv, 4)
  return {
    "fwd": 2 * (inputs + 5 * col) + temps,
    "dh": 2 * (inputs + n_bwd_cols * col + dh_block) + dh_block + temps,
    "dw": 2 * (inputs + n_bwd_cols * col + dw_block) + dw_block + temps,
  }


def tpu_kernel_vmem_bytes(block_tokens: int, block_vocab: int, d: int, d_emb: int | None, itemsize: int) -> int:
  """Estimated VMEM of the largest Mosaic fused-loss kernel at these blocks (tpu_kernel_vmem)."""
  return max(tpu_kernel_vmem(block_tokens, block_vocab, d, d_emb, itemsize).values())


def tpu_vmem_budget(device_kind: str | None) -> int:
  """The VMEM a planned kernel may take on this chip: TPU_VMEM_SAFETY of its VMEM."""
  return int(TPU_VMEM_SAFETY * tpu_vmem_bytes(device_kind))


def tpu_token_choices(n_tokens: int) -> tuple[int, ...]:
  """Token blocks the planner tries: 1024 halving to 8, none larger than N (rounded up to 8)."""
  n_cap = round_up(n_tokens, 8)
  choices, bt = [], TPU_KERNEL_BLOCK_TOKENS
  while bt >= TPU_MIN_BLOCK_TOKENS:
    choices.append(min(bt, n_cap))
    bt //= 2
  return tuple(dict.fromkeys(choices))


def tpu_stream_cost(block_tokens: int, block_vocab: int) -> float:
  """HBM reads of the Mosaic kernels at these blocks, in units of N d V x itemsize bytes: the forward and d-hidden
  kernels read the head once per token block (2 / bt), the d-head kernel the hidden once per vocabulary block."""
  return 2 / block_tokens + 1 / block_vocab


def tpu_kernel_blocks(n_tokens: int, d: int, vocab: int, d_emb: int | None, itemsize: int, block_tokens=None,
                      block_vocab=None, *, device_kind: str | None = None):
  """Blocks of the Mosaic TPU kernel on the chip `device_kind`, and the VMEM limit its kernels compile with.

  Tokens a multiple of 8, vocabulary of 128, d whole. Of the token blocks (1024 halving to 8) x vocabulary blocks
  (TPU_VOCAB_CHOICES) whose estimate (tpu_kernel_vmem_bytes) fits tpu_vmem_budget, the planner takes the one
  that reads least from HBM (tpu_stream_cost; ties: the larger token block); user sizes are only aligned.
  Raises ConfigError where even 8 x 128 blocks do not fit.
  """
  vmem_limit = tpu_vmem_bytes(device_kind)
  block_d = round_up(d, 128)
  n_cap, v_cap = round_up(n_tokens, 8), round_up(vocab, 128)
  if block_tokens is not None or block_vocab is not None:  # the user's sizes, aligned to the vreg
    bt = min(round_up(block_tokens or TPU_KERNEL_BLOCK_TOKENS, 8), n_cap)
    bv = min(round_up(block_vocab or TPU_VOCAB_CHOICES[0], 128), v_cap)
    return dict(block_tokens=bt, block_vocab=bv, block_d=block_d, vmem_limit_bytes=vmem_limit)
  budget = tpu_vmem_budget(device_kind)
  vocab_choices = tuple(dict.fromkeys(min(bv, v_cap) for bv in TPU_VOCAB_CHOICES))
  fitting = [(bt, bv) for bt in tpu_token_choices(n_tokens) for bv in vocab_choices
             if tpu_kernel_vmem_bytes(bt, bv, d, d_emb, itemsize) <= budget]
  if not fitting:
    bt, bv = min(TPU_MIN_BLOCK_TOKENS, n_cap), min(TPU_VOCAB_CHOICES[-1], v_cap)
    need = tpu_kernel_vmem_bytes(bt, bv, d, d_emb, itemsize)
    raise ConfigError(
      f"fused_loss impl='pallas' on {device_kind or 'this TPU'}: even {bt} x {bv} tiles need ~{need / MIB:.1f} MiB "
      f"of VMEM at d={d}, dE={d_emb}, over its {budget / MIB:.1f} MiB budget; use impl='blockwise'")
  bt, bv = min(fitting, key=lambda blocks: (tpu_stream_cost(*blocks), -blocks[0]))
  return dict(block_tokens=bt, block_vocab=bv, block_d=block_d, vmem_limit_bytes=vmem_limit)
