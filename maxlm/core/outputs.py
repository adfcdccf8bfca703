"""Output directories of maxlm's commands (HF exports, imports, derived checkpoints): written atomically, and never
replaced unless they hold exactly what a previous run of the same kind of command wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
import shutil
import tempfile
from typing import Iterator

from maxlm.core.errors import ConversionError


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


def check_target(output: str, kind: OutputKind, overwrite: bool) -> str:
  """The absolute output path, after refusing a plain file, a non-empty directory (without overwrite) and, with
  overwrite, anything but an earlier output of the same kind."""
  output = os.path.abspath(os.path.expanduser(output))
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
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
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
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
