"""maxlm's model section <-> a Hugging Face config.json, per family."""

from __future__ import annotations

from typing import Optional

from maxlm.core.config import Config
from maxlm.core.errors import ConversionError
from maxlm.hf import names as hf_names


def hf_config(cfg: Config, *, dtype: str, bos_id: Optional[int], eos_id: Optional[int]) -> dict:
  m = cfg.model
  if m.family not in hf_names.ARCHITECTURES:
    raise ConversionError(f"model.family {m.family!r} has no HF export; supported: "
                          f"{', '.join(hf_names.ARCHITECTURES)}")
  head_dim = cfg.head_dim
  out = {
      "architectures": [hf_names.ARCHITECTURES[m.family]],
      "model_type": m.family,
      "vocab_size": m.vocab_size,
      "hidden_size": m.hidden,
      "intermediate_size": m.ffn,
      "num_hidden_layers": m.layers,
      "num_attention_heads": m.heads,
      "num_key_value_heads": cfg.kv_heads,
      "max_position_embeddings": m.max_positions,
      # transformers >= 5 reads rope_parameters, 4.x reads rope_theta: write both.
      "rope_theta": m.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
      "rope_scaling": None,
      "hidden_act": "silu",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "tie_word_embeddings": m.tie_embeddings,
      "initializer_range": m.init_std,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": None,
      "use_cache": True,
      "dtype": dtype,
      "torch_dtype": dtype,
  }
  if m.family == "llama":
    out.update(head_dim=head_dim, rms_norm_eps=m.norm_eps, mlp_bias=False, pretraining_tp=1)
  else:
    if head_dim * m.heads != m.hidden:
      raise ConversionError(f"OlmoForCausalLM needs head_dim = hidden / heads; this model has head_dim "
                            f"{head_dim}, hidden {m.hidden}, heads {m.heads}")
    out.update(clip_qkv=m.clip_qkv)
  return out


def model_fields_from_hf(hf: dict, where: str) -> dict:
  """The model.* config values of an HF config.json, refusing features maxlm's model does not implement."""
  archs = hf.get("architectures") or []
  arch = archs[0] if archs else None
  family = hf_names.FAMILIES.get(arch) or (hf.get("model_type") if hf.get("model_type") in hf_names.ARCHITECTURES
                                           and not arch else None)
  if family is None:
    raise ConversionError(f"{where}: architecture {arch or hf.get('model_type')!r} is not supported; supported: "
                          f"{', '.join(hf_names.FAMILIES)}")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  rope_type = rope.get("rope_type") or rope.get("type") or (scaling or {}).get("rope_type") or \
      (scaling or {}).get("type") or "default"
  unsupported = []
  if rope_type != "default":
    unsupported.append(f"rope scaling {rope_type!r}")
  if hf.get("hidden_act", "silu") != "silu":
    unsupported.append(f"hidden_act {hf['hidden_act']!r}")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      unsupported.append(f"{flag} = true")
  if hf.get("sliding_window") and family == "llama":
    unsupported.append("sliding-window attention")
  if unsupported:
    raise ConversionError(f"{where}: {', '.join(unsupported)} is not supported by maxlm's {family} model")
  try:
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    fields = {
        "family": family,
        "vocab_size": int(hf["vocab_size"]),
        "hidden": hidden,
        "layers": int(hf["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(hf.get("num_key_value_heads") or heads),
        "ffn": int(hf["intermediate_size"]),
        "max_positions": int(hf.get("max_position_embeddings", 2048)),
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "clip_qkv": float(hf["clip_qkv"]) if hf.get("clip_qkv") is not None else None,
    }
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"{where}: missing or invalid field {e}") from None
  if hf.get("initializer_range") is not None:
    fields["init_std"] = float(hf["initializer_range"])  # only matters for layers a user adds later
  head_dim = int(hf.get("head_dim") or hidden // heads)
  fields["head_dim"] = 0 if head_dim * heads == hidden else head_dim
  if family == "llama":
    fields["norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
  return fields
