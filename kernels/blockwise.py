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


def _vma(*xs):
  """Mesh axes the values vary over inside shard_map (empty outside it)."""
  out = frozenset()
  for x in xs:
    if x is not None:
      aval = jax.typeof(x)
      manual = getattr(aval, "manual_axis_type", None)  # jax 0.10+; older versions call it vma
      out |= frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))
  return out


def _varying(x, vma):
  """Casts a fresh loop carry to vary over `vma`, the type the loop body will give it back with."""
  missing = tuple(sorted(vma - _vma(x)))
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
      # HIGHEST as in the reference: the cost must not be blurred by TF32/bf16 passes.
      self.s_TxC = dot(ey_TxE, e_CxE, ((1,), (1,)), precision=lax.Precision.HIGHEST)

  def slice(self, x_N):
    return lax.dynamic_slice_in_dim(x_N, self.t0, self.h_TxD.shape[0])


def _vocab_chunk(cfg, w_DxV, cost_VxE, j):
  bv = cfg.plan.block_vocab
  v0 = cfg.plan.vocab_start(j)
  w_DxC = _slice(w_DxV, v0, bv, axis=1)
  e_CxE = None if cost_VxE is None else unit_rows(lax.dynamic_slice_in_dim(cost_VxE, v0, bv, axis=0))
  return w_DxC, e_CxE


def _rescale_sum_rel(sum_rel, total, m_old, m_new):
  """Moves a running sum of e^{z-m} (z-m) from max m_old to m_new (e^{z-m} sums move by a plain scale)."""
  scale = jnp.exp(m_old - m_new)
  shift = jnp.where(total > 0, m_old - m_new, 0.0)  # m_old = -inf while nothing is summed yet
  return scale * (sum_rel + shift * total), scale


def _forward(cfg: StatsConfig, hidden_NxD, w_DxV, labels_N, cost_VxE):
  plan = cfg.plan
  n, v_local = hidden_NxD.shape[0], w_DxV.shape[1]
  valid_N = labels_N != cfg.ignore_index
  local_labels_N = local_labels(labels_N, cfg.ignore_index, cfg.vocab_axis, v_local)
  ey_NxE = None
  if cost_VxE is not None and cfg.vocab_axis is not None:
    ey_NxE = label_embedding(cost_VxE, local_labels_N, cfg.vocab_axis)

  # Online per-token state, relative to the running max m: l = sum e^{z-m}, a = sum e^{z-m}(z-m)
  # (entropy without cancellation at 1e4-scale logits), b = sum e^{z-m} s, and z_y.
  vma = _vma(hidden_NxD, w_DxV, labels_N, cost_VxE)
  zeros_N = _varying(jnp.zeros((n,), F32), vma)
  state = dict(m=_varying(jnp.full((n,), -jnp.inf, F32), vma), l=zeros_N, a=zeros_N, b=zeros_N, zy=zeros_N)

  def vocab_body(j, state):
    w_DxC, e_CxE = _vocab_chunk(cfg, w_DxV, cost_VxE, j)

    def token_body(i, state):
      tile = _Tile(cfg, hidden_NxD, w_DxV, cost_VxE, ey_NxE, local_labels_N, i, j, w_DxC, e_CxE)
      old = {k: tile.slice(x) for k, x in state.items()}
      z_TxC = jnp.where(tile.col_new_C[None, :], tile.z_TxC, -jnp.inf)
      m_new = jnp.maximum(old["m"], jnp.max(z_TxC, axis=1))
      e_TxC = jnp.exp(z_TxC - m_new[:, None])
      a, scale = _rescale_sum_rel(old["a"], old["l"], old["m"], m_new)
      new = dict(
        m=m_new,
        l=scale * old["l"] + jnp.sum(e_TxC, axis=1),
        a=a + jnp.sum(e_TxC * (tile.z_TxC - m_new[:, None]), axis=1),
        b=old["b"] if tile.s_TxC is None else scale * old["b"] + jnp.sum(e_TxC * tile.s_TxC, axis=1),
        zy=old["zy"] + jnp.sum(jnp.where(tile.onehot_TxC, tile.z_TxC, 0.0), axis=1),
      )
      return {k: lax.dynamic_update_slice_in_dim(state[k], jnp.where(tile.row_new_T, new[k], old[k]), tile.t0, 0)
              for k in state}

    return lax.fori_loop(0, plan.token_chunks, token_body, state)

  state = lax.fori_loop(0, plan.vocab_chunks, vocab_body, state)
  stats, (lse_N, mean_z_N, sum_ps_N) = finalize_stats(state, valid_N, cfg.vocab_axis, cost_VxE is not None)
  residuals = (hidden_NxD, w_DxV, labels_N, cost_VxE, lse_N, mean_z_N, sum_ps_N, stats["p_y"])
  return stats, residuals


def local_labels(labels_N, ignore_index, vocab_axis, v_local):
  """Labels as column indices into this vocabulary shard; -1 where ignored. Sharded, a label owned by
  another shard falls outside [0, v_local) and so matches no column here."""
  offset = 0 if vocab_axis is None else lax.axis_index(vocab_axis) * v_local
  return jnp.where(labels_N != ignore_index, labels_N - offset, -1).astype(jnp.int32)


def finalize_stats(state, valid_N, vocab_axis, with_emo):
  """token_stats from the online state {m, l, a, b, zy} of one vocabulary shard (all impls share this).

  Returns (stats, (lse, sum_v p_v z_v, sum_v p_v s_v)); the last three are backward residuals.
  """
  m, l, a, b, zy = (state[k] for k in ("m", "l", "a", "b", "zy"))
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


def _backward(cfg: StatsConfig, residuals, cts):
  hidden_NxD, w_DxV, labels_N, cost_VxE, lse_N, mean_z_N, sum_ps_N, p_y_N = residuals
  plan = cfg.plan
  (n, d), v_local = hidden_NxD.shape, w_DxV.shape[1]
  valid_N = labels_N != cfg.ignore_index
  local_labels_N = local_labels(labels_N, cfg.ignore_index, cfg.vocab_axis, v_local)
  ey_NxE = None
  if cost_VxE is not None and cfg.vocab_axis is not None:
    ey_NxE = label_embedding(cost_VxE, local_labels_N, cfg.vocab_axis)

  coef_p_N, coef_y_N, g_entropy, g_emo = backward_coefficients(cts, valid_N, mean_z_N, sum_ps_N, p_y_N)
  g = {"entropy": g_entropy, "emo": g_emo}
  use_emo = g_emo is not None
  cost_for_tiles = cost_VxE if use_emo else None
  vma = _vma(hidden_NxD, w_DxV, labels_N, cost_VxE, coef_p_N, g_entropy, g_emo)

  def vocab_body(j, carry):
    dh_NxD, dw_DxV = carry
    w_DxC, e_CxE = _vocab_chunk(cfg, w_DxV, cost_for_tiles, j)

    def token_body(i, carry):
      dh_NxD, dw_DxC = carry
      tile = _Tile(cfg, hidden_NxD, w_DxV, cost_for_tiles, ey_NxE, local_labels_N, i, j, w_DxC, e_CxE)
      p_TxC = jnp.where(tile.col_new_C[None, :], jnp.exp(tile.z_TxC - tile.slice(lse_N)[:, None]), 0.0)
      coef_TxC = tile.slice(coef_p_N)[:, None]
      if g["entropy"] is not None:
        coef_TxC = coef_TxC - tile.slice(g["entropy"])[:, None] * tile.z_TxC
      if use_emo:
        coef_TxC = coef_TxC - tile.slice(g["emo"])[:, None] * tile.s_TxC
      dz_TxC = p_TxC * coef_TxC + jnp.where(tile.onehot_TxC, tile.slice(coef_y_N)[:, None], 0.0)
      # Rows the clamped tail chunk shares with its predecessor were already counted.
      dz_TxC = jnp.where(tile.row_new_T[:, None], dz_TxC, 0.0).astype(hidden_NxD.dtype)
      dh_TxD = lax.dynamic_slice_in_dim(dh_NxD, tile.t0, plan.block_tokens, axis=0)
      dh_TxD = dh_TxD + dot(dz_TxC, w_DxC, ((1,), (1,)))
      dh_NxD = lax.dynamic_update_slice_in_dim(dh_NxD, dh_TxD, tile.t0, axis=0)
      return dh_NxD, dw_DxC + dot(tile.h_TxD, dz_TxC, ((0,), (0,)))

    dw_DxC = _varying(jnp.zeros((d, plan.block_vocab), F32), vma)
    dh_NxD, dw_DxC = lax.fori_loop(0, plan.token_chunks, token_body, (dh_NxD, dw_DxC))
    # The head gradient is written chunk by chunk into the output buffer, never accumulated whole
    # in fp32; columns shared with the previous chunk keep what that chunk wrote.
    v0 = plan.vocab_start(j)
    col_new_C = v0 + jnp.arange(plan.block_vocab) >= j * plan.block_vocab
    old_DxC = _slice(dw_DxV, v0, plan.block_vocab, axis=1)
    dw_DxC = jnp.where(col_new_C[None, :], dw_DxC.astype(dw_DxV.dtype), old_DxC)
    dw_DxV = _update_slice(dw_DxV, dw_DxC, v0, axis=1)
    return dh_NxD, dw_DxV

  carry = (_varying(jnp.zeros((n, d), F32), vma), _varying(jnp.zeros(w_DxV.shape, w_DxV.dtype), vma))
  dh_NxD, dw_DxV = lax.fori_loop(0, plan.vocab_chunks, vocab_body, carry)
  d_labels = np.zeros(labels_N.shape, jax.dtypes.float0)
  # The cost embedding is always under stop-gradient.
  d_cost = None if cost_VxE is None else jnp.zeros_like(cost_VxE)
  return dh_NxD.astype(hidden_NxD.dtype), dw_DxV, d_labels, d_cost


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
                block_vocab=None, vocab_axis=None):
  """maxlm.losses.token_stats of hidden @ w, tile by tile: ce, entropy, p_y, mask (+ emo with cost).

  Differentiable in hidden and w (gradients in their dtypes); cost_VxE is always stop-gradient.
  Entropy is exact (entropy_floor is a reference-only clamp, DESIGN.md section 4). vocab_axis: the
  mesh axis w (d, V/k) and cost (V/k, dE) are sharded over, when called inside shard_map.
  """
  plan = tiling.make_plan(hidden_NxD.shape[0], w_DxV.shape[1], block_tokens=block_tokens,
                          block_vocab=block_vocab)
  cfg = StatsConfig(plan=plan, ignore_index=ignore_index, vocab_axis=vocab_axis)
  if cost_VxE is not None:
    cost_VxE = lax.stop_gradient(cost_VxE)
  return _stats(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE)
