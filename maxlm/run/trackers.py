"""Run metrics behind one tracker interface: `run_dir/metrics.jsonl` (strict JSON lines, always), TensorBoard
(tensorboardX) and Weights & Biases (when configured). The loop logs to a MetricsLogger and never asks which is on.
On an object store (run.dir=gs://...) metrics.jsonl is kept in a local copy and uploaded whole at each flush (before
every checkpoint), at close and at most every UPLOAD_SECONDS while logging; TensorBoard event files likewise.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import time
from typing import Any, Optional, Protocol

from maxlm.core import files
from maxlm.core.errors import ConfigError, DataError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
UPLOAD_SECONDS = 30  # how stale metrics.jsonl on an object store may get while a run logs
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class Tracker(Protocol):
  """Where metrics go. `resume_at(step)`: records after `step` came from a run that crashed; forget them.
  `flush()`: everything logged so far is on disk (called before every checkpoint, so a resume loses nothing)."""

  def log(self, step: int, metrics: dict[str, float]) -> None: ...
  def resume_at(self, step: int) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...


# ----------------------------------------------------------------------------- metrics.jsonl


def _jsonable(value: Any) -> int | float | str:
  if isinstance(value, numbers.Integral):
    return int(value)
  value = float(value)
  if math.isfinite(value):
    return value
  return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _read_lines(path: str) -> list[tuple[str, dict]]:
  """(line, record) pairs; a torn last line (no newline: the crash came mid-write) is not a record."""
  lines = files.read_text(path).split("\n")[:-1]
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
  if not files.exists(path):
    raise DataError(f"no {METRICS_FILE} in {run_dir!r}: is this a run directory, and has it logged a step?")
  return [{k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}
          for _, record in _read_lines(path)]


class JsonlTracker:
  """One line `{"step": S, **metrics}` per logged step, flushed as written: what is logged at the step of the last
  line (validation after the training metrics, probes) is merged into that line, so a reader keying records by step
  loses nothing. Non-finite floats are the strings "NaN", "Infinity", "-Infinity" so every line stays strict JSON
  (jq, pandas); `read_metrics` turns them back."""

  def __init__(self, run_dir: str):
    files.makedirs(run_dir)
    self._staged = files.StagedFile(os.path.join(run_dir, METRICS_FILE))  # the file itself when run_dir is local
    self.path = self._staged.local
    self._uploaded = time.monotonic()
    self._drop_torn_tail()
    self._open()

  def _open(self) -> None:
    self._file = open(self.path, "ab")
    self._last: Optional[dict] = None  # the record of the file's last line while this process wrote it
    self._last_offset = 0

  def _drop_torn_tail(self) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)

  def log(self, step: int, metrics: dict[str, float]) -> None:
    values = {k: _jsonable(v) for k, v in metrics.items()}
    if self._last is not None and self._last["step"] == int(step):
      self._last.update(values)
      self._file.truncate(self._last_offset)  # append mode: the rewritten line goes where the old one began
    else:
      self._last = {"step": int(step), **values}
      self._last_offset = self._file.tell()
    self._file.write((json.dumps(self._last, allow_nan=False) + "\n").encode("utf-8"))
    self._file.flush()
    if time.monotonic() - self._uploaded > UPLOAD_SECONDS:
      self.flush()

  def resume_at(self, step: int) -> None:
    self._file.close()
    kept = [line + "\n" for line, record in _read_lines(self.path) if record["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    self._open()
    self.flush()

  def flush(self) -> None:
    # Every line is on local disk as it is written; a run.dir on an object store gets the whole file now.
    self._staged.publish()
    self._uploaded = time.monotonic()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
      self._staged.publish()
      self._staged.cleanup()


# ----------------------------------------------------------------------------- TensorBoard, W&B


class TensorBoardTracker:
  """Scalars in `run_dir/tensorboard/events.out.tfevents.*` through tensorboardX. For a run_dir on an object store
  the event files are written locally and uploaded once complete (at each flush, close, and every UPLOAD_SECONDS
  while logging): tensorboardX's own gs:// writer re-uploads each whole file every few seconds and again when
  garbage-collected."""

  def __init__(self, run_dir: str):
    self.target = os.path.join(run_dir, TENSORBOARD_DIR)
    self.logdir = self.target
    if files.is_url(run_dir):
      import tempfile  # pylint: disable=import-outside-toplevel
      self.logdir = tempfile.mkdtemp(prefix="maxlm-tensorboard-")
    self._writer = None
    self._uploaded = time.monotonic()

  def _open(self, purge_step: Optional[int] = None):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # purge_step writes SessionLog START: TensorBoard then drops earlier events with step >= purge_step. The
    # nanosecond suffix keeps two sessions started within one second from sharing (and clobbering) a file, and
    # keeps the files in time order within that second.
    self._writer = SummaryWriter(self.logdir, purge_step=purge_step, flush_secs=5,
                                 filename_suffix=f".{time.time_ns()}")

  def log(self, step: int, metrics: dict[str, float]) -> None:
    if self._writer is None:
      self._open()
    for tag, value in metrics.items():
      self._writer.add_scalar(tag, float(value), global_step=int(step))
    if self.logdir != self.target and time.monotonic() - self._uploaded > UPLOAD_SECONDS:
      self.flush()

  def resume_at(self, step: int) -> None:
    if self._writer is not None:
      self._writer.close()
    self._open(purge_step=int(step) + 1)

  def flush(self) -> None:
    # SummaryWriter.flush() flushes the file but not the events its writer thread has not dequeued yet; close()
    # drains the queue. The next log opens a new event file, which TensorBoard reads after this one.
    self.close()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if self.logdir != self.target:  # complete event files go up once each, then leave the local folder
      for name in sorted(os.listdir(self.logdir)):
        files.upload(os.path.join(self.logdir, name), files.join(self.target, name))
        os.remove(os.path.join(self.logdir, name))
      self._uploaded = time.monotonic()


class WandbTracker:
  """Weights & Biases: one W&B run per run directory (its id is kept in run_dir, so a resumed run continues it).
  WANDB_MODE=offline (or `wandb offline`) writes under run_dir/wandb without a network."""

  def __init__(self, run_dir: str, project: str, config: Optional[dict] = None):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError(f"run.wandb_project = {project!r} needs Weights & Biases: pip install 'maxlm[wandb]' "
                        "(or set run.wandb_project='')") from None
    id_file = os.path.join(run_dir, "wandb_run_id")
    if files.exists(id_file):
      run_id = files.read_text(id_file).strip()
    else:
      run_id = secrets.token_hex(4)  # W&B run ids: short lowercase alphanumerics
      files.write_atomic(id_file, run_id)
    # W&B keeps its local files in a directory (its default ./wandb when run_dir is an object store).
    self._run = wandb.init(project=project, id=run_id, resume="allow", dir=None if files.is_url(run_dir) else run_dir,
                           config=config, name=os.path.basename(files.absolute(run_dir)), reinit="create_new")

  def log(self, step: int, metrics: dict[str, float]) -> None:
    self._run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

  def resume_at(self, step: int) -> None:
    pass  # W&B ignores steps at or below the ones it has; later steps overwrite nothing

  def flush(self) -> None:
    pass  # wandb's service process holds the run; finish() at close() completes it

  def close(self) -> None:
    import wandb  # pylint: disable=import-outside-toplevel
    self._run.finish()
    # finish() only tells wandb's service process the run is over; the service closes (and flushes) the run's
    # transaction log later, at the latest in its atexit teardown, which multiprocessing can skip. Tear the service
    # down now, so the .wandb file is complete when close() returns, unless another run of this process still uses it.
    if wandb.run is None:
      wandb.teardown()


# ----------------------------------------------------------------------------- the logger


class MetricsLogger:
  """Sends `log(step, metrics)` to every tracker. Only the primary process writes; after a resume from checkpoint
  step S, `truncate_after(S)` drops what the crashed run logged past S so no step is recorded twice."""

  def __init__(self, run_dir: str, *, tensorboard: bool = True, is_primary: bool = True, wandb_project: str = "",
               config: Optional[dict] = None):
    self.trackers: list[Tracker] = []
    if not is_primary:
      return
    self.trackers.append(JsonlTracker(run_dir))
    if tensorboard:
      self.trackers.append(TensorBoardTracker(run_dir))
    if wandb_project:
      self.trackers.append(WandbTracker(run_dir, wandb_project, config))

  def log(self, step: int, metrics: dict[str, Any]) -> None:
    if "step" in metrics:
      raise ValueError("'step' is the record key, not a metric name")
    for tracker in self.trackers:
      tracker.log(step, metrics)

  def flush(self) -> None:
    for tracker in self.trackers:
      tracker.flush()

  def truncate_after(self, step: int) -> None:
    for tracker in self.trackers:
      tracker.resume_at(step)

  def close(self) -> None:
    for tracker in self.trackers:
      tracker.close()
    self.trackers = []
