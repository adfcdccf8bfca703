"""The run directory's lock: one live training job per `run.dir`, refused with the holder's pid, host and start time.

An fcntl lock on `run.dir/maxlm.lock` is released by the kernel when its holder dies, so a stale lock is broken
safely; under jax.distributed only process 0 holds it (one lock for the job) and every process learns the result.
On an object store (run.dir=gs://...) the lock is a lease (ObjectLease): see there what it does and does not promise.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import threading
import time
from typing import Optional

import jax

from maxlm.core import files
from maxlm.core.errors import ConfigError, MaxlmError

LOCK_FILE = "maxlm.lock"
LEASE_SECONDS = 300  # an object-store lock whose holder has not renewed it for this long is taken over


class RunDirBusyError(MaxlmError):
  """Another live job trains in this run directory."""


def _holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.loads(f.read() or "{}")
  except (OSError, ValueError):
    return {}


# What a job writes before its first logged step or checkpoint: a directory holding only these held nothing of value.
SETUP_FILES = (LOCK_FILE, "config.yaml", "config.json", "checkpoints", "tensorboard", "maxlm.token")


class RunDirLock:
  """`with RunDirLock(run_dir):` holds the directory for this job; entering raises RunDirBusyError if it is held.
  A run.dir this lock created is removed again when the block fails before anything of value was written in it
  (only SETUP_FILES, no checkpoint step): a rejected run leaves nothing behind."""

  def __init__(self, run_dir: str):
    self.run_dir = run_dir
    self.path = os.path.join(run_dir, LOCK_FILE)
    self._fd: Optional[int] = None
    self._created: Optional[str] = None
    self._lease: Optional[ObjectLease] = None

  def _try_acquire(self) -> Optional[str]:
    """None on success, else a description of the holder."""
    if files.is_url(self.run_dir):
      self._created = None if files.listdir(self.run_dir) else self.run_dir
      lease = ObjectLease(self.path)
      holder = lease.acquire()
      self._lease = lease if holder is None else None
      return holder
    self._created = None  # the outermost directory this lock makes, if any (run.dir or one of its parents)
    path = os.path.abspath(self.run_dir)
    while not os.path.exists(path):
      self._created, path = path, os.path.dirname(path)
    try:
      os.makedirs(self.run_dir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ConfigError(f"run.dir {self.run_dir} cannot be written ({e.strerror or e}): choose a run.dir on a "
                        "writable filesystem") from None
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
                            "overwrite each other's checkpoints and metrics. Wait for that job to finish (or stop it), "
                            "or choose another run.dir")
    return self

  def __exit__(self, exc_type, *exc):
    if self._lease is not None:
      if exc_type is not None and self._created and self._holds_nothing():
        files.rmtree(self.run_dir)  # the lease object goes with it
      self._lease.release()
      self._lease = None
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
      names = files.listdir(self.run_dir)
      steps = files.listdir(os.path.join(self.run_dir, "checkpoints")) if "checkpoints" in names else []
    except OSError:
      return False
    return set(names) <= set(SETUP_FILES) and not steps


class ObjectLease:
  """The run lock on an object store: the object `run.dir/maxlm.lock` holding {pid, host, since}, created only if
  absent and renewed every LEASE_SECONDS/4 by a thread of its holder, each write conditioned on the object's GCS
  generation (so of two jobs racing for it exactly one wins, and a holder whose lease was taken over learns it).

  What it promises is weaker than fcntl's: a holder that dies leaves the object behind. A holder on this host whose
  pid is gone is taken over at once; one on another host only once it has not renewed for LEASE_SECONDS (judged by
  the object's server-side update time against this host's clock). A job that stalls (e.g. a stopped process) past
  the lease can lose the lock to another job; it warns when it finds that, but does not stop."""

  def __init__(self, url: str):
    self.url = url
    bucket, _, self.name = url[len("gs://"):].partition("/")
    files.check_url_support(url)
    from google.cloud import storage  # pylint: disable=import-outside-toplevel
    self._bucket = storage.Client().bucket(bucket)
    self._generation: Optional[int] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def acquire(self) -> Optional[str]:
    """None when this job holds the lease now, else a description of the holder."""
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "processes": jax.process_count(), "lease_seconds": LEASE_SECONDS}
    try:
      existing = self._bucket.get_blob(self.name)
    except (exceptions.NotFound, exceptions.Forbidden, exceptions.Unauthorized) as e:
      raise ConfigError(f"run.dir {os.path.dirname(self.url)} cannot be used ({type(e).__name__}: "
                        f"{str(e)[:200]}): create the bucket, or give these credentials read and write access to "
                        "it (gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS)") from None
    if existing is not None:
      try:
        holder = json.loads(existing.download_as_bytes() or b"{}")
      except (ValueError, exceptions.NotFound):
        holder = {}
      renewed = existing.updated.timestamp() if existing.updated else 0.0
      if not self._stale(holder, renewed):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
        return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {since}, "
                f"{holder.get('processes', 1)} process(es); its lease on {self.url} was renewed "
                f"{time.time() - renewed:.0f}s ago and lapses {LEASE_SECONDS}s after its last renewal)")
    blob = self._bucket.blob(self.name)
    try:  # create if absent, or replace exactly the stale object read above: one job wins a race
      blob.upload_from_string(json.dumps(info), content_type="application/json",
                              if_generation_match=existing.generation if existing is not None else 0)
    except exceptions.PreconditionFailed:
      return f"another job, which took {self.url} a moment ago"
    self._generation = blob.generation
    self._info = info
    self._thread = threading.Thread(target=self._renew, name="maxlm-run-lease", daemon=True)
    self._thread.start()
    return None

  @staticmethod
  def _stale(holder: dict, renewed: float) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      try:
        os.kill(holder["pid"], 0)
      except ProcessLookupError:
        return True  # its holder died on this host
      except PermissionError:
        pass
    return time.time() - renewed > LEASE_SECONDS

  def _renew(self) -> None:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    while not self._stop.wait(LEASE_SECONDS / 4):
      blob = self._bucket.blob(self.name)
      try:
        blob.upload_from_string(json.dumps({**self._info, "renewed": time.time()}),
                                content_type="application/json", if_generation_match=self._generation)
        self._generation = blob.generation
      except exceptions.PreconditionFailed:
        print(f"maxlm: warning: the run lock {self.url} was taken over by another job (this one did not renew it "
              f"for {LEASE_SECONDS}s); two jobs may now write this run.dir", flush=True)
        return
      except Exception:  # pylint: disable=broad-except  (a transient error: the next renewal tries again)
        pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation is not None:
      from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
      try:
        self._bucket.blob(self.name).delete(if_generation_match=self._generation)
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        pass  # gone with run.dir, or no longer ours
      self._generation = None
