"""Fused output-head losses that never build the (N, V) logits.

Owns `fused_loss` (the trainer's entry) and its implementations: blockwise JAX, Pallas GPU and TPU.
"""

from maxlm.kernels.fused_loss import IMPLS, PALLAS_AUTO_PLATFORMS, fused_loss, resolve_impl

__all__ = ["IMPLS", "PALLAS_AUTO_PLATFORMS", "fused_loss", "resolve_impl"]
