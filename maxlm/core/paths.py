"""Local-path rules the config layer applies and the data layer shares: which file of a model or tokenizer
directory is its tokenizer.
"""

from __future__ import annotations

import os


def tokenizer_file_in(directory: str) -> str | None:
  """A model directory's main tokenizer file (tokenizer.json, else SentencePiece's tokenizer.model), or None."""
  return next((os.path.join(directory, n) for n in ("tokenizer.json", "tokenizer.model")
               if os.path.isfile(os.path.join(directory, n))), None)


def resolve_tokenizer_path(path: str) -> str:
  """`path`, or for a directory (a Hugging Face model or tokenizer folder) its main tokenizer file; unchanged when
  the directory has none (the caller reports it)."""
  return (tokenizer_file_in(path) or path) if path and os.path.isdir(path) else path
