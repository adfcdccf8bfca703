"""Params-only reads and writes: the decoder's weights and frozen entries of one step (never the optimizer state),
and the params-only checkpoints that `convert from-hf`, resuscitate and widen write."""

from __future__ import annotations

import os
from typing import Optional

import jax

from maxlm.checkpoint.checkpointer import CHECKPOINTS, Checkpointer, checkpoint_dir
from maxlm.checkpoint.spec import split_spec
from maxlm.core import files
from maxlm.core.config import CheckpointConfig, Config
from maxlm.core.errors import CheckpointError
from maxlm.core.trees import describe_mismatch, flat_tree

# Top-level train-state names that are not frozen entries (those sit beside them, each under its own name).
TRAINED_KEYS = ("params", "opt_state", "step")


def open_checkpoints(path: str) -> Checkpointer:
  directory = checkpoint_dir(path)
  if not files.exists(path):
    raise CheckpointError(f"checkpoint path {path!r} does not exist; pass a run directory holding "
                          f"'{CHECKPOINTS}/' (from maxlm.train or `maxlm.convert from-hf`)")
  if not files.isdir(directory):
    if not files.is_url(path) and os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
      raise CheckpointError(f"{path!r} is a Hugging Face model directory, not a maxlm run; import it first with "
                            f"`python -m maxlm.convert from-hf --model {path} --output runs/NAME` and pass runs/NAME")
    raise CheckpointError(f"{path!r} holds no '{CHECKPOINTS}/' directory: pass the run directory of a "
                          "maxlm.train run or a `maxlm.convert from-hf` output")
  return Checkpointer(path, CheckpointConfig(async_save=False), read_only=True)


def pin(spec: str) -> dict:
  """{"path", "step", "fingerprint"} of the checkpoint a spec (RUN: its newest step, or RUN@STEP) names now: what a
  run that depends on it (a LoRA run's base, init_from) records, so that later reads get the same weights."""
  path, step = split_spec(spec)
  with open_checkpoints(path) as ckpt:
    step = ckpt.resolve_step(int(step) if step is not None and step != "all" else None)
    return {"path": files.absolute(path), "step": step, "fingerprint": ckpt.fingerprint(step)}


def check_pin(pinned: dict, user: str) -> str:
  """`PATH@STEP` of a pinned source when that step is still the one `user` recorded; else a CheckpointError naming
  the source that moved and the fix."""
  path, step = pinned["path"], int(pinned["step"])
  if "://" not in path and not os.path.exists(path):
    raise CheckpointError(f"{user} depends on {path} at step {step}, and {path} is missing. Restore it there (the "
                          "weights it was trained on cannot be read otherwise)")
  with open_checkpoints(path) as ckpt:
    steps = ckpt.steps()
    if step not in steps:
      raise CheckpointError(
          f"{user} was trained on {path} at step {step}, and that step is gone from {path} (it now holds steps "
          f"{', '.join(map(str, steps)) or 'none'}: it trained on and rotated it out). Its newer steps are other "
          f"weights, so {user} is refused rather than read on them: restore step {step} of {path} (from a copy; "
          f"checkpoint.keep_every keeps steps from rotation), or train a new run on the newer base "
          f"(checkpoint.init_from={path}@{steps[-1] if steps else 'STEP'})")
    if pinned.get("fingerprint") and ckpt.fingerprint(step) != pinned["fingerprint"]:
      raise CheckpointError(
          f"{user} was trained on {path} at step {step}, and that step was saved again since (other weights "
          f"under the same step: fingerprint {ckpt.fingerprint(step)}, recorded {pinned['fingerprint']}). Restore "
          f"the original step {step} of {path}, or train a new run on it (checkpoint.init_from={path}@{step})")
  return f"{path}@{step}"


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
