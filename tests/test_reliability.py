"""The failures a hostile first week finds (issue 14), each reproduced: NaN never reaches a checkpoint, one trainer
per run directory, --overwrite never deletes what an export did not write, unreadable steps are set aside, a missing
data state is never a silent restart, a full disk names the failed and the intact step, config mistakes stop the
run before it writes, Ctrl-C saves, help texts exist."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from maxlm.checkpoint import params as ckpt_params
from maxlm import pretrained
from maxlm import convert, model, train
from maxlm.core.config import load_config
from maxlm.core.errors import CheckpointError, ConfigError, ConversionError, DataError, TrainingDivergedError
from maxlm.run.trackers import read_metrics
from maxlm.run.lock import RunDirBusyError, RunDirLock

TINY = ["model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
        "model.ffn=64", "model.max_positions=32", "model.compute_dtype=float32", "model.remat=none",
        "train.seq_len=16", "train.global_batch=8", "optim.warmup_steps=1", "run.progress=false",
        "run.tensorboard=false", "run.eval_batches=0", "run.log_every=1"]


def run(run_dir, steps, *extra):
  return train.train(load_config("demo", TINY + [f"run.dir={run_dir}", f"train.steps={steps}", *extra]),
                     verbose=False)


def cli(*args, env=None, **kw):
  overrides = {a.split("=", 1)[0]: a for a in TINY + list(args)}  # the CLI refuses a key given twice
  return subprocess.Popen([sys.executable, "-m", "maxlm.train", "--config=demo", *overrides.values()],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), **kw)


def wait_for_steps(run_dir, n, proc, timeout=240):
  deadline = time.time() + timeout
  path = os.path.join(run_dir, "metrics.jsonl")
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and open(path).read().count("\n") >= n:
      return
    time.sleep(0.2)
  raise AssertionError(f"trainer did not reach {n} steps: {proc.communicate()[1][-2000:] if proc.poll() else ''}")


def finite_checkpoints(run_dir):
  with ckpt_params.open_checkpoints(run_dir) as ckpt:
    steps = ckpt.steps()
  for s in steps:
    _, params, _ = pretrained.load_params(run_dir, s)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), f"step {s} holds non-finite params"
  return steps


# ----------------------------------------------------------------------------- 1. NaN


def test_diverging_run_never_checkpoints_nan_and_says_what_is_on_disk(tmp_path):
  # Saves every 2 steps; the learning rate overflows the params within a few steps. The step whose metrics are
  # non-finite is read before its save, so it is never written; nor is a state that turned non-finite.
  with pytest.raises(TrainingDivergedError, match=r"non-finite at step (\d+).*nothing from that step was saved, "
                                                  r"(no checkpoint has been written|the newest checkpoint in .* is step "
                                                  r"\d+ \(all finite)") as info:
    run(tmp_path / "r", 30, "optim.lr=1e30", "checkpoint.every=2", "checkpoint.async_save=false")
  steps = finite_checkpoints(str(tmp_path / "r"))
  diverged = int(re.search(r"non-finite at step (\d+)", str(info.value)).group(1))
  assert all(s < diverged for s in steps)
  if steps:
    assert f"is step {steps[-1]}" in str(info.value)


def test_with_stop_on_nan_off_non_finite_states_are_skipped_not_saved(tmp_path):
  with pytest.warns(UserWarning, match="holds NaN or Inf, so it was not saved"):
    summary = run(tmp_path / "r", 8, "optim.lr=1e30", "checkpoint.every=2", "checkpoint.async_save=false",
                  "train.stop_on_nan=false")
  assert summary["steps"] == 8
  assert max(finite_checkpoints(str(tmp_path / "r")), default=0) < 8


# ----------------------------------------------------------------------------- 2. one trainer per run.dir


def test_second_trainer_on_a_live_run_dir_is_refused_with_the_holder(tmp_path):
  run_dir = str(tmp_path / "r")
  first = cli(f"run.dir={run_dir}", "train.steps=100000", "checkpoint.every=100000")
  try:
    wait_for_steps(run_dir, 2, first)
    second = cli(f"run.dir={run_dir}", "train.steps=5")
    out, err = second.communicate(timeout=240)
    assert second.returncode == 2, err[-2000:]
    assert f"is in use by pid {first.pid} on host" in err and "choose another run.dir" in err
    assert "Traceback" not in err
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=240)
  assert first.returncode == 0
  logged = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
  assert logged == list(range(1, logged[-1] + 1))  # the survivor's metrics are all there


def test_stale_lock_of_a_dead_process_is_broken_and_live_lock_refused(tmp_path):
  run_dir = tmp_path / "r"
  run_dir.mkdir()
  # A holder killed with -9 leaves its lock file behind; the kernel released its lock.
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom maxlm.run.lock import RunDirLock\n"
                             f"RunDirLock({str(run_dir)!r}).__enter__(); print('held', flush=True); time.sleep(600)"],
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
    RunDirLock(str(run_dir)).__enter__()
  holder.kill()
  holder.wait()
  assert json.loads((run_dir / "maxlm.lock").read_text())["pid"] == holder.pid
  with RunDirLock(str(run_dir)):
    assert json.loads((run_dir / "maxlm.lock").read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------- 4. --overwrite


def _params_run(run_dir):
  cfg = load_config("demo", TINY)
  ckpt_params.save_params(str(run_dir), cfg, model.init_params(cfg.model, 0))


def test_overwrite_never_deletes_a_run_a_file_or_foreign_files(tmp_path):
  run_dir = tmp_path / "run"
  _params_run(run_dir)
  before = sorted(os.listdir(run_dir))
  with pytest.raises(ConversionError, match="--overwrite refused.*is a maxlm run|--overwrite refused"):
    convert.to_hf(str(run_dir), str(run_dir), overwrite=True, log=lambda *_: None)
  assert sorted(os.listdir(run_dir)) == before
  with pytest.raises(ConversionError, match="--overwrite refused"):  # a directory that contains the run
    convert.to_hf(str(run_dir), str(tmp_path), overwrite=True, log=lambda *_: None)
  assert (run_dir / "checkpoints").is_dir()
  plain = tmp_path / "notes.txt"
  plain.write_text("mine")
  with pytest.raises(ConversionError, match="is not a directory"):
    convert.to_hf(str(run_dir), str(plain), overwrite=True, log=lambda *_: None)
  assert plain.read_text() == "mine"
  # An earlier export is replaced; one with a file the export did not write is not.
  out = tmp_path / "hf"
  convert.to_hf(str(run_dir), str(out), dtype="float32", log=lambda *_: None)
  convert.to_hf(str(run_dir), str(out), dtype="float32", overwrite=True, log=lambda *_: None)
  (out / "my_eval_results.csv").write_text("keep me")
  with pytest.raises(ConversionError, match="my_eval_results.csv"):
    convert.to_hf(str(run_dir), str(out), overwrite=True, log=lambda *_: None)
  assert (out / "my_eval_results.csv").read_text() == "keep me"
  # from-hf --overwrite onto a run that trained is refused too.
  with pytest.raises(ConversionError, match="--overwrite refused"):
    convert.from_hf(str(tmp_path / "hf"), str(run_dir), overwrite=True, log=lambda *_: None)


# ----------------------------------------------------------------------------- 5, 6. resume


def _delete_data_files(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      for f in files:
        os.remove(os.path.join(root, f))


def test_unreadable_latest_step_is_set_aside_and_the_previous_one_resumed(tmp_path, capsys):
  run_dir = tmp_path / "r"
  run(run_dir, 4, "checkpoint.every=2", "checkpoint.async_save=false", "optim.schedule=constant")
  _delete_data_files(run_dir / "checkpoints" / "4")
  capsys.readouterr()
  cfg = load_config("demo", TINY + [f"run.dir={run_dir}", "train.steps=6", "checkpoint.every=2",
                                    "optim.schedule=constant"])
  summary = train.train(cfg, verbose=True)
  text = capsys.readouterr().out
  assert summary["start_step"] == 2 and sorted(summary["losses"]) == [3, 4, 5, 6]
  assert "checkpoint step 4" in text and "unreadable" in text and "resumed from" in text and "at step 2" in text
  aside = glob.glob(str(tmp_path / "r" / "checkpoints.unreadable" / "4-*"))
  assert len(aside) == 1 and os.path.isdir(os.path.join(aside[0], "state"))  # kept, never deleted
  straight = run(tmp_path / "straight", 6, "checkpoint.enabled=false", "optim.schedule=constant")
  assert all(summary["losses"][s] == straight["losses"][s] for s in (3, 4, 5, 6))
  # An explicit step is honoured or refused, never silently replaced.
  with pytest.raises(CheckpointError, match="step 5 has no checkpoint"):
    run(run_dir, 8, "checkpoint.resume_step=5")
  # Resuming from an older step abandons the newer ones: they are set aside, so a later crash cannot resume from them.
  again = run(run_dir, 5, "checkpoint.every=2", "checkpoint.resume_step=2", "optim.schedule=constant")
  assert again["start_step"] == 2 and again["losses"][3] == straight["losses"][3]
  assert glob.glob(str(run_dir / "checkpoints.superseded" / "6-*"))
  with ckpt_params.open_checkpoints(str(run_dir)) as ckpt:
    assert ckpt.steps() == [2, 4, 5]


def test_missing_data_state_is_an_error_or_an_explicit_warned_restart(tmp_path):
  run_dir = tmp_path / "r"
  run(run_dir, 2, "checkpoint.every=2", "checkpoint.async_save=false")
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(run_dir / "checkpoints" / "2" / "data_state")
  with pytest.raises(CheckpointError, match="no data-iterator state.*checkpoint.allow_data_restart=true"):
    run(run_dir, 3)
  summary = run(run_dir, 3, "checkpoint.allow_data_restart=true")
  assert summary["start_step"] == 2 and sorted(summary["losses"]) == [3]


# ----------------------------------------------------------------------------- 7. disk full


def test_full_disk_names_the_failed_and_the_intact_step(tmp_path):
  mount_point = tmp_path / "small_fs"
  mount_point.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount_point)],
                           capture_output=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode()[:200]}")
  try:
    run_dir = str(mount_point / "r")
    proc = cli(f"run.dir={run_dir}", "train.steps=60", "checkpoint.every=2", "checkpoint.keep_last=0")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    message = err[err.index("maxlm: error:"):]
    failed, intact = (int(x) for x in re.search(
        r"saving checkpoint step (\d+) .* failed: .*No space left.*newest intact checkpoint is step (\d+)",
        message, flags=re.S).groups())
    assert intact < failed and "Free space on that filesystem (or set run.dir to another one)" in message
    assert err.rstrip().endswith(message.rstrip()) or message.count("\n") <= 3  # the advice is the last word
    assert len(err.splitlines()) < 120  # library tracebacks cut to one line each
    with ckpt_params.open_checkpoints(run_dir) as ckpt:
      assert ckpt.steps()[-1] == intact
    _, params, _ = pretrained.load_params(run_dir, intact)  # intact means readable
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  finally:
    subprocess.run(["umount", str(mount_point)], capture_output=True)


# ----------------------------------------------------------------------------- 8. config


@pytest.mark.parametrize("text,fragment", [
    ("train:\n  steps: 3\ntrain:\n  seq_len: 8\n", "'train' appears twice"),
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", "'lr' appears twice"),
])
def test_repeated_yaml_keys_and_sections_are_errors(tmp_path, text, fragment):
  path = tmp_path / "mine.yaml"
  path.write_text("inherit: demo\n" + text)
  with pytest.raises(ConfigError, match=fragment):
    load_config(str(path))


@pytest.mark.parametrize("override,fragment", [
    ("optim.lr=-1", "optim.lr = -1.0 (from override 'optim.lr=-1') must be a positive finite learning rate"),
    ("checkpoint.every=0", "checkpoint.every = 0 (from override 'checkpoint.every=0') must be a positive number"),
    ("optim.b2=1.5", "optim.b2 = 1.5"),
    ("run.profile_steps=5", "START:STOP"),
])
def test_impossible_values_are_errors_naming_who_set_them(override, fragment):
  with pytest.raises(ConfigError) as info:
    load_config("demo", [override])
  assert fragment in str(info.value)


def test_a_rejected_run_does_not_touch_run_dir_config(tmp_path):
  run_dir = tmp_path / "r"
  run(run_dir, 1)
  saved = (run_dir / "config.yaml").read_text()
  with pytest.raises(ConfigError, match="set model.vocab_size >="):
    run(run_dir, 2, "model.vocab_size=100")
  assert (run_dir / "config.yaml").read_text() == saved
  # A new run.dir that a rejected run created (its lock) is gone again; a data error names the keys behind it.
  with pytest.raises(ConfigError, match=r"model.vocab_size = 100 \(from override 'model.vocab_size=100'\)"):
    run(tmp_path / "new" / "deeper", 2, "model.vocab_size=100")  # the parents it made go too
  with pytest.raises(DataError, match=r"no token store.*data.path = .*nowhere.* \(from override"):
    run(tmp_path / "new", 2, "data.source=store", f"data.path={tmp_path / 'nowhere'}")
  assert not (tmp_path / "new").exists()


def test_sigkill_then_resume_loses_no_logged_step_in_jsonl_or_tensorboard(tmp_path):
  """A killed process flushed nothing on its way out: every step up to the checkpoint it resumes from must already
  be on disk, in metrics.jsonl (one record per step, validation merged in) and in TensorBoard's event files."""
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  run_dir = str(tmp_path / "r")
  logging = ["run.tensorboard=true", "run.eval_batches=1", "run.eval_every=3", "checkpoint.every=3"]
  proc = cli(f"run.dir={run_dir}", "train.steps=100000", *logging)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not os.path.isdir(os.path.join(run_dir, "checkpoints", "6")):
    time.sleep(0.05)  # Orbax renames a finished save to its step number
  wait_for_steps(run_dir, 7, proc)
  proc.kill()
  proc.communicate(timeout=60)
  with ckpt_params.open_checkpoints(run_dir) as ckpt:
    saved = ckpt.steps()[-1]
  assert saved >= 6
  end = saved + 4
  run(run_dir, end, *logging)
  records = read_metrics(run_dir)
  steps = [r["step"] for r in records]
  assert steps == list(range(1, end + 1))  # one record per step, none lost, none twice
  assert [r["step"] for r in records if "eval/uniform_avg" in r] == [s for s in steps if s % 3 == 0 or s == end]
  acc = event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"))
  acc.Reload()
  for tag in ("loss", "eval/uniform_avg"):
    logged = [(r["step"], np.float32(r[tag])) for r in records if tag in r]
    assert [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)] == logged, tag


# ----------------------------------------------------------------------------- 10. Ctrl-C


def test_ctrl_c_saves_exits_130_and_resumes(tmp_path):
  run_dir = str(tmp_path / "r")
  proc = cli(f"run.dir={run_dir}", "train.steps=100000", "checkpoint.every=100000")
  wait_for_steps(run_dir, 3, proc)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err and "Ctrl-C" in err
  assert "preempted (SIGINT)" in out and "mean of the first 5 steps" in out
  with ckpt_params.open_checkpoints(run_dir) as ckpt:
    (stopped,) = ckpt.steps()
  assert [r["step"] for r in read_metrics(run_dir) if "loss" in r][-1] == stopped
  assert run(run_dir, stopped + 1)["start_step"] == stopped


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path):
  run_dir = str(tmp_path / "r")
  proc = cli(f"run.dir={run_dir}", "train.steps=100000", "checkpoint.every=100000")
  wait_for_steps(run_dir, 2, proc)
  proc.send_signal(signal.SIGINT)
  first = ""
  while "Ctrl-C again" not in first:  # the first one was handled (two at once would coalesce into one signal)
    first += proc.stderr.readline()
  proc.send_signal(signal.SIGINT)  # while the run is finishing its step and saving
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130 and "second Ctrl-C: exiting now without saving" in err


def test_error_message_starts_on_its_own_line_after_a_progress_bar(tmp_path):
  proc = cli(f"run.dir={tmp_path / 'r'}", "train.steps=30", "optim.lr=1e30", "run.progress=true",
             "checkpoint.enabled=false")
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 2
  (line,) = [l for l in err.splitlines() if "maxlm: error:" in l]
  assert line.startswith("maxlm: error:")


# ----------------------------------------------------------------------------- 11. help


def test_help_lists_presets_and_where_the_keys_are(capsys):
  with pytest.raises(SystemExit):
    train.parse_args(["--help"])
  text = capsys.readouterr().out
  assert "demo" in text and "mile_7b" in text and "configs/base.yaml" in text


def test_every_convert_and_evaluate_option_has_help():
  from maxlm import evaluate  # pylint: disable=import-outside-toplevel
  parsers = [convert.build_parser(), *evaluate.build_parsers().values()]
  missing = []
  for parser in parsers:
    stack = [parser]
    while stack:
      p = stack.pop()
      for action in p._actions:  # pylint: disable=protected-access
        if getattr(action, "choices", None) and isinstance(action.choices, dict):
          stack.extend(action.choices.values())
        elif action.help is None and action.dest != "help":
          missing.append(f"{p.prog} {'/'.join(action.option_strings) or action.dest}")
  assert not missing, missing
