"""Run metrics on disk: `run_dir/metrics.jsonl` (one strict-JSON line per logged step) and TensorBoard scalars.

Owns the dependency-free TensorBoard event-file writer (TFRecord framing, CRC32C, hand-encoded Event protos).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import socket
import struct
import time
from typing import Any

from maxlm.errors import DataError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum TFRecord framing uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 on the wire: negatives are 10-byte two's complement
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(field: int, payload: bytes, step: int | None = None) -> bytes:
  """A tensorflow.Event: wall_time (1), step (2) and one of file_version (3), summary (5), session_log (7)."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", time.time())
  if step is not None:
    out += _varint(2 << 3 | 0) + _varint(step)
  return out + _bytes_field(field, payload)


class EventFileWriter:
  """Writes `logdir/events.out.tfevents.<time>.<hostname>`, readable by TensorBoard without TensorFlow."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}")
    # Append, never clobber: a restart within the same second reuses the name.
    self._file = open(self.path, "ab")
    self._write(_event(3, b"brain.Event:2"))
    self.flush()

  def _write(self, payload: bytes) -> None:
    header = struct.pack("<Q", len(payload))
    self._file.write(header + struct.pack("<I", masked_crc32c(header)))
    self._file.write(payload + struct.pack("<I", masked_crc32c(payload)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    summary = b"".join(
      _bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(v)))
      for tag, v in values.items())
    self._write(_event(5, summary, step=int(step)))

  def restart_at(self, step: int) -> None:
    """Writes SessionLog START at `step`: TensorBoard then drops the earlier events with step >= `step`."""
    start = _varint(1 << 3 | 0) + _varint(1)  # SessionLog.status = START
    self._write(_event(7, start, step=int(step)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


def _jsonable(value: Any) -> int | float | str:
  if isinstance(value, numbers.Integral):
    return int(value)
  value = float(value)
  if math.isfinite(value):
    return value
  return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _read_lines(path: str) -> list[tuple[str, dict]]:
  """(line, record) pairs; a torn last line (no newline: the crash came mid-write) is not a record."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")[:-1]
  pairs = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      raise DataError(f"{path} line {number} is not a metrics record (a JSON object with an integer "
                      f"'step'): {line[:200]!r}; fix or delete that line.")
    pairs.append((line, record))
  return pairs


def read_metrics(run_dir: str) -> list[dict]:
  """Every record in `run_dir/metrics.jsonl`, in file order, non-finite strings turned back into floats."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    raise DataError(f"no {METRICS_FILE} in {run_dir!r}: is this a run directory, and has it logged a step?")
  return [{k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}
          for _, record in _read_lines(path)]


class MetricsLogger:
  """Appends `{"step": S, **metrics}` to `run_dir/metrics.jsonl` and the same scalars to TensorBoard.

  Only the primary process writes. On resume from checkpoint step S, call `truncate_after(S)` before
  logging, so the steps re-run after a crash are not recorded twice. Each line is flushed as written.
  Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity" so every line stays strict
  JSON (jq, pandas, other languages); `read_metrics` turns them back into floats.
  """

  def __init__(self, run_dir: str, *, tensorboard: bool = True, is_primary: bool = True):
    self.path = os.path.join(run_dir, METRICS_FILE)
    self._file = None
    self._events = None
    if not is_primary:
      return
    os.makedirs(run_dir, exist_ok=True)
    self._drop_torn_tail()
    self._file = open(self.path, "a", buffering=1, encoding="utf-8")
    if tensorboard:
      self._events = EventFileWriter(os.path.join(run_dir, TENSORBOARD_DIR))

  def _drop_torn_tail(self) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)

  def log(self, step: int, metrics: dict[str, Any]) -> None:
    if self._file is None:
      return
    if "step" in metrics:
      raise ValueError("'step' is the record key, not a metric name")
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._events is not None:
      self._events.scalars(step, {k: float(v) for k, v in metrics.items()})
      self._events.flush()

  def truncate_after(self, step: int) -> None:
    """Drops the records with step > `step` (and hides those TensorBoard events), e.g. after a resume."""
    if self._file is None:
      return
    self._file.close()
    kept = [line + "\n" for line, record in _read_lines(self.path) if record["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", buffering=1, encoding="utf-8")
    if self._events is not None:
      self._events.restart_at(step + 1)
      self._events.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._events is not None:
      self._events.close()
      self._events = None
