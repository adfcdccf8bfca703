"""Raw corpus readers: JSON lines (plain, .gz, .zst), Parquet and plain text, yielding (text, domain) per document
and counting every record they cannot use (malformed JSON, missing text, undecodable bytes, ...) by reason.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json

BAD_EXAMPLES_PER_REASON = 3


@dataclasses.dataclass
class FileStats:
  """What reading one input file produced; bad records are counted by reason, with a few examples."""
  file: str
  records: int = 0
  documents: int = 0
  tokens: int = 0
  bytes: int = 0
  blank_lines: int = 0
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
    import zstandard  # pylint: disable=import-outside-toplevel
    # Pile shards are written with a long window; allow it rather than failing on them.
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
    return io.BufferedReader(dctx.stream_reader(open(path, "rb"), closefd=True), buffer_size=1 << 20)
  return open(path, "rb")


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


def _accept(stats: FileStats, where: str, text, domain, text_key: str, domain_key: str, default_domain: str):
  if text is _MISSING or text is None:
    stats.bad(f"missing text field '{text_key}'", where)
    return None
  if not isinstance(text, str):
    stats.bad(f"text field '{text_key}' is not a string", where, repr(text))
    return None
  if not text:
    stats.bad("empty text", where)
    return None
  if domain_key:
    if domain is _MISSING or domain is None:
      stats.bad(f"missing domain field '{domain_key}'", where, text)
      return None
    domain = str(domain)
  else:
    domain = default_domain
  return text, domain


_MISSING = object()


def _get(record, key):
  try:
    return field(record, key)
  except KeyError:
    return _MISSING


def read_documents(path: str, stats: FileStats, *, text_key: str = "text", domain_key: str = "",
                   default_domain: str = "default"):
  """Yields (text, domain) for every usable document of `path`; everything else is counted in `stats`.

  A corrupt or truncated file is reported as one bad record ('unreadable file: ...') after the documents read
  before the damage; it never raises.
  """
  fmt = input_format(path)
  try:
    if fmt == "jsonl":
      yield from _read_jsonl(path, stats, text_key, domain_key, default_domain)
    elif fmt == "parquet":
      yield from _read_parquet(path, stats, text_key, domain_key, default_domain)
    else:
      yield from _read_text(path, stats, default_domain)
  except (OSError, EOFError, ValueError, RuntimeError) as e:
    # zstandard raises ZstdError (a subclass of Exception only); caught below.
    stats.bad(f"unreadable file: {type(e).__name__}", f"{path}: {e}")
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ != "ZstdError" and not type(e).__module__.startswith("pyarrow"):
      raise
    stats.bad(f"unreadable file: {type(e).__name__}", f"{path}: {e}")


def _read_jsonl(path, stats, text_key, domain_key, default_domain):
  with _open_binary(path) as f:
    for lineno, raw in enumerate(f, 1):
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
      doc = _accept(stats, where, _get(record, text_key), _get(record, domain_key) if domain_key else None,
                    text_key, domain_key, default_domain)
      if doc is not None:
        yield doc


def _read_parquet(path, stats, text_key, domain_key, default_domain):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pf = pq.ParquetFile(path)
  names = set(pf.schema_arrow.names)
  top = lambda key: key if key in names else key.split(".")[0]
  columns = sorted({top(k) for k in (text_key, domain_key) if k and top(k) in names})
  row = 0
  for batch in pf.iter_batches(batch_size=4096, columns=columns):
    records = batch.to_pylist() if columns else [{}] * batch.num_rows
    for record in records:
      row += 1
      stats.records += 1
      doc = _accept(stats, f"row {row}", _get(record, text_key), _get(record, domain_key) if domain_key else None,
                    text_key, domain_key, default_domain)
      if doc is not None:
        yield doc
  if not columns and row == 0:
    # No requested column and no rows read through iter_batches: count the rows the file says it has.
    for _ in range(pf.metadata.num_rows):
      stats.records += 1
      stats.bad(f"missing text field '{text_key}'", path)


def _read_text(path, stats, default_domain):
  """A plain text file is one document."""
  with _open_binary(path) as f:
    raw = f.read()
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
