"""Shared fixtures: tiny configs that compile in seconds on a 2-core CPU."""

import os

import pytest

TINY = [
    "model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
    "model.ffn=64", "model.max_positions=32", "model.compute_dtype=float32", "model.remat=none",
    "train.seq_len=16", "train.global_batch=8", "train.steps=4", "optim.warmup_steps=1",
    "run.progress=false", "run.tensorboard=false", "run.eval_batches=0",
]


@pytest.fixture
def tiny_overrides(tmp_path):
  return TINY + [f"run.dir={tmp_path / 'run'}"]


def repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
