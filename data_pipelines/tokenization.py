"""Text tokenizers for the token store: a local HF tokenizer.json or SentencePiece .model behind one small class,
with the document separator id, vocab size and a content hash recorded in the store manifest.
"""

from __future__ import annotations

import hashlib
import os

from maxlm.errors import DataError

# Tried in order when no separator is given: end-of-document tokens of common tokenizers.
SEPARATOR_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def tokenizer_kind(path: str) -> str:
  if path.endswith(".json"):
    return "hf"
  if path.endswith(".model"):
    return "sentencepiece"
  with open(path, "rb") as f:
    head = f.read(1).lstrip()
  return "hf" if head == b"{" else "sentencepiece"


class TextTokenizer:
  """Encodes documents without special tokens (the separator is appended by the caller) and decodes ids.

  Picklable: the underlying tokenizer is loaded lazily in each process.
  """

  def __init__(self, path: str, separator: str | None = None):
    if not path or not os.path.isfile(path):
      raise DataError(f"tokenizer {path!r} not found: pass a local HF tokenizer.json or SentencePiece .model "
                      "(nothing is downloaded).")
    self.path = path
    self.kind = tokenizer_kind(path)
    self.sha256 = file_sha256(path)
    self._tok = None
    tok = self._load()
    if self.kind == "hf":
      self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
      names = (separator,) if separator else SEPARATOR_CANDIDATES
      found = [(n, tok.token_to_id(n)) for n in names if tok.token_to_id(n) is not None]
    else:
      self.vocab_size = tok.get_piece_size()
      if separator:
        sid = tok.piece_to_id(separator)
        found = [(separator, sid)] if sid != tok.unk_id() or separator == tok.id_to_piece(tok.unk_id()) else []
      else:
        found = [(tok.id_to_piece(tok.eos_id()), tok.eos_id())] if tok.eos_id() >= 0 else []
    if not found:
      what = f"token {separator!r} is not in" if separator else "no end-of-document token found in"
      raise DataError(f"{what} tokenizer {path}; pass --separator TOKEN naming a token of its vocabulary "
                      f"(looked for: {', '.join(names if self.kind == 'hf' else ['the eos piece'])}).")
    self.separator, self.separator_id = found[0]

  def _load(self):
    if self._tok is None:
      try:
        if self.kind == "hf":
          import tokenizers  # pylint: disable=import-outside-toplevel
          self._tok = tokenizers.Tokenizer.from_file(self.path)
        else:
          import sentencepiece  # pylint: disable=import-outside-toplevel
          self._tok = sentencepiece.SentencePieceProcessor(model_file=self.path)
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"cannot load tokenizer {self.path} as {self.kind}: {e}") from None
    return self._tok

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tok"] = None
    return state

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    tok = self._load()
    if self.kind == "hf":
      return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    return tok.encode(texts)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    tok = self._load()
    if self.kind == "hf":
      return tok.decode(ids, skip_special_tokens=False)
    return tok.decode(ids)

  def info(self) -> dict:
    return {"kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
            "separator": self.separator, "separator_id": self.separator_id}
