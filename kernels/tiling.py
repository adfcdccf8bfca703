"""The tiling plan every fused-loss implementation shares: block sizes, chunk counts and tail handling.

Blockwise clamps its last tile and masks the overlap (no copies); Pallas pads operands to whole tiles.
"""

from __future__ import annotations

import dataclasses

from maxlm.errors import ConfigError

# Why these defaults: a 1024 x 512 fp32 tile is 2 MB, small next to the 131 MB (d, V) head gradient
# at d=1024, V=32000, yet each tile matmul (1024 x d x 512) is big enough to run near peak on CPU.
DEFAULT_BLOCK_TOKENS = 1024
DEFAULT_BLOCK_VOCAB = 512


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Static tiling of an (N, V) logits matrix into (block_tokens, block_vocab) tiles.

  Blocks are clamped to the array (a block never exceeds N or V). The last chunk of each axis
  starts at `size - block` so that a slice never leaves the array; the rows/columns it shares with
  the previous chunk are masked by `is_new`, so every token and vocabulary entry counts once.
  """
  n_tokens: int
  vocab: int
  block_tokens: int
  block_vocab: int

  @property
  def token_chunks(self) -> int:
    return cdiv(self.n_tokens, self.block_tokens)

  @property
  def vocab_chunks(self) -> int:
    return cdiv(self.vocab, self.block_vocab)

  def token_start(self, i):
    """Start row of token chunk i (traced or static): clamped so the block stays inside N."""
    return _clamped_start(i, self.block_tokens, self.n_tokens)

  def vocab_start(self, j):
    return _clamped_start(j, self.block_vocab, self.vocab)


def _clamped_start(i, block, size):
  import jax.numpy as jnp  # local: tiling arithmetic must also work on Python ints
  if isinstance(i, int):
    return min(i * block, size - block)
  return jnp.minimum(i * block, size - block)


def make_plan(n_tokens: int, vocab: int, *, block_tokens: int | None = None,
              block_vocab: int | None = None) -> TilePlan:
  block_tokens = DEFAULT_BLOCK_TOKENS if block_tokens is None else block_tokens
  block_vocab = DEFAULT_BLOCK_VOCAB if block_vocab is None else block_vocab
  for name, value in (("block_tokens", block_tokens), ("block_vocab", block_vocab)):
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"fused_loss: {name} must be a positive int, got {value!r}")
  if n_tokens < 1 or vocab < 1:
    raise ConfigError(f"fused_loss: need at least one token and one vocabulary entry, got N={n_tokens}, V={vocab}")
  return TilePlan(n_tokens=n_tokens, vocab=vocab, block_tokens=min(block_tokens, n_tokens),
                  block_vocab=min(block_vocab, vocab))


def next_power_of_2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())
