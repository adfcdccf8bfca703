"""LoRA: low-rank adapters (A, B) on chosen projections of a frozen base, as a ParamView over a frozen state entry
(the base, rebuilt from checkpoint.init_from, never saved), and the merge W + alpha/r A B. Reading a LoRA checkpoint
merged is maxlm.pretrained's; its PEFT export is maxlm.hf.peft's.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from maxlm import model as model_lib
from maxlm.core.config import LORA_TARGETS, Config
from maxlm.checkpoint.params import check_pin, open_checkpoints
from maxlm.checkpoint.spec import split_spec
from maxlm.core.errors import CheckpointError, ConfigError
from maxlm.state.frozen import FrozenEntry
from maxlm.state.views import ParamView

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
                      f"{cfg.model.family} model; it has "
                      f"{', '.join(n[:-5] for n in model_lib.family_of(cfg.model).projections)}")
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
  return ParamView(
      trainable=lambda abstract, specs: adapter_shapes(cfg, abstract, specs),
      init_trainable=lambda params, seed: init_adapters(cfg, params, seed),
      model_params=lambda trainable, frozen, rng=None: compose(cfg, trainable, frozen[BASE], rng))


def base_entries(cfg: Config) -> list:
  """The frozen entry BASE: the decoder's weights from checkpoint.init_from, rebuilt from there on resume."""
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


# ----------------------------------------------------------------------------- LoRA checkpoints


def base_path(ckpt, step: int, cfg: Config, where: str) -> str:
  """The base a LoRA checkpoint's adapters were trained on, as a spec: `PATH@STEP` when the run pinned it (the
  meta item's pins, written since the run recorded its base's step; a base that moved on is refused, naming it),
  else PATH (the meta item's sources, else init_from: its newest step)."""
  _, meta = ckpt.metadata(step)
  path = (meta.get("sources") or {}).get(BASE) or cfg.checkpoint.init_from
  if not path:
    raise CheckpointError(f"{where} (step {step}) holds LoRA adapters but names no base checkpoint; pass its base "
                          "as checkpoint.init_from in the run's config")
  pinned = (meta.get("pins") or {}).get(BASE)
  if pinned is not None:
    return check_pin({"path": split_spec(path)[0], **pinned}, f"the LoRA run {where} (step {step})")
  if "://" not in path and not os.path.exists(os.path.expanduser(split_spec(path)[0])):
    raise CheckpointError(f"{where} (step {step}) holds LoRA adapters only; its base {path} (the run's "
                          "checkpoint.init_from) is missing. Restore the base there (a LoRA checkpoint cannot be "
                          "read without it), or export with `to-hf --adapter` for the adapters alone")
  return path


def read_adapters(checkpoint_path: str, step: Optional[int] = None) -> tuple[Config, int, dict, str]:
  """(config, step, host adapters, base path) of a LoRA checkpoint; a CheckpointError for any other checkpoint."""
  with open_checkpoints(checkpoint_path) as ckpt:
    step = ckpt.resolve_step(step)
    cfg = ckpt.config(step)
    if cfg.lora.rank <= 0:
      raise CheckpointError(f"{checkpoint_path} (step {step}) is not a LoRA run (lora.rank = 0): it has no adapters "
                            "to export; drop --adapter to export the model")
    adapters = ckpt.restore_subtree(("params",), step)["params"]
    return cfg, step, adapters, base_path(ckpt, step, cfg, checkpoint_path)
