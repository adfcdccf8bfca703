"""Frozen train-state entries: arrays that live beside the params (own sharding, no gradient, no optimizer state).

EMO's fixed or file cost embedding is one, a LoRA base another; a feature that needs one adds a provider to
maxlm.state.registry, nothing else.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from maxlm import model as model_lib
from maxlm.checkpoint.params import TRAINED_KEYS
from maxlm.core.config import Config
from maxlm.core.errors import CheckpointError, ConfigError, resolved_from



@dataclasses.dataclass(frozen=True)
class FrozenEntry:
  """One frozen entry of the train state, a single array or a tree of them.

  `abstract` / `logical_axes`: shapes (ShapeDtypeStruct, no sharding) and logical axis names, same tree.
  `from_params(model_params)`: the entry from the model's initial (or imported) params, traced under jit; or
  `from_host()`: the entry as host numpy arrays (e.g. read from a file). Exactly one of the two is set.
  `saved`: False for entries rebuilt from their source on resume instead of being checkpointed (a LoRA base).
  A checkpoint given to `checkpoint.init_from` that holds an entry of the same name and shape wins over both.
  """
  name: str
  abstract: Any
  logical_axes: Any
  from_params: Optional[Callable[[dict], Any]] = None
  from_host: Optional[Callable[[], Any]] = None
  saved: bool = True
  source: str = ""

  def __post_init__(self):
    if (self.from_params is None) == (self.from_host is None):
      raise ValueError(f"frozen entry {self.name!r} needs exactly one of from_params / from_host")
    if self.name in TRAINED_KEYS:
      raise ValueError(f"frozen entry name {self.name!r} is reserved for the trained state")


# ----------------------------------------------------------------------------- providers


def emo_cost_embedding(cfg: Config) -> list[FrozenEntry]:
  """EMO's cost embedding when it is not the live head: a snapshot of the head at init/import, or a file."""
  loss = cfg.loss
  if loss.objective != "emo" or loss.cost_embedding == "adaptive":
    return []
  vocab = cfg.model.vocab_size
  if loss.cost_embedding == "fixed":
    return [FrozenEntry("cost_embedding", jax.ShapeDtypeStruct((vocab, cfg.model.hidden), jnp.float32),
                        ("vocab", None), from_params=lambda p: model_lib.head_weights(cfg.model, p).T.astype(
                            jnp.float32), source="the output head at init or import")]
  path = loss.cost_embedding_file
  shape = cost_embedding_file_shape(path, vocab)
  return [FrozenEntry("cost_embedding", jax.ShapeDtypeStruct(shape, jnp.float32), ("vocab", None),
                      from_host=lambda: read_cost_embedding(path), source=os.path.abspath(path))]


def _open_cost_embedding(path: str) -> np.ndarray:
  """The (memory-mapped) array of a cost-embedding file, or a ConfigError that says what the file is instead."""
  if not os.path.exists(path):
    raise ConfigError(f"loss.cost_embedding_file = {path!r} does not exist{resolved_from(path)}; point it at a "
                      "(vocab, dim) .npy array")
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ConfigError(f"loss.cost_embedding_file = {path!r} is not a readable .npy array ({e}); save the (vocab, "
                      "dim) matrix with numpy.save") from None
  if not isinstance(array, np.ndarray):  # an .npz archive
    raise ConfigError(f"loss.cost_embedding_file = {path!r} is an .npz archive; save the one (vocab, dim) matrix "
                      "with numpy.save as .npy")
  if not np.issubdtype(array.dtype, np.floating):
    raise ConfigError(f"cost embedding {path} holds {array.dtype} values; it must be a float (vocab, dim) matrix")
  return array


def cost_embedding_file_shape(path: str, vocab: int) -> tuple[int, int]:
  shape = _open_cost_embedding(path).shape
  if len(shape) != 2 or shape[0] != vocab:
    raise ConfigError(f"cost embedding {path} has shape {shape}; it must be (model.vocab_size = "
                      f"{vocab}, dim): take it from a model with the same tokenizer")
  return shape


def read_cost_embedding(path: str) -> np.ndarray:
  """A cost-embedding file as float32; NaN or Inf in it is a ConfigError (training would stop at step 1 with a
  non-finite loss, blaming the learning rate)."""
  array = np.asarray(_open_cost_embedding(path), np.float32)
  bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
  if bad.size:
    raise ConfigError(f"cost embedding {path}: {bad.size} row(s) hold NaN or Inf (the first is row {int(bad[0])}); "
                      "fix or regenerate the file")
  return array


def check_resume(cfg: Config, checkpointer, step) -> None:
  """Before a resume of `step` (None: the newest): it continues the run it finds, with the frozen entries that run
  saved; a config asking for another EMO cost-embedding source would be silently ignored (or fail on shapes), so it
  is a CheckpointError that says how to switch."""
  try:
    step = checkpointer.resolve_step(step)
    saved = checkpointer.config(step)
  except CheckpointError:
    return  # an unreadable step: restore_for_resume sets it aside and says so
  if cfg.loss.objective != "emo" or saved.loss.objective != "emo":
    return
  mine, theirs = cfg.loss, saved.loss
  same_file = mine.cost_embedding_file == theirs.cost_embedding_file or (
      os.path.isfile(mine.cost_embedding_file) and os.path.isfile(theirs.cost_embedding_file)
      and os.path.samefile(mine.cost_embedding_file, theirs.cost_embedding_file))
  if mine.cost_embedding != theirs.cost_embedding or not same_file:
    raise CheckpointError(
        f"{cfg.run.dir} (step {step}) was trained with loss.cost_embedding = {theirs.cost_embedding!r}"
        f"{' from ' + theirs.cost_embedding_file if theirs.cost_embedding_file else ''}, and a resume keeps it; "
        f"{cfg.said('loss.cost_embedding')}"
        f"{', ' + cfg.said('loss.cost_embedding_file') if mine.cost_embedding_file else ''} asks for another. Drop "
        f"those settings to resume, or start a new run.dir with checkpoint.init_from={cfg.run.dir}")
