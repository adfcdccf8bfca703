"""A tokenizer file (a local HF tokenizer.json or SentencePiece .model) behind one small class, with the document
separator id, vocab size and content hash the token store records, and the JSON files beside it.
"""

from __future__ import annotations

import json
import os

from maxlm.core.paths import file_sha256
from maxlm.core.errors import DataError
from maxlm.core.paths import resolve_tokenizer_path

# Tried in order when no separator is given: end-of-document tokens of common tokenizers.
SEPARATOR_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")


def tokenizer_kind(path: str) -> str:
  if path.endswith(".json"):
    return "hf"
  if path.endswith(".model"):
    return "sentencepiece"
  with open(path, "rb") as f:
    head = f.read(1).lstrip()
  return "hf" if head == b"{" else "sentencepiece"


def tokenizer_vocab_size(path: str) -> int:
  """How many ids a tokenizer file can produce (added tokens included); a DataError when it cannot be read."""
  try:
    if tokenizer_kind(path) == "hf":
      import tokenizers  # pylint: disable=import-outside-toplevel
      return tokenizers.Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    import sentencepiece  # pylint: disable=import-outside-toplevel
    return sentencepiece.SentencePieceProcessor(model_file=path).get_piece_size()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot load tokenizer {path}: {e}") from None


class TextTokenizer:
  """Encodes documents without special tokens (the separator is appended by the caller) and decodes ids; knows which
  special tokens transformers would add around a text (`special_tokens`), for tools that score or continue text.

  Picklable: the underlying tokenizer is loaded lazily in each process.
  """

  def __init__(self, path: str, separator: str | None = None):
    given, path = path, resolve_tokenizer_path(path)
    if not path or not os.path.isfile(path):
      where = " (a directory without tokenizer.json or tokenizer.model)" if given and os.path.isdir(given) else ""
      raise DataError(f"tokenizer {given!r} not found{where}: pass a local HF tokenizer.json, a SentencePiece "
                      ".model, or a directory holding one (nothing is downloaded).")
    self.path = path
    self.kind = tokenizer_kind(path)
    self.sha256 = file_sha256(path)
    self._tok = None
    self._specials = None
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
          tok = tokenizers.Tokenizer.from_file(self.path)
          # A tokenizer.json may carry truncation and padding for a model's inputs (BERT's: 128 tokens, [PAD]);
          # documents are encoded whole and unpadded, as transformers' tokenizer(text) does unless asked.
          tok.no_truncation()
          tok.no_padding()
          self._tok = tok
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

  def special_tokens(self) -> tuple[list[int], list[int]]:
    """(ids before, ids after) a text that transformers' `tokenizer(text)` adds (transformers 5, measured): for a
    tokenizer.json what its post-processor adds (LLaMA's: <s> before); for a SentencePiece model BOS / EOS when the
    tokenizer_config.json beside it sets add_bos_token / add_eos_token (neither when it says nothing)."""
    if self._specials is None:
      tok = self._load()
      if self.kind == "hf":
        self._specials = ([], [])
        for probe in ("a", "hello world", "0"):
          encoding = tok.encode(probe, add_special_tokens=True)
          text = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
          if text:
            self._specials = (encoding.ids[:text[0]], encoding.ids[text[-1] + 1:])
            break
      else:
        flags = tokenizer_config(self.path)
        self._specials = ([tok.bos_id()] if flags.get("add_bos_token") is True and tok.bos_id() >= 0 else [],
                          [tok.eos_id()] if flags.get("add_eos_token") is True and tok.eos_id() >= 0 else [])
    return self._specials

  def encode_with_special_tokens(self, texts: list[str]) -> list[list[int]]:
    """What transformers' `tokenizer(text)["input_ids"]` gives: the text's ids inside `special_tokens()`."""
    before, after = self.special_tokens()
    return [before + ids + after for ids in self.encode_batch(texts)]

  def token_id(self, token: str) -> int | None:
    """The id of `token` in the vocabulary: None when a tokenizer.json lacks it (a SentencePiece model answers its
    unknown piece's id)."""
    tok = self._load()
    found = tok.token_to_id(token) if self.kind == "hf" else tok.piece_to_id(token)
    return None if found is None else int(found)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    tok = self._load()
    if self.kind == "hf":
      return tok.decode(ids, skip_special_tokens=False)
    return tok.decode(ids)

  def info(self) -> dict:
    return {"kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
            "separator": self.separator, "separator_id": self.separator_id}


def tokenizer_config(tokenizer_path: str, name: str = "tokenizer_config.json") -> dict:
  """A JSON object beside a tokenizer file (tokenizer_config.json, special_tokens_map.json); {} when there is none
  or it is unreadable."""
  try:
    with open(os.path.join(os.path.dirname(tokenizer_path), name)) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return {}
  return config if isinstance(config, dict) else {}


def named_special_token(tokenizer_path: str, key: str) -> str | None:
  """The token a tokenizer_config.json / special_tokens_map.json beside `tokenizer_path` names for `key`
  ("eos_token", "pad_token", ...), or None."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    token = tokenizer_config(tokenizer_path, name).get(key)
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str) and token:
      return token
  return None
