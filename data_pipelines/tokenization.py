"""The tokenizer of a run: what a run's data section implies (a tokenizer file, the token store's copy, a PCFG's
word vocabulary), its special ids, and carrying or exporting it with a checkpoint.

The tokenizer-file class lives in text_tokenizer.py, below the token store (which checks its tokenizer with it);
TextTokenizer, tokenizer_file_in and tokenizer_vocab_size are importable from here too, where maxlm's CLIs look.
"""

from __future__ import annotations

import json
import os
import shutil

from maxlm.core.errors import ConversionError, DataError
from maxlm.data_pipelines.masking import MASK
from maxlm.data_pipelines.pcfg import load_grammar
from maxlm.data_pipelines.text_tokenizer import SEPARATOR_CANDIDATES
from maxlm.data_pipelines.text_tokenizer import TextTokenizer
from maxlm.data_pipelines.text_tokenizer import named_special_token
from maxlm.data_pipelines.text_tokenizer import tokenizer_kind
from maxlm.data_pipelines.token_store import TokenStore, TokenizerMismatchError

# ----------------------------------------------------------------------------- the tokenizer of a run

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


def run_tokenizer(data_cfg) -> tuple[str | None, object]:
  """The tokenizer a run's data section implies: ('file', path) | ('pcfg', Grammar) | (None, why not)."""
  if data_cfg.tokenizer:
    if not os.path.isfile(data_cfg.tokenizer):  # config.finalize already took a directory's tokenizer file
      return None, f"data.tokenizer {data_cfg.tokenizer} does not exist here (or holds no tokenizer.json/.model)"
    if data_cfg.source in ("store", "replay") and data_cfg.path:
      try:  # a run saved before training checked this: never export or decode with a tokenizer the ids are not of
        TokenStore(data_cfg.path).check_tokenizer(data_cfg.tokenizer)
      except TokenizerMismatchError as e:
        return None, str(e)
      except (DataError, OSError):
        pass  # an unreadable store: the tokenizer file is all there is to go by
    return "file", data_cfg.tokenizer
  if data_cfg.source in ("store", "replay") and data_cfg.path:
    try:
      path = TokenStore(data_cfg.path).tokenizer_path()
      if path:
        return "file", path
    except (DataError, OSError) as e:
      return None, f"cannot read the token store's tokenizer: {e}"
  if data_cfg.source == "pcfg":
    try:
      return "pcfg", load_grammar(data_cfg.grammar)
    except DataError as e:
      return None, f"cannot build the PCFG tokenizer: {e}"
  return None, "the run names no tokenizer (data.tokenizer is empty)"


class WordTokenizer:
  """A PCFG's word-level vocabulary behind TextTokenizer's interface (no special tokens). With `mask` (a masked-LM
  run, data.mlm) the word <mask> is one more id, the grammar's vocabulary size (data_pipelines/masking.py)."""

  def __init__(self, grammar, mask: bool = False):
    self.grammar, self.separator_id = grammar, grammar.separator_id
    self.mask_id = grammar.vocab_size if mask else None

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    if self.mask_id is None:
      return [self.grammar.encode(t) for t in texts]
    return [[self.mask_id if w == MASK else i for w, i in zip(t.split(), self.grammar.encode(t))] for t in texts]

  def decode(self, ids) -> str:
    if self.mask_id is None:
      return self.grammar.decode(ids)
    return " ".join(MASK if int(i) == self.mask_id else self.grammar.decode([i]) for i in ids)

  def special_tokens(self) -> tuple[list[int], list[int]]:
    return [], []


def run_text_tokenizer(data_cfg):
  """The tokenizer a run trained with (a TextTokenizer, or a WordTokenizer for a PCFG); a DataError when none is
  known."""
  kind, what = run_tokenizer(data_cfg)
  if kind == "file":
    return TextTokenizer(what)
  if kind == "pcfg":
    return WordTokenizer(what, mask=bool(getattr(data_cfg, "mlm", False)))
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
  import tokenizers  # pylint: disable=import-outside-toplevel  (loaded only when a tokenizer is exported)
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
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def special_ids(data_cfg, tok=None) -> tuple[int, int]:
  """(eos id, pad id) of a run's tokenizer (`tok`: run_text_tokenizer's, when the caller has it): the tokens its
  tokenizer_config / special_tokens_map names (OLMo's eos is 50279, not the first end-of-text candidate), else the
  document separator for both."""
  tok = tok or run_text_tokenizer(data_cfg)
  separator = tok.separator_id
  if not isinstance(tok, TextTokenizer) or tok.kind != "hf":
    return separator, separator
  ids = []
  for key, fallback in (("eos_token", separator), ("pad_token", None)):
    token = named_special_token(tok.path, key)
    found = tok.token_id(token) if token else None
    ids.append(found if found is not None else fallback)
  eos, pad = ids
  return eos, (eos if pad is None else pad)


def carry_tokenizer(data_cfg, staging_dir: str, final_dir: str) -> str | None:
  """Copies the tokenizer file data.tokenizer names (with its HF companions: tokenizer_config, special tokens,
  chat template) into staging_dir/tokenizer/ and points data.tokenizer at final_dir/tokenizer/, so a written run
  (an import, a derived checkpoint) keeps its own tokenizer. Returns the source path, or None when the config names
  no tokenizer file (a PCFG or token-store tokenizer travels with its data spec)."""
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
