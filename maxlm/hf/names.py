"""Hugging Face names of the model's parameters (LLaMA and OLMo v1 share them) and the one generic mapping
between maxlm's stacked `layers` arrays and HF's per-layer tensors, used by both directions of conversion.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from maxlm.core.errors import ConversionError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "olmo": "OlmoForCausalLM"}
FAMILIES = {arch: family for family, arch in ARCHITECTURES.items()}

# maxlm name -> HF name. Every matrix is (in, out) in maxlm and (out, in) in torch's nn.Linear, so matrices
# transpose and vectors do not; the embedding is (vocab, hidden) on both sides.
TOP = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
LAYER = {
    "attn_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
LAYER_PREFIX = "model.layers.{}."
NOT_TRANSPOSED = {"embed", "final_norm", "attn_norm", "mlp_norm"}
# HF tensors that carry no parameters (buffers some versions saved): skipped on import.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor: where it lives in maxlm's params (`key`, and `layer` within the stacked axis)."""
  hf_name: str
  key: tuple[str, ...]
  layer: int | None
  shape: tuple[int, ...]  # HF shape (out, in for matrices)

  @property
  def transpose(self) -> bool:
    return self.key[-1] not in NOT_TRANSPOSED


def tensors(param_shapes: dict) -> list[Tensor]:
  """The HF tensors of a params tree (shapes only are read), in HF's usual order: embedding, layers, head."""
  out = []

  def hf_shape(name, shape):
    return tuple(shape) if name in NOT_TRANSPOSED else tuple(shape)[::-1]

  if "embed" in param_shapes:
    out.append(Tensor(TOP["embed"], ("embed",), None, hf_shape("embed", param_shapes["embed"].shape)))
  layers = param_shapes.get("layers", {})
  num_layers = next(iter(layers.values())).shape[0] if layers else 0
  unknown = set(layers) - set(LAYER)
  unknown |= set(param_shapes) - set(TOP) - {"layers"}
  if unknown:
    raise ConversionError(f"parameters without an HF name: {sorted(unknown)}; extend maxlm/hf_names.py")
  for i in range(num_layers):
    for name, hf in LAYER.items():
      if name in layers:
        out.append(Tensor(LAYER_PREFIX.format(i) + hf, ("layers", name), i,
                          hf_shape(name, layers[name].shape[1:])))
  for name in ("final_norm", "lm_head"):
    if name in param_shapes:
      out.append(Tensor(TOP[name], (name,), None, hf_shape(name, param_shapes[name].shape)))
  return out


def to_hf(t: Tensor, array: np.ndarray) -> np.ndarray:
  """maxlm layout (one layer's slice) -> HF layout."""
  return np.ascontiguousarray(array.T) if t.transpose else array


def unstack(param_shapes: dict, read: Callable[[Tensor], np.ndarray]) -> Iterator[tuple[Tensor, np.ndarray]]:
  """Yields each HF tensor in HF layout; `read(t)` returns maxlm's slice for `t` (one layer of a stacked array),
  so a caller reading from disk holds one tensor at a time."""
  for t in tensors(param_shapes):
    yield t, to_hf(t, read(t))


def stack(param_shapes: dict, read: Callable[[Tensor], np.ndarray], dtype=np.float32) -> dict:
  """Builds maxlm params from HF tensors: `read(t)` returns the HF tensor named `t.hf_name` (HF layout);
  per-layer tensors land in their slot of the stacked `layers` arrays."""
  params: dict = {}
  for t in tensors(param_shapes):
    array = np.asarray(read(t))
    array = array.T if t.transpose else array
    if t.layer is None:
      params[t.key[0]] = np.array(array, dtype=dtype)
      continue
    layers = params.setdefault("layers", {})
    if t.key[1] not in layers:
      layers[t.key[1]] = np.empty(param_shapes["layers"][t.key[1]].shape, dtype)
    layers[t.key[1]][t.layer] = array
  return params
