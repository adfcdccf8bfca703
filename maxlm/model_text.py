"""A model's text side: its text codec (the tokenizer, pad / end-of-text ids, and the special tokens transformers'
`tokenizer(text)` adds, so tools score and continue text as transformers would) and data files as padded rows."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from maxlm.core.config import Config
from maxlm.core.errors import DataError


@dataclasses.dataclass
class TextCodec:
  """The tokenizer of a loaded model: its text encoder, decoder, pad / end-of-text ids and the special tokens its
  transformers tokenizer puts around a text (LLaMA's <s>), so a text is scored and continued as transformers would."""
  encode_text: Callable[[list[str]], list[list[int]]]  # the text's own ids, no special tokens
  decode: Callable[[list[int]], str]
  eos_id: int
  pad_id: int
  before: list[int] = dataclasses.field(default_factory=list)
  after: list[int] = dataclasses.field(default_factory=list)

  def encode_batch(self, texts: list[str], max_length: Optional[int] = None) -> list[list[int]]:
    """transformers' `tokenizer(text)["input_ids"]` for each text: its ids inside the tokenizer's special tokens;
    with `max_length`, truncated as `truncation=True` does (the text is cut, the special tokens kept)."""
    room = None if max_length is None else max(max_length - len(self.before) - len(self.after), 0)
    return [(self.before + list(ids)[:room] + self.after)[:max_length] for ids in self.encode_text(texts)]


def text_codec(cfg: Config) -> TextCodec:
  """The model's tokenizer (data.tokenizer, the token store's, or the PCFG's). EOS and pad are the tokens its
  tokenizer_config / special tokens map names, else its end-of-text separator (for pad: else EOS)."""
  from maxlm.data_pipelines import tokenization  # pylint: disable=import-outside-toplevel
  kind, what = tokenization.run_tokenizer(cfg.data)
  if kind is None:
    raise DataError(f"cannot tokenize text for this checkpoint: {what}. Give token ids instead (JSONL with an 'ids' "
                    "field) or set data.tokenizer in the run's config")
  tok = tokenization.run_text_tokenizer(cfg.data)
  eos, pad = tokenization.special_ids(cfg.data, tok)
  before, after = tok.special_tokens()
  return TextCodec(tok.encode_batch, tok.decode, eos, pad, list(before), list(after))


@dataclasses.dataclass
class Rows:
  """Documents as fixed-length rows: ids (N, T) int32 right-padded with the pad id, mask (N, T) 1 on real tokens."""
  ids: np.ndarray
  mask: np.ndarray


def document_rows(path: str, codec: Optional[TextCodec], *, seq_len: int, max_docs: int = 0, pad_id: int = 0,
                  vocab_size: int = 0, special_tokens: bool = True, log=print) -> Rows:
  """Rows of `seq_len` tokens from a data file (JSONL `text` tokenized with `codec` as transformers' tokenizer does,
  special tokens included unless `special_tokens` is False; or `ids` used as they are; plain text one document per
  line), each document truncated or right-padded; `max_docs` 0 = all. With `vocab_size`, an id outside the model's
  vocabulary is a DataError."""
  from maxlm.data_pipelines.raw_records import collect_documents  # pylint: disable=import-outside-toplevel
  docs = [d for group in collect_documents(path, ids_key="ids", log=log).values() for d in group]
  if max_docs:
    docs = docs[:max_docs]
  texts = [i for i, d in enumerate(docs) if isinstance(d, str)]
  if texts and codec is None:
    raise DataError(f"{path} holds text, but this checkpoint has no tokenizer; give token ids (an 'ids' field)")
  if texts:
    chosen = [docs[i] for i in texts]
    encoded = dict(zip(texts, codec.encode_batch(chosen, seq_len) if special_tokens else codec.encode_text(chosen)))
  else:
    encoded = {}
  pad = codec.pad_id if codec is not None else pad_id
  ids = np.full((len(docs), seq_len), pad, np.int32)
  mask = np.zeros((len(docs), seq_len), np.int32)
  for i, doc in enumerate(docs):
    tokens = (encoded[i] if i in encoded else doc)[:seq_len]
    ids[i, :len(tokens)] = tokens
    mask[i, :len(tokens)] = 1
  if not mask.any():
    raise DataError(f"{path}: every document tokenized to zero tokens")
  top = int(ids[mask > 0].max())
  if vocab_size and top >= vocab_size:
    raise DataError(f"{path} holds token id {top} but the model's vocabulary has {vocab_size} entries: the ids come "
                    "from another tokenizer")
  return Rows(ids, mask)


def model_rows(cfg: Config, path: str, *, seq_len: int, max_docs: int = 0, log=print) -> Rows:
  """document_rows of a data file for a model: text tokenized with its codec (a model without a tokenizer reads
  `ids` records only, and says so for text), ids checked against its vocabulary."""
  try:
    codec = text_codec(cfg)
  except DataError:
    codec = None  # ids-only files still work; a text file then says it needs a tokenizer
  return document_rows(path, codec, seq_len=seq_len, max_docs=max_docs, vocab_size=cfg.model.vocab_size, log=log)
