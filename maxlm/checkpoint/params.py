"""Params-only reads and writes: the decoder's weights and frozen entries of one step (never the optimizer state),
and the params-only checkpoints that `convert from-hf`, resuscitate and widen write."""

from __future__ import annotations

import os
from typing import Optional

import jax

from maxlm.checkpoint.checkpointer import CHECKPOINTS, Checkpointer, checkpoint_dir
from maxlm.core.config import CheckpointConfig, Config
from maxlm.core.errors import CheckpointError
from maxlm.core.trees import describe_mismatch, flat_tree

# Top-level train-state names that are not frozen entries (those sit beside them, each under its own name).
TRAINED_KEYS = ("params", "opt_state", "step")


def open_checkpoints(path: str) -> Checkpointer:
  directory = checkpoint_dir(path)
  if not os.path.exists(os.path.abspath(os.path.expanduser(path))):
    raise CheckpointError(f"checkpoint path {path!r} does not exist; pass a run directory holding "
                          f"'{CHECKPOINTS}/' (from maxlm.train or `maxlm.convert from-hf`)")
  if not os.path.isdir(directory):
    if os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
      raise CheckpointError(f"{path!r} is a Hugging Face model directory, not a maxlm run; import it first with "
                            f"`python -m maxlm.convert from-hf --model {path} --output runs/NAME` and pass runs/NAME")
    raise CheckpointError(f"{path!r} holds no '{CHECKPOINTS}/' directory: pass the run directory of a "
                          "maxlm.train run or a `maxlm.convert from-hf` output")
  return Checkpointer(path, CheckpointConfig(async_save=False), read_only=True)


def load_params(path: str, step: Optional[int] = None, *,
                abstract: Optional[dict] = None) -> tuple[Config, dict, dict]:
  """(resolved config, params, frozen entries such as {'cost_embedding': (V, dE)}) of a run dir.

  Reads only the params and the frozen entries, never the optimizer state. `abstract` ({"params": tree, plus any
  frozen entries wanted} of ShapeDtypeStructs with shardings) checks the params' shapes against the caller's model
  and restores sharded device arrays (frozen entries of another shape are left out); without it, host numpy arrays
  of every entry. A LoRA checkpoint (adapters only) is refused: maxlm.pretrained.load_params merges it.
  """
  ckpt = open_checkpoints(path)
  try:
    step = ckpt.resolve_step(step)
    cfg = ckpt.config(step)
    if cfg.lora.rank > 0:
      raise CheckpointError(f"{path} (step {step}) holds LoRA adapters, not a decoder: read it with "
                            "maxlm.pretrained.load_params, which merges them into their base")
    saved = ckpt.state_metadata(step).tree
    keys = tuple(k for k in saved if k not in TRAINED_KEYS or k == "params")
    shardings = None
    if abstract is not None:
      problems = describe_mismatch(flat_tree({"params": abstract["params"]}), flat_tree({"params": saved.get(
          "params", {})}))
      if problems:
        raise CheckpointError(f"{path} (step {step}) does not fit this model: " + "; ".join(problems)
                              + ". Make the model section match the checkpoint's config.yaml.")
      fits = lambda k: not describe_mismatch(flat_tree(abstract[k]), flat_tree(saved[k]))  # noqa: E731
      keys = tuple(k for k in keys if k in abstract and (k == "params" or fits(k)))
      shardings = {k: jax.tree.map(lambda a: a.sharding, abstract[k]) for k in keys}
    state = ckpt.restore_subtree(keys, step, shardings=shardings)
  finally:
    ckpt.close()
  if "params" not in state:
    raise CheckpointError(f"checkpoint step {step} under {path} holds no params")
  return cfg, state["params"], {k: v for k, v in state.items() if k != "params"}


def save_params(run_dir: str, cfg: Config, params: dict, *, extras: Optional[dict] = None, step: int = 0) -> None:
  """Writes a params-only checkpoint (+ frozen entries) that load_params reads and checkpoint.init_from starts from."""
  reserved = set(extras or {}) & set(TRAINED_KEYS)
  if reserved:
    raise ValueError(f"frozen entries may not be named {sorted(reserved)}")
  state = {"params": params, **(extras or {})}
  with Checkpointer(run_dir, CheckpointConfig(async_save=False, keep_last=0)) as ckpt:
    if step in ckpt.steps():
      raise CheckpointError(f"{ckpt.directory} already holds step {step}; write to a new directory")
    ckpt.save(step, state, data_state=None, config=cfg, force=True, kind="params")
