"""The filesystem seam for what a run writes beside its arrays: local paths through os, gs:// (and s3://) URLs through
fsspec (gcsfs), plus the tensorstore kvstore spec of either; orbax and tensorstore read and write the arrays themselves.

STORAGE_EMULATOR_HOST (a GCS emulator such as fake-gcs-server) points every client at it: gcsfs and
google-cloud-storage read it themselves; tensorstore is given TENSORSTORE_GCS_HTTP_URL and a test token here.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any, Optional

from maxlm.core.errors import ConfigError

OBJECT_STORES = ("gs", "s3")


def point_clients_at_emulator() -> None:
  """When STORAGE_EMULATOR_HOST names a GCS emulator, points tensorstore and gcsfs at it too (idempotent; call it
  after setting the variable in a running process, before the first gs:// access)."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if not emulator:
    return
  if "://" not in emulator:
    emulator = "http://" + emulator
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore: no real credentials to find
  # gcsfs >= 2025 first asks the bucket's type over gRPC, which an emulator does not serve (60 s per call before
  # falling back): its plain HTTP filesystem is what an emulator speaks.
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  if "gcsfs" in sys.modules:  # imported before the variable was set: register the plain filesystem by hand
    import fsspec  # pylint: disable=import-outside-toplevel
    from gcsfs.core import GCSFileSystem  # pylint: disable=import-outside-toplevel
    for protocol in ("gs", "gcs"):
      fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)


def _no_stale_listings() -> None:
  """gcsfs caches directory listings per filesystem instance, and orbax (through etils.epath) keeps one instance for
  the life of the process: a Checkpointer would then miss steps another process (a resumed job, a trainer beside an
  evaluation) wrote since. Listings are read afresh unless the user configured fsspec otherwise."""
  try:
    import fsspec.config  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


point_clients_at_emulator()
_no_stale_listings()


def is_url(path: str) -> bool:
  """An object-store URL (gs://bucket/path, s3://bucket/path), as opposed to a local path."""
  return bool(re.match(r"^[a-z][a-z0-9+.-]*://", str(path))) and not str(path).startswith("file://")


def absolute(path: str) -> str:
  """A local path made absolute (~ expanded); a URL unchanged but for a trailing slash."""
  path = str(path)
  if is_url(path):
    return path.rstrip("/")
  if path.startswith("file://"):
    path = path[len("file://"):]
  return os.path.abspath(os.path.expanduser(path))


def join(path: str, *names: str) -> str:
  return os.path.join(str(path), *names)  # "gs://b/run" + "x" -> "gs://b/run/x", as for local paths


def parent(path: str) -> str:
  return os.path.dirname(str(path).rstrip("/"))


def check_url_support(path: str, what: str = "") -> None:
  """A ConfigError naming the fix when `path` is a URL this installation cannot write a run to: run directories on
  gs:// need gcsfs (files, orbax's metadata) and google-cloud-storage (the run lock, TensorBoard); s3:// is not
  supported for run directories (no lock with preconditions, untested)."""
  if not is_url(path):
    return
  point_clients_at_emulator()
  scheme = path.split("://", 1)[0]
  if scheme != "gs":
    raise ConfigError(f"{what or path}: run directories on {scheme}:// are not supported (gs:// is); use "
                      "gs://BUCKET/PATH or a path every host sees")
  for module, package in (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage")):
    try:
      __import__(module)
    except ImportError:
      raise ConfigError(f"{what or path} needs the {package} package: pip install 'maxlm[gcs]'") from None


def _fs(path: str):
  """The fsspec filesystem of a URL, with the fix named when its client is not installed."""
  point_clients_at_emulator()
  scheme = str(path).split("://", 1)[0]
  if scheme not in OBJECT_STORES:
    raise ConfigError(f"{path}: unsupported URL scheme {scheme}://; use a local path, gs://BUCKET/PATH or "
                      "s3://BUCKET/PATH")
  try:
    import fsspec  # pylint: disable=import-outside-toplevel
    # No listings cache: another process (a resumed job, another host) replaces these objects between our reads.
    return fsspec.filesystem(scheme, use_listings_cache=False)
  except ImportError:
    package = "gcsfs" if scheme == "gs" else "s3fs"
    raise ConfigError(f"{path} needs the {package} package to read and write {scheme}:// objects: "
                      f"pip install 'maxlm[gcs]' (or pip install {package})") from None


def exists(path: str) -> bool:
  return _fs(path).exists(path) if is_url(path) else os.path.exists(absolute(path))


def isdir(path: str) -> bool:
  """A local directory, or a URL prefix holding at least one object."""
  return _fs(path).isdir(path) if is_url(path) else os.path.isdir(absolute(path))


def isfile(path: str) -> bool:
  return _fs(path).isfile(path) if is_url(path) else os.path.isfile(absolute(path))


def size(path: str) -> int:
  return int(_fs(path).size(path)) if is_url(path) else os.path.getsize(absolute(path))


def listdir(path: str) -> list[str]:
  """The names directly under a directory or URL prefix; [] when there is none."""
  if not is_url(path):
    try:
      return os.listdir(absolute(path))
    except OSError:
      return []
  try:
    return sorted({os.path.basename(p.rstrip("/")) for p in _fs(path).ls(path, detail=False)} - {""})
  except FileNotFoundError:
    return []


def makedirs(path: str) -> None:
  """A local directory and its parents; nothing for a URL (object stores have no directories)."""
  if not is_url(path):
    os.makedirs(absolute(path), exist_ok=True)


def open_file(path: str, mode: str = "r", **kwargs) -> Any:
  """open() for a local path or a URL; a URL opened for writing becomes one object when the file is closed."""
  if is_url(path):
    return _fs(path).open(path, mode, **kwargs)
  return open(absolute(path), mode, **kwargs)  # pylint: disable=unspecified-encoding


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_atomic(path: str, data: bytes | str) -> None:
  """Replaces a file whole: a local temp file renamed over it, or one object upload (atomic on object stores)."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_url(path):
    _fs(path).pipe_file(path, data)
    return
  path = absolute(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def upload(local: str, path: str) -> None:
  """Copies a local file to `path` (a URL or a local path) whole."""
  if is_url(path):
    _fs(path).put_file(local, path)
  else:
    shutil.copyfile(local, absolute(path))


def remove(path: str) -> None:
  """Deletes a file or object; nothing when it is gone."""
  try:
    if is_url(path):
      _fs(path).rm_file(path)
    else:
      os.remove(absolute(path))
  except FileNotFoundError:
    pass


def rmtree(path: str) -> None:
  """Deletes a directory or every object under a URL prefix; nothing when there is none."""
  if not is_url(path):
    shutil.rmtree(absolute(path), ignore_errors=True)
    return
  try:
    _fs(path).rm(path, recursive=True)
  except FileNotFoundError:
    pass


def move(src: str, dst: str) -> None:
  """Moves a directory (or object prefix) to `dst`; on object stores a copy of every object, then their deletion."""
  if is_url(src):
    fs = _fs(src)
    fs.copy(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
    fs.rm(src, recursive=True)
    return
  shutil.move(absolute(src), absolute(dst))


def kvstore_spec(path: str) -> dict:
  """A tensorstore kvstore spec for a directory: a local path or file:// URL, gs://bucket/path or s3://bucket/path."""
  point_clients_at_emulator()
  m = re.match(r"^(gs|s3)://([^/]+)/?(.*)$", str(path))
  if m:
    scheme, bucket, key = m.groups()
    key = key.rstrip("/") + "/" if key else ""
    return {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket, "path": key}
  if is_url(path):
    raise ConfigError(f"unsupported URL {path!r}: use a local path, gs://bucket/path or s3://bucket/path")
  return {"driver": "file", "path": absolute(path) + "/"}


class StagedFile:
  """A local working copy of a file that lives at `path`: the path itself when local; for a URL a temp file,
  downloaded when the object exists and uploaded whole by `publish()` (objects cannot be appended to)."""

  def __init__(self, path: str, tmp_dir: Optional[str] = None):
    self.target = path
    self.remote = is_url(path)
    if not self.remote:
      self.local = absolute(path)  # a relative path is its own working copy too: never copied onto itself
      return
    import tempfile  # pylint: disable=import-outside-toplevel
    self._tmp = tempfile.mkdtemp(prefix="maxlm-staged-", dir=tmp_dir)
    self.local = os.path.join(self._tmp, os.path.basename(path))
    if exists(path):
      with open(self.local, "wb") as f:
        f.write(read_bytes(path))

  def publish(self) -> None:
    if self.remote and os.path.exists(self.local):
      upload(self.local, self.target)

  def cleanup(self) -> None:
    """Removes the local copy of a URL's file (after the last publish)."""
    if self.remote:
      shutil.rmtree(os.path.dirname(self.local), ignore_errors=True)
