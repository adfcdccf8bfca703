"""Resume through the trainer: N steps, stop, resume to 2N equals an uninterrupted 2N-step run (data order
included); SIGTERM mid-run saves a finalised checkpoint and exits 0; from-hf output starts a run via init_from."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from maxlm import pretrained
from maxlm import train
from maxlm.checkpoint import checkpointer as checkpoint
from maxlm.core.config import load_config
from maxlm.run.trackers import read_metrics

# A constant learning rate makes the schedule independent of train.steps, so a run stopped at N and resumed to
# 2N sees the same hyper-parameters at every step as one that ran 2N steps at once.
TINY = ["model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
        "model.ffn=64", "model.max_positions=32", "model.compute_dtype=float32", "model.remat=none",
        "train.seq_len=16", "train.global_batch=4", "optim.schedule=constant", "optim.warmup_steps=0",
        "run.progress=false", "run.tensorboard=false", "run.eval_batches=0", "run.log_every=1"]


def run(run_dir, steps, *extra):
  cfg = load_config("demo", TINY + [f"run.dir={run_dir}", f"train.steps={steps}", *extra])
  return train.train(cfg, verbose=False)


def test_resume_equals_uninterrupted(tmp_path):
  straight = run(tmp_path / "straight", 6, "checkpoint.every=3")
  first = run(tmp_path / "resumed", 3, "checkpoint.every=100")  # the final step is saved (forced)
  assert checkpoint.Checkpointer(str(tmp_path / "resumed"), first_cfg_checkpoint()).steps() == [3]
  second = run(tmp_path / "resumed", 6, "checkpoint.every=100")
  assert second["start_step"] == 3 and sorted(second["losses"]) == [4, 5, 6]
  combined = {**first["losses"], **second["losses"]}
  assert combined == straight["losses"]  # bit-identical: parameters, optimizer moments and data order
  logged = [r["step"] for r in read_metrics(str(tmp_path / "resumed")) if "loss" in r]
  assert logged == [1, 2, 3, 4, 5, 6]


def first_cfg_checkpoint():
  return load_config("demo", TINY).checkpoint


def test_sigterm_saves_and_exits_0_then_resumes(tmp_path):
  run_dir = tmp_path / "run"
  cmd = [sys.executable, "-m", "maxlm.train", "--config=demo", *TINY, f"run.dir={run_dir}",
         "train.steps=100000", "checkpoint.every=100000"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + 240
  # SIGTERM only once steps are running (the handler is installed by then).
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count("\n") >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  steps = checkpoint.Checkpointer(str(run_dir), first_cfg_checkpoint()).steps()
  assert len(steps) == 1 and steps[0] >= 3
  stopped = steps[0]
  logged = [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r]
  assert logged[-1] == stopped
  # Rerunning continues from the preemption checkpoint and matches a run that was never interrupted.
  resumed = run(run_dir, stopped + 2)
  assert resumed["start_step"] == stopped and sorted(resumed["losses"]) == [stopped + 1, stopped + 2]
  straight = run(tmp_path / "straight", stopped + 2, "checkpoint.enabled=false")
  for s in (stopped + 1, stopped + 2):
    assert resumed["losses"][s] == straight["losses"][s]


@pytest.mark.slow  # two training runs around a conversion: ~25-35 s
def test_init_from_a_from_hf_import(tmp_path):
  """convert from-hf output starts a new run through checkpoint.init_from (params only, fresh optimizer)."""
  from maxlm import convert  # pylint: disable=import-outside-toplevel
  source = run(tmp_path / "source", 2, "checkpoint.every=100")
  convert.to_hf(str(tmp_path / "source"), str(tmp_path / "hf"), dtype="float32", log=lambda *_: None)
  convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "imported"), config="demo", log=lambda *_: None)
  _, imported, _ = pretrained.load_params(str(tmp_path / "imported"))
  _, trained, _ = pretrained.load_params(str(tmp_path / "source"))
  for a, b in zip(_leaves(imported), _leaves(trained)):
    np.testing.assert_array_equal(a, b)
  summary = run(tmp_path / "continued", 1, f"checkpoint.init_from={tmp_path / 'imported'}")
  assert summary["start_step"] == 0 and len(summary["losses"]) == 1
  assert source["losses"]


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_init_from_rejects_a_model_of_another_shape(tmp_path):
  """A checkpoint whose shapes differ from the configured model fails before training, naming the mismatch."""
  from maxlm.core.errors import CheckpointError
  run(tmp_path / "small", 1)
  with pytest.raises(CheckpointError, match=r"does not fit this model.*shape mismatch"):
    run(tmp_path / "wide", 1, f"checkpoint.init_from={tmp_path / 'small'}", "model.ffn=96")


def test_a_preset_that_contradicts_the_source_is_told_the_overrides_that_fit():
  """Every contradicting key is named in one error with its origin, and the overrides the error suggests make
  the same preset fit; keys the preset leaves at the defaults are taken from the source silently."""
  import re  # pylint: disable=import-outside-toplevel
  from maxlm.state import layout as state_lib  # pylint: disable=import-outside-toplevel
  from maxlm.core.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  source = load_config("demo", ["model.vocab_size=300", "model.hidden=64", "model.ffn=160", "model.kv_heads=2",
                                "model.tie_embeddings=true"])
  with pytest.raises(CheckpointError) as info:
    state_lib.inherit_architecture(load_config("demo"), source, "my_import")
  said = str(info.value)
  for key, mine, theirs in (("vocab_size", 512, 300), ("hidden", 256, 64), ("ffn", 768, 160)):
    assert f"model.{key} = {mine} (from configs/demo.yaml) contradicts the source's model.{key} = {theirs}" in said
  assert "kv_heads" not in said and "tie_embeddings" not in said  # left at the defaults by demo.yaml
  suggested = re.search(r"command line \(([^)]*)\)", said).group(1).split()
  assert suggested == ["model.vocab_size=300", "model.hidden=64", "model.ffn=160"]
  cfg = load_config("demo", suggested)
  state_lib.inherit_architecture(cfg, source, "my_import")
  assert (cfg.model.vocab_size, cfg.model.hidden, cfg.model.ffn, cfg.model.kv_heads, cfg.model.tie_embeddings) == (
      300, 64, 160, 2, True)


def test_init_from_an_emo_run_keeps_the_fixed_cost_embedding_sharded(tmp_path):
  """EMO with a fixed cost embedding started from a checkpoint takes a snapshot of the imported head."""
  import numpy as np
  from maxlm.pretrained import load_params
  run(tmp_path / "base", 2)
  summary = run(tmp_path / "emo", 1, f"checkpoint.init_from={tmp_path / 'base'}", "loss.objective=emo")
  _, params, _ = load_params(str(tmp_path / "base"))
  np.testing.assert_array_equal(np.asarray(summary["state"]["cost_embedding"]), np.asarray(params["lm_head"]).T)


def test_cost_embedding_file_errors_and_a_resume_that_asks_for_another_source(tmp_path):
  """A file cost embedding is read once, checked (not .npy, .npz, NaN: ConfigError with the fix) and saved; a
  resume that names another source is refused instead of silently keeping the saved one."""
  import numpy as np
  from maxlm.core.errors import CheckpointError, ConfigError
  emb = np.random.default_rng(0).normal(size=(384, 12)).astype(np.float32)
  np.save(tmp_path / "emb.npy", emb)
  emo = ["loss.objective=emo", "loss.cost_embedding=file", f"loss.cost_embedding_file={tmp_path / 'emb.npy'}"]
  summary = run(tmp_path / "r", 2, *emo, "checkpoint.every=2")
  np.testing.assert_array_equal(np.asarray(summary["state"]["cost_embedding"]), emb)
  with pytest.raises(CheckpointError, match="trained with loss.cost_embedding = 'file'.*checkpoint.init_from="):
    run(tmp_path / "r", 3, "loss.objective=emo")  # fixed, as base.yaml says: not what the run saved
  np.savez(tmp_path / "emb.npz", emb=emb)
  (tmp_path / "junk.npy").write_bytes(b"not an array")
  nan = emb.copy()
  nan[7, 3] = np.nan
  np.save(tmp_path / "nan.npy", nan)
  for name, message in (("emb.npz", "npz archive"), ("junk.npy", "not a readable .npy"), ("nan.npy", "row 7")):
    with pytest.raises(ConfigError, match=message):
      run(tmp_path / f"run_{name}", 1, *emo[:2], f"loss.cost_embedding_file={tmp_path / name}")
  with pytest.raises(ConfigError, match="used only with loss.objective=emo and loss.cost_embedding=file"):
    run(tmp_path / "x", 1, f"loss.cost_embedding_file={tmp_path / 'emb.npy'}")
