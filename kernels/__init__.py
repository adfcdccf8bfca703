"""Fused output-head losses that never build the (N, V) logits, and the attention backends of the model.

Owns `fused_loss` (the trainer's entry), its implementations (blockwise JAX, Pallas GPU and TPU) and their tile
plans per platform (tiling), and `attention` (XLA, cuDNN, splash on TPU).
"""

if __name__ != "maxlm.kernels":  # a bare `import kernels` from the checkout's root
  import maxlm
  maxlm.step_aside(__name__)
else:
  from maxlm.kernels.fused_loss import IMPLS, PALLAS_AUTO_PLATFORMS, fused_loss, resolve_impl

__all__ = ["IMPLS", "PALLAS_AUTO_PLATFORMS", "fused_loss", "resolve_impl"]
