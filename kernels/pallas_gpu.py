"""Pallas GPU (Triton backend) kernels of the fused loss: forward online softmax, backward with atomic adds.

Owns the GPU loop structure; the tile math, padding and custom VJP are in pallas_common. An explicit
impl="pallas" option only: jax 0.11 deprecates the Triton backend, and the backward's fp32 atomics (one
per 64 x 128 tile and d chunk) make it slower than the blockwise GPU plan by estimate (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from maxlm.kernels import blockwise
from maxlm.kernels import pallas_common as pc
from maxlm.kernels import tiling

F32 = jnp.float32
DEFAULT_BLOCKS = tiling.TRITON_BLOCKS


def _compiler_params(num_warps=4, num_stages=2):
  from jax.experimental.pallas import triton as plgpu  # GPU-only module: imported when a GPU kernel is built
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _tile_logits(h_ref, w_ref, j, cfg, n_d):
  """z = h[i] @ w[:, j-block] as n_d contraction steps of block_d (h_ref is (bt, D), w_ref (D, V))."""
  bt, bv, bk = cfg.block_tokens, cfg.block_vocab, cfg.block_d

  def body(k, acc):
    h_k = h_ref[:, pl.ds(k * bk, bk)]
    w_k = w_ref[pl.ds(k * bk, bk), pl.ds(j * bv, bv)]
    return acc + blockwise.dot(h_k, w_k, ((1,), (0,)))

  return lax.fori_loop(0, n_d, body, jnp.zeros((bt, bv), F32))


def _similarity(ey_ref, cost_ref, j, cfg):
  """s = e_y . e_v of the (bt, bv) tile in block_e chunks of the (padded) cost width: every loaded block is a
  power of two, as Triton requires. Rows are unit and in the compute dtype already (pallas_common)."""
  bt, bv, be = cfg.block_tokens, cfg.block_vocab, cfg.block_e
  n_e = ey_ref.shape[1] // be

  def body(k, acc):
    ey_k = ey_ref[:, pl.ds(k * be, be)]
    e_k = cost_ref[pl.ds(j * bv, bv), pl.ds(k * be, be)]
    return acc + blockwise.dot(ey_k, e_k, ((1,), (1,)))

  return lax.fori_loop(0, n_e, body, jnp.zeros((bt, bv), F32))


def forward(cfg: pc.KernelConfig, padded: pc.Padded):
  n_pad, d_pad = padded.hidden_NxD.shape
  v_pad = padded.w_DxV.shape[1]
  bt, bv = cfg.block_tokens, cfg.block_vocab
  n_v, n_d = v_pad // bv, d_pad // cfg.block_d
  with_emo = padded.ey_NxE is not None

  def kernel(h_ref, w_ref, y_ref, *refs):
    if with_emo:
      ey_ref, cost_ref, *out_refs = refs
    else:
      ey_ref = cost_ref = None
      out_refs = refs
    y_Tx1 = y_ref[...]

    def vocab_step(j, state):
      z_TxC = _tile_logits(h_ref, w_ref, j, cfg, n_d)
      cols_1xC = j * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
      s_TxC = _similarity(ey_ref, cost_ref, j, cfg) if with_emo else None
      return pc.tile_state_update(state, z_TxC, cols_1xC < padded.v_valid, cols_1xC == y_Tx1, s_TxC)

    zeros = jnp.zeros((bt, 1), F32)
    state = lax.fori_loop(0, n_v, vocab_step, (jnp.full((bt, 1), -jnp.inf, F32), zeros, zeros, zeros, zeros))
    for ref, x in zip(out_refs, state):
      ref[...] = x

  row = lambda cols: pl.BlockSpec((bt, cols), lambda i: (i, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0, 0))
  in_specs = [row(d_pad), whole((d_pad, v_pad)), row(1)]
  args = [padded.hidden_NxD, padded.w_DxV, padded.labels_Nx1]
  if with_emo:
    in_specs += [row(padded.ey_NxE.shape[1]), whole(padded.cost_VxE.shape)]
    args += [padded.ey_NxE, padded.cost_VxE]
  out_shape = [pc.out_struct((n_pad, 1), F32, *args)] * len(pc.STATE_KEYS)
  return pl.pallas_call(
    kernel, out_shape=out_shape, grid=(n_pad // bt,), in_specs=in_specs,
    out_specs=[row(1)] * len(pc.STATE_KEYS), interpret=cfg.interpret,
    compiler_params=None if cfg.interpret else _compiler_params(), name="fused_loss_fwd",
  )(*args)


def backward(cfg: pc.KernelConfig, padded: pc.Padded, lse, coef_p, coef_y, g_h, g_emo):
  """One program per (token block, vocab block) tile: recompute z, form dz, atomically add dz @ w^T into
  d hidden and h^T @ dz into d w (8 N d V FLOPs in all, no (N, V) buffer)."""
  from jax.experimental.pallas import triton as plgpu

  n_pad, d_pad = padded.hidden_NxD.shape
  v_pad = padded.w_DxV.shape[1]
  bt, bv, bk = cfg.block_tokens, cfg.block_vocab, cfg.block_d
  n_d = d_pad // bk
  with_emo = g_emo is not None
  with_h = g_h is not None
  dtype = padded.hidden_NxD.dtype

  def kernel(h_ref, w_ref, y_ref, lse_ref, cp_ref, cy_ref, *refs):
    refs = list(refs)
    gh_ref = refs.pop(0) if with_h else None
    if with_emo:
      ge_ref, ey_ref, cost_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    _, _, dh_ref, dw_ref = refs  # the zero-filled accumulators come in aliased to the outputs
    i, j = pl.program_id(0), pl.program_id(1)
    z_TxC = _tile_logits(h_ref, w_ref, j, cfg, n_d)
    cols_1xC = j * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    s_TxC = _similarity(ey_ref, cost_ref, j, cfg) if with_emo else None
    dz_TxC = pc.tile_dz(z_TxC, cols_1xC < padded.v_valid, cols_1xC == y_ref[...], s_TxC, lse_ref[...],
                        cp_ref[...], cy_ref[...], gh_ref[...] if with_h else None,
                        ge_ref[...] if with_emo else None).astype(dtype)

    def add_chunk(k, carry):
      w_k = w_ref[pl.ds(k * bk, bk), pl.ds(j * bv, bv)]
      h_k = h_ref[:, pl.ds(k * bk, bk)]
      plgpu.atomic_add(dh_ref, (pl.ds(i * bt, bt), pl.ds(k * bk, bk)), blockwise.dot(dz_TxC, w_k, ((1,), (1,))))
      plgpu.atomic_add(dw_ref, (pl.ds(k * bk, bk), pl.ds(j * bv, bv)), blockwise.dot(h_k, dz_TxC, ((0,), (0,))))
      return carry

    lax.fori_loop(0, n_d, add_chunk, 0)

  row = lambda cols: pl.BlockSpec((bt, cols), lambda i, j: (i, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0))
  in_specs = [row(d_pad), whole((d_pad, v_pad)), row(1), row(1), row(1), row(1)]
  args = [padded.hidden_NxD, padded.w_DxV, padded.labels_Nx1, lse, coef_p, coef_y]
  if with_h:
    in_specs.append(row(1))
    args.append(g_h)
  if with_emo:
    in_specs += [row(1), row(padded.ey_NxE.shape[1]), whole(padded.cost_VxE.shape)]
    args += [g_emo, padded.ey_NxE, padded.cost_VxE]
  acc_shapes = [pc.out_struct((n_pad, d_pad), F32, *args), pc.out_struct((d_pad, v_pad), F32, *args)]
  in_specs += [whole(s.shape) for s in acc_shapes]
  vma = blockwise.varying_axes(*args)
  args += [blockwise.mark_varying(jnp.zeros(s.shape, F32), vma) for s in acc_shapes]
  n_in = len(args)
  return pl.pallas_call(
    kernel, out_shape=acc_shapes, grid=(n_pad // bt, v_pad // bv), in_specs=in_specs,
    out_specs=[whole(s.shape) for s in acc_shapes], input_output_aliases={n_in - 2: 0, n_in - 1: 1},
    interpret=cfg.interpret, compiler_params=None if cfg.interpret else _compiler_params(),
    name="fused_loss_bwd",
  )(*args)


stats = pc.make_stats((forward, backward))


def blocks(hidden_shape, w_shape, d_emb, dtype, block_tokens=None, block_vocab=None, *, device_kind=None):
  """Block sizes for these shapes (tiling.triton_blocks: powers of two; others are refused)."""
  del dtype, device_kind  # Triton's tiles depend on neither
  (n, d), v = hidden_shape, w_shape[1]
  return tiling.triton_blocks(n, d, v, d_emb, block_tokens, block_vocab)
