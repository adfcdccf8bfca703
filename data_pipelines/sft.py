"""Instruction data (data.source = sft): Alpaca JSON and chat JSONL records -> prompt-masked examples (Stanford
Alpaca's templates and masking, or the tokenizer's chat template), packed or padded rows, a held-out split.

Rows: an example of n tokens gives n - 1 (input, target) pairs; packing places whole examples into rows of seq_len
pairs in order (one that does not fit opens the next row; none ever crosses a row), each its own segment for
document masking; an example longer than seq_len + 1 tokens is truncated to that, and counted.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import threading

import grain
import numpy as np

from maxlm.core.errors import ConfigError, DataError
from maxlm.core.config import IGNORE_INDEX
from maxlm.data_pipelines.batches import DataIterator, SourceInfo, global_batches
from maxlm.data_pipelines.raw_records import FileStats, bad_summary
from maxlm.data_pipelines.text_tokenizer import TextTokenizer
from maxlm.data_pipelines.tokenization import run_tokenizer

_INFINITE_ROWS = 1 << 40
# Stanford Alpaca's train.py PROMPT_DICT, verbatim (the response follows "### Response:" with no separator).
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:")


# ----------------------------------------------------------------------------- the tokenizer


def _special_text(value):
  return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


class SFTTokenizer:
  """The run's tokenizer file with what instruction data needs beyond plain documents: encoding with the
  tokenizer's own special tokens (BOS, as `tokenizer(text)` in transformers), its EOS and pad ids, and the chat
  template and special-token strings of the tokenizer_config.json beside it."""

  def __init__(self, path: str):
    self.text = TextTokenizer(path)  # checks the file; its separator is the EOS fallback
    self.path, self.kind, self.vocab_size = path, self.text.kind, self.text.vocab_size
    self.config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
      side = os.path.join(os.path.dirname(path), name)
      if os.path.isfile(side):
        try:
          with open(side) as f:
            self.config.update(json.load(f))
        except (OSError, ValueError) as e:
          raise DataError(f"{side} is not readable JSON: {e}") from None
    self.special = {k: _special_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    self.eos_id = self._id(self.special["eos_token"], self.text.separator_id)
    self.pad_id = self._id(self.special["pad_token"], self.eos_id)

  def _id(self, token, default: int) -> int:
    if token is None:
      return default
    found = self.text.token_id(token)
    return default if found is None else found

  def encode(self, texts: list[str], *, special: bool) -> list[list[int]]:
    return self.text.encode_with_special_tokens(texts) if special else self.text.encode_batch(texts)

  def decode(self, ids) -> str:
    return self.text.decode(ids)

  def chat_template(self) -> str:
    template = self.config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
      template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    side = os.path.join(os.path.dirname(self.path), "chat_template.jinja")
    if not template and os.path.isfile(side):
      with open(side) as f:
        template = f.read()
    if not template:
      raise DataError(f"the tokenizer {self.path} has no chat template (no 'chat_template' in its "
                      "tokenizer_config.json, no chat_template.jinja beside it), so chat records cannot be rendered; "
                      "add one there, or give Alpaca records (data.sft_template=alpaca)")
    return template


def _chat_renderer(template: str, special: dict):
  """render(messages, add_generation_prompt) -> text, in the Jinja environment transformers renders chat templates
  in (sandboxed, trim_blocks, lstrip_blocks, loop controls, raise_exception, strftime_now, tojson)."""
  try:
    import jinja2  # pylint: disable=import-outside-toplevel
    import jinja2.ext  # pylint: disable=import-outside-toplevel  (not loaded by `import jinja2`)
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError("chat templates are rendered with jinja2: pip install jinja2 (it comes with 'maxlm[hf]')") from None

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
      x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
  env.globals.update(raise_exception=raise_exception,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  try:
    compiled = env.from_string(template)
  except jinja2.exceptions.TemplateError as e:
    raise DataError(f"the tokenizer's chat template does not parse: {e}") from None
  tokens = {k: v for k, v in special.items() if v is not None}
  return lambda messages, add_generation_prompt: compiled.render(
      messages=messages, add_generation_prompt=add_generation_prompt, **tokens)


# ----------------------------------------------------------------------------- records


def read_records(path: str, stats: FileStats) -> list[tuple[str, object]]:
  """(where, record) of an Alpaca JSON file (a list of records) or JSONL (one record per line)."""
  if not os.path.isfile(path):
    raise DataError(f"data.path {path!r} does not exist: give an Alpaca JSON file (a list of {{instruction, input, "
                    "output}) or a chat JSONL file ({messages: [{role, content}, ...]} per line)")
  with open(path, encoding="utf-8-sig", errors="replace") as f:  # a byte-order mark is not part of line 1
    text = f.read()
  stats.bytes = len(text)
  if text.lstrip().startswith("["):
    try:
      records = json.loads(text)
    except ValueError as e:
      raise DataError(f"{path} starts like a JSON list but does not parse: {e}") from None
    stats.records = len(records)
    return [(f"record {i}", r) for i, r in enumerate(records)]
  out = []
  for i, line in enumerate(text.splitlines()):
    if not line.strip():
      stats.blank_lines += 1
      continue
    stats.records += 1
    try:
      out.append((f"line {i + 1}", json.loads(line)))
    except ValueError:
      stats.bad("not valid JSON", f"line {i + 1}", line)
  return out


def record_kind(record, template: str) -> tuple[str | None, str]:
  """('alpaca' | 'chat', '') for a usable record, else (None, why not)."""
  if not isinstance(record, dict):
    return None, "not a JSON object"
  kind = template
  if template == "auto":
    kind = "chat" if "messages" in record else "alpaca" if ("instruction" in record or "output" in record) else None
    if kind is None:
      return None, "neither Alpaca fields (instruction, output) nor chat 'messages'"
  if kind == "alpaca":
    for key in ("instruction", "output"):
      if not isinstance(record.get(key), str):
        return None, f"Alpaca record without a string '{key}'"
    if not isinstance(record.get("input", ""), str):
      return None, "Alpaca record whose 'input' is not a string"
    return kind, ""
  messages = record.get("messages")
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
    return None, "'messages' is not a non-empty list of {role, content} strings"
  if not any(m["role"] == "assistant" for m in messages):
    return None, "chat record without an assistant message"
  return kind, ""


def alpaca_prompt(record: dict) -> str:
  """Stanford Alpaca's prompt: the with-input template when `input` is non-empty, else the other."""
  return (PROMPT_INPUT if record.get("input", "") != "" else PROMPT_NO_INPUT).format_map(record)


def alpaca_examples(records: list[dict], tok: SFTTokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
  """(ids, labels) per record as Stanford Alpaca's train.py builds them: tokenize prompt + output, label -100 on the
  first len(tokenize(prompt)) tokens; EOS follows the response (Stanford appends the EOS token's text)."""
  prompts = [alpaca_prompt(r) for r in records]
  fulls = tok.encode([p + r["output"] for p, r in zip(prompts, records)], special=True)
  prompt_lens = [len(ids) for ids in tok.encode(prompts, special=True)]
  out = []
  for ids, n_prompt in zip(fulls, prompt_lens):
    ids = np.asarray(ids + [tok.eos_id], np.int32)
    labels = ids.copy()
    labels[:n_prompt] = IGNORE_INDEX
    out.append((ids, labels))
  return out


def chat_example(messages: list[dict], tok: SFTTokenizer, render) -> tuple[np.ndarray, np.ndarray]:
  """(ids, labels) of a conversation rendered with the chat template (tokenized without added special tokens, as
  transformers' apply_chat_template): every assistant turn is a response, its span the tokens between the rendered
  conversation up to the turn (with the generation prompt) and through it; EOS ends it unless the template did."""
  ids = tok.encode([render(messages, False)], special=False)[0]
  labels = [IGNORE_INDEX] * len(ids)
  for k, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    start = len(tok.encode([render(messages[:k], True)], special=False)[0])
    end = len(tok.encode([render(messages[:k + 1], False)], special=False)[0])
    labels[start:end] = ids[start:end]
  if not ids or ids[-1] != tok.eos_id:
    ids.append(tok.eos_id)
    labels.append(tok.eos_id if messages[-1]["role"] == "assistant" else IGNORE_INDEX)
  return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def in_validation(record, fraction: float) -> bool:
  """The held-out split by content hash: stable under reordering, and duplicates always land together."""
  if fraction <= 0:
    return False
  digest = hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2 ** 64 < fraction


# ----------------------------------------------------------------------------- loaded data


@dataclasses.dataclass
class SFTData:
  """A file's examples (ids, labels int32 arrays) by split, and what reading it met."""
  path: str
  train: list
  validation: list
  stats: FileStats
  kinds: dict  # {"alpaca": n, "chat": n}

  def summary(self, seq_len: int) -> str:
    over = sum(len(ids) > seq_len + 1 for ids, _ in self.train + self.validation)
    bad = bad_summary(self.stats)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()) if n)
    return (f"maxlm: sft data {self.path}: {self.stats.records} records ({kinds}) -> {len(self.train)} train / "
            f"{len(self.validation)} validation examples; {over} longer than seq_len + 1 = {seq_len + 1} tokens "
            f"(truncated)" + (f"; {bad} (skipped)" if bad else "; no malformed records"))


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def _file_key(path: str) -> tuple:
  st = os.stat(path)
  return os.path.abspath(path), st.st_mtime_ns, st.st_size


def tokenizer_of(cfg) -> SFTTokenizer:
  """The SFT tokenizer of a data section: data.tokenizer, else the tokenizer file its token store names (a run
  trained on a store, evaluated on instruction data)."""
  path = cfg.tokenizer
  if not path:
    kind, found = run_tokenizer(cfg)
    if kind != "file":
      raise DataError("instruction data is tokenized with a tokenizer file, but data.tokenizer is empty and the run "
                      f"names none ({found if kind is None else 'a PCFG word vocabulary'}): set data.tokenizer to a "
                      "tokenizer.json or SentencePiece .model (a run started with checkpoint.init_from takes the "
                      "source's)")
    path = found
  return SFTTokenizer(path)


def load(cfg, path: str = "", *, split: bool = True) -> SFTData:
  """The examples of data.path (or `path`), tokenized once per file, tokenizer and template (cached). Bad records are
  counted by reason; a file without one usable record is a DataError naming what was wrong."""
  path = path or cfg.path
  template, fraction = cfg.sft_template, float(cfg.validation_fraction)
  if not split:
    fraction = 0.0
  tok = tokenizer_of(cfg)
  if not os.path.isfile(path):
    read_records(path, FileStats(path))  # raises the DataError naming the formats
  key = (_file_key(path), _file_key(tok.path), template, fraction)
  with _CACHE_LOCK:
    if key not in _CACHE:
      _CACHE.clear()  # one file at a time: a 52k-example file is a few hundred MB of token arrays
      _CACHE[key] = _load(path, tok, template, fraction)
    return _CACHE[key]


def _load(path: str, tok: SFTTokenizer, template: str, fraction: float) -> SFTData:
  stats = FileStats(path)
  usable = {"alpaca": [], "chat": []}
  for where, record in read_records(path, stats):
    kind, why = record_kind(record, template)
    if kind is None:
      stats.bad(why, where, json.dumps(record)[:80] if not isinstance(record, str) else record)
    else:
      usable[kind].append((where, record))
  examples = list(zip([r for _, r in usable["alpaca"]], alpaca_examples([r for _, r in usable["alpaca"]], tok)))
  if usable["chat"]:
    render = _chat_renderer(tok.chat_template(), tok.special)
    for where, record in usable["chat"]:
      try:
        examples.append((record, chat_example(record["messages"], tok, render)))
      except Exception as e:  # pylint: disable=broad-except  (a template's raise_exception, a type error in it)
        stats.bad(f"chat template refused the conversation ({type(e).__name__}: {str(e)[:60]})", where)
  if not examples:
    summary = bad_summary(stats) or "the file holds no records"
    raise DataError(f"{path} holds no usable instruction record: {summary}. Give Alpaca records "
                    "({instruction, input, output}) or chat records ({messages: [{role, content}, ...]})")
  stats.documents = len(examples)
  train = [ex for record, ex in examples if not in_validation(record, fraction)]
  validation = [ex for record, ex in examples if in_validation(record, fraction)]
  return SFTData(os.path.abspath(path), train, validation, stats,
                 {k: len(v) for k, v in usable.items()})


def check_config(cfg) -> None:
  if cfg.sft_packing and not cfg.document_masking:
    raise ConfigError("data.sft_packing = true packs several examples into each row, which needs "
                      "data.document_masking = true (else examples attend to each other); set it, or set "
                      "data.sft_packing = false for one padded example per row")


# ----------------------------------------------------------------------------- rows


def truncate(examples: list, seq_len: int) -> tuple[list, int, int]:
  """Examples cut to seq_len + 1 tokens (seq_len pairs); (kept, truncated, dropped): one whose truncation leaves no
  response token trains nothing and is dropped (counted)."""
  kept, truncated, dropped = [], 0, 0
  for ids, labels in examples:
    if len(ids) > seq_len + 1:
      truncated += 1
      ids, labels = ids[:seq_len + 1], labels[:seq_len + 1]
      if not (labels[1:] != IGNORE_INDEX).any():
        dropped += 1
        continue
    kept.append((ids, labels))
  return kept, truncated, dropped


def pack(lengths: np.ndarray, order: np.ndarray, seq_len: int, packing: bool) -> list[list[int]]:
  """Rows of example indices: with packing, whole examples in `order` while their pairs (length - 1) fit seq_len;
  without, one example per row."""
  if not packing:
    return [[int(i)] for i in order]
  rows, current, used = [], [], 0
  for i in order:
    n = int(lengths[i]) - 1
    if current and used + n > seq_len:
      rows.append(current)
      current, used = [], 0
    current.append(int(i))
    used += n
  if current:
    rows.append(current)
  return rows


def row_arrays(examples: list, row: list[int], seq_len: int, pad_id: int) -> dict:
  """One row: inputs / targets / segment_ids (seq_len,) int32; example j of the row is segment j + 1, padding is
  segment 0 with targets -100."""
  inputs = np.full(seq_len, pad_id, np.int32)
  targets = np.full(seq_len, IGNORE_INDEX, np.int32)
  segments = np.zeros(seq_len, np.int32)
  offset = 0
  for j, i in enumerate(row):
    ids, labels = examples[i]
    n = len(ids) - 1
    inputs[offset:offset + n], targets[offset:offset + n] = ids[:-1], labels[1:]
    segments[offset:offset + n] = j + 1
    offset += n
  return {"inputs": inputs, "targets": targets, "segment_ids": segments}


class EpochRows:
  """Random access to the training rows of every epoch: epoch e packs the examples in a permutation seeded by
  (seed, e) (or file order without shuffle). Layouts are built on demand; picklable for grain's workers."""

  def __init__(self, examples: list, seq_len: int, pad_id: int, *, packing: bool, shuffle: bool, seed: int):
    self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
    self.packing, self.shuffle, self.seed = packing, shuffle, seed
    self.lengths = np.asarray([len(ids) for ids, _ in examples], np.int64)
    self._starts = [0]  # first global row of each epoch laid out so far
    self._layouts: dict[int, list] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    return dict(self.__dict__, _layouts={}, _lock=None)

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __len__(self):
    return _INFINITE_ROWS

  def layout(self, epoch: int) -> list[list[int]]:
    if epoch not in self._layouts:
      order = np.arange(len(self.examples))
      if self.shuffle:
        order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(len(self.examples))
      self._layouts = {**{e: v for e, v in self._layouts.items() if e >= epoch - 1}, epoch: pack(
          self.lengths, order, self.seq_len, self.packing)}
    return self._layouts[epoch]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    with self._lock:
      while self._starts[-1] <= index:  # lay out epochs until one holds the row
        self._starts.append(self._starts[-1] + len(self.layout(len(self._starts) - 1)))
      epoch = int(np.searchsorted(self._starts, index, side="right")) - 1
      row = self.layout(epoch)[index - self._starts[epoch]]
    return row_arrays(self.examples, row, self.seq_len, self.pad_id)


def _content_hash(examples: list) -> str:
  h = hashlib.sha256()
  for ids, labels in examples:
    h.update(ids.tobytes())
    h.update(labels.tobytes())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the pipeline interface


def build_train_iterator(cfg, *, seq_len, batch_size, rows, seed, fingerprint) -> DataIterator:
  """Infinite batches of this process's rows (row r of global batch b is row b * batch_size + r of the global
  order), resumable by the global batch index."""
  check_config(cfg)
  data = load(cfg)
  tok = tokenizer_of(cfg)
  train, truncated, dropped = truncate(data.train, seq_len)
  if not train:
    raise DataError(f"{data.path}: no training example left ({len(data.validation)} held out by "
                    f"data.validation_fraction = {cfg.validation_fraction}, {dropped} without a response token "
                    f"within seq_len + 1 = {seq_len + 1} tokens); lower the fraction or raise train.seq_len")
  if rows[0] == 0:
    print(data.summary(seq_len) + (f"; {dropped} of the truncated keep no response token and are skipped"
                                   if dropped else ""))
  packing, shuffle = bool(cfg.sft_packing), bool(cfg.shuffle)
  fingerprint = dict(fingerprint, sft=_content_hash(train), sft_packing=packing, sft_template=cfg.sft_template,
                     validation_fraction=float(cfg.validation_fraction))
  ds = grain.MapDataset.source(EpochRows(train, seq_len, tok.pad_id, packing=packing, shuffle=shuffle, seed=seed))
  return global_batches(ds, batch_size, rows, _identity, cfg, fingerprint)


def _identity(batch):
  return batch


def batches_of(examples: list, seq_len: int, pad_id: int, *, batch_size: int, num_batches: int, packing: bool,
               rows=None) -> list[dict]:
  """Evaluation batches over examples in file order: this process's `rows` (default all) of global batches of
  batch_size, every process the same number of batches (rows past the end are padding with targets -100);
  num_batches 0 = all."""
  mine = range(batch_size) if rows is None else rows
  rows = pack(np.asarray([len(ids) for ids, _ in examples]), np.arange(len(examples)), seq_len, packing)
  per_step = batch_size
  steps = -(-len(rows) // per_step)
  if num_batches:
    steps = min(steps, num_batches)
  out = []
  for s in range(steps):
    picked = [s * per_step + r for r in mine]
    arrays = [row_arrays(examples, rows[i] if i < len(rows) else [], seq_len, pad_id) for i in picked]
    out.append({k: np.stack([a[k] for a in arrays]) for k in arrays[0]})
  return out


def build_eval_batches(cfg, *, seq_len, batch_size, rows, num_batches) -> dict:
  """{"sft": batches} of the held-out split (response-only CE), {} when nothing is held out."""
  check_config(cfg)
  data = load(cfg)
  examples, _, _ = truncate(data.validation, seq_len)
  if not examples:
    return {}
  return {"sft": batches_of(examples, seq_len, tokenizer_of(cfg).pad_id, batch_size=batch_size,
                            num_batches=num_batches, packing=bool(cfg.sft_packing),
                            rows=rows)}


def file_batches(cfg, path: str, *, seq_len: int, batch_size: int, num_batches: int, log=print) -> dict:
  """{"sft": batches} of every usable record of `path` (no split), packed with segment ids: response-only CE for
  `maxlm.evaluate --format sft`."""
  data = load(cfg, path, split=False)
  log(data.summary(seq_len))
  examples, _, dropped = truncate(data.train, seq_len)
  if not examples:
    raise DataError(f"{path}: no example keeps a response token within --seq-len + 1 = {seq_len + 1} tokens "
                    f"({dropped} dropped); raise --seq-len")
  return {"sft": batches_of(examples, seq_len, tokenizer_of(cfg).pad_id, batch_size=batch_size,
                            num_batches=num_batches, packing=True)}


def describe(cfg):
  """SourceInfo of the instruction data: the tokenizer's vocabulary and EOS (reading the file fails fast here)."""
  check_config(cfg)
  tok = tokenizer_of(cfg)
  load(cfg)
  return SourceInfo(tok.vocab_size, ["sft"], None, tok.path, tok.eos_id, tok.decode)
