"""LoRA: low-rank adapters (A, B) on chosen projections of a frozen base, as a ParamView over a frozen state entry
(the base, rebuilt from checkpoint.init_from, never saved); the merged weights of a LoRA checkpoint; its PEFT export.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from maxlm import model as model_lib
from maxlm.config import LORA_TARGETS, Config
from maxlm.errors import CheckpointError, ConfigError

BASE = "lora_base"  # the frozen entry holding the base decoder's weights
ADAPTER_DTYPE = jnp.float32  # adapters are tiny: train them in fp32 whatever the base's dtype


def target_names(cfg: Config) -> list[str]:
  """maxlm's projection names of lora.targets: q -> q_proj, ..."""
  return [f"{t}_proj" for t in cfg.lora.targets]


def scale(cfg: Config) -> float:
  return cfg.lora.alpha / cfg.lora.rank


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


# ----------------------------------------------------------------------------- the view


def adapter_shapes(cfg: Config, model_abstract: dict, model_specs: dict) -> tuple[dict, dict]:
  """Abstract adapters {"layers": {name: {"a": (L, in, r), "b": (L, r, out)}}} and their logical PartitionSpecs:
  A shards its input dimension like the base weight's, B its output dimension; the rank dimension is replicated."""
  layers, rank = model_abstract["layers"], cfg.lora.rank
  missing = [n for n in target_names(cfg) if n not in layers]
  if missing:
    raise ConfigError(f"lora.targets {missing} (from {cfg.origin('lora.targets')}) are not projections of this "
                      f"{cfg.model.family} model; it has {', '.join(n[:-5] for n in layers if n.endswith('_proj'))}")
  shapes, specs = {}, {}
  for name in target_names(cfg):
    L, fan_in, fan_out = layers[name].shape
    if rank > min(fan_in, fan_out):
      raise ConfigError(f"lora.rank = {rank} exceeds the {name} projection's smaller side ({fan_in} x {fan_out}); "
                        "lower lora.rank")
    layer_axis, in_axis, out_axis = tuple(model_specs["layers"][name])
    shapes[name] = {"a": jax.ShapeDtypeStruct((L, fan_in, rank), ADAPTER_DTYPE),
                    "b": jax.ShapeDtypeStruct((L, rank, fan_out), ADAPTER_DTYPE)}
    specs[name] = {"a": PartitionSpec(layer_axis, in_axis, None), "b": PartitionSpec(layer_axis, None, out_axis)}
  return {"layers": shapes}, {"layers": specs}


def init_adapters(cfg: Config, params: dict, seed: int) -> dict:
  """Fresh adapters for the base `params` (jittable): A as peft's default (kaiming-uniform with a = sqrt(5), i.e.
  U(-1/sqrt(in), 1/sqrt(in))), B zero, so training starts at exactly the base's function."""
  key = jax.random.key(seed)
  out = {}
  for name in target_names(cfg):
    L, fan_in, fan_out = params["layers"][name].shape
    bound = 1.0 / math.sqrt(fan_in)
    a_key = jax.random.fold_in(key, LORA_TARGETS.index(name[:-5]))
    out[name] = {"a": jax.random.uniform(a_key, (L, fan_in, cfg.lora.rank), ADAPTER_DTYPE, -bound, bound),
                 "b": jnp.zeros((L, cfg.lora.rank, fan_out), ADAPTER_DTYPE)}
  return {"layers": out}


def compose(cfg: Config, adapters: dict, base: dict, rng: Optional[jax.Array] = None) -> dict:
  """The decoder's weights for a forward: the base plus its adapters under model.ADAPTERS (B scaled by alpha / r),
  with per-layer dropout keys when `rng` is given and lora.dropout > 0 (training; evaluation passes none)."""
  s, p = scale(cfg), cfg.lora.dropout
  out = {}
  for name, ab in adapters["layers"].items():
    entry = {"a": ab["a"], "b": ab["b"] * s}
    if rng is not None and p > 0:
      L = ab["a"].shape[0]
      entry["dropout_key"] = jax.random.split(jax.random.fold_in(rng, LORA_TARGETS.index(name[:-5])), L)
      entry["keep"] = jnp.full((L,), 1.0 - p, jnp.float32)
    out[name] = entry
  return {**base, model_lib.ADAPTERS: out}


def view(cfg: Config):
  """The ParamView of a LoRA run: the adapters are trained, the base is the frozen entry BASE."""
  from maxlm.state import ParamView  # pylint: disable=import-outside-toplevel  (state asks this module for it)
  return ParamView(
      trainable=lambda abstract, specs: adapter_shapes(cfg, abstract, specs),
      init_trainable=lambda params, seed: init_adapters(cfg, params, seed),
      model_params=lambda trainable, frozen, rng=None: compose(cfg, trainable, frozen[BASE], rng))


def base_entries(cfg: Config) -> list:
  """The frozen entry BASE: the decoder's weights from checkpoint.init_from, rebuilt from there on resume."""
  from maxlm.frozen import FrozenEntry  # pylint: disable=import-outside-toplevel  (frozen lists this provider)
  if cfg.lora.rank <= 0:
    return []
  _, abstract, specs = model_lib.abstract_model(cfg.model)
  axes = jax.tree.map(tuple, specs, is_leaf=_is_spec)
  source = cfg.checkpoint.init_from
  return [FrozenEntry(BASE, abstract, axes, from_params=lambda params: params, saved=False,
                      source=os.path.abspath(source) if source and "://" not in source else source)]


# ----------------------------------------------------------------------------- merging


def merged_weight(w, a, b, s: float):
  """W + s * A @ B in maxlm's (in, out) layout (numpy or jax, one layer or stacked), computed in fp32, in W's dtype."""
  if isinstance(w, np.ndarray):
    return (w.astype(np.float32) + s * np.matmul(a.astype(np.float32), b.astype(np.float32))).astype(w.dtype)
  return (w.astype(jnp.float32) + s * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))).astype(w.dtype)


def merge(cfg: Config, base: dict, adapters: dict) -> dict:
  """The decoder's weights with the adapters folded in (numpy or jax arrays)."""
  layers = dict(base["layers"])
  for name, ab in adapters["layers"].items():
    layers[name] = merged_weight(layers[name], ab["a"], ab["b"], scale(cfg))
  return {**base, "layers": layers}


def base_path(ckpt, step: int, cfg: Config, where: str) -> str:
  """Where a LoRA checkpoint's base lives: the meta item's sources (written at save time), else init_from."""
  _, meta = ckpt.metadata(step)
  path = (meta.get("sources") or {}).get(BASE) or cfg.checkpoint.init_from
  if not path:
    raise CheckpointError(f"{where} (step {step}) holds LoRA adapters but names no base checkpoint; pass its base "
                          "as checkpoint.init_from in the run's config")
  if "://" not in path and not os.path.exists(os.path.expanduser(path)):
    raise CheckpointError(f"{where} (step {step}) holds LoRA adapters only; its base {path} (the run's "
                          "checkpoint.init_from) is missing. Restore the base there (a LoRA checkpoint cannot be "
                          "read without it), or export with `to-hf --adapter` for the adapters alone")
  return path


def load_merged(ckpt, path: str, step: int, cfg: Config, abstract: Optional[dict]) -> tuple[Config, dict, dict]:
  """checkpoint.load_params of a LoRA checkpoint: (its config with lora.rank = 0, as the weights now are a plain
  decoder; base + merged adapters; frozen entries), the base loaded as any checkpoint (so a base that is itself a
  LoRA checkpoint merges too). With `abstract`, the merge runs sharded like the base; without, on host arrays."""
  from maxlm import checkpoint  # pylint: disable=import-outside-toplevel
  source = base_path(ckpt, step, cfg, path)
  merged_cfg = copy.deepcopy(cfg)
  merged_cfg.lora.rank = 0
  _, base, base_frozen = checkpoint.load_params(source, abstract=abstract)
  saved = ckpt.state_metadata(step).tree
  if "params" not in saved:
    raise CheckpointError(f"checkpoint step {step} under {path} holds no adapters")
  adapters = ckpt.restore_subtree(("params",), step)["params"]
  names = tuple(k for k in saved if k not in checkpoint.TRAINED_KEYS)
  if abstract is not None:
    flat = checkpoint.flat_tree
    names = tuple(k for k in names if k in abstract and not checkpoint.describe_mismatch(flat(abstract[k]),
                                                                                         flat(saved[k])))
    shardings = {k: jax.tree.map(lambda a: a.sharding, abstract[k]) for k in names}
    own = ckpt.restore_subtree(names, step, shardings=shardings) if names else {}
  else:
    own = ckpt.restore_subtree(names, step) if names else {}
  if abstract is None:
    return merged_cfg, merge(cfg, base, adapters), {**base_frozen, **own}
  mesh = jax.tree.leaves(abstract["params"])[0].sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, PartitionSpec())
  adapters = jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: x[i]), adapters)
  out_shardings = jax.tree.map(lambda a: a.sharding, abstract["params"])
  merged = jax.jit(lambda b, a: merge(cfg, b, a), out_shardings=out_shardings)(base, adapters)
  return merged_cfg, merged, {**base_frozen, **own}


class MergedTensors:
  """A LoRA checkpoint's decoder tensors for `to-hf`, one at a time: the base's tensor (read as any checkpoint's)
  plus scale * A[l] @ B[l] on adapted projections. Host memory holds the adapters (megabytes) and one tensor."""

  def __init__(self, adapter_source, base_source, adapters: dict):
    self.config, self.step = adapter_source.config, adapter_source.step
    self.shapes = base_source.shapes
    self.base, self.adapters = base_source, adapters["layers"]

  def read(self, t) -> np.ndarray:
    w = np.asarray(self.base.read(t))
    if t.key[0] == "layers" and t.key[1] in self.adapters:
      ab = self.adapters[t.key[1]]
      w = merged_weight(w, ab["a"][t.layer], ab["b"][t.layer], scale(self.config))
    return w


def read_adapters(checkpoint_path: str, step: Optional[int] = None) -> tuple[Config, int, dict, str]:
  """(config, step, host adapters, base path) of a LoRA checkpoint; a CheckpointError for any other checkpoint."""
  from maxlm import checkpoint  # pylint: disable=import-outside-toplevel
  with checkpoint.open_checkpoints(checkpoint_path) as ckpt:
    step = ckpt.resolve_step(step)
    cfg = ckpt.config(step)
    if cfg.lora.rank <= 0:
      raise CheckpointError(f"{checkpoint_path} (step {step}) is not a LoRA run (lora.rank = 0): it has no adapters "
                            "to export; drop --adapter to export the model")
    adapters = ckpt.restore_subtree(("params",), step)["params"]
    return cfg, step, adapters, base_path(ckpt, step, cfg, checkpoint_path)


# ----------------------------------------------------------------------------- PEFT export


def peft_config(cfg: Config, base: str) -> dict:
  """adapter_config.json of peft's LoraConfig for these adapters (peft scales B A by lora_alpha / r itself)."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
          "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
          "target_modules": target_names(cfg), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
          "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
          "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def peft_base_name(base: str) -> str:
  """adapter_config.json's base_model_name_or_path: the Hugging Face directory a from-hf base was imported from
  (AutoPeftModelForCausalLM loads it), else the maxlm base run (export it with to-hf, then load the adapter onto it)."""
  from maxlm.outputs import HF_IMPORT  # pylint: disable=import-outside-toplevel
  try:
    with open(os.path.join(os.path.expanduser(base), HF_IMPORT.marker)) as f:
      source = json.load(f).get("source")
  except (OSError, ValueError, AttributeError):
    return base
  return source if isinstance(source, str) and os.path.isfile(os.path.join(source, "config.json")) else base


def peft_tensors(adapters: dict) -> dict[str, np.ndarray]:
  """peft's tensor names and torch layouts: lora_A.weight (r, in) = A[l].T, lora_B.weight (out, r) = B[l].T."""
  from maxlm import hf_names  # pylint: disable=import-outside-toplevel
  out = {}
  for name, ab in adapters["layers"].items():
    module = hf_names.LAYER[name][:-len(".weight")]
    for layer in range(ab["a"].shape[0]):
      prefix = "base_model.model." + hf_names.LAYER_PREFIX.format(layer) + module
      out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"][layer], np.float32).T)
      out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"][layer], np.float32).T)
  return out


def export_peft(checkpoint_path: str, output: str, *, step: Optional[int] = None, dtype: str = "float32",
                overwrite: bool = False, log=print) -> str:
  """Writes a LoRA checkpoint's adapters as a PEFT adapter directory (adapter_config.json +
  adapter_model.safetensors) that peft.PeftModel.from_pretrained loads onto the base's HF export."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from maxlm.convert import _np_dtype  # pylint: disable=import-outside-toplevel
  from maxlm.outputs import HF_EXPORT, atomic_output  # pylint: disable=import-outside-toplevel
  cfg, step, adapters, base = read_adapters(checkpoint_path, step)
  tensors = {k: v.astype(_np_dtype(dtype)) for k, v in peft_tensors(adapters).items()}
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
