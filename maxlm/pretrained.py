"""Any model maxlm can read, by one spec: a run directory (its newest step), `RUN@STEP`, `RUN@all` (every kept step)
or a Hugging Face directory of a supported family (imported in memory). Evaluation, generation, analysis and
init_from load here; a LoRA checkpoint becomes a decoder here (its base with the adapters merged in), and nowhere else.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Optional

import jax
from jax.sharding import PartitionSpec

from maxlm.checkpoint.params import load_params as load_plain_params, open_checkpoints
from maxlm.checkpoint.spec import is_hf_dir, one_checkpoint, split_spec
from maxlm.core.trees import describe_mismatch, flat_tree
from maxlm.state import lora
from maxlm.checkpoint.params import TRAINED_KEYS
from maxlm.core.config import Config
from maxlm.core.errors import CheckpointError


@dataclasses.dataclass
class Pretrained:
  """A loaded model: config, decoder weights (host numpy arrays unless loaded sharded), frozen entries, origin."""
  spec: str
  cfg: Config
  params: dict
  frozen: dict
  step: Optional[int]  # None for an HF directory
  kind: str  # "run" | "hf"


def expand(spec: str) -> list[str]:
  """The checkpoint specs a user's spec stands for: `RUN@all` -> every kept step, oldest first."""
  path, step = split_spec(spec)
  if step != "all":
    return [spec]
  if is_hf_dir(path):
    raise CheckpointError(f"{spec}: an HF directory has one set of weights; drop '@all'")
  with open_checkpoints(path) as ckpt:
    steps = ckpt.steps()
  if not steps:
    raise CheckpointError(f"{path} holds no finalised checkpoint")
  return [f"{path}@{s}" for s in steps]


def load(spec: str, *, abstract: Optional[dict] = None, hf_config: Optional[str] = None) -> Pretrained:
  """Loads the weights a spec names. `abstract` ({"params": tree of sharded ShapeDtypeStructs}) restores a run's
  params sharded with a shape check; HF directories always come as host arrays (`hf_config`: the preset for the
  non-model sections of an import)."""
  path, step = split_spec(spec)
  if step == "all":
    raise CheckpointError(f"{spec} names every kept step, and this command reads one checkpoint: give RUN (its "
                          "newest step) or RUN@STEP (knowledge-entropy, token-difficulty, hessian-trace and probe "
                          "take RUN@all)")
  path = os.path.expanduser(path)
  if is_hf_dir(path):
    if step is not None:
      raise CheckpointError(f"{spec}: an HF directory has no steps; drop '@{step}'")
    from maxlm.hf import imports  # pylint: disable=import-outside-toplevel  (torch-free, but heavy)
    cfg, params, frozen = imports.read_hf(path, config=hf_config)
    return Pretrained(spec, cfg, params, frozen, None, "hf")
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint {path!r} does not exist: pass a maxlm run directory (optionally RUN@STEP or "
                          "RUN@all) or a Hugging Face model directory (config.json + weights)")
  with open_checkpoints(path) as ckpt:
    resolved = ckpt.resolve_step(int(step) if step is not None else None)
  cfg, params, frozen = load_params(path, resolved, abstract=abstract)
  return Pretrained(spec, cfg, params, frozen, resolved, "run")


def load_one(spec: str, step: Optional[int] = None) -> Pretrained:
  """The one checkpoint a spec (RUN, RUN@STEP, HF directory) and a command's optional --step name."""
  path, step = one_checkpoint(spec, step)
  return load(path if step is None else f"{path}@{step}")


def load_params(path: str, step: Optional[int] = None, *,
                abstract: Optional[dict] = None) -> tuple[Config, dict, dict]:
  """(config, decoder weights, frozen entries) of a maxlm checkpoint, as maxlm.checkpoint.params.load_params gives
  them, except that a LoRA checkpoint (adapters only) comes as its base's weights with the adapters merged in (its
  config then says lora.rank = 0). `path` may name its step (RUN@STEP, as a pinned init_from or LoRA base does).
  `abstract`: see maxlm.checkpoint.params.load_params."""
  path, named = split_spec(path)
  if named is not None and named != "all" and step is None:
    step = int(named)
  with open_checkpoints(path) as ckpt:
    step = ckpt.resolve_step(step)
    cfg = ckpt.config(step)
    if cfg.lora.rank > 0:
      return _load_merged(ckpt, path, step, cfg, abstract)
  return load_plain_params(path, step, abstract=abstract)


# ----------------------------------------------------------------------------- LoRA checkpoints


def _load_merged(ckpt, path: str, step: int, cfg: Config, abstract: Optional[dict]) -> tuple[Config, dict, dict]:
  """load_params of a LoRA checkpoint: (its config with lora.rank = 0, as the weights now are a plain
  decoder; base + merged adapters; frozen entries), the base loaded as any checkpoint (so a base that is itself a
  LoRA checkpoint merges too). With `abstract`, the merge runs sharded like the base; without, on host arrays."""
  source = lora.base_path(ckpt, step, cfg, path)
  merged_cfg = copy.deepcopy(cfg)
  merged_cfg.lora.rank = 0
  _, base, base_frozen = load_params(source, abstract=abstract)
  saved = ckpt.state_metadata(step).tree
  if "params" not in saved:
    raise CheckpointError(f"checkpoint step {step} under {path} holds no adapters")
  adapters = ckpt.restore_subtree(("params",), step)["params"]
  names = tuple(k for k in saved if k not in TRAINED_KEYS)
  if abstract is not None:
    flat = flat_tree
    names = tuple(k for k in names if k in abstract and not describe_mismatch(flat(abstract[k]),
                                                                                         flat(saved[k])))
    shardings = {k: jax.tree.map(lambda a: a.sharding, abstract[k]) for k in names}
    own = ckpt.restore_subtree(names, step, shardings=shardings) if names else {}
  else:
    own = ckpt.restore_subtree(names, step) if names else {}
  if abstract is None:
    return merged_cfg, lora.merge(cfg, base, adapters), {**base_frozen, **own}
  mesh = jax.tree.leaves(abstract["params"])[0].sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, PartitionSpec())
  adapters = jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: x[i]), adapters)
  out_shardings = jax.tree.map(lambda a: a.sharding, abstract["params"])
  merged = jax.jit(lambda b, a: lora.merge(cfg, b, a), out_shardings=out_shardings)(base, adapters)
  return merged_cfg, merged, {**base_frozen, **own}
