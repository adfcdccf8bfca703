"""Raw corpus readers: JSON lines (plain, .gz, .zst), Parquet and plain text, yielding (text, domain) per document
and counting every record they cannot use (malformed JSON, missing text, undecodable bytes, ...) by reason.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os

from maxlm.core.errors import DataError

BAD_EXAMPLES_PER_REASON = 3
UTF8_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark (Windows editors write one): stripped, not a bad record
LONE_SURROGATE = "text holds a lone surrogate (JSON \\ud800-\\udfff escape, not valid Unicode)"


def is_valid_unicode(text: str) -> bool:
  """False for a string holding a lone surrogate (JSON's "\\ud800" decodes to one): no tokenizer can encode it."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


@dataclasses.dataclass
class FileStats:
  """What reading one input file produced; bad records are counted by reason, with a few examples."""
  file: str
  records: int = 0
  documents: int = 0
  tokens: int = 0
  bytes: int = 0
  blank_lines: int = 0
  shortest: int = 0  # tokens of the shortest and longest document (prepare fills them)
  longest: int = 0
  bad_records: dict = dataclasses.field(default_factory=dict)
  bad_examples: dict = dataclasses.field(default_factory=dict)

  def bad(self, reason: str, where: str, snippet: str | bytes = ""):
    self.bad_records[reason] = self.bad_records.get(reason, 0) + 1
    examples = self.bad_examples.setdefault(reason, [])
    if len(examples) < BAD_EXAMPLES_PER_REASON:
      if isinstance(snippet, bytes):
        snippet = snippet[:80].decode("utf-8", "backslashreplace")
      examples.append(f"{where}: {snippet[:80]!r}" if snippet else where)


def input_format(path: str) -> str:
  name = path.lower()
  for ext in (".gz", ".zst", ".zstd"):
    if name.endswith(ext):
      name = name[:-len(ext)]
  if name.endswith(".parquet"):
    return "parquet"
  if name.endswith((".jsonl", ".json", ".ndjson")):
    return "jsonl"
  return "text"


def _open_binary(path: str):
  name = path.lower()
  if name.endswith(".gz"):
    return gzip.open(path, "rb")
  if name.endswith((".zst", ".zstd")):
    return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 20)
  return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
  """A .zst file's decompressed bytes, frame after frame. Input that ends inside a frame is an EOFError: zstandard's
  stream reader ends quietly there, so a truncated file would read as a shorter one."""

  def __init__(self, path: str):
    import zstandard  # pylint: disable=import-outside-toplevel
    # Pile shards are written with a long window; allow it rather than failing on them.
    self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
    self._file = open(path, "rb")  # pylint: disable=consider-using-with  (closed by close())
    self._frame = None
    self._out, self._pos = b"", 0

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while self._pos >= len(self._out):
      data = self._file.read(1 << 20)
      if not data:
        if self._frame is not None and not self._frame.eof:
          raise EOFError("the compressed data ends inside a zstd frame (the file is truncated)")
        return 0
      self._out, self._pos = self._decompress(data), 0
    n = min(len(buffer), len(self._out) - self._pos)
    buffer[:n] = self._out[self._pos:self._pos + n]
    self._pos += n
    return n

  def _decompress(self, data: bytes) -> bytes:
    out = []
    while data:
      if self._frame is None or self._frame.eof:
        self._frame = self._dctx.decompressobj()
      out.append(self._frame.decompress(data))
      data = self._frame.unused_data if self._frame.eof else b""
    return b"".join(out)

  def close(self) -> None:
    self._file.close()
    super().close()


def field(record, key_path: str):
  """record[key_path], where `a.b` walks nested objects; a literal key containing dots wins."""
  if isinstance(record, dict) and key_path in record:
    return record[key_path]
  cur = record
  for part in key_path.split("."):
    if not isinstance(cur, dict) or part not in cur:
      raise KeyError(key_path)
    cur = cur[part]
  return cur


def _accept(stats: FileStats, where: str, text, domain, text_key: str, domain_key: str, default_domain: str,
            ids=None):
  if (text is _MISSING or text is None) and ids is not None and ids is not _MISSING:
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in ids):
      stats.bad("ids field is not a non-empty list of token ids (ints >= 0)", where, repr(ids)[:80])
      return None
    text = ids
  elif text is _MISSING:
    stats.bad(f"missing text field '{text_key}'", where)
    return None
  elif text is None:
    stats.bad(f"text field '{text_key}' is null", where)
    return None
  elif not isinstance(text, str):
    stats.bad(f"text field '{text_key}' is not a string", where, repr(text))
    return None
  if not text:
    stats.bad("empty text", where)
    return None
  if isinstance(text, str) and not is_valid_unicode(text):
    stats.bad(LONE_SURROGATE, where, text.encode("utf-8", "backslashreplace"))
    return None
  if domain_key:
    if domain is _MISSING or domain is None:
      stats.bad(f"missing domain field '{domain_key}'", where, str(text))
      return None
    domain = str(domain)
    if not domain.strip():
      stats.bad(f"empty domain field '{domain_key}'", where, str(text))
      return None
  elif domain is not None and domain is not _MISSING:
    domain = str(domain)  # found through a fallback key
  else:
    domain = default_domain
  if not is_valid_unicode(domain):
    stats.bad("domain holds a lone surrogate (not valid Unicode)", where, domain.encode("utf-8", "backslashreplace"))
    return None
  return text, domain


_MISSING = object()


def _get(record, key):
  try:
    return field(record, key)
  except KeyError:
    return _MISSING


def read_documents(path: str, stats: FileStats, *, text_key: str = "text", domain_key: str = "",
                   default_domain: str = "default", domain_fallbacks: tuple[str, ...] = (), ids_key: str = "",
                   text_lines: bool = False):
  """Yields (document, domain) for every usable document of `path`; everything else is counted in `stats`.

  A document is a string, or (with `ids_key`, for records without text) a list of token ids. The domain comes from
  `domain_key` (a record without it is bad), else from the first of `domain_fallbacks` present, else
  `default_domain`. A plain text file is one document, or one per line with `text_lines`. A corrupt or truncated
  file is a DataError naming it (after the documents read before the damage were yielded: callers must not keep
  them).
  """
  fmt = input_format(path)
  keys = dict(text_key=text_key, domain_key=domain_key, default_domain=default_domain,
              domain_fallbacks=domain_fallbacks, ids_key=ids_key)
  try:
    if fmt == "jsonl":
      yield from _read_jsonl(path, stats, **keys)
    elif fmt == "parquet":
      yield from _read_parquet(path, stats, **keys)
    elif text_lines:
      yield from _read_text_lines(path, stats, default_domain)
    else:
      yield from _read_text(path, stats, default_domain)
  except (OSError, EOFError, ValueError, RuntimeError) as e:
    # zstandard raises ZstdError (a subclass of Exception only); caught below.
    raise _damaged(path, stats, e) from None
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ != "ZstdError" and not type(e).__module__.startswith("pyarrow"):
      raise
    raise _damaged(path, stats, e) from None


def _damaged(path: str, stats: "FileStats", cause: BaseException) -> DataError:
  """A truncated or corrupt input file: an error naming it, never a store that quietly holds part of it."""
  return DataError(f"input file {path} is truncated or corrupt ({type(cause).__name__}: {str(cause)[:200]}); "
                   f"{stats.records} records were read before the damage. Re-download or re-create it, or leave "
                   "it out of --input; nothing of it is kept")


def _record_document(stats, where, record, text_key, domain_key, default_domain, domain_fallbacks, ids_key):
  domain = _get(record, domain_key) if domain_key else next(
      (d for d in (_get(record, k) for k in domain_fallbacks) if d is not _MISSING and d is not None), None)
  return _accept(stats, where, _get(record, text_key), domain, text_key, domain_key, default_domain,
                 ids=_get(record, ids_key) if ids_key else None)


def _read_jsonl(path, stats, **keys):
  with _open_binary(path) as f:
    for lineno, raw in enumerate(f, 1):
      if lineno == 1:
        raw = raw.removeprefix(UTF8_BOM)
      if not raw.strip():
        stats.blank_lines += 1
        continue
      stats.records += 1
      where = f"line {lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        stats.bad("undecodable bytes (not UTF-8)", f"{where} byte {e.start}", raw)
        continue
      try:
        record = json.loads(line)
      except ValueError:
        stats.bad("malformed JSON", where, raw)
        continue
      if not isinstance(record, dict):
        stats.bad("not a JSON object", where, raw)
        continue
      doc = _record_document(stats, where, record, **keys)
      if doc is not None:
        yield doc


def _read_parquet(path, stats, **keys):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pf = pq.ParquetFile(path)
  names = set(pf.schema_arrow.names)
  top = lambda key: key if key in names else key.split(".")[0]
  wanted = (keys["text_key"], keys["domain_key"], keys["ids_key"], *keys["domain_fallbacks"])
  columns = sorted({top(k) for k in wanted if k and top(k) in names})
  row = 0
  for batch in pf.iter_batches(batch_size=4096, columns=columns):
    records = batch.to_pylist() if columns else [{}] * batch.num_rows
    for record in records:
      row += 1
      stats.records += 1
      doc = _record_document(stats, f"row {row}", record, **keys)
      if doc is not None:
        yield doc
  if not columns and row == 0:
    # No requested column and no rows read through iter_batches: count the rows the file says it has.
    for _ in range(pf.metadata.num_rows):
      stats.records += 1
      stats.bad(f"missing text field '{keys['text_key']}'", path)


def _read_text_lines(path, stats, default_domain):
  """A plain text file with one document per (non-blank) line."""
  with _open_binary(path) as f:
    for lineno, raw in enumerate(f, 1):
      if lineno == 1:
        raw = raw.removeprefix(UTF8_BOM)
      if not raw.strip():
        stats.blank_lines += 1
        continue
      stats.records += 1
      try:
        yield raw.decode("utf-8").rstrip("\r\n"), default_domain
      except UnicodeDecodeError as e:
        stats.bad("undecodable bytes (not UTF-8)", f"line {lineno} byte {e.start}", raw)


def _read_text(path, stats, default_domain):
  """A plain text file is one document."""
  with _open_binary(path) as f:
    raw = f.read().removeprefix(UTF8_BOM)
  stats.records += 1
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    stats.bad("undecodable bytes (not UTF-8)", f"byte {e.start}", raw[max(0, e.start - 20):e.start + 20])
    return
  if not text.strip():
    stats.bad("empty text", path)
    return
  yield text, default_domain


def bad_summary(stats: FileStats) -> str:
  """'3 bad records: 2 malformed JSON (line 4: ...), 1 ...' or '' when there are none."""
  total = sum(stats.bad_records.values())
  if not total:
    return ""
  parts = [f"{n} {reason} (e.g. {stats.bad_examples.get(reason, [''])[0]})" for reason, n in
           sorted(stats.bad_records.items(), key=lambda kv: -kv[1])]
  return f"{total} bad record(s) in {stats.file}: " + "; ".join(parts)


def collect_documents(path: str, *, text_key: str = "text", domain_key: str = "", ids_key: str = "",
                      domain_fallbacks: tuple[str, ...] = ("domain", "meta.pile_set_name"),
                      default_domain: str = "all", log=print) -> dict[str, list]:
  """{domain: [document]} of one evaluation or analysis file: JSONL (.gz/.zst; `text`, or `ids` when ids_key is
  set), Parquet, or plain text with one document per line. Bad records are counted and reported through `log`;
  a file that yields no document is a DataError naming what was wrong."""
  if not os.path.isfile(path):
    raise DataError(f"data file {path!r} does not exist; pass a .jsonl (text or ids per line) or .txt file")
  stats = FileStats(path)
  docs: dict[str, list] = {}
  for doc, domain in read_documents(path, stats, text_key=text_key, domain_key=domain_key, ids_key=ids_key,
                                    default_domain=default_domain, domain_fallbacks=domain_fallbacks,
                                    text_lines=True):
    docs.setdefault(domain, []).append(doc)
  summary = bad_summary(stats)
  if not docs:
    fields = f"'{text_key}'" + (f" or '{ids_key}'" if ids_key else "")
    raise DataError(f"{path} holds no documents ({stats.records} records{'; ' + summary if summary else ''}): give "
                    f"JSONL records with a {fields} field, or plain text with one document per line")
  if summary:
    log(f"maxlm: warning: {summary}; these records were skipped")
  return docs
