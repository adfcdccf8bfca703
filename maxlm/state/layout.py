"""The train state: abstract shapes and shardings, fresh sharded init, `init_from` another checkpoint, and resume.

State = {"params": trainable tree, "opt_state": optax state, "step": int32, **frozen entries (maxlm.state.frozen)}.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from maxlm import model as model_lib
from maxlm.checkpoint.params import open_checkpoints
from maxlm.checkpoint.spec import split_spec
from maxlm.state import optim, registry
from maxlm.state.views import ParamView
from maxlm.core import sharding
from maxlm.core.config import Config, finalize, set_value
from maxlm.core.errors import CheckpointError

# Model-section keys that fix the architecture (and so must agree with a checkpoint given to init_from).
ARCHITECTURE_KEYS = ("family", "vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn",
                     "max_positions", "rope_theta", "rope_scaling", "rope_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor", "rope_original_max_positions", "rotary_fraction", "norm_eps",
                     "tie_embeddings", "clip_qkv", "causal")


@dataclasses.dataclass
class StateLayout:
  """Everything the steps, the loop and the checkpoints need to know about the state, built once from the config."""
  cfg: Config
  mesh: jax.sharding.Mesh
  graphdef: Any
  abstract: dict  # the whole state as ShapeDtypeStructs carrying their shardings
  shardings: dict
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  param_count: int  # parameters of the decoder
  trainable_count: int
  frozen: dict  # name -> FrozenEntry
  view: ParamView
  model_abstract: dict  # the decoder's weights (ShapeDtypeStructs with shardings)

  @property
  def saved_abstract(self) -> dict:
    """The part of the state that goes into checkpoints."""
    return {k: v for k, v in self.abstract.items() if k not in self.frozen or self.frozen[k].saved}

  def model_params(self, state: dict) -> dict:
    return self.view.model_params(state["params"], {k: state[k] for k in self.frozen})


def layout(cfg: Config, mesh: Optional[jax.sharding.Mesh] = None) -> StateLayout:
  mesh = mesh or sharding.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), slices=cfg.mesh.slices)
  view = registry.param_view(cfg)
  graphdef, model_abstract, model_specs = model_lib.abstract_model(cfg.model)
  trainable, trainable_specs = view.trainable(model_abstract, model_specs)
  param_shardings = sharding.named_shardings(trainable_specs, mesh)
  tx = optim.make_optimizer(cfg, trainable)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: sharding.replicated(mesh))
  abstract = {"params": trainable, "opt_state": abstract_opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}
  shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": sharding.replicated(mesh)}
  entries = registry.frozen_entries(cfg)
  for name, entry in entries.items():
    abstract[name] = entry.abstract
    shardings[name] = jax.tree.map(lambda axes: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes)),
                                   entry.logical_axes, is_leaf=lambda x: isinstance(x, tuple))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  model_shardings = sharding.named_shardings(model_specs, mesh)
  model_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), model_abstract,
                                model_shardings)
  return StateLayout(cfg, mesh, graphdef, abstract, shardings, tx, optim.learning_rate_schedule(cfg),
                     model_lib.param_count(model_abstract), model_lib.param_count(trainable), entries, view,
                     model_abstract)


# ----------------------------------------------------------------------------- materialising


def from_weights(lay: StateLayout, model_params: dict, trainable: Optional[dict], step, known: dict) -> dict:
  """The full state from the decoder's weights: trainable params (derived when None), fresh optimizer state,
  frozen entries (`known` ones as given, the others derived from the weights or read from their host source)."""
  traced = [n for n, e in lay.frozen.items() if e.from_params is not None and n not in known]

  def build(params, trainable):
    if trainable is None:
      trainable = lay.view.init_trainable(params, lay.cfg.train.seed)
    state = {"params": trainable, "opt_state": lay.tx.init(trainable), "step": jnp.asarray(step, jnp.int32)}
    state.update({n: lay.frozen[n].from_params(params) for n in traced})
    return state

  out_keys = ("params", "opt_state", "step", *traced)
  state = jax.jit(build, out_shardings={k: lay.shardings[k] for k in out_keys})(model_params, trainable)
  for name, entry in lay.frozen.items():
    if name in known:
      state[name] = known[name]
    elif entry.from_host is not None:
      state[name] = jax.tree.map(sharding.put_host, entry.from_host(), lay.abstract[name])
  return state


def init_state(lay: StateLayout) -> dict:
  """A fresh state, each shard materialised where it lives (no full copy of the model on any host)."""
  cfg = lay.cfg
  params = jax.jit(lambda: model_lib.init_params(cfg.model, cfg.train.seed),
                   out_shardings=jax.tree.map(lambda a: a.sharding, lay.model_abstract))()
  return from_weights(lay, params, None, 0, {})


def inherit_architecture(cfg: Config, source: Config, where: str) -> None:
  """Takes the model architecture of an init_from source for every key the user did not set; keys the user (or
  the preset) set to different values are one CheckpointError naming each, with the overrides that would fit."""
  conflicts = []
  for key in ARCHITECTURE_KEYS:
    mine, theirs = getattr(cfg.model, key), getattr(source.model, key)
    if mine == theirs:
      continue
    origin = cfg.origin(f"model.{key}")
    if origin == "the defaults":
      set_value(cfg, f"model.{key}", theirs, f"checkpoint.init_from {where}")
    else:
      conflicts.append((key, mine, origin, theirs))
  if conflicts:
    said = "; ".join(f"model.{k} = {mine!r} (from {origin}) contradicts the source's model.{k} = {theirs!r}"
                     for k, mine, origin, theirs in conflicts)
    fits = " ".join(f"model.{k}={_yaml_scalar(theirs)}" for k, _, _, theirs in conflicts)
    raise CheckpointError(f"checkpoint.init_from {where} does not fit this model: shape mismatch: {said}; drop the "
                          "setting (the architecture comes from the source), or keep the preset and add the "
                          f"source's values to the command line ({fits}), or start from another checkpoint")


def init_source_config(cfg: Config) -> Config:
  """The config saved with checkpoint.init_from (RUN or RUN@STEP); a CheckpointError when it cannot be read."""
  path, step = split_spec(cfg.checkpoint.init_from)
  with open_checkpoints(path) as source:
    return source.config(int(step) if step is not None and step != "all" else None)


def planned_architecture(cfg: Config, num_devices: int) -> tuple[bool, str]:
  """`--dry-run`'s view of checkpoint.init_from: where the source is there, its architecture (taken as a run takes
  it: keys the config sets to other values are refused the same way); else the config's own. Returns (taken, a note
  saying which)."""
  if not cfg.checkpoint.init_from:
    return False, ""
  try:
    source_cfg = init_source_config(cfg)
  except CheckpointError as e:
    m = cfg.model
    return False, (f"checkpoint.init_from {cfg.checkpoint.init_from} cannot be read here ({e}): this plans the "
                   f"config's own architecture ({m.family}, hidden {m.hidden}, {m.layers} layers, vocabulary "
                   f"{m.vocab_size}), not the source's")
  inherit_architecture(cfg, source_cfg, cfg.checkpoint.init_from)
  finalize(cfg, num_devices=num_devices)
  return True, f"architecture from checkpoint.init_from {cfg.checkpoint.init_from}"


def _yaml_scalar(value) -> str:
  """A config value as a `key=value` override spells it."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)
