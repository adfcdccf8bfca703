"""What the Pallas GPU and TPU fused-loss kernels share: padding to the tile plan, tile math, the custom VJP.

Owns the per-tile online-softmax update and dz formula (the same algebra as blockwise) and the glue around kernels;
it knows no backend (fused_loss picks the kernel module for a platform).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal

from maxlm.kernels import blockwise

F32 = jnp.float32
STATE_KEYS = blockwise.STATE_KEYS


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static description of one fused-loss kernel launch (a custom_vjp nondiff argument)."""
  backend: str  # "gpu" | "tpu"
  block_tokens: int
  block_vocab: int
  block_d: int  # contraction chunk: the (bt, d) x (d, bv) tile matmul runs as d / block_d steps
  block_e: int  # EMO's cost width is padded to a multiple of this (Triton: its contraction chunk)
  ignore_index: int
  vocab_axis: Any
  interpret: Any  # False, or the interpret flag/params pallas_call takes
  vmem_limit_bytes: int | None = None  # Mosaic: the chip's VMEM (tiling.tpu_vmem_bytes); Triton: None


tile_state_update = blockwise.tile_state_update
tile_dz = blockwise.tile_dz


def pad_to(x, axis, multiple):
  pad = (-x.shape[axis]) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


@dataclasses.dataclass
class Padded:
  """Operands padded to whole tiles (zeros; padded labels are -1, padded columns masked by v_valid)."""
  hidden_NxD: jax.Array
  w_DxV: jax.Array
  labels_Nx1: jax.Array  # local column of the label, -1 where ignored or on another shard
  ey_NxE: jax.Array | None  # unit cost embedding of each label, compute dtype (EMO only)
  cost_VxE: jax.Array | None  # unit cost rows, compute dtype: kernels take them as they are
  n: int
  v_valid: int


def pad_operands(cfg: KernelConfig, hidden_NxD, w_DxV, labels_N, cost_VxE) -> Padded:
  """Pads every operand to whole tiles; hidden and w must share their dtype (fused_loss casts them)."""
  if hidden_NxD.dtype != w_DxV.dtype:
    raise ValueError(f"Pallas fused loss needs hidden and lm_head in one dtype, got {hidden_NxD.dtype} and "
                     f"{w_DxV.dtype} (fused_loss casts both to their promotion)")
  n, v_local = hidden_NxD.shape[0], w_DxV.shape[1]
  dtype = hidden_NxD.dtype
  local_N = blockwise.local_labels(labels_N, cfg.ignore_index, cfg.vocab_axis, v_local)
  ey_NxE = None
  if cost_VxE is not None:
    # Rows are normalised once here in fp32, then cast to the compute dtype: the similarity matmul runs in
    # it with fp32 accumulation (docs/LOSSES.md). The label's row is gathered once per call ((N, dE), not
    # per tile): a gather inside a kernel is not portable across Triton and Mosaic. The width is padded with
    # zeros to a multiple of block_e (Triton tiles are powers of two; 768 -> 12 chunks of 64).
    ey_NxE = blockwise.label_embedding(cost_VxE, local_N, cfg.vocab_axis).astype(dtype)
    ey_NxE = pad_to(pad_to(ey_NxE, 0, cfg.block_tokens), 1, cfg.block_e)
    cost_VxE = pad_to(pad_to(blockwise.unit_rows(cost_VxE).astype(dtype), 0, cfg.block_vocab), 1, cfg.block_e)
  # Padding the head copies it; choose block_vocab dividing V (32000 = 250 x 128) to avoid that.
  hidden_NxD = pad_to(pad_to(hidden_NxD, 0, cfg.block_tokens), 1, cfg.block_d)
  w_DxV = pad_to(pad_to(w_DxV, 0, cfg.block_d), 1, cfg.block_vocab)
  labels_Nx1 = pad_to(local_N + 1, 0, cfg.block_tokens)[:, None] - 1
  return Padded(hidden_NxD, w_DxV, labels_Nx1, ey_NxE, cost_VxE, n, v_local)


# A backend supplies forward(cfg, padded) -> (m, l, a, b, zy) each (N_pad, 1) fp32, and
# backward(cfg, padded, lse, coef_p, coef_y, g_h, g_emo) -> (d hidden (N_pad, D_pad) fp32, d w (D_pad, V_pad) fp32).
Backend = tuple[Callable[..., Any], Callable[..., Any]]


def make_stats(backend_impl: Backend):
  """token_stats with a custom VJP whose forward and backward are the backend's kernels."""
  forward_kernel, backward_kernel = backend_impl

  def forward(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE):
    padded = pad_operands(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE)
    raw = forward_kernel(cfg, padded)
    state = {k: x[:padded.n, 0] for k, x in zip(STATE_KEYS, raw)}
    valid_N = labels_N != cfg.ignore_index
    stats, (lse_N, mean_z_N, sum_ps_N) = blockwise.finalize_stats(state, valid_N, cfg.vocab_axis,
                                                                   cost_VxE is not None)
    return stats, (hidden_NxD, w_DxV, labels_N, cost_VxE, lse_N, mean_z_N, sum_ps_N, stats["p_y"])

  def backward(cfg, residuals, cts):
    hidden_NxD, w_DxV, labels_N, cost_VxE, lse_N, mean_z_N, sum_ps_N, p_y_N = residuals
    valid_N = labels_N != cfg.ignore_index
    coef_p, coef_y, g_h, g_emo = blockwise.backward_coefficients(cts, valid_N, mean_z_N, sum_ps_N, p_y_N)
    padded = pad_operands(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE if g_emo is not None else None)
    col = lambda x: None if x is None else pad_to(x, 0, cfg.block_tokens)[:, None]
    dh_NxD, dw_DxV = backward_kernel(cfg, padded, col(lse_N), col(coef_p), col(coef_y), col(g_h), col(g_emo))
    n, d = hidden_NxD.shape
    dh_NxD = dh_NxD[:n, :d].astype(hidden_NxD.dtype)
    dw_DxV = dw_DxV[:d, :w_DxV.shape[1]].astype(w_DxV.dtype)
    d_cost = None if cost_VxE is None else jnp.zeros_like(cost_VxE)
    return dh_NxD, dw_DxV, np.zeros(labels_N.shape, jax.dtypes.float0), d_cost

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def stats(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE):
    return forward(cfg, hidden_NxD, w_DxV, labels_N, cost_VxE)[0]

  def stats_fwd(cfg, *args):
    args = jax.tree.map(lambda x: x.value, args, is_leaf=lambda x: isinstance(x, CustomVJPPrimal))
    return forward(cfg, *args)

  stats.defvjp(stats_fwd, backward, symbolic_zeros=True)
  return stats


def out_struct(shape, dtype, *like):
  """ShapeDtypeStruct for a kernel output; inside shard_map it varies over the mesh axes its inputs vary over."""
  vma = blockwise.varying_axes(*like)
  if not vma:
    return jax.ShapeDtypeStruct(shape, dtype)
  aval = jax.typeof(blockwise.mark_varying(jnp.zeros((), dtype), vma))
  if getattr(aval, "manual_axis_type", None) is not None:  # jax 0.10+
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.manual_axis_type)
  return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
