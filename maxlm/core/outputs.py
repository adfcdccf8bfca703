"""Outputs of maxlm's commands: directories (HF exports, imports, derived checkpoints) and files (evaluation JSON,
completions, plots, task CSVs), written atomically, never inside a run's checkpoints/ or over a run's own files, and
never replacing anything but an earlier output of the same command (a file's: recorded with its hash under
~/.cache/maxlm/outputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterator

from maxlm.core.paths import file_sha256
from maxlm.core.errors import ConversionError, DataError


@dataclasses.dataclass(frozen=True)
class OutputKind:
  """What a command writes: the marker file it leaves, and the names (globs) its output directory may hold."""
  what: str
  marker: str
  names: tuple[str, ...]


HF_EXPORT = OutputKind("a Hugging Face export (maxlm.convert to-hf)", "maxlm_export.json",
                       ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                        "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "adapter_config.json",
                        "adapter_model.safetensors", "README.md", "maxlm_export.json"))
HF_IMPORT = OutputKind("an import (maxlm.convert from-hf)", "maxlm_import.json",
                       ("checkpoints", "tokenizer", "config.yaml", "config.json", "maxlm_import.json"))
DERIVED_RUN = OutputKind("a derived checkpoint (maxlm.analyze resuscitate / widen)", "maxlm_derived.json",
                         ("checkpoints", "tokenizer", "config.yaml", "config.json", "maxlm_derived.json"))


def replaceable(path: str, kind: OutputKind) -> tuple[bool, str]:
  """(True, "") when `path` is an earlier output of `kind` and nothing else; else (False, why)."""
  names = os.listdir(path)
  if kind.marker not in names:
    what = "a maxlm run" if {"checkpoints", "metrics.jsonl", "config.yaml"} & set(names) else "not written by maxlm"
    return False, f"it is {what} ({len(names)} entries, no {kind.marker})"
  foreign = [n for n in names if not any(fnmatch.fnmatch(n, g) for g in kind.names)]
  if foreign:
    return False, f"it holds files {kind.what} does not write: {', '.join(sorted(foreign)[:6])}"
  if kind is not HF_EXPORT and os.path.isfile(os.path.join(path, "metrics.jsonl")):
    return False, "it has been trained in (metrics.jsonl)"
  return True, ""


# What makes a directory a maxlm run (training, import or derived checkpoint), and the files that are its own.
RUN_SIGNS = ("checkpoints", "metrics.jsonl", "config.yaml", "maxlm.lock", HF_IMPORT.marker, DERIVED_RUN.marker)
RUN_FILES = ("metrics.jsonl", "config.yaml", "config.json", "maxlm.lock", HF_IMPORT.marker, DERIVED_RUN.marker)
CHECKPOINT_DIRS = ("checkpoints", "checkpoints.unreadable")


def _is_run(directory: str) -> bool:
  return os.path.isdir(directory) and any(os.path.exists(os.path.join(directory, n)) for n in RUN_SIGNS)


def protected(path: str) -> str:
  """Why maxlm must never write at `path` (inside a run's checkpoints/, a run's own file, inside a token store);
  "" when it may."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.basename(path) in RUN_FILES and _is_run(os.path.dirname(path)):
    return f"it is the run {os.path.dirname(path)}'s own {os.path.basename(path)}"
  if os.path.basename(path) in CHECKPOINT_DIRS and _is_run(os.path.dirname(path)):
    return f"it is the run {os.path.dirname(path)}'s {os.path.basename(path)}/"
  child, parent = path, os.path.dirname(path)
  while parent != child:
    if os.path.basename(child) in CHECKPOINT_DIRS and _is_run(parent):
      return (f"it is inside the run {parent}'s {os.path.basename(child)}/, which holds only what maxlm saves there "
              "(checkpoint rotation deletes the rest)")
    if os.path.isfile(os.path.join(parent, "manifest.json")) and os.path.isdir(os.path.join(parent, "domains")):
      return f"it is inside the token store {parent}"
    child, parent = parent, os.path.dirname(parent)
  return ""


def check_target(output: str, kind: OutputKind, overwrite: bool) -> str:
  """The absolute output path, after refusing a place inside a run's checkpoints/ (or a run's own file), a plain
  file, a non-empty directory (without overwrite) and, with overwrite, anything but an earlier output of the same
  kind."""
  output = os.path.abspath(os.path.expanduser(output))
  why = protected(output)
  if why:
    raise ConversionError(f"--output {output} refused: {why}. Nothing was written; choose a directory outside it")
  if os.path.lexists(output) and not os.path.isdir(output):
    raise ConversionError(f"output {output} exists and is not a directory; choose a new directory path")
  if os.path.isdir(output) and os.listdir(output):
    if not overwrite:
      raise ConversionError(f"output {output} already exists and is not empty; choose a new directory or pass "
                            "--overwrite")
    ok, why = replaceable(output, kind)
    if not ok:
      raise ConversionError(f"--overwrite refused: {output} is not {kind.what} that can be replaced: {why}. Nothing "
                            "was deleted; choose a new output directory")
  return output


@contextlib.contextmanager
def atomic_output(output: str, kind: OutputKind, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `output` that is renamed to `output` only if the block succeeds, so a failed or
  killed command never leaves a directory that looks complete. The block must write `kind.marker`."""
  output = check_target(output, kind, overwrite)
  parent = os.path.dirname(output)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
  except OSError as e:
    raise ConversionError(f"--output {output} cannot be written ({e.strerror or e}): choose a directory on a "
                          "writable filesystem") from None
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick to the final directory
  try:
    yield tmp
    if not os.path.isfile(os.path.join(tmp, kind.marker)):
      raise ValueError(f"{kind.what} must write its marker {kind.marker}")
    old = None
    if os.path.exists(output):
      check_target(output, kind, overwrite)  # still an earlier output, right before it goes
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=parent)
      os.rename(output, os.path.join(old, "x"))
    os.rename(tmp, output)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ConversionError(f"writing {kind.what} to {output} failed ({e.strerror or e}); nothing was left at "
                          f"{output}: free space or choose another --output and run it again") from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ----------------------------------------------------------------------------- files

def _record_path(path: str) -> str:
  """Where the record of the file maxlm wrote at `path` lives: one small JSON per output under the user's cache
  (MAXLM_OUTPUT_RECORDS, default ~/.cache/maxlm/outputs), so output folders hold only what was asked for."""
  root = os.environ.get("MAXLM_OUTPUT_RECORDS") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "maxlm", "outputs")
  return os.path.join(root, hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".json")


def written_by(path: str) -> str:
  """The maxlm command that wrote the file at `path` as it is now (its path and hash recorded), or ""."""
  path = os.path.abspath(path)
  try:
    with open(_record_path(path), encoding="utf-8") as f:
      entry = json.load(f)
  except (OSError, ValueError):
    return ""
  if not isinstance(entry, dict) or entry.get("path") != path or not os.path.isfile(path):
    return ""
  return entry.get("command", "") if entry.get("sha256") == file_sha256(path) else ""


def _record(path: str, command: str) -> None:
  record = _record_path(path)
  try:
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record + ".tmp", "w", encoding="utf-8") as f:
      json.dump({"path": path, "command": command, "sha256": file_sha256(path)}, f)
    os.replace(record + ".tmp", record)
  except OSError:
    pass  # the output is written; only a later --overwrite of it will be refused


def check_file(path: str, command: str, *, overwrite: bool = False, flag: str = "--output") -> str:
  """The absolute path of a file `command` may write: a DataError for a place inside a run's checkpoints/ or a token
  store, a run's own file, a directory, and an existing file unless `overwrite` and it is an earlier output of
  `command` unchanged since."""
  path = os.path.abspath(os.path.expanduser(path))
  why = protected(path)
  if why:
    raise DataError(f"{flag} {path} refused: {why}. Nothing was written; choose a file outside it")
  if os.path.isdir(path):
    raise DataError(f"{flag} {path} is a directory; give a file name")
  parent = os.path.dirname(path)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise DataError(f"{flag} {path}: {parent} is a file, so no directory can be made below it; choose another path")
  if os.path.lexists(path):
    if not overwrite:
      raise DataError(f"{flag} {path} already exists; choose a new file, or pass --overwrite to replace an earlier "
                      f"output of {command} (nothing else is replaced)")
    owner = written_by(path)
    if owner != command:
      what = f"an output of {owner}" if owner else "a file maxlm did not write (or one changed since)"
      raise DataError(f"--overwrite refused: {path} is {what}, not an earlier output of {command}. Nothing was "
                      "replaced; choose a new file")
  return path


@contextlib.contextmanager
def atomic_file(path: str, command: str, *, overwrite: bool = False, flag: str = "--output") -> Iterator[str]:
  """Yields a temporary sibling of `path` for the block to write; on success it replaces `path` (checked as
  `check_file` does) and is recorded as `command`'s output, so a later --overwrite may replace it. A failed block
  leaves `path` as it was."""
  path = check_file(path, command, overwrite=overwrite, flag=flag)
  parent = os.path.dirname(path)
  base, ext = os.path.splitext(os.path.basename(path))
  try:
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.partial-", suffix=ext, dir=parent)
    os.close(fd)
  except OSError as e:
    raise DataError(f"{flag} {path} cannot be written ({e.strerror or e}): choose a writable place") from None
  try:
    yield tmp
    check_file(path, command, overwrite=overwrite, flag=flag)  # still replaceable, right before it goes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would otherwise stick to the output
    os.replace(tmp, path)
  except OSError as e:
    raise DataError(f"writing {path} failed ({e.strerror or e}); it was left as it was") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  _record(path, command)


def write_text(path: str, command: str, text: str, *, overwrite: bool = False, flag: str = "--output") -> str:
  """Writes `text` (UTF-8) to `path` as atomic_file does; returns the absolute path."""
  with atomic_file(path, command, overwrite=overwrite, flag=flag) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return os.path.abspath(os.path.expanduser(path))
