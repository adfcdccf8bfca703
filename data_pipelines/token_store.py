"""The token store: one zarr3 token array per domain and split under a root (local path, gs://, s3://), written
and read through tensorstore, plus manifest.json. Layout and read access live here; writing is in prepare.py.

    ROOT/manifest.json                      documents/tokens per domain, tokenizer (hash, vocab, separator), inputs
    ROOT/tokenizer/<file>                   a copy of the tokenizer, so a store is self-describing
    ROOT/domains/<slug>/{train,validation}  zarr3 uint16/uint32 arrays: documents joined, each followed by the separator
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np
import tensorstore as ts

from maxlm.core.errors import DataError
from maxlm.core.paths import resolve_tokenizer_path
from maxlm.core.paths import file_sha256
from maxlm.data_pipelines.text_tokenizer import TextTokenizer

MANIFEST = "manifest.json"
FORMAT = "maxlm-token-store"
SPLITS = ("train", "validation")
# Shards of 16M tokens hold inner chunks of 4096 tokens: a window read touches 1-2 small chunks (measured
# 40-60M tokens/s of random windows locally) while object stores see few, large files.
SHARD_TOKENS = 1 << 24
INNER_TOKENS = 4096


def prepare_hint(path: str) -> str:
  return (f"Create it with: python -m maxlm.data prepare --input 'RAW/*.jsonl.zst' --tokenizer tokenizer.json "
          f"--output {path or 'STORE'} [--domain-key meta.pile_set_name] (see python -m maxlm.data prepare --help)")


def kvstore_spec(root: str) -> dict:
  """A tensorstore kvstore spec for a store root: a local path, gs://bucket/path, s3://bucket/path or file://."""
  m = re.match(r"^(gs|s3)://([^/]+)/?(.*)$", root)
  if m:
    scheme, bucket, path = m.groups()
    path = path.rstrip("/") + "/" if path else ""
    return {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket, "path": path}
  if root.startswith("file://"):
    root = root[len("file://"):]
  if "://" in root:
    raise DataError(f"unsupported store URL {root!r}: use a local path, gs://bucket/path or s3://bucket/path.")
  return {"driver": "file", "path": os.path.abspath(root) + "/"}


def domain_slug(name: str, taken: set[str]) -> str:
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "domain"
  base, k = slug, 1
  while slug.lower() in taken:
    k += 1
    slug = f"{base}_{k}"
  taken.add(slug.lower())
  return slug


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


def array_spec(root: str, rel_path: str, *, shape: int | None = None, dtype: str | None = None) -> dict:
  kv = kvstore_spec(root)
  kv["path"] = kv["path"] + rel_path.strip("/") + "/"
  spec = {"driver": "zarr3", "kvstore": kv}
  if shape is not None:
    shard = min(SHARD_TOKENS, max(INNER_TOKENS, -(-shape // INNER_TOKENS) * INNER_TOKENS))
    spec["metadata"] = {
        "shape": [shape], "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [INNER_TOKENS],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}],
    }
  return spec


class TokenizerMismatchError(DataError):
  """A tokenizer file that is not the one a store was prepared with."""


class KV:
  """Byte-level access to a store root through a tensorstore kvstore (the same code for local and cloud)."""

  def __init__(self, root: str):
    self.root = root
    self._kv = ts.KvStore.open(kvstore_spec(root)).result()

  def read(self, key: str) -> bytes | None:
    r = self._kv.read(key).result()
    return None if r.state == "missing" else bytes(r.value)

  def write(self, key: str, value: bytes):
    self._kv.write(key, value).result()

  def read_json(self, key: str):
    raw = self.read(key)
    return None if raw is None else json.loads(raw)

  def write_json(self, key: str, obj):
    self.write(key, json.dumps(obj, indent=1, sort_keys=True).encode())

  def list(self, prefix: str) -> list[str]:
    keys = self._kv.list(ts.KvStore.KeyRange(prefix, prefix + "\xff")).result()
    return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)

  def delete_prefix(self, prefix: str):
    self._kv.delete_range(ts.KvStore.KeyRange(prefix, prefix + "\xff")).result()


class TokenStore:
  """Read access to a prepared store; tensorstore handles are opened lazily per process (picklable)."""

  def __init__(self, root: str):
    if not root:
      raise DataError("data.path is empty: set it to a token store. " + prepare_hint(""))
    self.root = root
    try:
      manifest = KV(root).read_json(MANIFEST)
    except (ValueError, RuntimeError) as e:
      raise DataError(f"cannot read token store {root}: {e}. " + prepare_hint(root)) from None
    if manifest is None:
      raise DataError(f"no token store at {root} (no {MANIFEST}; an interrupted prepare resumes when re-run "
                      "with the same arguments). " + prepare_hint(root))
    if manifest.get("format") != FORMAT:
      raise DataError(f"{root}/{MANIFEST} is not a maxlm token store manifest.")
    self.manifest = manifest
    self._arrays = {}
    self._tokenizer = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_arrays"], state["_tokenizer"] = {}, None
    return state

  @property
  def domains(self) -> list[str]:
    return sorted(self.manifest["domains"])

  @property
  def vocab_size(self) -> int:
    return int(self.manifest["tokenizer"]["vocab_size"])

  @property
  def separator_id(self) -> int:
    return int(self.manifest["tokenizer"]["separator_id"])

  def num_tokens(self, domain: str, split: str = "train") -> int:
    return int(self.manifest["domains"][domain][split]["tokens"])

  def array(self, domain: str, split: str = "train") -> ts.TensorStore:
    key = (domain, split)
    if key not in self._arrays:
      rel = self.manifest["domains"][domain]["path"] + "/" + split
      # A small cache keeps shard indices in memory: without it every window read re-fetches the index.
      ctx = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
      arr = ts.open(array_spec(self.root, rel), read=True, context=ctx).result()
      self._check_shards(domain, split, rel, arr)
      self._arrays[key] = arr
    return self._arrays[key]

  def _check_shards(self, domain: str, split: str, rel: str, arr: ts.TensorStore) -> None:
    """Every shard file the manifest's token count implies is present (one listing): tensorstore reads a missing
    shard as the fill value, so a deleted file would otherwise train on token 0 without a word."""
    tokens = self.num_tokens(domain, split)
    if arr.shape[0] != tokens:
      raise DataError(f"token store {self.root}: domain {domain!r} {split} holds {arr.shape[0]} tokens but the "
                      f"manifest says {tokens}: the store is damaged; prepare it again into a new --output")
    shard = arr.chunk_layout.write_chunk.shape[0]
    expected = {f"{rel}/c/{i}" for i in range(-(-tokens // shard))}
    missing = sorted(expected - set(KV(self.root).list(rel + "/c/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if missing:
      raise DataError(f"token store {self.root} is damaged: domain {domain!r} ({split} split) is missing "
                      f"{len(missing)} of its {len(expected)} shard file(s) ({', '.join(missing[:3])}"
                      f"{', ...' if len(missing) > 3 else ''}); their tokens would read as 0. Restore the files, or "
                      "prepare the store again into a new --output")

  def read(self, domain: str, split: str, start: int, stop: int) -> np.ndarray:
    return self.array(domain, split)[start:stop].read().result()

  def read_many(self, domain: str, split: str, starts, length: int) -> np.ndarray:
    """Rows of `length` tokens at each start, read concurrently (one tensorstore future per row)."""
    arr = self.array(domain, split)
    futures = [arr[int(s):int(s) + length].read() for s in starts]
    out = np.empty((len(futures), length), np.int32)
    for i, f in enumerate(futures):
      out[i] = f.result()
    return out

  def tokenizer_path(self) -> str | None:
    """A local path to the store's tokenizer copy (downloaded to a temp file for cloud stores)."""
    rel = self.manifest["tokenizer"].get("file")
    if not rel:
      return None
    spec = kvstore_spec(self.root)
    if spec["driver"] == "file":
      return os.path.join(spec["path"], rel)
    raw = KV(self.root).read(rel)
    if raw is None:
      return None
    local = os.path.join(tempfile.mkdtemp(prefix="maxlm_tok_"), os.path.basename(rel))
    with open(local, "wb") as f:
      f.write(raw)
    return local

  def tokenizer(self, override: str = "") -> TextTokenizer:
    if self._tokenizer is None:
      path = override or self.tokenizer_path()
      if not path:
        raise DataError(f"store {self.root} has no tokenizer copy; set data.tokenizer to the tokenizer file.")
      self.check_tokenizer(path)
      self._tokenizer = TextTokenizer(path, separator=self.manifest["tokenizer"].get("separator"))
    return self._tokenizer

  def check_tokenizer(self, path: str) -> None:
    """A DataError unless the tokenizer file `path` is the one the store was prepared with (its sha256)."""
    resolved = resolve_tokenizer_path(path)
    if not resolved or not os.path.isfile(resolved):
      raise DataError(f"tokenizer {path!r} not found: leave data.tokenizer empty (the store {self.root} carries its "
                      "own copy) or point it at the tokenizer the store was prepared with.")
    sha = file_sha256(resolved)
    if sha != self.manifest["tokenizer"]["sha256"]:
      raise TokenizerMismatchError(
          f"tokenizer {path} (sha256 {sha[:12]}) is not the one the store {self.root} was prepared with (sha256 "
          f"{self.manifest['tokenizer']['sha256'][:12]}, {self.vocab_size} tokens): the store's ids would be read, "
          "decoded and exported as another tokenizer's. Leave data.tokenizer empty (the store carries its own copy) "
          "or point it at that tokenizer.")
