"""Checkpoints on disk: the Orbax checkpointer of a run, params-only checkpoints, and checkpoint specs (RUN, RUN@STEP,
RUN@all). Knows nothing of LoRA or Hugging Face."""
