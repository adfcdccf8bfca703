"""A checkpoint's params read one tensor (one layer of a stacked array) at a time from Orbax's on-disk layout through
tensorstore, so an export holds one tensor in host memory rather than the model."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from maxlm.checkpoint.params import load_params, open_checkpoints
from maxlm.core import files
from maxlm.core.errors import CheckpointError


class CheckpointTensors:
  """Reads params of one checkpoint step slice by slice (one layer of a stacked array) through tensorstore,
  so export holds one tensor in host memory rather than the model."""

  def __init__(self, run_dir: str, step: Optional[int] = None):
    ckpt = open_checkpoints(run_dir)
    try:
      self.step = ckpt.resolve_step(step)
      self.config = ckpt.config(self.step)
      md = ckpt.state_metadata(self.step)  # a CheckpointError on a corrupt or partial step
    finally:
      ckpt.close()
    if "params" not in md.tree:
      raise CheckpointError(f"checkpoint step {self.step} under {run_dir} holds no params")
    self.shapes = md.tree["params"]
    self.state_dir = os.path.join(ckpt.directory, str(self.step), "state")
    self.driver = "zarr3" if getattr(md, "use_zarr3", False) else "zarr"
    self._fallback = None

  def read(self, t) -> np.ndarray:
    """The tensor `t` names (its params key path `t.key`, and `t.layer` for one layer of a stacked array)."""
    meta = self.shapes
    for k in t.key:
      meta = meta[k]
    try:
      import tensorstore as ts  # pylint: disable=import-outside-toplevel
      store = ts.open({"driver": self.driver, "kvstore": {"driver": "ocdbt", "base": files.kvstore_spec(self.state_dir),
                                                          "path": meta.name}}, read=True).result()
      return store[t.layer].read().result() if t.layer is not None else store.read().result()
    except Exception:  # pylint: disable=broad-except
      # A layout tensorstore cannot open directly (a future orbax format): fall back to orbax's own restore of
      # the params, which holds the whole model in memory but reads anything orbax wrote.
      if self._fallback is None:
        self._fallback = load_params(os.path.dirname(os.path.dirname(self.state_dir)), self.step)[1]
      array = self._fallback
      for k in t.key:
        array = array[k]
      return np.asarray(array[t.layer] if t.layer is not None else array)
