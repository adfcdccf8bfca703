"""Local-path rules the config layer applies and the data layer shares: which file of a model or tokenizer
directory is its tokenizer.
"""

from __future__ import annotations

import hashlib
import os


def tokenizer_file_in(directory: str) -> str | None:
  """A model directory's main tokenizer file (tokenizer.json, else SentencePiece's tokenizer.model), or None."""
  return next((os.path.join(directory, n) for n in ("tokenizer.json", "tokenizer.model")
               if os.path.isfile(os.path.join(directory, n))), None)


def resolve_tokenizer_path(path: str) -> str:
  """`path`, or for a directory (a Hugging Face model or tokenizer folder) its main tokenizer file; unchanged when
  the directory has none (the caller reports it)."""
  return (tokenizer_file_in(path) or path) if path and os.path.isdir(path) else path


def file_sha256(path: str) -> str:
  """The SHA-256 hex digest of a local file, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
