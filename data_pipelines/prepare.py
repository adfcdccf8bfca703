"""`prepare` turns raw corpora into a token store (token_store.py), file-parallel and resumable; `inspect_store`
summarises one. Each input file is tokenized into parts under ROOT/_parts/ with a completion marker; assembly
concatenates the parts in input order, so a re-run after a crash skips finished files and writes the same store.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import multiprocessing
import os
import shutil
import sys

import numpy as np
import tensorstore as ts

from maxlm.data_pipelines import raw_records
from maxlm.data_pipelines import token_store
from maxlm.data_pipelines.text_tokenizer import TextTokenizer
from maxlm.core.errors import DataError

STORE_VERSION = 1
_PARTS = "_parts/"
_BATCH_DOCS = 256
_BATCH_BYTES = 4 << 20
_FLUSH_TOKENS = 1 << 24


def expand_inputs(patterns) -> list[str]:
  if isinstance(patterns, str):
    patterns = [patterns]
  files = set()
  for pattern in patterns:
    matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
    if not matched:
      raise DataError(f"--input {pattern!r} matches no files; quote the glob so the shell does not expand it, "
                      "e.g. --input 'data/*.jsonl.zst'.")
    files.update(os.path.abspath(p) for p in matched)
  return sorted(files)


def _file_key(path: str) -> str:
  return hashlib.sha1(path.encode()).hexdigest()[:16]


def is_validation(text_utf8: bytes, fraction: float) -> bool:
  """Held-out by content hash: deterministic, independent of file order, and duplicates share a split."""
  if fraction <= 0:
    return False
  h = int.from_bytes(hashlib.blake2b(text_utf8, digest_size=8).digest(), "little")
  return h < fraction * 2.0**64


_WORKER = {}


def _worker_init():
  # One process per core already: keep the tokenizer's own thread pool from oversubscribing.
  os.environ["RAYON_NUM_THREADS"] = "1"


def tokenize_file(path: str, root: str, settings: dict) -> dict:
  """Tokenizes one input file into parts under ROOT/_parts/<key>/ and writes its completion marker last."""
  key = _PARTS + _file_key(path) + "/"
  tok = _WORKER.get(settings["tokenizer_path"])
  if tok is None:
    tok = _WORKER[settings["tokenizer_path"]] = TextTokenizer(settings["tokenizer_path"], settings["separator"])
  kv = token_store.KV(root)
  kv.delete_prefix(key)  # leftovers of a crashed attempt on this file
  dtype = np.dtype(settings["dtype"])
  sep = np.array([tok.separator_id], dtype)
  stats = raw_records.FileStats(file=path)
  fraction = settings["validation_fraction"]
  buffers = collections.defaultdict(list)   # (domain, split) -> [token arrays]
  docs = collections.Counter()
  pieces = []
  pending, pending_bytes, buffered = [], 0, 0

  def encode_pending():
    nonlocal pending, pending_bytes, buffered
    if not pending:
      return
    for (text, domain, raw), ids in zip(pending, tok.encode_batch([p[0] for p in pending])):
      split = "validation" if is_validation(raw, fraction) else "train"
      buffers[(domain, split)].append(np.asarray(ids, dtype))
      buffers[(domain, split)].append(sep)
      docs[(domain, split)] += 1
      stats.shortest = min(stats.shortest, len(ids)) if stats.documents else len(ids)
      stats.longest = max(stats.longest, len(ids))
      stats.documents += 1
      stats.tokens += len(ids) + 1
      stats.bytes += len(raw)
      buffered += len(ids) + 1
    pending, pending_bytes = [], 0

  def flush_parts():
    nonlocal buffered
    for (domain, split), arrays in sorted(buffers.items()):
      data = np.concatenate(arrays)
      name = f"{key}{len(pieces):06d}.bin"
      kv.write(name, data.tobytes())
      pieces.append({"key": name, "domain": domain, "split": split, "tokens": int(data.shape[0]),
                     "documents": docs[(domain, split)]})
    buffers.clear()
    docs.clear()
    buffered = 0

  for text, domain in raw_records.read_documents(path, stats, text_key=settings["text_key"],
                                                  domain_key=settings["domain_key"],
                                                  default_domain=settings["default_domain"],
                                                  text_lines=settings.get("text_lines", False)):
    raw = text.encode("utf-8")  # raw_records refused lone surrogates
    pending.append((text, domain, raw))
    pending_bytes += len(raw)
    if len(pending) >= _BATCH_DOCS or pending_bytes >= _BATCH_BYTES:
      encode_pending()
      if buffered >= settings["flush_tokens"]:
        flush_parts()
  encode_pending()
  flush_parts()
  done = {"stats": dataclasses.asdict(stats), "pieces": pieces}
  kv.write_json(key + "done.json", done)
  return done


def _tokenize_job(job):
  return tokenize_file(*job)


class _ShardAlignedWriter:
  """Appends to a zarr3 array writing whole shards only, so no shard is read back and rewritten."""

  def __init__(self, array, shard: int, dtype):
    self.array, self.shard, self.dtype = array, shard, dtype
    self.offset, self.buf, self.buffered = 0, [], 0

  def append(self, data: np.ndarray):
    self.buf.append(data)
    self.buffered += data.shape[0]
    if self.buffered >= self.shard:
      data = np.concatenate(self.buf)
      n = (data.shape[0] // self.shard) * self.shard
      self.array[self.offset:self.offset + n].write(data[:n]).result()
      self.offset += n
      self.buf, self.buffered = [data[n:]], data.shape[0] - n

  def close(self):
    if self.buffered:
      data = np.concatenate(self.buf)
      self.array[self.offset:self.offset + data.shape[0]].write(data).result()
      self.offset += data.shape[0]
    self.buf, self.buffered = [], 0


def _assemble(root: str, files: list[str], dones: dict, settings: dict, tok: TextTokenizer) -> dict:
  kv = token_store.KV(root)
  dtype = np.dtype(settings["dtype"])
  by_domain = collections.defaultdict(lambda: {s: [] for s in token_store.SPLITS})
  for path in files:
    for piece in dones[path]["pieces"]:
      by_domain[piece["domain"]][piece["split"]].append(piece)
  taken, domains = set(), {}
  for domain in sorted(by_domain):
    rel = "domains/" + token_store.domain_slug(domain, taken)
    entry = {"path": rel}
    for split, pieces in by_domain[domain].items():
      total = sum(p["tokens"] for p in pieces)
      entry[split] = {"documents": sum(p["documents"] for p in pieces), "tokens": total}
      if total == 0:
        continue
      spec = token_store.array_spec(root, rel + "/" + split, shape=total, dtype=settings["dtype"])
      array = ts.open(spec, create=True, delete_existing=True).result()
      writer = _ShardAlignedWriter(array, array.chunk_layout.write_chunk.shape[0], dtype)
      for p in pieces:
        raw = kv.read(p["key"])
        if raw is None or len(raw) != p["tokens"] * dtype.itemsize:
          raise DataError(f"part {p['key']} of {root} is missing or truncated; delete {root}/{p['key']}'s "
                          "folder and re-run the same prepare command to redo that file.")
        writer.append(np.frombuffer(raw, dtype))
      writer.close()
    domains[domain] = entry
  with open(settings["tokenizer_path"], "rb") as f:
    tok_file = "tokenizer/" + os.path.basename(settings["tokenizer_path"])
    kv.write(tok_file, f.read())
  inputs = [dones[p]["stats"] for p in files]
  with_docs = [s for s in inputs if s["documents"]]  # _check_documents made sure there is one
  bad = collections.Counter()
  for s in inputs:
    bad.update(s["bad_records"])
  return {
      "format": token_store.FORMAT, "version": STORE_VERSION, "dtype": settings["dtype"],
      "tokenizer": dict(tok.info(), file=tok_file, source_path=settings["tokenizer_path"]),
      "domains": domains,
      "validation_fraction": settings["validation_fraction"],
      "totals": {"files": len(files), "records": sum(s["records"] for s in inputs),
                 "documents": sum(s["documents"] for s in inputs), "tokens": sum(s["tokens"] for s in inputs),
                 "bytes": sum(s["bytes"] for s in inputs), "bad_records": dict(sorted(bad.items())),
                 "document_tokens": None if any("longest" not in s for s in with_docs) else  # parts of old
                 {"min": min(s["shortest"] for s in with_docs), "max": max(s["longest"] for s in with_docs)}},
      "inputs": inputs,
      "settings": settings,
  }


def prepare(inputs, tokenizer: str, output: str, *, text_key: str = "text", domain_key: str = "",
            default_domain: str = "default", validation_fraction: float = 0.0, workers: int | None = None,
            separator: str | None = None, keep_parts: bool = False, progress: bool = True,
            flush_tokens: int = _FLUSH_TOKENS, text_lines: bool = False) -> dict:
  """Tokenizes every document of the input files into a token store at `output`; returns the manifest.

  A plain-text input is one document per file, or one per non-blank line with `text_lines` (as the analysis tools
  and `evaluate` read .txt files).
  workers: processes (None = all cores; 1 = in this process). Re-running with the same arguments after a crash
  redoes only unfinished files; after success it returns the existing manifest.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise DataError(f"--validation-fraction must be in [0, 1), got {validation_fraction}.")
  if workers is not None and workers < 1:
    raise DataError(f"--workers {workers}: give a number of processes >= 1 (1 = in this process), or leave it out "
                    f"for one per core ({os.cpu_count() or 1} here)")
  check_output(output)
  files = expand_inputs(inputs)
  tok = TextTokenizer(tokenizer, separator)
  settings = {
      "version": STORE_VERSION, "text_key": text_key, "domain_key": domain_key, "default_domain": default_domain,
      "validation_fraction": validation_fraction, "tokenizer_path": os.path.abspath(tok.path),
      "tokenizer_sha256": tok.sha256, "separator": tok.separator, "dtype": token_store.token_dtype(tok.vocab_size),
      "flush_tokens": flush_tokens, **({"text_lines": True} if text_lines else {}),
      "inputs": [{"file": p, "size": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns} for p in files],
  }
  kv = token_store.KV(output)
  existing = kv.read_json(token_store.MANIFEST)
  if existing is not None:
    if existing.get("settings") == settings:
      _say(progress, f"{output}: already prepared with these inputs and settings; nothing to do.")
      return existing
    raise DataError(f"{output} already holds a token store prepared from other inputs or settings; choose a new "
                    "--output or delete the old store.")
  previous = kv.read_json(_PARTS + "settings.json")
  if previous is not None and previous != settings:
    raise DataError(f"{output}/_parts holds an interrupted prepare with other inputs or settings; re-run that "
                    f"command, or delete {output}/_parts to start over.")
  kv.write_json(_PARTS + "settings.json", settings)

  dones = {p: kv.read_json(_PARTS + _file_key(p) + "/done.json") for p in files}
  todo = [p for p in files if dones[p] is None]
  if len(todo) < len(files):
    _say(progress, f"resuming: {len(files) - len(todo)} of {len(files)} files already tokenized.")
  workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))  # None: one per core
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=sum(os.path.getsize(p) for p in todo), unit="B", unit_scale=True, desc="tokenize",
             disable=not progress, file=sys.stderr)
  jobs = [(p, output, settings) for p in todo]
  if workers <= 1:
    results = map(_tokenize_job, jobs)
    pool = None
  else:
    # spawn: tensorstore and tokenizer thread pools do not survive fork.
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)
    results = pool.imap_unordered(_tokenize_job, jobs)
  try:
    for done in results:
      dones[done["stats"]["file"]] = done
      bar.update(os.path.getsize(done["stats"]["file"]))
      _report_bad(done["stats"], bar if progress else None)
  finally:
    if pool is not None:
      pool.terminate()
    bar.close()
  _check_documents([dones[p]["stats"] for p in files], output, text_key, domain_key, progress)
  manifest = _assemble(output, files, dones, settings, tok)
  kv.write_json(token_store.MANIFEST, manifest)  # written last: its presence means the store is complete
  if not keep_parts:
    _delete_parts(output)
  _say(progress, summarize(manifest))
  lengths = manifest["totals"]["document_tokens"] or _sampled_lengths(token_store.TokenStore(output))
  warning = same_length_warning(manifest["totals"]["documents"], lengths["min"], lengths["max"]) if lengths else ""
  if warning:
    print(warning, file=sys.stderr)  # even with --quiet: the store is probably not what was meant
  return manifest


def same_length_warning(documents: int, shortest: int, longest: int) -> str:
  """A warning when every document of a store has the same length (a tokenizer that truncates and pads, or inputs
  cut to a fixed size), else ""."""
  if documents < 2 or shortest != longest:
    return ""
  return (f"maxlm: warning: all {documents} documents are exactly {shortest} tokens long: were they truncated or "
          "padded (a tokenizer.json's truncation/padding settings, or inputs cut to one size)? maxlm encodes whole "
          "documents; check the inputs if that length is not what they hold")


def check_output(output: str) -> None:
  """A DataError unless a local --output is new, empty, a token store or an interrupted prepare: prepare never
  writes into a file, a run directory or a folder of other files."""
  local = token_store.kvstore_spec(output)
  if local["driver"] != "file":
    return
  path = local["path"].rstrip("/")
  if os.path.lexists(path) and not os.path.isdir(path):
    raise DataError(f"--output {output} is an existing file, not a directory; a token store is a directory: choose "
                    "a new path (nothing was written)")
  parent = os.path.dirname(path)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise DataError(f"--output {output}: {parent} is a file, so no directory can be made below it; choose another "
                    "path")
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if names and not names & {token_store.MANIFEST, _PARTS.rstrip("/")}:
      what = "a maxlm run directory" if names & {"checkpoints", "metrics.jsonl", "config.yaml"} else \
          "a directory of files prepare did not write"
      raise DataError(f"--output {output} is {what} ({', '.join(sorted(names)[:5])}); a token store needs a new or "
                      "empty directory (nothing was written)")


def _delete_parts(output: str):
  token_store.KV(output).delete_prefix(_PARTS)
  local = token_store.kvstore_spec(output)
  if local["driver"] == "file":  # the file kvstore leaves empty directories behind
    shutil.rmtree(os.path.join(local["path"], _PARTS), ignore_errors=True)


def _check_documents(stats: list, output: str, text_key: str, domain_key: str, progress: bool):
  """No documents at all is an error (an empty store would only fail later, in training); a file without any is a
  warning."""
  if not any(s["documents"] for s in stats):
    _delete_parts(output)  # nothing worth resuming, and fixed inputs must not meet a stale _parts
    local = token_store.kvstore_spec(output)
    if local["driver"] == "file" and os.path.isdir(local["path"]) and not os.listdir(local["path"]):
      os.rmdir(local["path"])  # the empty directory this run made: "no token store was written" is then true
    raise DataError(_no_documents_message(stats, output, text_key, domain_key))
  for s in stats:
    if not s["documents"]:
      _say(progress, f"warning: {s['file']} gave no documents ({_file_outcome(s)})")


def _file_outcome(stats: dict) -> str:
  """What one input file held, in words: its records and the bad ones by reason."""
  if not stats["records"] and not stats["bad_records"]:
    return "empty: no records" + (f", {stats['blank_lines']} blank lines" if stats["blank_lines"] else "")
  bad = ", ".join(f"{n} {reason}" for reason, n in sorted(stats["bad_records"].items()))
  return f"{stats['records']} records" + (f"; bad: {bad}" if bad else "")


def _no_documents_message(stats: list, output: str, text_key: str, domain_key: str) -> str:
  shown = stats[:10]
  listing = "\n".join(f"  {s['file']}: {_file_outcome(s)}" for s in shown)
  if len(stats) > len(shown):
    listing += f"\n  ... and {len(stats) - len(shown)} more files"
  bad = collections.Counter()
  for s in stats:
    bad.update(s["bad_records"])
  totals = ", ".join(f"{n} {reason}" for reason, n in sorted(bad.items())) or "none"
  keys = f"--text-key (now {text_key!r})" + (f" and --domain-key (now {domain_key!r})" if domain_key else "")
  files = f"{len(stats)} file" + ("s" if len(stats) != 1 else "")
  return (f"the input gave no documents, so no token store was written to {output}. {files}, bad records by "
          f"reason: {totals}.\n{listing}\nFix: point --input at files that hold documents (one JSON object per "
          f"line for JSONL); if the records are there, set {keys} to the fields that hold them.")


def _say(progress: bool, text: str):
  if progress:
    print(text, file=sys.stderr)


def _report_bad(stats: dict, bar):
  if stats["bad_records"] and bar is not None:
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(stats["bad_records"].items()))
    bar.write(f"{stats['file']}: skipped {sum(stats['bad_records'].values())} bad records ({reasons})",
              file=sys.stderr)


def summarize(manifest: dict) -> str:
  t = manifest["totals"]
  lines = [f"{t['documents']} documents, {t['tokens']} tokens from {t['files']} files "
           f"({t['records']} records, {sum(t['bad_records'].values())} bad)"]
  for name, d in sorted(manifest["domains"].items()):
    lines.append(f"  {name:<28} train {d['train']['documents']:>10} docs {d['train']['tokens']:>14} tokens"
                 f"   validation {d['validation']['documents']:>8} docs {d['validation']['tokens']:>12} tokens")
  for s in manifest["inputs"]:
    if s["bad_records"]:
      lines.append(f"  bad records in {s['file']}:")
      for reason, n in sorted(s["bad_records"].items()):
        lines.append(f"    {n:>8}  {reason}   e.g. {'; '.join(s['bad_examples'].get(reason, []))}")
  return "\n".join(lines)


def inspect_store(root: str, sample_tokens: int = 48) -> str:
  """Per-domain counts, tokenizer, bad records and a decoded sample from each domain."""
  store = token_store.TokenStore(root)
  m = store.manifest
  tk = m["tokenizer"]
  lines = [f"token store {root}: {m['dtype']}, tokenizer {tk['kind']} vocab {tk['vocab_size']} "
           f"separator {tk['separator']!r}={tk['separator_id']} sha256 {tk['sha256'][:12]}", summarize(m)]
  try:
    tok = store.tokenizer()
  except DataError as e:
    tok = None
    lines.append(f"  (no decoded samples: {e})")
  for domain in store.domains:
    n = store.num_tokens(domain, "train")
    if tok is not None and n:
      ids = store.read(domain, "train", 0, min(n, sample_tokens))
      lines.append(f"  sample {domain}: {tok.decode(ids)!r}")
  lengths = m["totals"].get("document_tokens") or _sampled_lengths(store)  # stores before it was recorded: a sample
  warning = same_length_warning(m["totals"]["documents"], lengths["min"], lengths["max"]) if lengths else ""
  return "\n".join(lines + ([warning] if warning else []))


def _sampled_lengths(store, tokens_per_domain: int = 1 << 20) -> dict | None:
  """{"min", "max"} document length over the first documents of each domain's train split (None if none end there)."""
  found = []
  for domain in store.domains:
    n = store.num_tokens(domain, "train")
    if not n:
      continue
    ids = np.asarray(store.read(domain, "train", 0, min(n, tokens_per_domain)))
    ends = np.flatnonzero(ids == store.separator_id)
    found.extend(np.diff(np.concatenate([[-1], ends])) - 1)
  return {"min": int(min(found)), "max": int(max(found))} if found else None
