"""Checkpoints on disk: the Orbax checkpointer of a run, params-only checkpoints, and checkpoint specs (RUN, RUN@STEP,
RUN@all). Knows nothing of LoRA or Hugging Face (maxlm.pretrained reads any spec, a LoRA checkpoint merged).

The names most callers need are re-exported here: `Checkpointer`, `open_checkpoints`, `load_params`, `save_params`.
"""

from maxlm.checkpoint.checkpointer import Checkpointer, checkpoint_dir
from maxlm.checkpoint.params import load_params, open_checkpoints, save_params

__all__ = ["Checkpointer", "checkpoint_dir", "load_params", "open_checkpoints", "save_params"]
