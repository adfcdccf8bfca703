"""Blockwise fused loss: pure JAX, vocabulary- and token-chunked, with a custom VJP that recomputes tiles.

Owns the per-token softmax statistics of hidden @ lm_head (maxlm.losses.token_stats) without the (N, V) logits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from maxlm.kernels import tiling

F32 = jnp.float32
# Statistics a kernel returns, as maxlm.losses.token_stats names them.
DIFF_STATS = ("ce", "entropy", "emo", "p_y")
# The online per-token state of every implementation, relative to the running max m: l = sum e^{z-m},
# a = sum e^{z-m}(z-m) (entropy without cancellation at 1e4-scale logits), b = sum e^{z-m} s, and z_y.
STATE_KEYS = ("m", "l", "a", "b", "zy")


@dataclasses.dataclass(frozen=True)
class StatsConfig:
  """Static options of one blockwise stats computation (hashable: a custom_vjp nondiff argument)."""
  plan: tiling.TilePlan
  ignore_index: int = -100
  # Mesh axis (or axes) the vocabulary is sharded over, inside shard_map; None on one device.
  vocab_axis: Any = None


def dot(a, b, dims, precision=None):
  """dot_general accumulating in fp32 (the kernels' one matmul)."""
  return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=F32)


def similarity(ey_TxE, e_CxE):
  """EMO's s = e_y . e_v in the compute dtype of the unit cost rows e_CxE, accumulated in fp32 (docs/LOSSES.md)."""
  return dot(ey_TxE.astype(e_CxE.dtype), e_CxE, ((1,), (1,)))


def compute_dtype(*xs):
  """The dtype the matmuls of hidden @ lm_head run in: the promotion of both, as `hidden @ lm_head` would."""
  return jnp.result_type(*(x.dtype for x in xs))


def varying_axes(*xs):
  """Mesh axes the values vary over inside shard_map (empty outside it)."""
  out = frozenset()
  for x in xs:
    if x is not None:
      aval = jax.typeof(x)
      manual = getattr(aval, "manual_axis_type", None)  # jax 0.10+; older versions call it vma
      out |= frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))
  return out


def mark_varying(x, vma):
  """Casts a fresh loop carry to vary over `vma`, the type the loop body will give it back with."""
  missing = tuple(sorted(vma - varying_axes(x)))
  if not missing:
    return x
  if hasattr(lax, "pcast"):  # jax >= 0.8
    return lax.pcast(x, missing, to="varying")
  return lax.pvary(x, missing)


def _slice(x, start, size, axis):
  """dynamic_slice that keeps a 16-bit array 16-bit on every backend.

  XLA CPU cannot dynamic-slice bf16/f16 natively: it converts the WHOLE operand to fp32, and that
  convert is loop-invariant, so it is hoisted out of the tile loop as a full fp32 copy of the head.
  Slicing the same bits as uint16 avoids it; the bitcasts are free.
  """
  if x.dtype.itemsize != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)
  bits = lax.dynamic_slice_in_dim(lax.bitcast_convert_type(x, jnp.uint16), start, size, axis=axis)
  return lax.bitcast_convert_type(bits, x.dtype)


def _update_slice(x, update, start, axis):
  """dynamic_update_slice counterpart of `_slice` (same CPU upcast, on the written buffer)."""
  if x.dtype.itemsize != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    return lax.dynamic_update_slice_in_dim(x, update, start, axis=axis)
  bits = lax.dynamic_update_slice_in_dim(lax.bitcast_convert_type(x, jnp.uint16),
                                         lax.bitcast_convert_type(update, jnp.uint16), start, axis=axis)
  return lax.bitcast_convert_type(bits, x.dtype)


def unit_rows(emb_RxE):
  """Rows L2-normalised in fp32, the same guard as maxlm.losses.token_stats (per tile, never a full copy)."""
  emb_RxE = emb_RxE.astype(F32)
  norm_R = jnp.sqrt(jnp.sum(emb_RxE * emb_RxE, axis=-1, keepdims=True))
  return emb_RxE / jnp.maximum(norm_R, jnp.finfo(F32).tiny)


def label_embedding(cost_VxE, local_labels_N, vocab_axis):
  """Unit cost embedding of each token's label, (N, dE).

  With a vocabulary sharded over `vocab_axis`, the label's row lives on one shard: every shard gathers what it
  owns and a psum assembles it. (On one device blockwise gathers rows per token chunk inside the loop instead.)
  """
  v_local = cost_VxE.shape[0]
  owned_N = (local_labels_N >= 0) & (local_labels_N < v_local)
  rows_NxE = jnp.where(owned_N[:, None], cost_VxE[jnp.clip(local_labels_N, 0, v_local - 1)].astype(F32), 0.0)
  if vocab_axis is not None:
    rows_NxE = lax.psum(rows_NxE, vocab_axis)
  return unit_rows(rows_NxE)


def tile_state_update(state, z_TxC, col_ok_1xC, hit_TxC, s_TxC):
  """One tile of the online softmax on (T, 1) state arrays (every implementation's forward step).

  col_ok_1xC: columns that count (None: all); hit_TxC: the label's column (already masked by col_ok).
  """
  m_old, l_old, a_old, b_old, zy_old = state
  z_masked = z_TxC if col_ok_1xC is None else jnp.where(col_ok_1xC, z_TxC, -jnp.inf)
  m_new = jnp.maximum(m_old, jnp.max(z_masked, axis=1, keepdims=True))
  e_TxC = jnp.exp(z_masked - m_new)
  scale = jnp.exp(m_old - m_new)
  shift = jnp.where(l_old > 0, m_old - m_new, 0.0)  # m_old = -inf before the first tile
  l_new = scale * l_old + jnp.sum(e_TxC, axis=1, keepdims=True)
  a_new = scale * (a_old + shift * l_old) + jnp.sum(e_TxC * (z_TxC - m_new), axis=1, keepdims=True)
  b_new = b_old if s_TxC is None else scale * b_old + jnp.sum(e_TxC * s_TxC, axis=1, keepdims=True)
  zy_new = zy_old + jnp.sum(jnp.where(hit_TxC, z_TxC, 0.0), axis=1, keepdims=True)
  return m_new, l_new, a_new, b_new, zy_new


def tile_dz(z_TxC, col_ok_1xC, hit_TxC, s_TxC, lse_Tx1, coef_p_Tx1, coef_y_Tx1, g_h_Tx1, g_emo_Tx1):
  """dL/dz on one tile: p * (coef_p - g_H z - g_emo s) + onehot(y) * coef_y (see backward_coefficients)."""
  p_TxC = jnp.exp(z_TxC - lse_Tx1)
  if col_ok_1xC is not None:
    p_TxC = jnp.where(col_ok_1xC, p_TxC, 0.0)
  coef_TxC = coef_p_Tx1
  if g_h_Tx1 is not None:
    coef_TxC = coef_TxC - g_h_Tx1 * z_TxC
  if g_emo_Tx1 is not None:
    coef_TxC = coef_TxC - g_emo_Tx1 * s_TxC
  return p_TxC * coef_TxC + jnp.where(hit_TxC, coef_y_Tx1, 0.0)


def initial_state(shape, vma):
  """The online state before any tile: m = -inf, sums 0 (each array marked varying over `vma`)."""
  zeros = mark_varying(jnp.zeros(shape, F32), vma)
  return (mark_varying(jnp.full(shape, -jnp.inf, F32), vma), zeros, zeros, zeros, zeros)


# ----------------------------------------------------------------------------- vocab-major order (CPU plan)


class _Tile:
  """One (block_tokens, block_vocab) tile: its logits, masks and EMO similarities, shared by fwd and bwd."""

  def __init__(self, cfg, hidden_NxD, w_DxV, cost_VxE, ey_NxE, local_labels_N, i, j, w_DxC, e_CxE):
    plan = cfg.plan
    bt, bv = plan.block_tokens, plan.block_vocab
    self.t0 = plan.token_start(i)
    self.v0 = plan.vocab_start(j)
    self.h_TxD = _slice(hidden_NxD, self.t0, bt, axis=0)
    self.z_TxC = dot(self.h_TxD, w_DxC, ((1,), (0,)))
    # The clamped last chunk overlaps its predecessor: only rows/columns past i*bt / j*bv are new.
    self.row_new_T = self.t0 + jnp.arange(bt) >= i * bt
    self.col_new_C = self.v0 + jnp.arange(bv) >= j * bv
    self.labels_T = lax.dynamic_slice_in_dim(local_labels_N, self.t0, bt)
    self.onehot_TxC = (self.labels_T[:, None] == self.v0 + jnp.arange(bv)[None, :]) & self.col_new_C[None, :]
    self.s_TxC = None
    if e_CxE is not None:
      if ey_NxE is None:
        v_local = cost_VxE.shape[0]
        ey_TxE = unit_rows(cost_VxE[jnp.clip(self.labels_T, 0, v_local - 1)])
      else:
        ey_TxE = lax.dynamic_slice_in_dim(ey_NxE, self.t0, bt, axis=0)
      self.s_TxC = similarity(ey_TxE, e_CxE)

  def slice(self, x_N):
    return lax.dynamic_slice_in_dim(x_N, self.t0, self.h_TxD.shape[0])


def _vocab_chunk(cfg, w_DxV, cost_VxE, j):
  bv = cfg.plan.block_vocab
  v0 = cfg.plan.vocab_start(j)
  w_DxC = _slice(w_DxV, v0, bv, axis=1)
  e_CxE = None
  if cost_VxE is not None:  # unit rows in the compute dtype, normalised once per vocabulary chunk
    e_CxE = unit_rows(lax.dynamic_slice_in_dim(cost_VxE, v0, bv, axis=0)).astype(w_DxV.dtype)
  return w_DxC, e_CxE


def _rescale_sum_rel(sum_rel, total, m_old, m_new):
  """Moves a running sum of e^{z-m} (z-m) from max m_old to m_new (e^{z-m} sums move by a plain scale)."""
  scale = jnp.exp(m_old - m_new)
  shift = jnp.where(total > 0, m_old - m_new, 0.0)  # m_old = -inf while nothing is summed yet
  return scale * (sum_rel + shift * total), scale


def _sharded_label_embedding(cfg, cost_VxE, local_labels_N):
  if cost_VxE is None or cfg.vocab_axis is None:
    return None
  return label_embedding(cost_VxE, local_labels_N, cfg.vocab_axis)


def _forward_vocab_major(cfg: StatsConfig, hidden_NxD, w_DxV, labels_N, cost_VxE):
  """Online state {m, l, a, b, zy} (N,) each, vocabulary chunks outside, token chunks inside."""
  plan = cfg.plan
  n = hidden_NxD.shape[0]
  local_labels_N = local_labels(labels_N, cfg.ignore_index, cfg.vocab_axis, w_DxV.shape[1])
  ey_NxE = _sharded_label_embedding(cfg, cost_VxE, local_labels_N)
  vma = varying_axes(hidden_NxD, w_DxV, labels_N, cost_VxE)
  state = dict(zip(STATE_KEYS, (x[:, 0] for x in initial_state((n, 1), vma))))

  def vocab_body(j, state):
    w_DxC, e_CxE = _vocab_chunk(cfg, w_DxV, cost_VxE, j)

    def token_body(i, state):
      tile = _Tile(cfg, hidden_NxD, w_DxV, cost_VxE, ey_NxE, local_labels_N, i, j, w_DxC, e_CxE)
      old = {k: tile.slice(x)[:, None] for k, x in state.items()}
      new = tile_state_update(tuple(old[k] for k in STATE_KEYS), tile.z_TxC, tile.col_new_C[None, :],
                              tile.onehot_TxC, tile.s_TxC)
      return {k: lax.dynamic_update_slice_in_dim(state[k], jnp.where(tile.row_new_T, x[:, 0], old[k][:, 0]),
                                                 tile.t0, 0)
              for k, x in zip(STATE_KEYS, new)}

    return lax.fori_loop(0, plan.token_chunks, token_body, state)

  return lax.fori_loop(0, plan.vocab_chunks, vocab_body, state)


def _backward_vocab_major(cfg: StatsConfig, hidden_NxD, w_DxV, labels_N, cost_VxE, per_token):
  """(d hidden fp32, d w): d w written once per vocabulary chunk, d hidden accumulated across them."""
  plan = cfg.plan
  (n, d) = hidden_NxD.shape
  local_labels_N = local_labels(labels_N, cfg.ignore_index, cfg.vocab_axis, w_DxV.shape[1])
  ey_NxE = _sharded_label_embedding(cfg, cost_VxE, local_labels_N)
  vma = varying_axes(hidden_NxD, w_DxV, labels_N, cost_VxE, *per_token.values())

  def vocab_body(j, carry):
    dh_NxD, dw_DxV = carry
    w_DxC, e_CxE = _vocab_chunk(cfg, w_DxV, cost_VxE, j)

    def token_body(i, carry):
      dh_NxD, dw_DxC = carry
      tile = _Tile(cfg, hidden_NxD, w_DxV, cost_VxE, ey_NxE, local_labels_N, i, j, w_DxC, e_CxE)
      col = {k: None if x is None else tile.slice(x)[:, None] for k, x in per_token.items()}
      dz_TxC = tile_dz(tile.z_TxC, tile.col_new_C[None, :], tile.onehot_TxC, tile.s_TxC, col["lse"], col["coef_p"],
                       col["coef_y"], col["g_entropy"], col["g_emo"])
      # Rows the clamped tail chunk shares with its predecessor were already counted.
      dz_TxC = jnp.where(tile.row_new_T[:, None], dz_TxC, 0.0).astype(hidden_NxD.dtype)
      dh_TxD = lax.dynamic_slice_in_dim(dh_NxD, tile.t0, plan.block_tokens, axis=0)
      dh_TxD = dh_TxD + dot(dz_TxC, w_DxC, ((1,), (1,)))
      dh_NxD = lax.dynamic_update_slice_in_dim(dh_NxD, dh_TxD, tile.t0, axis=0)
      return dh_NxD, dw_DxC + dot(tile.h_TxD, dz_TxC, ((0,), (0,)))

    dw_DxC = mark_varying(jnp.zeros((d, plan.block_vocab), F32), vma)
    dh_NxD, dw_DxC = lax.fori_loop(0, plan.token_chunks, token_body, (dh_NxD, dw_DxC))
    # The head gradient is written chunk by chunk into the output buffer, never accumulated whole
    # in fp32; columns shared with the previous chunk keep what that chunk wrote.
    v0 = plan.vocab_start(j)
    col_new_C = v0 + jnp.arange(plan.block_vocab) >= j * plan.block_vocab
    old_DxC = _slice(dw_DxV, v0, plan.block_vocab, axis=1)
    dw_DxC = jnp.where(col_new_C[None, :], dw_DxC.astype(dw_DxV.dtype), old_DxC)
    dw_DxV = _update_slice(dw_DxV, dw_DxC, v0, axis=1)
    return dh_NxD, dw_DxV

  carry = (mark_varying(jnp.zeros((n, d), F32), vma), mark_varying(jnp.zeros(w_DxV.shape, w_DxV.dtype), vma))
  return lax.fori_loop(0, plan.vocab_chunks, vocab_body, carry)


# ----------------------------------------------------------------------------- token-major order (GPU/TPU plans)


class _TokenChunk:
  """Rows [t0, t0 + size) of the tokens (size static), and the tiles of their logits against vocabulary chunks.

  With the whole local vocabulary in one chunk (the GPU plan) a tile is the full (size, V) logits: no column
  mask and no slice of the head, so each matmul is one library call over the whole head.
  """

  def __init__(self, cfg, hidden_NxD, w_DxV, local_labels_N, e_VxE, ey_NxE, t0, size):
    self.cfg, self.w_DxV, self.e_VxE = cfg, w_DxV, e_VxE
    self.t0, self.size = t0, size
    self.h_TxD = _slice(hidden_NxD, t0, size, axis=0)
    self.labels_T = lax.dynamic_slice_in_dim(local_labels_N, t0, size)
    self.ey_TxE = None
    if e_VxE is not None:
      if ey_NxE is None:  # one vocabulary shard: the label's unit row is a gather from this shard's rows
        self.ey_TxE = e_VxE[jnp.clip(self.labels_T, 0, e_VxE.shape[0] - 1)]
      else:
        self.ey_TxE = lax.dynamic_slice_in_dim(ey_NxE, t0, size, axis=0)

  def slice(self, x_N):
    return None if x_N is None else lax.dynamic_slice_in_dim(x_N, self.t0, self.size)[:, None]

  def tile(self, j):
    """(w_DxC, v0, z_TxC, col_ok_1xC or None, hit_TxC, s_TxC or None) of vocabulary chunk j."""
    plan = self.cfg.plan
    if plan.vocab_chunks == 1:
      v0, w_DxC, e_CxE, col_ok_1xC = 0, self.w_DxV, self.e_VxE, None
      cols_1xC = jnp.arange(plan.vocab)[None, :]
    else:
      v0 = plan.vocab_start(j)
      w_DxC = _slice(self.w_DxV, v0, plan.block_vocab, axis=1)
      e_CxE = None if self.e_VxE is None else lax.dynamic_slice_in_dim(self.e_VxE, v0, plan.block_vocab, axis=0)
      cols_1xC = v0 + jnp.arange(plan.block_vocab)[None, :]
      col_ok_1xC = cols_1xC >= j * plan.block_vocab  # the clamped last chunk overlaps its predecessor
    z_TxC = dot(self.h_TxD, w_DxC, ((1,), (0,)))
    hit_TxC = self.labels_T[:, None] == cols_1xC
    if col_ok_1xC is not None:
      hit_TxC = hit_TxC & col_ok_1xC
    s_TxC = None if e_CxE is None else similarity(self.ey_TxE, e_CxE)
    return w_DxC, v0, z_TxC, col_ok_1xC, hit_TxC, s_TxC


def _over_vocab(plan, step, carry):
  """carry after step(j, carry) for every vocabulary chunk j (no loop for a single chunk)."""
  if plan.vocab_chunks == 1:
    return step(0, carry)
  return lax.fori_loop(0, plan.vocab_chunks, step, carry)


def _over_tokens(plan, chunk_fn, carry):
  """carry after chunk_fn(t0, size, carry) over the whole chunks, then over the static tail (if any)."""
  bt = plan.block_tokens
  if plan.full_token_chunks == 1:
    carry = chunk_fn(0, bt, carry)
  elif plan.full_token_chunks > 1:
    carry = lax.fori_loop(0, plan.full_token_chunks, lambda i, c: chunk_fn(i * bt, bt, c), carry)
  if plan.tail_tokens:
    carry = chunk_fn(plan.full_token_chunks * bt, plan.tail_tokens, carry)
  return carry


def _unit_cost(cost_VxE, dtype):
  """The cost rows L2-normalised (fp32 norms) in the compute dtype: once per call, (V, dE) like the input."""
  return None if cost_VxE is None else unit_rows(cost_VxE).astype(dtype)


def _forward_token_major(cfg: StatsConfig, hidden_NxD, w_DxV, labels_N, cost_VxE):
  """Online state {m, l, a, b, zy} (N,) each, token chunks outside: each token's state is written once."""
  plan = cfg.plan
  local_labels_N = local_labels(labels_N, cfg.ignore_index, cfg.vocab_axis, w_DxV.shape[1])
  ey_NxE = _sharded_label_embedding(cfg, cost_VxE, local_labels_N)
  e_VxE = _unit_cost(cost_VxE, w_DxV.dtype)
  vma = varying_axes(hidden_NxD, w_DxV, labels_N, cost_VxE)

  def chunk_fn(t0, size, state):
    chunk = _TokenChunk(cfg, hidden_NxD, w_DxV, local_labels_N, e_VxE, ey_NxE, t0, size)

    def vocab_step(j, local):
      _, _, z_TxC, col_ok_1xC, hit_TxC, s_TxC = chunk.tile(j)
      return tile_state_update(local, z_TxC, col_ok_1xC, hit_TxC, s_TxC)

    local = _over_vocab(plan, vocab_step, initial_state((size, 1), vma))
    return {k: lax.dynamic_update_slice_in_dim(state[k], x[:, 0], t0, 0) for k, x in zip(STATE_KEYS, local)}

  state = dict(zip(STATE_KEYS, (x[:, 0] for x in initial_state((hidden_NxD.shape[0], 1), vma))))
  return _over_tokens(plan, chunk_fn, state)


def _backward_token_major(cfg: StatsConfig, hidden_NxD, w_DxV, labels_N, cost_VxE, per_token):
  """(d hidden, d w fp32): d hidden written once per token chunk, d w accumulated in fp32 across chunks."""
  plan = cfg.plan
  n, d = hidden_NxD.shape
  local_labels_N = local_labels(labels_N, cfg.ignore_index, cfg.vocab_axis, w_DxV.shape[1])
  ey_NxE = _sharded_label_embedding(cfg, cost_VxE, local_labels_N)
  e_VxE = _unit_cost(cost_VxE, w_DxV.dtype)
  vma = varying_axes(hidden_NxD, w_DxV, labels_N, cost_VxE, *per_token.values())

  def chunk_fn(t0, size, carry):
    dh_NxD, dw_DxV = carry
    chunk = _TokenChunk(cfg, hidden_NxD, w_DxV, local_labels_N, e_VxE, ey_NxE, t0, size)
    col = {k: chunk.slice(x) for k, x in per_token.items()}

    def vocab_step(j, inner):
      dh_TxD, dw_DxV = inner
      w_DxC, v0, z_TxC, col_ok_1xC, hit_TxC, s_TxC = chunk.tile(j)
      dz_TxC = tile_dz(z_TxC, col_ok_1xC, hit_TxC, s_TxC, col["lse"], col["coef_p"], col["coef_y"],
                       col["g_entropy"], col["g_emo"]).astype(hidden_NxD.dtype)
      dh_part_TxD = dot(dz_TxC, w_DxC, ((1,), (1,)))
      dw_part_DxC = dot(chunk.h_TxD, dz_TxC, ((0,), (0,)))
      if plan.vocab_chunks == 1:
        return dh_part_TxD, dw_DxV + dw_part_DxC
      # Columns of the clamped last chunk shared with its predecessor have dz = 0: adding them is harmless.
      dw_DxC = lax.dynamic_slice_in_dim(dw_DxV, v0, plan.block_vocab, axis=1) + dw_part_DxC
      return dh_TxD + dh_part_TxD, lax.dynamic_update_slice_in_dim(dw_DxV, dw_DxC, v0, axis=1)

    dh_TxD = None if plan.vocab_chunks == 1 else mark_varying(jnp.zeros((size, d), F32), vma)
    dh_TxD, dw_DxV = _over_vocab(plan, vocab_step, (dh_TxD, dw_DxV))
    return _update_slice(dh_NxD, dh_TxD.astype(hidden_NxD.dtype), t0, axis=0), dw_DxV

  carry = (mark_varying(jnp.zeros((n, d), hidden_NxD.dtype), vma), mark_varying(jnp.zeros(w_DxV.shape, F32), vma))
  return _over_tokens(plan, chunk_fn, carry)


# ----------------------------------------------------------------------------- shared by both orders and Pallas


def local_labels(labels_N, ignore_index, vocab_axis, v_local):
  """Labels as column indices into this vocabulary shard; -1 where ignored. Sharded, a label owned by
  another shard falls outside [0, v_local) and so matches no column here."""
  offset = 0 if vocab_axis is None else lax.axis_index(vocab_axis) * v_local
  return jnp.where(labels_N != ignore_index, labels_N - offset, -1).astype(jnp.int32)


def finalize_stats(state, valid_N, vocab_axis, with_emo):
  """token_stats from the online state {m, l, a, b, zy} of one vocabulary shard (all impls share this).

  Returns (stats, (lse, sum_v p_v z_v, sum_v p_v s_v)); the last three are backward residuals.
  """
  m, l, a, b, zy = (state[k] for k in STATE_KEYS)
  if vocab_axis is not None:
    # Each shard summed its own vocabulary slice: bring every shard to the global max, then add.
    m_all = lax.pmax(m, vocab_axis)
    a, scale = _rescale_sum_rel(a, l, m, m_all)
    a, l, b, zy = (lax.psum(x, vocab_axis) for x in (a, scale * l, scale * b, zy))
    m = m_all
  log_l = jnp.log(l)
  lse_N = m + log_l
  mean_z_N = m + a / l  # sum_v p_v z_v
  ce_N = jnp.where(valid_N, lse_N - zy, 0.0)
  stats = {
    "ce": ce_N,
    "entropy": log_l - a / l,
    "p_y": jnp.exp(-ce_N),
    "mask": valid_N.astype(F32),
  }
  sum_ps_N = None
  if with_emo:
    sum_ps_N = b / l
    stats["emo"] = jnp.where(valid_N, 1.0 - sum_ps_N, 0.0)
  return stats, (lse_N, mean_z_N, sum_ps_N)


def backward_coefficients(cts, valid_N, mean_z_N, sum_ps_N, p_y_N):
  """Per-token terms of dL/dz = p * (coef_p - g_H z - g_emo s) + onehot(y) * coef_y (all impls share this).

  From dCE/dz = p - onehot, dH/dz = -p (z - sum p z), demo/dz = -p (s - sum p s),
  dp_y/dz = p_y (onehot - p). Zero cotangents (SymbolicZero or absent) drop their term: returns
  (coef_p, coef_y, g_entropy or None, g_emo or None).
  """
  g = {k: (None if isinstance(cts.get(k), SymbolicZero) or cts.get(k) is None else cts[k].astype(F32))
       for k in DIFF_STATS}
  # ce, emo and p_y are defined as 0 / 1 at ignored tokens: no gradient flows there.
  for k in ("ce", "emo", "p_y"):
    if g[k] is not None:
      g[k] = jnp.where(valid_N, g[k], 0.0)
  if sum_ps_N is None:
    g["emo"] = None
  coef_p_N = jnp.zeros(valid_N.shape, F32)
  coef_y_N = jnp.zeros(valid_N.shape, F32)
  if g["ce"] is not None:
    coef_p_N, coef_y_N = coef_p_N + g["ce"], coef_y_N - g["ce"]
  if g["entropy"] is not None:
    coef_p_N = coef_p_N + g["entropy"] * mean_z_N
  if g["emo"] is not None:
    coef_p_N = coef_p_N + g["emo"] * sum_ps_N
  if g["p_y"] is not None:
    coef_p_N, coef_y_N = coef_p_N - g["p_y"] * p_y_N, coef_y_N + g["p_y"] * p_y_N
  return coef_p_N, coef_y_N, g["entropy"], g["emo"]


def _forward(cfg: StatsConfig, hidden_NxD, w_DxV, labels_N, cost_VxE):
  order_forward = _forward_token_major if cfg.plan.order == tiling.TOKEN_MAJOR else _forward_vocab_major
  state = order_forward(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE)
  valid_N = labels_N != cfg.ignore_index
  stats, (lse_N, mean_z_N, sum_ps_N) = finalize_stats(state, valid_N, cfg.vocab_axis, cost_VxE is not None)
  residuals = (hidden_NxD, w_DxV, labels_N, cost_VxE, lse_N, mean_z_N, sum_ps_N, stats["p_y"])
  return stats, residuals


def _backward(cfg: StatsConfig, residuals, cts):
  hidden_NxD, w_DxV, labels_N, cost_VxE, lse_N, mean_z_N, sum_ps_N, p_y_N = residuals
  valid_N = labels_N != cfg.ignore_index
  coef_p_N, coef_y_N, g_entropy, g_emo = backward_coefficients(cts, valid_N, mean_z_N, sum_ps_N, p_y_N)
  per_token = dict(lse=lse_N, coef_p=coef_p_N, coef_y=coef_y_N, g_entropy=g_entropy, g_emo=g_emo)
  cost_for_tiles = cost_VxE if g_emo is not None else None
  order_backward = _backward_token_major if cfg.plan.order == tiling.TOKEN_MAJOR else _backward_vocab_major
  dh_NxD, dw_DxV = order_backward(cfg, hidden_NxD, w_DxV, labels_N, cost_for_tiles, per_token)
  d_labels = np.zeros(labels_N.shape, jax.dtypes.float0)
  # The cost embedding is always under stop-gradient.
  d_cost = None if cost_VxE is None else jnp.zeros_like(cost_VxE)
  return dh_NxD.astype(hidden_NxD.dtype), dw_DxV.astype(w_DxV.dtype), d_labels, d_cost


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE):
  return _forward(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE)[0]


def _stats_fwd(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE):
  args = jax.tree.map(lambda x: x.value, (hidden_NxD, w_DxV, labels_N, cost_VxE),
                      is_leaf=lambda x: isinstance(x, CustomVJPPrimal))
  return _forward(cfg, *args)


def _stats_bwd(cfg, residuals, cts):
  return _backward(cfg, residuals, cts)


_stats.defvjp(_stats_fwd, _stats_bwd, symbolic_zeros=True)


def token_stats(hidden_NxD, w_DxV, labels_N, cost_VxE=None, *, ignore_index=-100, block_tokens=None,
                block_vocab=None, vocab_axis=None, platform=None):
  """maxlm.losses.token_stats of hidden @ w, tile by tile: ce, entropy, p_y, mask (+ emo with cost).

  Differentiable in hidden and w (gradients in their dtypes); cost_VxE is always stop-gradient. The matmuls
  run in the promotion of hidden's and w's dtypes with fp32 accumulation, EMO's similarities too; softmax,
  logs and sums are fp32. Entropy is exact (entropy_floor is a reference-only clamp, docs/LOSSES.md).
  platform: whose tile plan to use ("cpu" | "gpu" | "tpu"; default: the default backend's), and
  block_tokens / block_vocab override its sizes. vocab_axis: the mesh axis w (d, V/k) and cost (V/k, dE) are
  sharded over, when called inside shard_map.
  """
  plan = tiling.make_plan(hidden_NxD.shape[0], w_DxV.shape[1], platform=platform or jax.default_backend(),
                          block_tokens=block_tokens, block_vocab=block_vocab)
  cfg = StatsConfig(plan=plan, ignore_index=ignore_index, vocab_axis=vocab_axis)
  dtype = compute_dtype(hidden_NxD, w_DxV)
  if cost_VxE is not None:
    cost_VxE = lax.stop_gradient(cost_VxE)
  return _stats(cfg, hidden_NxD.astype(dtype), w_DxV.astype(dtype), labels_N, cost_VxE)
