"""Pallas TPU (Mosaic) kernels of the fused loss: grid-sequential online softmax, two-kernel backward.

Owns the TPU loop structure (reductions as "arbitrary" grid axes, no atomics); tile math and VJP are in pallas_common.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from maxlm.kernels import blockwise
from maxlm.kernels import pallas_common as pc
from maxlm.kernels import tiling

F32 = jnp.float32


def _compiler_params(cfg, semantics):
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=cfg.vmem_limit_bytes)


def blocks(hidden_shape, w_shape, d_emb, dtype, block_tokens=None, block_vocab=None, *, device_kind=None):
  """Block sizes and VMEM limit for these shapes on the chip `device_kind` (tiling.tpu_kernel_blocks: token blocks
  of up to 1024, vocabulary blocks of a multiple of 128 lanes, both sized to its VMEM); EMO's cost width pads to
  whole 128-lane vregs."""
  (n, d), v = hidden_shape, w_shape[1]
  plan = tiling.tpu_kernel_blocks(n, d, v, d_emb, jnp.dtype(dtype).itemsize, block_tokens, block_vocab,
                                  device_kind=device_kind)
  return dict(plan, block_e=128)


def _tile(cfg, padded, h_ref, w_ref, y_ref, ey_ref, cost_ref, j):
  """Logits, column mask, label hits and EMO similarities of the current (token block, vocab block j)."""
  bv = cfg.block_vocab
  z_TxC = blockwise.dot(h_ref[...], w_ref[...], ((1,), (0,)))
  cols_1xC = j * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
  # Rows are unit and in the compute dtype already (pallas_common): the similarity is one MXU matmul.
  s_TxC = None if ey_ref is None else blockwise.similarity(ey_ref[...], cost_ref[...])
  return z_TxC, cols_1xC < padded.v_valid, cols_1xC == y_ref[...], s_TxC


def _specs(cfg, padded, token_axis, vocab_axis, with_emo):
  """BlockSpecs of (h, w, labels, [ey, cost]) for a grid whose token/vocab block ids sit at these axes."""
  bt, bv = cfg.block_tokens, cfg.block_vocab
  d_pad = padded.hidden_NxD.shape[1]

  def at(fn):
    return lambda *ids: fn(ids[token_axis], ids[vocab_axis])

  specs = [pl.BlockSpec((bt, d_pad), at(lambda i, j: (i, 0))), pl.BlockSpec((d_pad, bv), at(lambda i, j: (0, j))),
           pl.BlockSpec((bt, 1), at(lambda i, j: (i, 0)))]
  args = [padded.hidden_NxD, padded.w_DxV, padded.labels_Nx1]
  if with_emo:
    d_emb = padded.ey_NxE.shape[1]
    specs += [pl.BlockSpec((bt, d_emb), at(lambda i, j: (i, 0))), pl.BlockSpec((bv, d_emb), at(lambda i, j: (j, 0)))]
    args += [padded.ey_NxE, padded.cost_VxE]
  token_col = pl.BlockSpec((bt, 1), at(lambda i, j: (i, 0)))
  return specs, args, token_col


def forward(cfg: pc.KernelConfig, padded: pc.Padded):
  n_pad = padded.hidden_NxD.shape[0]
  v_pad = padded.w_DxV.shape[1]
  with_emo = padded.ey_NxE is not None
  in_specs, args, token_col = _specs(cfg, padded, 0, 1, with_emo)

  def kernel(h_ref, w_ref, y_ref, *refs):
    ey_ref, cost_ref = (refs[0], refs[1]) if with_emo else (None, None)
    out_refs = refs[2:] if with_emo else refs
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
      out_refs[0][...] = jnp.full(out_refs[0].shape, -jnp.inf, F32)
      for ref in out_refs[1:]:
        ref[...] = jnp.zeros(ref.shape, F32)

    z_TxC, col_ok, hit, s_TxC = _tile(cfg, padded, h_ref, w_ref, y_ref, ey_ref, cost_ref, j)
    state = pc.tile_state_update(tuple(ref[...] for ref in out_refs), z_TxC, col_ok, hit, s_TxC)
    for ref, x in zip(out_refs, state):
      ref[...] = x

  out_shape = [pc.out_struct((n_pad, 1), F32, *args)] * len(pc.STATE_KEYS)
  return pl.pallas_call(
    kernel, out_shape=out_shape, grid=(n_pad // cfg.block_tokens, v_pad // cfg.block_vocab), in_specs=in_specs,
    out_specs=[token_col] * len(pc.STATE_KEYS), interpret=cfg.interpret, name="fused_loss_fwd",
    compiler_params=None if cfg.interpret else _compiler_params(cfg, ("parallel", "arbitrary")),
  )(*args)


def backward(cfg: pc.KernelConfig, padded: pc.Padded, lse, coef_p, coef_y, g_h, g_emo):
  """Two kernels (TPU has no atomics): d hidden reduces over vocabulary blocks, d w over token blocks.

  Each recomputes the tile logits: 10 N d V FLOPs in all against 8 for the GPU kernel.
  """
  n_pad, d_pad = padded.hidden_NxD.shape
  v_pad = padded.w_DxV.shape[1]
  bt, bv = cfg.block_tokens, cfg.block_vocab
  with_emo, with_h = g_emo is not None, g_h is not None
  dtype = padded.hidden_NxD.dtype
  token_cols = [lse, coef_p, coef_y] + ([g_h] if with_h else []) + ([g_emo] if with_emo else [])
  all_inputs = [padded.hidden_NxD, padded.w_DxV, padded.labels_Nx1, padded.ey_NxE, *token_cols]

  def make_kernel(vocab_axis, accumulate):
    def kernel(h_ref, w_ref, y_ref, *refs):
      refs = list(refs)
      ey_ref, cost_ref = (refs.pop(0), refs.pop(0)) if with_emo else (None, None)
      lse_ref, cp_ref, cy_ref = refs.pop(0), refs.pop(0), refs.pop(0)
      gh_ref = refs.pop(0) if with_h else None
      ge_ref = refs.pop(0) if with_emo else None
      (out_ref,) = refs

      @pl.when(pl.program_id(1) == 0)  # grid axis 1 is the reduction in both kernels
      def _():
        out_ref[...] = jnp.zeros(out_ref.shape, F32)

      j = pl.program_id(vocab_axis)
      z_TxC, col_ok, hit, s_TxC = _tile(cfg, padded, h_ref, w_ref, y_ref, ey_ref, cost_ref, j)
      dz_TxC = pc.tile_dz(z_TxC, col_ok, hit, s_TxC, lse_ref[...], cp_ref[...], cy_ref[...],
                          gh_ref[...] if with_h else None, ge_ref[...] if with_emo else None).astype(dtype)
      out_ref[...] += accumulate(h_ref[...], w_ref[...], dz_TxC)
    return kernel

  def run(name, grid, token_axis, vocab_axis, out_spec, out_shape, accumulate):
    in_specs, args, token_col = _specs(cfg, padded, token_axis, vocab_axis, with_emo)
    in_specs += [token_col] * len(token_cols)
    return pl.pallas_call(
      make_kernel(vocab_axis, accumulate), out_shape=out_shape, grid=grid,
      in_specs=in_specs, out_specs=out_spec, interpret=cfg.interpret, name=f"fused_loss_bwd_{name}",
      compiler_params=None if cfg.interpret else _compiler_params(cfg, ("parallel", "arbitrary")),
    )(*args, *token_cols)

  # d hidden: grid (token block, vocab block), reducing over the vocabulary (axis 1).
  dh = run("dh", (n_pad // bt, v_pad // bv), 0, 1, pl.BlockSpec((bt, d_pad), lambda i, j: (i, 0)),
           pc.out_struct((n_pad, d_pad), F32, *all_inputs), lambda h, w, dz: blockwise.dot(dz, w, ((1,), (1,))))
  # d w: grid (vocab block, token block), reducing over tokens (axis 1).
  dw = run("dw", (v_pad // bv, n_pad // bt), 1, 0, pl.BlockSpec((d_pad, bv), lambda j, i: (0, j)),
           pc.out_struct((d_pad, v_pad), F32, *all_inputs), lambda h, w, dz: blockwise.dot(h, dz, ((0,), (0,))))
  return dh, dw


stats = pc.make_stats((forward, backward))
