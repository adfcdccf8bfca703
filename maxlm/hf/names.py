"""Hugging Face names of the model's parameters, one small map per family (Levanter's style), and the one generic
mapping between maxlm's stacked `layers` arrays and HF's per-layer tensors (fused q/k/v included), used by both
directions of conversion.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import numpy as np

from maxlm.core.errors import ConversionError


@dataclasses.dataclass(frozen=True)
class HFNames:
  """One family's HF layout: architecture, model_type, maxlm name -> HF name for the top-level and per-layer
  tensors, and how HF stores matrices: torch nn.Linear (out, in), or GPT-2's Conv1D (in, out) as maxlm does.
  `fused_qkv` names the one HF module holding q, k and v: "concat" stacks them along the output ([q; k; v], GPT-2's
  c_attn), "per_head" interleaves them head by head ([q_0; k_0; v_0; q_1; ...], GPT-NeoX's query_key_value)."""
  architecture: str
  model_type: str
  top: dict
  layer_prefix: str
  layer: dict
  conv1d: bool = False
  fused_qkv: Optional[str] = None  # HF module name (without .weight / .bias)
  fused_layout: str = ""
  ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)  # buffers some versions saved: skipped on import

  def module(self, name: str) -> Optional[str]:
    """The HF module of a maxlm projection (q_proj -> self_attn.q_proj), None where it is fused into another."""
    hf = self.layer.get(name)
    return hf[:-len(".weight")] if hf else None


def _llama_layer(biases=(), qk_norm=False, post_norm=False) -> dict:
  out = {f"{p}_proj": f"self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")}
  out.update({f"{p}_proj": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")})
  out.update({f"{p}_bias": f"self_attn.{p}_proj.bias" for p in biases})
  if post_norm:  # OLMo-2: the norms of the attention and MLP outputs
    out.update(attn_norm="post_attention_layernorm.weight", mlp_norm="post_feedforward_layernorm.weight")
  else:
    out.update(attn_norm="input_layernorm.weight", mlp_norm="post_attention_layernorm.weight")
  if qk_norm:
    out.update(q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight")
  return out


_LLAMA_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}

NAMES: dict[str, HFNames] = {
    "llama": HFNames("LlamaForCausalLM", "llama", _LLAMA_TOP, "model.layers.{}.", _llama_layer()),
    "olmo": HFNames("OlmoForCausalLM", "olmo", _LLAMA_TOP, "model.layers.{}.", _llama_layer()),
    "olmo2": HFNames("Olmo2ForCausalLM", "olmo2", _LLAMA_TOP, "model.layers.{}.",
                     _llama_layer(qk_norm=True, post_norm=True)),
    "qwen2": HFNames("Qwen2ForCausalLM", "qwen2", _LLAMA_TOP, "model.layers.{}.", _llama_layer(biases="qkv")),
    "gpt2": HFNames(
        "GPT2LMHeadModel", "gpt2",
        {"embed": "transformer.wte.weight", "positions": "transformer.wpe.weight",
         "final_norm": "transformer.ln_f.weight", "final_norm_bias": "transformer.ln_f.bias",
         "lm_head": "lm_head.weight"},
        "transformer.h.{}.",
        {"attn_norm": "ln_1.weight", "attn_norm_bias": "ln_1.bias", "o_proj": "attn.c_proj.weight",
         "o_bias": "attn.c_proj.bias", "mlp_norm": "ln_2.weight", "mlp_norm_bias": "ln_2.bias",
         "up_proj": "mlp.c_fc.weight", "up_bias": "mlp.c_fc.bias", "down_proj": "mlp.c_proj.weight",
         "down_bias": "mlp.c_proj.bias"},
        conv1d=True, fused_qkv="attn.c_attn", fused_layout="concat",
        ignored_suffixes=(".attn.bias", ".attn.masked_bias")),
    "gpt_neox": HFNames(
        "GPTNeoXForCausalLM", "gpt_neox",
        {"embed": "gpt_neox.embed_in.weight", "final_norm": "gpt_neox.final_layer_norm.weight",
         "final_norm_bias": "gpt_neox.final_layer_norm.bias", "lm_head": "embed_out.weight"},
        "gpt_neox.layers.{}.",
        {"attn_norm": "input_layernorm.weight", "attn_norm_bias": "input_layernorm.bias",
         "o_proj": "attention.dense.weight", "o_bias": "attention.dense.bias",
         "mlp_norm": "post_attention_layernorm.weight", "mlp_norm_bias": "post_attention_layernorm.bias",
         "up_proj": "mlp.dense_h_to_4h.weight", "up_bias": "mlp.dense_h_to_4h.bias",
         "down_proj": "mlp.dense_4h_to_h.weight", "down_bias": "mlp.dense_4h_to_h.bias"},
        fused_qkv="attention.query_key_value", fused_layout="per_head",
        ignored_suffixes=("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")),
}
ARCHITECTURES = {family: n.architecture for family, n in NAMES.items()}
FAMILIES = {arch: family for family, arch in ARCHITECTURES.items()}
QKV = (("q_proj", "k_proj", "v_proj"), ("q_bias", "k_bias", "v_bias"))


def names_of(family: str) -> HFNames:
  if family not in NAMES:
    raise ConversionError(f"model.family {family!r} has no Hugging Face layout; supported: {', '.join(NAMES)}")
  return NAMES[family]


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor: where it lives in maxlm's params (`key`, and `layer` within the stacked axis). A fused q/k/v
  tensor has `parts`: the three maxlm tensors it holds (their `shape` maxlm's), joined as `fused` says."""
  hf_name: str
  key: tuple[str, ...]
  layer: int | None
  shape: tuple[int, ...]  # HF shape
  transpose: bool = False  # maxlm (in, out) <-> torch Linear (out, in)
  parts: tuple["Tensor", ...] = ()
  fused: str = ""


def _is_matrix(name: str) -> bool:
  return name.endswith("_proj") or name == "lm_head"


def tensors(param_shapes: dict, family: str) -> list[Tensor]:
  """The HF tensors of a params tree (shapes only are read), in HF's usual order: embeddings, layers, final norm,
  head."""
  names = names_of(family)
  out = []

  def one(hf_name, key, layer, shape):
    transpose = _is_matrix(key[-1]) and not (names.conv1d and key[-1] != "lm_head")
    return Tensor(hf_name, key, layer, tuple(shape)[::-1] if transpose else tuple(shape), transpose)

  layers = param_shapes.get("layers", {})
  unknown = set(layers) - set(names.layer) - (set(QKV[0] + QKV[1]) if names.fused_qkv else set())
  unknown |= set(param_shapes) - set(names.top) - {"layers"}
  if unknown:
    raise ConversionError(f"parameters without an HF name in the {family} family: {sorted(unknown)}; extend "
                          "maxlm/hf/names.py")
  for name in ("embed", "positions"):
    if name in param_shapes:
      out.append(one(names.top[name], (name,), None, param_shapes[name].shape))
  num_layers = next(iter(layers.values())).shape[0] if layers else 0
  for i in range(num_layers):
    prefix = names.layer_prefix.format(i)
    if names.fused_qkv:
      for group, suffix in zip(QKV, (".weight", ".bias")):
        if group[0] not in layers:
          continue
        parts = tuple(Tensor(prefix + names.fused_qkv + suffix, ("layers", n), i, tuple(layers[n].shape[1:]))
                      for n in group)
        width = sum(p.shape[-1] for p in parts)
        shape = (width,) if suffix == ".bias" else ((parts[0].shape[0], width) if names.conv1d
                                                    else (width, parts[0].shape[0]))
        out.append(Tensor(prefix + names.fused_qkv + suffix, ("layers", group[0]), i, shape,
                          transpose=suffix == ".weight" and not names.conv1d, parts=parts,
                          fused=names.fused_layout))
    for name, hf in names.layer.items():
      if name in layers:
        out.append(one(prefix + hf, ("layers", name), i, layers[name].shape[1:]))
  for name in ("final_norm", "final_norm_bias", "lm_head"):
    if name in param_shapes:
      out.append(one(names.top[name], (name,), None, param_shapes[name].shape))
  return out


def fuse(t: Tensor, arrays: list[np.ndarray], heads: int) -> np.ndarray:
  """maxlm's q, k, v (one layer, (in, out) or (out,)) -> the fused HF tensor of `t`."""
  if t.fused == "concat":
    joined = np.concatenate(arrays, axis=-1)
  else:  # per head: [q_n; k_n; v_n] for each head n (GPT-NeoX has no grouped kv heads)
    lead = arrays[0].shape[:-1]
    joined = np.stack([a.reshape(*lead, heads, -1) for a in arrays], axis=-2).reshape(*lead, -1)
  return np.ascontiguousarray(joined.T) if t.transpose else joined


def split(t: Tensor, array: np.ndarray, heads: int) -> list[np.ndarray]:
  """The fused HF tensor of `t` -> maxlm's q, k, v in maxlm's layout (the inverse of `fuse`)."""
  array = array.T if t.transpose else array
  if t.fused == "concat":
    bounds = np.cumsum([p.shape[-1] for p in t.parts])[:-1]
    return [np.ascontiguousarray(a) for a in np.split(array, bounds, axis=-1)]
  lead = array.shape[:-1]
  grouped = array.reshape(*lead, heads, 3, -1)
  return [np.ascontiguousarray(grouped[..., j, :].reshape(*lead, -1)) for j in range(3)]


def unstack(param_shapes: dict, family: str, heads: int, read: Callable[[Tensor], np.ndarray]
            ) -> Iterator[tuple[Tensor, np.ndarray]]:
  """Yields each HF tensor in HF layout; `read(t)` returns maxlm's slice for `t` (one layer of a stacked array),
  so a caller reading from disk holds one tensor (three for a fused q/k/v) at a time."""
  for t in tensors(param_shapes, family):
    if t.parts:
      yield t, fuse(t, [np.asarray(read(p)) for p in t.parts], heads)
    else:
      array = np.asarray(read(t))
      yield t, np.ascontiguousarray(array.T) if t.transpose else array


def stack(param_shapes: dict, family: str, heads: int, read: Callable[[Tensor], np.ndarray], dtype=np.float32
          ) -> dict:
  """Builds maxlm params from HF tensors: `read(t)` returns the HF tensor named `t.hf_name` (HF layout);
  per-layer tensors land in their slot of the stacked `layers` arrays, fused q/k/v split into its three."""
  params: dict = {}
  for t in tensors(param_shapes, family):
    array = np.asarray(read(t))
    if t.parts:
      pieces = list(zip(t.parts, split(t, array, heads)))
    else:
      pieces = [(t, array.T if t.transpose else array)]
    for part, piece in pieces:
      if part.layer is None:
        params[part.key[0]] = np.array(piece, dtype=dtype)
        continue
      layers = params.setdefault("layers", {})
      if part.key[1] not in layers:
        layers[part.key[1]] = np.empty(param_shapes["layers"][part.key[1]].shape, dtype)
      layers[part.key[1]][part.layer] = piece
  return params
