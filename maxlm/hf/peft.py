"""A LoRA checkpoint's adapters as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
peft.PeftModel.from_pretrained loads onto the base's Hugging Face export."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from safetensors.numpy import save_file

from maxlm.checkpoint.spec import spec_path
from maxlm.core.config import Config
from maxlm.core.errors import ConversionError
from maxlm.core.outputs import HF_EXPORT, HF_IMPORT, atomic_output
from maxlm.hf import names as hf_names
from maxlm.hf.tensors import np_dtype
from maxlm.state import lora


def peft_config(cfg: Config, base: str) -> dict:
  """adapter_config.json of peft's LoraConfig for these adapters (peft scales B A by lora_alpha / r itself)."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
          "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
          "target_modules": peft_modules(cfg), "bias": "none",
          "fan_in_fan_out": hf_names.names_of(cfg.model.family).conv1d, "use_rslora": False,
          "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
          "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def peft_base_name(base: str) -> str:
  """adapter_config.json's base_model_name_or_path: the Hugging Face directory a from-hf base was imported from
  (AutoPeftModelForCausalLM loads it), else the maxlm base run (export it with to-hf, then load the adapter onto it)."""
  try:
    with open(os.path.join(spec_path(base), HF_IMPORT.marker)) as f:
      source = json.load(f).get("source")
  except (OSError, ValueError, AttributeError):
    return base
  return source if isinstance(source, str) and os.path.isfile(os.path.join(source, "config.json")) else base


def hf_module(family: str, target: str) -> str:
  """The HF module peft adapts for a maxlm projection; a ConversionError for q, k, v of a family whose HF model fuses
  them into one module (GPT-2's c_attn, GPT-NeoX's query_key_value)."""
  names = hf_names.names_of(family)
  module = names.module(target)
  if module is None:
    raise ConversionError(
        f"lora target {target[:-len('_proj')]!r} cannot be written as a PEFT adapter for {names.architecture}: its "
        f"q, k and v are one fused module ({names.fused_qkv}), which peft adapts as a whole with one A and B, while "
        "maxlm trains an adapter per projection. Export merged instead (to-hf without --adapter: exact), or train "
        "LoRA on o, up, down")
  return module


def peft_modules(cfg: Config) -> list[str]:
  """adapter_config.json's target_modules: the HF module names of the adapted projections, their last component
  where that is unambiguous (q_proj), else the path peft matches as a suffix (GPT-2's attn.c_proj beside mlp.c_proj)."""
  names = hf_names.names_of(cfg.model.family)
  every = {hf.rsplit(".", 1)[0] for hf in names.layer.values()}
  modules = [hf_module(cfg.model.family, name) for name in lora.target_names(cfg)]
  last = lambda m: m.rsplit(".", 1)[-1]  # noqa: E731
  return [last(m) if sum(last(o) == last(m) for o in every) == 1 else m for m in modules]


def peft_tensors(adapters: dict, family: str = "llama") -> dict[str, np.ndarray]:
  """peft's tensor names and torch layouts: lora_A.weight (r, in) = A[l].T, lora_B.weight (out, r) = B[l].T (also for
  GPT-2's Conv1D modules, which peft adapts with fan_in_fan_out)."""
  names = hf_names.names_of(family)
  out = {}
  for name, ab in adapters["layers"].items():
    module = hf_module(family, name)
    for layer in range(ab["a"].shape[0]):
      prefix = "base_model.model." + names.layer_prefix.format(layer) + module
      out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"][layer], np.float32).T)
      out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"][layer], np.float32).T)
  return out


def export_peft(checkpoint_path: str, output: str, *, step: Optional[int] = None, dtype: str = "float32",
                overwrite: bool = False, log=print) -> str:
  """Writes a LoRA checkpoint's adapters as a PEFT adapter directory (adapter_config.json +
  adapter_model.safetensors) that peft.PeftModel.from_pretrained loads onto the base's HF export."""
  cfg, step, adapters, base = lora.read_adapters(checkpoint_path, step)
  tensors = {k: v.astype(np_dtype(dtype)) for k, v in peft_tensors(adapters, cfg.model.family).items()}
  with atomic_output(output, HF_EXPORT, overwrite=overwrite) as tmp:
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(peft_config(cfg, peft_base_name(base)), f, indent=2)
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, HF_EXPORT.marker), "w") as f:
      json.dump({"checkpoint": os.path.abspath(checkpoint_path), "step": step, "dtype": dtype, "adapter": True,
                 "base": base}, f, indent=2)
  size = sum(v.nbytes for v in tensors.values())
  log(f"wrote {output}: PEFT LoRA adapter (r={cfg.lora.rank}, alpha={cfg.lora.alpha}, targets "
      f"{','.join(cfg.lora.targets)}), step {step}, {size / 1e6:.2f} MB; load it onto the base's export "
      f"(`maxlm.convert to-hf --checkpoint {base}`) with peft.PeftModel.from_pretrained")
  return os.path.abspath(output)
