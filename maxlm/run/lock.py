"""The run directory's lock: one live training job per `run.dir`, refused with the holder's pid, host and start time.

An fcntl lock on `run.dir/maxlm.lock` is released by the kernel when its holder dies, so a stale lock is broken
safely; under jax.distributed only process 0 holds it (one lock for the job) and every process learns the result.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from typing import Optional

import jax

from maxlm.core.errors import MaxlmError

LOCK_FILE = "maxlm.lock"


class RunDirBusyError(MaxlmError):
  """Another live job trains in this run directory."""


def _holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.loads(f.read() or "{}")
  except (OSError, ValueError):
    return {}


# What a job writes before its first logged step or checkpoint: a directory holding only these held nothing of value.
SETUP_FILES = (LOCK_FILE, "config.yaml", "config.json", "checkpoints", "tensorboard")


class RunDirLock:
  """`with RunDirLock(run_dir):` holds the directory for this job; entering raises RunDirBusyError if it is held.
  A run.dir this lock created is removed again when the block fails before anything of value was written in it
  (only SETUP_FILES, no checkpoint step): a rejected run leaves nothing behind."""

  def __init__(self, run_dir: str):
    self.run_dir = run_dir
    self.path = os.path.join(run_dir, LOCK_FILE)
    self._fd: Optional[int] = None
    self._created: Optional[str] = None

  def _try_acquire(self) -> Optional[str]:
    """None on success, else a description of the holder."""
    self._created = None  # the outermost directory this lock makes, if any (run.dir or one of its parents)
    path = os.path.abspath(self.run_dir)
    while not os.path.exists(path):
      self._created, path = path, os.path.dirname(path)
    os.makedirs(self.run_dir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      h = _holder(self.path)
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if "since" in h else "an unknown time"
      return (f"pid {h.get('pid', '?')} on host {h.get('host', '?')} (started {since}, "
              f"{h.get('processes', 1)} process(es))")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "processes": jax.process_count()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    os.fsync(fd)
    self._fd = fd
    return None

  def __enter__(self):
    holder = self._try_acquire() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      import numpy as np  # pylint: disable=import-outside-toplevel
      busy = multihost_utils.broadcast_one_to_all(np.int32(holder is not None))
      if int(busy) and holder is None:
        holder = "another job (see the lock on process 0's host)"
    if holder is not None:
      raise RunDirBusyError(f"run.dir {self.run_dir} is in use by {holder}: two jobs in one run directory would "
                            f"overwrite each other's checkpoints and metrics. Wait for that job to finish (or stop it), "
                            f"or choose another run.dir")
    return self

  def __exit__(self, exc_type, *exc):
    if self._fd is not None:
      if exc_type is not None and self._created and self._holds_nothing():
        shutil.rmtree(self.run_dir, ignore_errors=True)  # still locked: nobody else can have started in it
        parent = os.path.dirname(os.path.abspath(self.run_dir))
        while len(parent) >= len(self._created) and os.path.isdir(parent) and not os.listdir(parent):
          os.rmdir(parent)  # the parents this lock made, while nothing else is in them
          parent = os.path.dirname(parent)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    return False

  def _holds_nothing(self) -> bool:
    try:
      names = os.listdir(self.run_dir)
      steps = os.listdir(os.path.join(self.run_dir, "checkpoints")) if "checkpoints" in names else []
    except OSError:
      return False
    return set(names) <= set(SETUP_FILES) and not steps
