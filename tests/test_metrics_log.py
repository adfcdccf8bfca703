"""Tests for maxlm.metrics_log against independent references: a bitwise CRC32C, a minimal TFRecord and
protobuf reader written here, strict JSON parsing and, when installed, TensorBoard's own EventAccumulator."""

import glob
import json
import math
import os
import socket
import struct

import numpy as np
import pytest

from maxlm import metrics_log
from maxlm.errors import DataError
from maxlm.metrics_log import EventFileWriter, MetricsLogger, read_metrics


def bitwise_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
  return crc ^ 0xFFFFFFFF


def unmask(masked: int) -> int:
  rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
  return ((rot << 15) | (rot >> 17)) & 0xFFFFFFFF


def read_records(path):
  """TFRecord payloads, both CRCs checked with the bitwise CRC above."""
  with open(path, "rb") as f:
    data = f.read()
  records, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    assert unmask(struct.unpack("<I", data[pos + 8:pos + 12])[0]) == bitwise_crc32c(header)
    (length,) = struct.unpack("<Q", header)
    payload = data[pos + 12:pos + 12 + length]
    assert len(payload) == length
    crc = data[pos + 12 + length:pos + 16 + length]
    assert unmask(struct.unpack("<I", crc)[0]) == bitwise_crc32c(payload)
    records.append(payload)
    pos += 16 + length
  return records


def parse_proto(buf):
  """{field: [raw values]}: varints as int, fixed64/fixed32 as bytes, length-delimited as bytes."""
  fields, pos = {}, 0

  def varint():
    nonlocal pos
    value, shift = 0, 0
    while True:
      byte = buf[pos]
      pos += 1
      value |= (byte & 0x7F) << shift
      shift += 7
      if byte < 0x80:
        return value

  while pos < len(buf):
    key = varint()
    number, wire = key >> 3, key & 7
    if wire == 0:
      value = varint()
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == 2:
      length = varint()
      value, pos = buf[pos:pos + length], pos + length
    else:
      raise AssertionError(f"unexpected wire type {wire}")
    fields.setdefault(number, []).append(value)
  return fields


def decode_events(path):
  events = []
  for payload in read_records(path):
    event = parse_proto(payload)
    decoded = {"wall_time": struct.unpack("<d", event[1][0])[0]}
    if 2 in event:
      step = event[2][0]
      decoded["step"] = step - (1 << 64) if step >= 1 << 63 else step
    if 3 in event:
      decoded["file_version"] = event[3][0].decode()
    if 5 in event:
      values = {}
      for value in parse_proto(event[5][0])[1]:
        value = parse_proto(value)
        values[value[1][0].decode()] = struct.unpack("<f", value[2][0])[0]
      decoded["scalars"] = values
    if 7 in event:  # Event.session_log (6 is the deprecated log_message)
      decoded["session_log_status"] = parse_proto(event[7][0])[1][0]
    events.append(decoded)
  return events


def f32(x):
  return float(np.float32(x))


@pytest.mark.parametrize("data, expected", [
  (b"123456789", 0xE3069283),
  (bytes(32), 0x8A9136AA),
  (b"\xff" * 32, 0x62A8AB43),
  (bytes(range(32)), 0x46DD794E),
  (b"", 0x0),
])
def test_crc32c_known_vectors(data, expected):
  assert metrics_log.crc32c(data) == expected
  assert bitwise_crc32c(data) == expected


def test_crc32c_matches_bitwise_on_random_bytes():
  rng = np.random.default_rng(0)
  for n in (1, 7, 64, 1000):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert metrics_log.crc32c(data) == bitwise_crc32c(data)
    assert unmask(metrics_log.masked_crc32c(data)) == bitwise_crc32c(data)


def test_event_file_parses_back(tmp_path):
  writer = EventFileWriter(str(tmp_path / "tb"))
  writer.scalars(1, {"loss": 2.5, "lr": 3e-4})
  writer.scalars(2**40, {"loss": float("nan"), "tokens": 123456})
  writer.scalars(-3, {"neg": -1.0})
  writer.close()
  (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert os.path.basename(path).endswith("." + socket.gethostname())
  assert os.path.basename(path).split(".")[3].isdigit()
  events = decode_events(path)
  assert events[0]["file_version"] == "brain.Event:2"
  assert "step" not in events[0] and "scalars" not in events[0]
  assert all(abs(e["wall_time"] - events[0]["wall_time"]) < 60 for e in events)
  assert [e["step"] for e in events[1:]] == [1, 2**40, -3]
  assert events[1]["scalars"] == {"loss": 2.5, "lr": f32(3e-4)}
  assert math.isnan(events[2]["scalars"]["loss"]) and events[2]["scalars"]["tokens"] == 123456.0
  assert events[3]["scalars"] == {"neg": -1.0}


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


def test_logger_writes_tensorboard_scalars(tmp_path):
  run = str(tmp_path / "run")
  logger = MetricsLogger(run)
  logger.log(10, {"loss": 1.25, "tokens": 7})
  (path,) = glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))
  events = decode_events(path)  # before close: flushed per log
  assert events[1]["step"] == 10 and events[1]["scalars"] == {"loss": 1.25, "tokens": 7.0}
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
  starts = [e for path in glob.glob(os.path.join(run, "tensorboard", "*"))
            for e in decode_events(path) if "session_log_status" in e]
  assert [(e["step"], e["session_log_status"]) for e in starts] == [(4, 1)]  # SessionLog START


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
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  run = str(tmp_path / "run")
  logger = MetricsLogger(run)
  for step in (1, 2, 3):
    logger.log(step, {"loss": step / 4, "lr": 1e-3})
  logger.close()
  logger = MetricsLogger(run)  # crash after step 3, resume from step 2
  logger.truncate_after(2)
  logger.log(3, {"loss": 9.5, "lr": 1e-3})
  logger.close()

  acc = event_accumulator.EventAccumulator(os.path.join(run, "tensorboard"))
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]
  loss = acc.Scalars("loss")
  assert [(e.step, e.value) for e in loss] == [(1, 0.25), (2, 0.5), (3, 9.5)]
  assert [e.value for e in acc.Scalars("lr")] == [f32(1e-3)] * 3
  mine = [e for path in sorted(glob.glob(os.path.join(run, "tensorboard", "*")))
          for e in decode_events(path) if "scalars" in e]
  assert loss[0].wall_time == mine[0]["wall_time"]

  event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
  events = [event_pb2.Event.FromString(record)
            for path in sorted(glob.glob(os.path.join(run, "tensorboard", "*"))) for record in read_records(path)]
  assert [e.WhichOneof("what") for e in events] == (["file_version"] + ["summary"] * 3 + ["file_version"]
                                                     + ["session_log", "summary"])
  assert events[0].file_version == "brain.Event:2"
  assert events[5].session_log.status == event_pb2.SessionLog.START and events[5].step == 3
