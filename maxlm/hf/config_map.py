"""maxlm's model section <-> a Hugging Face config.json, per family (maxlm.hf.names holds the tensor names)."""

from __future__ import annotations

from typing import Optional

from maxlm.core.config import Config
from maxlm.core.errors import ConversionError
from maxlm.hf import names as hf_names

LLAMA_LIKE = ("llama", "olmo", "olmo2", "qwen2")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation


def rope_parameters(m) -> dict:
  """transformers' rope_parameters (>= 5; rope_scaling in 4.x) of the model section."""
  out = {"rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling, "rope_theta": m.rope_theta}
  if m.rope_scaling != "none":
    out["factor"] = m.rope_factor
  if m.rope_scaling == "llama3":
    out.update(low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor,
               original_max_position_embeddings=m.rope_original_max_positions)
  if m.rotary_fraction != 1.0:
    out["partial_rotary_factor"] = m.rotary_fraction
  return out


def hf_config(cfg: Config, *, dtype: str, bos_id: Optional[int], eos_id: Optional[int]) -> dict:
  m = cfg.model
  names = hf_names.names_of(m.family)
  head_dim = cfg.head_dim
  out = {
      "architectures": [names.architecture],
      "model_type": names.model_type,
      "vocab_size": m.vocab_size,
      "tie_word_embeddings": m.tie_embeddings,
      "initializer_range": m.init_std,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": None,
      "use_cache": True,
      "dtype": dtype,
      "torch_dtype": dtype,
  }
  if m.family in ("gpt2", "gpt_neox", "olmo"):
    if head_dim * m.heads != m.hidden:
      raise ConversionError(f"{names.architecture} needs head_dim = hidden / heads; this model has head_dim "
                            f"{head_dim}, hidden {m.hidden}, heads {m.heads}")
  if m.family in ("gpt2", "gpt_neox") and cfg.kv_heads != m.heads:
    raise ConversionError(f"{names.architecture} has no grouped kv heads (its q, k, v are one fused matrix); this "
                          f"model has kv_heads {cfg.kv_heads} of heads {m.heads}")
  if m.family == "gpt2":
    out.update(n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=m.ffn, n_positions=m.max_positions,
               n_ctx=m.max_positions, activation_function="gelu_new", layer_norm_epsilon=m.norm_eps,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
               scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    return out
  rope = rope_parameters(m)
  legacy_scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
  out.update({
      "hidden_size": m.hidden,
      "intermediate_size": m.ffn,
      "num_hidden_layers": m.layers,
      "num_attention_heads": m.heads,
      "max_position_embeddings": m.max_positions,
      # transformers >= 5 reads rope_parameters, 4.x reads rope_theta and rope_scaling: write both.
      "rope_theta": m.rope_theta,
      "rope_parameters": rope,
      "rope_scaling": legacy_scaling if m.rope_scaling != "none" else None,
      "attention_dropout": 0.0,
  })
  if m.family == "gpt_neox":
    out.update(hidden_act="gelu", layer_norm_eps=m.norm_eps, use_parallel_residual=True, attention_bias=True,
               rotary_pct=m.rotary_fraction, rotary_emb_base=m.rope_theta, hidden_dropout=0.0)
    return out
  out.update(num_key_value_heads=cfg.kv_heads, hidden_act="silu", attention_bias=False)
  if m.family == "olmo":
    out.update(clip_qkv=m.clip_qkv)
  else:
    out.update(head_dim=head_dim, rms_norm_eps=m.norm_eps)
  if m.family == "llama":
    out.update(mlp_bias=False, pretraining_tp=1)
  if m.family == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.layers)
    del out["attention_bias"]
  return out


def _family_of(hf: dict, where: str) -> str:
  archs = hf.get("architectures") or []
  arch = archs[0] if archs else None
  by_type = {n.model_type: f for f, n in hf_names.NAMES.items()}
  family = hf_names.FAMILIES.get(arch) or (by_type.get(hf.get("model_type")) if not arch else None)
  if family is None:
    raise ConversionError(f"{where}: architecture {arch or hf.get('model_type')!r} is not supported; supported: "
                          f"{', '.join(hf_names.FAMILIES)}")
  return family


def model_fields_from_hf(hf: dict, where: str) -> dict:
  """The model.* config values of an HF config.json, refusing features maxlm's model does not implement."""
  family = _family_of(hf, where)
  gpt2 = family == "gpt2"
  get = (lambda key, gpt2_key, default=None: hf.get(gpt2_key, hf.get(key, default))) if gpt2 else \
      (lambda key, _unused, default=None: hf.get(key, default))
  rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  rope_type = rope.get("rope_type") or rope.get("type") or "default"
  unsupported = []
  if not gpt2 and rope_type not in ("default", "linear", "dynamic", "llama3"):
    unsupported.append(f"rope scaling {rope_type!r}")
  act = get("hidden_act", "activation_function", "gelu_new" if gpt2 else "gelu" if family == "gpt_neox" else "silu")
  wanted_act = {"gpt2": GPT2_ACTIVATIONS, "gpt_neox": ("gelu",)}.get(family, ("silu",))
  if act not in wanted_act:
    unsupported.append(f"hidden_act {act!r}")
  if family in ("llama", "olmo", "olmo2"):
    unsupported += [f"{flag} = true" for flag in ("attention_bias", "mlp_bias") if hf.get(flag)]
  if family == "gpt_neox":
    if not hf.get("use_parallel_residual", True):
      unsupported.append("use_parallel_residual = false (maxlm's gpt_neox row is the parallel layout of Pythia)")
    if not hf.get("attention_bias", True):
      unsupported.append("attention_bias = false")
  if gpt2:
    if not hf.get("scale_attn_weights", True):
      unsupported.append("scale_attn_weights = false")
    if hf.get("scale_attn_by_inverse_layer_idx"):
      unsupported.append("scale_attn_by_inverse_layer_idx = true")
    if hf.get("add_cross_attention"):
      unsupported.append("cross-attention")
  if family == "llama" and hf.get("sliding_window"):
    unsupported.append("sliding-window attention")
  if family == "qwen2" and (hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or [])):
    unsupported.append("sliding-window attention")
  if unsupported:
    raise ConversionError(f"{where}: {', '.join(unsupported)} is not supported by maxlm's {family} model")
  try:
    hidden, heads = int(get("hidden_size", "n_embd")), int(get("num_attention_heads", "n_head"))
    fields = {
        "family": family,
        "vocab_size": int(hf["vocab_size"]),
        "hidden": hidden,
        "layers": int(get("num_hidden_layers", "n_layer")),
        "heads": heads,
        "kv_heads": int(hf.get("num_key_value_heads") or heads),
        "ffn": int(get("intermediate_size", "n_inner", None) or 4 * hidden),
        "max_positions": int(get("max_position_embeddings", "n_positions", 2048)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", gpt2)),
        "clip_qkv": float(hf["clip_qkv"]) if family == "olmo" and hf.get("clip_qkv") is not None else None,
    }
    if not gpt2:
      fields["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))))
      fields["rope_scaling"] = "none" if rope_type == "default" else rope_type
      if rope_type != "default":
        fields["rope_factor"] = float(rope["factor"])
      if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_positions=int(rope["original_max_position_embeddings"]))
      default_fraction = 0.25 if family == "gpt_neox" else 1.0
      fields["rotary_fraction"] = float(rope.get("partial_rotary_factor",
                                                 hf.get("rotary_pct", hf.get("partial_rotary_factor",
                                                                             default_fraction))))
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"{where}: missing or invalid field {e}") from None
  if hf.get("initializer_range") is not None:
    fields["init_std"] = float(hf["initializer_range"])  # only matters for layers a user adds later
  head_dim = int(hf.get("head_dim") or hidden // heads)
  fields["head_dim"] = 0 if head_dim * heads == hidden else head_dim
  eps_key = {"gpt2": "layer_norm_epsilon", "gpt_neox": "layer_norm_eps", "olmo": None}.get(family, "rms_norm_eps")
  if eps_key:
    fields["norm_eps"] = float(hf.get(eps_key, 1e-5 if family in ("gpt2", "gpt_neox", "olmo2") else 1e-6))
  return fields
