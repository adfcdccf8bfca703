"""The training loop end to end on CPU: the demo learns, metrics are written, NaN stops the run,
gradient accumulation equals the full batch."""

import math
import os

import jax
import numpy as np
import pytest

from maxlm import train
from maxlm.state import optim
from maxlm.core import sharding
from maxlm.state import layout as state_lib
from maxlm.state import step as step_lib
from maxlm.core.config import load_config
from maxlm.core.errors import TrainingDivergedError
from maxlm.run.trackers import read_metrics


def test_demo_loss_falls_towards_the_grammar_entropy(tmp_path):
  cfg = load_config("demo", [f"run.dir={tmp_path}", "train.steps=40", "run.eval_every=0", "run.eval_batches=2",
                             "run.progress=false", "checkpoint.enabled=false", "run.log_every=5"])
  summary = train.train(cfg, verbose=False)
  losses = [summary["losses"][s] for s in sorted(summary["losses"])]
  assert len(losses) == 40
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.8, losses
  final_ce = summary["evals"][40]["eval/uniform_avg"]
  floor = summary["true_entropy_per_token"]
  assert floor < final_ce < math.log(cfg.model.vocab_size)  # learnt something, and never below the true entropy

  records = read_metrics(str(tmp_path))
  logged = [r for r in records if "loss" in r]
  assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30, 35, 40]
  for key in ("step", "loss", "ce", "entropy", "lr", "grad_norm", "tokens_per_sec", "mfu"):
    assert key in logged[-1]
  assert logged[-1]["tokens_per_sec"] > 0 and 0 < logged[-1]["mfu"] < 1
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  assert (tmp_path / "config.yaml").exists()


def test_nan_stops_the_run_with_a_clear_message(tmp_path, tiny_overrides):
  cfg = load_config("demo", tiny_overrides + ["optim.lr=1e30", "checkpoint.enabled=false"])
  with pytest.raises(TrainingDivergedError, match=r"non-finite at step \d+.*lower optim.lr"):
    train.train(cfg, verbose=False)


def _one_step(overrides, batch):
  cfg = load_config("demo", overrides, num_devices=1)
  setup = state_lib.layout(cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  step, _ = step_lib.make_train_step(setup)
  state = state_lib.init_state(setup)
  for _ in range(2):  # step 0 has lr 0 (warmup); step 1 moves the weights
    state, metrics = step(state, batch)
  return float(metrics["loss"]), jax.device_get(state["params"])


@pytest.mark.parametrize("objective", [["loss.objective=ce"], ["loss.objective=mile", "loss.gamma=2.0"],
                                       ["loss.objective=mile", "loss.reduction=reference"],
                                       ["loss.objective=emo"]], ids=lambda o: "-".join(o))
def test_gradient_accumulation_equals_the_full_batch(tiny_overrides, objective):
  """DESIGN section 4: reductions (M, MiLe's alpha) are over the global batch, however it is split into microbatches."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 384, size=(8, 17)).astype(np.int32)
  targets = tokens[:, 1:].copy()
  for row in range(8):
    targets[row, :2 * row] = -100  # microbatches with unequal valid counts: a mean of their means would be wrong
  batch = {"inputs": tokens[:, :-1], "targets": targets}
  # A large Adam eps keeps the update linear in the gradient, so the comparison tests the gradients, not Adam's
  # amplification of rounding in near-zero gradients.
  common = tiny_overrides + objective + ["optim.eps=1.0", "optim.lr=1.0"]
  loss1, p1 = _one_step(common + ["train.microbatches=1"], batch)
  loss4, p4 = _one_step(common + ["train.microbatches=4"], batch)
  assert abs(loss1 - loss4) < 1e-5
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_vocab_smaller_than_the_tokenizer_is_an_error(tmp_path):
  from maxlm.core.errors import ConfigError
  cfg = load_config("demo", [f"run.dir={tmp_path}", "model.vocab_size=100"])
  with pytest.raises(ConfigError, match="set model.vocab_size >="):
    train.train(cfg, verbose=False)


def test_learning_rate_schedule_warms_up_then_decays():
  cfg = load_config("demo", ["train.steps=100", "optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1"])
  sched = optim.learning_rate_schedule(cfg)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
  assert abs(float(sched(100)) - 0.1) < 1e-6
  mid = 10 + 45
  assert abs(float(sched(mid)) - (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))) < 1e-5


def test_weight_decay_skips_norms():
  mask = optim.weight_decay_mask({"embed": np.zeros((4, 2)), "final_norm": np.zeros(2),
                                  "layers": {"attn_norm": np.zeros((2, 2)), "q_proj": np.zeros((2, 2, 2))}})
  assert mask == {"embed": True, "final_norm": False, "layers": {"attn_norm": False, "q_proj": True}}


@pytest.mark.slow
def test_bf16_compute_tracks_fp32(tiny_overrides):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 384, size=(8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  common = tiny_overrides + ["loss.objective=mile", "model.init_std=0.1"]
  loss32, p32 = _one_step(common + ["model.compute_dtype=float32"], batch)
  loss16, p16 = _one_step(common + ["model.compute_dtype=bfloat16"], batch)
  assert np.isfinite(loss16) and abs(loss16 - loss32) < 2e-2 * abs(loss32)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(p16))  # parameters stay fp32 under bf16 compute
