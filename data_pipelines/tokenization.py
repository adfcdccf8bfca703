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


def tokenizer_file_in(directory: str) -> str | None:
  """A model directory's main tokenizer file (tokenizer.json, else SentencePiece's tokenizer.model), or None."""
  return next((os.path.join(directory, n) for n in ("tokenizer.json", "tokenizer.model")
               if os.path.isfile(os.path.join(directory, n))), None)


def resolve_tokenizer_path(path: str) -> str:
  """`path`, or for a directory (a Hugging Face model or tokenizer folder) its main tokenizer file; unchanged when
  the directory has none (the caller reports it)."""
  return (tokenizer_file_in(path) or path) if path and os.path.isdir(path) else path


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

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    tok = self._load()
    if self.kind == "hf":
      return tok.decode(ids, skip_special_tokens=False)
    return tok.decode(ids)

  def info(self) -> dict:
    return {"kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
            "separator": self.separator, "separator_id": self.separator_id}


# ----------------------------------------------------------------------------- the tokenizer of a run

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


def run_tokenizer(data_cfg) -> tuple[str | None, object]:
  """The tokenizer a run's data section implies: ('file', path) | ('pcfg', Grammar) | (None, why not)."""
  if data_cfg.tokenizer:
    if not os.path.isfile(data_cfg.tokenizer):  # config.finalize already took a directory's tokenizer file
      return None, f"data.tokenizer {data_cfg.tokenizer} does not exist here (or holds no tokenizer.json/.model)"
    return "file", data_cfg.tokenizer
  if data_cfg.source in ("store", "replay") and data_cfg.path:
    try:
      from maxlm.data_pipelines.token_store import TokenStore  # pylint: disable=import-outside-toplevel
      path = TokenStore(data_cfg.path).tokenizer_path()
      if path:
        return "file", path
    except (ImportError, DataError, OSError) as e:
      return None, f"cannot read the token store's tokenizer: {e}"
  if data_cfg.source == "pcfg":
    from maxlm.data_pipelines.pcfg import load_grammar  # pylint: disable=import-outside-toplevel
    try:
      return "pcfg", load_grammar(data_cfg.grammar)
    except DataError as e:
      return None, f"cannot build the PCFG tokenizer: {e}"
  return None, "the run names no tokenizer (data.tokenizer is empty)"


class WordTokenizer:
  """A PCFG's word-level vocabulary behind TextTokenizer's interface (no special tokens)."""

  def __init__(self, grammar):
    self.grammar, self.separator_id = grammar, grammar.separator_id

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.grammar.encode(t) for t in texts]

  def decode(self, ids) -> str:
    return self.grammar.decode(ids)

  def special_tokens(self) -> tuple[list[int], list[int]]:
    return [], []


def run_text_tokenizer(data_cfg):
  """The tokenizer a run trained with (a TextTokenizer, or a WordTokenizer for a PCFG); a DataError when none is
  known."""
  kind, what = run_tokenizer(data_cfg)
  if kind == "file":
    return TextTokenizer(what)
  if kind == "pcfg":
    return WordTokenizer(what)
  raise DataError(f"cannot tokenize text for this checkpoint: {what}. Set data.tokenizer in the run's config "
                  "(a tokenizer.json or SentencePiece .model) or use token ids / a token store instead")


def run_encoder(data_cfg):
  """(encode_batch, separator id, decode) of the tokenizer a run trained with; a DataError when none is known."""
  tok = run_text_tokenizer(data_cfg)
  return tok.encode_batch, tok.separator_id, tok.decode


def export_tokenizer(data_cfg, out_dir: str, *, vocab_size: int, max_positions: int) -> tuple[int | None, int | None,
                                                                                               str]:
  """Writes the run's tokenizer files into an HF directory; returns (bos id, eos id, note). A tokenizer larger
  than the model's vocabulary is a ConversionError (it does not belong to this checkpoint)."""
  import shutil  # pylint: disable=import-outside-toplevel
  from maxlm.errors import ConversionError  # pylint: disable=import-outside-toplevel

  kind, what = run_tokenizer(data_cfg)
  if kind is None:
    return None, None, f"no tokenizer files written: {what}"
  if kind == "file" and tokenizer_kind(what) == "sentencepiece":
    shutil.copy(what, os.path.join(out_dir, "tokenizer.model"))
    src_cfg = os.path.join(os.path.dirname(what), "tokenizer_config.json")
    if os.path.isfile(src_cfg):
      shutil.copy(src_cfg, os.path.join(out_dir, "tokenizer_config.json"))
    else:
      _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                  {"tokenizer_class": "LlamaTokenizer", "model_max_length": max_positions})
    tok = TextTokenizer(what)
    return 1, tok.separator_id, f"tokenizer.model copied from {what}"
  import tokenizers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.Tokenizer.from_file(what) if kind == "file" else what.to_hf_tokenizer()
  size = tok.get_vocab_size(with_added_tokens=True)
  if size > vocab_size:
    raise ConversionError(f"the run's tokenizer has {size} tokens but the model's vocab_size is {vocab_size}: "
                          "the tokenizer does not belong to this checkpoint")
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  eos = next((n for n in ("<eos>",) + SEPARATOR_CANDIDATES if tok.token_to_id(n) is not None), None)
  bos = next((n for n in BOS_CANDIDATES if tok.token_to_id(n) is not None), None)
  copied = False
  if kind == "file":
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
      src = os.path.join(os.path.dirname(what), extra)
      if os.path.isfile(src):
        shutil.copy(src, os.path.join(out_dir, extra))
        copied = copied or extra == "tokenizer_config.json"
  if not copied:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_positions,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    config.update({k: v for k, v in (("eos_token", eos), ("bos_token", bos)) if v})
    unk = next((n for n in ("<unk>", "[UNK]") if tok.token_to_id(n) is not None), None)
    if unk:
      config["unk_token"] = unk
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
  source = what if kind == "file" else f"the PCFG grammar {data_cfg.grammar}"
  return (tok.token_to_id(bos) if bos else None), (tok.token_to_id(eos) if eos else None), \
      f"tokenizer.json from {source}"


def _write_json(path: str, obj) -> None:
  import json  # pylint: disable=import-outside-toplevel
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def tokenizer_config(tokenizer_path: str, name: str = "tokenizer_config.json") -> dict:
  """A JSON object beside a tokenizer file (tokenizer_config.json, special_tokens_map.json); {} when there is none
  or it is unreadable."""
  import json  # pylint: disable=import-outside-toplevel
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


def special_ids(data_cfg, tok=None) -> tuple[int, int]:
  """(eos id, pad id) of a run's tokenizer (`tok`: run_text_tokenizer's, when the caller has it): the tokens its
  tokenizer_config / special_tokens_map names (OLMo's eos is 50279, not the first end-of-text candidate), else the
  document separator for both."""
  tok = tok or run_text_tokenizer(data_cfg)
  separator = tok.separator_id
  if not isinstance(tok, TextTokenizer) or tok.kind != "hf":
    return separator, separator
  raw = tok._load()  # pylint: disable=protected-access
  ids = []
  for key, fallback in (("eos_token", separator), ("pad_token", None)):
    token = named_special_token(tok.path, key)
    found = raw.token_to_id(token) if token else None
    ids.append(int(found) if found is not None else fallback)
  eos, pad = ids
  return eos, (eos if pad is None else pad)


def carry_tokenizer(data_cfg, staging_dir: str, final_dir: str) -> str | None:
  """Copies the tokenizer file data.tokenizer names (with its HF companions: tokenizer_config, special tokens,
  chat template) into staging_dir/tokenizer/ and points data.tokenizer at final_dir/tokenizer/, so a written run
  (an import, a derived checkpoint) keeps its own tokenizer. Returns the source path, or None when the config names
  no tokenizer file (a PCFG or token-store tokenizer travels with its data spec)."""
  import shutil  # pylint: disable=import-outside-toplevel
  source = data_cfg.tokenizer
  if not source or not os.path.isfile(source):
    return None
  folder = os.path.dirname(os.path.abspath(source))
  names = {os.path.basename(source)} | {f for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))}
  os.makedirs(os.path.join(staging_dir, "tokenizer"), exist_ok=True)
  for name in sorted(names):
    shutil.copy(os.path.join(folder, name), os.path.join(staging_dir, "tokenizer", name))
  data_cfg.tokenizer = os.path.join(final_dir, "tokenizer", os.path.basename(source))
  return source
