"""Tests for maxlm.run.trackers: strict JSON lines, resume truncation, TensorBoard's own reader on the tensorboardX
event files, and the Weights & Biases tracker in offline mode (its run file read back)."""

import glob
import json
import math
import os

import numpy as np
import pytest

from maxlm.core.errors import DataError
from maxlm.run.trackers import MetricsLogger, read_metrics


def f32(x):
  return float(np.float32(x))


def tensorboard_scalars(run_dir):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  acc = event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"))
  acc.Reload()
  return acc


def test_metrics_jsonl_round_trip(tmp_path):
  run = str(tmp_path / "run")
  logger = MetricsLogger(run, tensorboard=False)
  logger.log(1, {"loss": 2.5, "tokens": np.int64(4096), "grad_norm": np.float32(0.5)})
  logger.log(2, {"loss": float("nan"), "up": float("inf"), "down": -float("inf")})
  # Flushed per line: readable before close, as after a crash.
  assert [r["step"] for r in read_metrics(run)] == [1, 2]
  logger.close()
  assert not os.path.exists(os.path.join(run, "tensorboard"))

  def reject(constant):
    raise AssertionError(f"non-strict JSON constant {constant}")

  with open(os.path.join(run, "metrics.jsonl")) as f:
    raw = [json.loads(line, parse_constant=reject) for line in f]
  assert raw == [{"step": 1, "loss": 2.5, "tokens": 4096, "grad_norm": 0.5},
                 {"step": 2, "loss": "NaN", "up": "Infinity", "down": "-Infinity"}]
  assert isinstance(raw[0]["tokens"], int)
  records = read_metrics(run)
  assert records[0] == raw[0]
  assert math.isnan(records[1]["loss"])
  assert records[1]["up"] == math.inf and records[1]["down"] == -math.inf


def test_what_is_logged_at_one_step_is_one_record(tmp_path):
  """Validation or probes logged at the step of the last line join that line (in either order), flushed at once."""
  run = str(tmp_path / "run")
  logger = MetricsLogger(run, tensorboard=False)
  logger.log(1, {"loss": 1.0})
  logger.log(2, {"eval/a": 3.0})
  logger.log(2, {"loss": 2.0, "eval/a": 3.5})
  assert read_metrics(run) == [{"step": 1, "loss": 1.0}, {"step": 2, "eval/a": 3.5, "loss": 2.0}]
  logger.log(3, {"loss": 3.0})
  logger.close()
  logger = MetricsLogger(run, tensorboard=False)  # a resumed process starts a new line even at the same step
  logger.truncate_after(3)
  logger.log(4, {"loss": 4.0})
  logger.log(4, {"probe/x": 0.5})
  logger.close()
  assert read_metrics(run)[2:] == [{"step": 3, "loss": 3.0}, {"step": 4, "loss": 4.0, "probe/x": 0.5}]


def test_flush_puts_tensorboard_scalars_on_disk_before_close(tmp_path):
  run = str(tmp_path / "run")
  logger = MetricsLogger(run)
  logger.log(1, {"loss": 0.25})
  logger.flush()
  assert [(e.step, e.value) for e in tensorboard_scalars(run).Scalars("loss")] == [(1, 0.25)]
  logger.close()


def test_resume_appends_and_truncate_after_drops_later_steps(tmp_path):
  run = str(tmp_path / "run")
  logger = MetricsLogger(run)
  for step in range(1, 6):
    logger.log(step, {"loss": float(step)})
  logger.close()

  logger = MetricsLogger(run)  # resume from the checkpoint at step 3
  logger.truncate_after(3)
  logger.log(4, {"loss": 40.0})
  logger.close()
  assert read_metrics(run) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                               {"step": 3, "loss": 3.0}, {"step": 4, "loss": 40.0}]
  acc = tensorboard_scalars(run)
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_torn_last_line_is_dropped(tmp_path):
  run = str(tmp_path / "run")
  logger = MetricsLogger(run, tensorboard=False)
  logger.log(1, {"loss": 1.0})
  logger.close()
  with open(os.path.join(run, "metrics.jsonl"), "a") as f:
    f.write('{"step": 2, "lo')  # the crash came mid-write
  assert read_metrics(run) == [{"step": 1, "loss": 1.0}]
  logger = MetricsLogger(run, tensorboard=False)
  logger.log(2, {"loss": 2.0})
  logger.close()
  assert read_metrics(run) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_malformed_line_and_missing_file_raise_data_error(tmp_path):
  with pytest.raises(DataError, match="no metrics.jsonl"):
    read_metrics(str(tmp_path))
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
  with pytest.raises(DataError, match="line 2"):
    read_metrics(str(tmp_path))


def test_non_primary_writes_nothing(tmp_path):
  run = tmp_path / "run"
  logger = MetricsLogger(str(run), is_primary=False)
  logger.log(1, {"loss": 1.0})
  logger.truncate_after(0)
  logger.close()
  assert not run.exists()


def test_tensorboard_reads_the_event_file(tmp_path):
  run = str(tmp_path / "run")
  logger = MetricsLogger(run)
  for step in (1, 2, 3):
    logger.log(step, {"loss": step / 4, "lr": 1e-3})
  logger.close()
  logger = MetricsLogger(run)  # crash after step 3, resume from step 2
  logger.truncate_after(2)
  logger.log(3, {"loss": 9.5, "lr": 1e-3})
  logger.close()

  acc = tensorboard_scalars(run)
  assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]
  loss = acc.Scalars("loss")
  assert [(e.step, e.value) for e in loss] == [(1, 0.25), (2, 0.5), (3, 9.5)]
  assert [e.value for e in acc.Scalars("lr")] == [f32(1e-3)] * 3
  files = glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 2  # one event file per session, as TensorBoard expects

  event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=import-outside-toplevel
  events = [e for path in sorted(files, key=os.path.getmtime)
            for e in event_file_loader.EventFileLoader(path).Load()]
  starts = [e for e in events if e.WhichOneof("what") == "session_log"]
  assert [(e.step, e.session_log.status) for e in starts] == [(3, event_pb2.SessionLog.START)]


def test_wandb_tracker_offline_writes_its_files(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  run = str(tmp_path / "run")
  logger = MetricsLogger(run, tensorboard=False, wandb_project="maxlm-test", config={"train": {"steps": 2}})
  for step in (1, 2):
    logger.log(step, {"loss": 1.0 / step})
  logger.close()
  assert [r["step"] for r in read_metrics(run)] == [1, 2]  # jsonl is always on
  offline = glob.glob(os.path.join(run, "wandb", "offline-run-*"))
  assert len(offline) == 1
  run_id = open(os.path.join(run, "wandb_run_id")).read().strip()
  assert offline[0].endswith(run_id) and glob.glob(os.path.join(offline[0], "*.wandb"))
  # The run file (wandb's own binary log of protobuf records) carries the metric and its values.
  blob = open(glob.glob(os.path.join(offline[0], "*.wandb"))[0], "rb").read()
  assert b"loss" in blob and b"0.5" in blob and b"maxlm-test" in blob


def test_wandb_tracker_close_leaves_the_users_own_run_alive(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  mine = wandb.init(project="users-own", dir=str(tmp_path))
  logger = MetricsLogger(str(tmp_path / "run"), tensorboard=False, wandb_project="maxlm-test")
  logger.log(1, {"loss": 1.0})
  logger.close()
  mine.log({"users_metric": 0.125})  # raises if closing maxlm's tracker tore down the service under it
  mine.finish()
  wandb.teardown()
  users = glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*", "*.wandb"))
  assert len(users) == 1 and b"users_metric" in open(users[0], "rb").read()


def test_a_relative_run_dir_is_its_own_working_copy(tmp_path, monkeypatch):
  """run.dir as the README's quickstart leaves it (runs/demo, relative to the working directory): the metrics file
  is written in place, never copied onto itself, and closing leaves the run directory alone."""
  monkeypatch.chdir(tmp_path)
  logger = MetricsLogger(os.path.join("runs", "rel"), tensorboard=True)
  logger.log(1, {"loss": 2.5})
  logger.flush()
  logger.log(2, {"loss": 2.0})
  logger.close()
  assert [r["loss"] for r in read_metrics(str(tmp_path / "runs" / "rel"))] == [2.5, 2.0]
  assert glob.glob(str(tmp_path / "runs" / "rel" / "tensorboard" / "events.out.tfevents.*"))
