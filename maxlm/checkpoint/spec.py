"""Checkpoint specs, the one resolver: `RUN` (its newest step), `RUN@STEP`, `RUN@all` (every kept step), or a Hugging
Face model directory; with a command's optional --step, which must agree with a step the spec names."""

from __future__ import annotations

import os
from typing import Optional

from maxlm.checkpoint.checkpointer import checkpoint_dir
from maxlm.core.errors import CheckpointError


def is_hf_dir(path: str) -> bool:
  path = os.path.expanduser(path)
  return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints"))


def split_spec(spec: str) -> tuple[str, Optional[str]]:
  """'runs/x@300' -> ('runs/x', '300'); 'runs/x@all' -> ('runs/x', 'all'); 'runs/x' -> ('runs/x', None)."""
  path, sep, step = spec.rpartition("@")
  if sep and path and (step == "all" or step.isdigit()):
    return path, step
  return spec, None


def spec_path(spec: str) -> str:
  """The directory a spec names (user's ~ expanded), without its @STEP / @all."""
  return os.path.expanduser(split_spec(spec)[0])


def one_checkpoint(spec: str, step: Optional[int] = None, *, error=CheckpointError,
                   what: str = "this command reads one checkpoint") -> tuple[str, Optional[int]]:
  """(path, step or None) of the one checkpoint a spec (RUN, RUN@STEP, HF directory) and an optional --step name;
  `error` is the MaxlmError kind the calling command raises."""
  path, named = split_spec(spec)
  if named == "all":
    raise error(f"{spec}: {what}; name a step (RUN@STEP) or none (the newest), not @all")
  if named is not None:
    if step is not None and int(named) != step:
      raise error(f"{spec} and --step {step} name different steps; give one of them")
    step = int(named)
  return path, step


def default_output(checkpoint_path: str, step: Optional[int], what: str, tag: str) -> str:
  """Where an evaluation's JSON goes by default: RUN_DIR/eval/WHAT_stepN_TAG.json for a run's step; for a Hugging
  Face directory (step None; often read-only, a shared cache), WHAT_NAME_TAG.json in the working directory."""
  path = split_spec(checkpoint_path)[0]
  if step is not None:
    return os.path.join(os.path.dirname(checkpoint_dir(path)), "eval", f"{what}_step{step}_{tag}.json")
  return os.path.abspath(f"{what}_{os.path.basename(os.path.normpath(path))}_{tag}.json")
