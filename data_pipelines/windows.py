"""Token windows as grain datasets: readers of seq_len+1 token windows (over a store split, an in-memory stream, an
on-demand PCFG stream), the replay index, and the per-domain index datasets and batch reader built over them.
"""

from __future__ import annotations

import collections
import functools
import hashlib

import grain
import numpy as np

from maxlm.core.errors import DataError
from maxlm.data_pipelines import pcfg
from maxlm.data_pipelines.batches import make_batch
from maxlm.data_pipelines.token_store import TokenStore

PCFG_CHUNK_TOKENS = 1 << 17
PCFG_INFINITE_WINDOWS = 1 << 40


def seed32(*parts) -> int:
  return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


class StoreWindows:
  """Windows of seq_len+1 tokens with stride seq_len (every token is a target once) over a store split."""

  def __init__(self, store: TokenStore, split: str, seq_len: int, domains: list[str]):
    self.store, self.split, self.seq_len, self.domains = store, split, seq_len, domains

  def num_windows(self, d: int) -> int:
    return max(0, (self.store.num_tokens(self.domains[d], self.split) - 1) // self.seq_len)

  def read(self, d: int, ids: np.ndarray) -> np.ndarray:
    return self.store.read_many(self.domains[d], self.split, np.asarray(ids) * self.seq_len, self.seq_len + 1)


class ArrayWindows:
  """Windows over an in-memory token stream (a finite pre-sampled PCFG corpus)."""

  def __init__(self, tokens: np.ndarray, seq_len: int, domain: str):
    self.tokens, self.seq_len, self.domains = tokens, seq_len, [domain]

  def num_windows(self, d: int) -> int:
    return max(0, (self.tokens.shape[0] - 1) // self.seq_len)

  def read(self, d: int, ids: np.ndarray) -> np.ndarray:
    starts = np.asarray(ids, np.int64)[:, None] * self.seq_len
    return self.tokens[starts + np.arange(self.seq_len + 1)].astype(np.int32)


class PCFGStreamWindows:
  """An unbounded PCFG token stream cut into chunks sampled on demand from (seed, tag, chunk): random access
  without pre-sampling. Window j is in chunk j // per_chunk, whichever process reads it."""

  def __init__(self, grammar: str, seed: int, tag: int, seq_len: int):
    self.grammar, self.seed, self.tag, self.seq_len = grammar, seed, tag, seq_len
    self.per_chunk = max(1, PCFG_CHUNK_TOKENS // seq_len)
    self.domains = ["pcfg"]
    self._cache = collections.OrderedDict()

  def __getstate__(self):
    return dict(self.__dict__, _cache=collections.OrderedDict())

  def num_windows(self, d: int) -> int:
    return PCFG_INFINITE_WINDOWS

  def _chunk(self, c: int) -> np.ndarray:
    if c not in self._cache:
      g = pcfg.load_grammar(self.grammar)
      need = self.per_chunk * self.seq_len + 1
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.tag, c]))
      parts, total = [], 0
      while total < need:  # whole sentences until the chunk is full; the last one is cut at the chunk end
        parts.append(g.sample_chunk(rng, 16384)[0])
        total += parts[-1].shape[0]
      self._cache[c] = np.concatenate(parts)[:need]
      while len(self._cache) > 4:
        self._cache.popitem(last=False)
    return self._cache[c]

  def read(self, d: int, ids: np.ndarray) -> np.ndarray:
    out = np.empty((len(ids), self.seq_len + 1), np.int32)
    for i, j in enumerate(np.asarray(ids, np.int64)):
      c, k = divmod(int(j), self.per_chunk)
      chunk = self._chunk(c)
      out[i] = chunk[k * self.seq_len:(k + 1) * self.seq_len + 1]
    return out


class ReplayIndex:
  """Global window index -> (domain, window) over the domains' windows laid end to end in sorted order."""

  def __init__(self, index_file: str, offsets: np.ndarray):
    self.index_file, self.offsets = index_file, offsets
    self._indices = None

  def __getstate__(self):
    return dict(self.__dict__, _indices=None)

  def indices(self):
    if self._indices is None:
      self._indices = np.load(self.index_file, mmap_mode="r")
    return self._indices

  def __len__(self):
    return int(self.indices().shape[0])

  def __getitem__(self, i):
    g = int(self.indices()[i])
    d = int(np.searchsorted(self.offsets, g, side="right")) - 1
    return np.int64(d), np.int64(g - self.offsets[d])


class ReadBatch:
  """grain map: a batch of (domain, window) indices -> the batch dict; one concurrent read per domain."""

  def __init__(self, windows, separator_id: int, document_masking: bool):
    self.windows, self.separator_id, self.document_masking = windows, separator_id, document_masking

  def __call__(self, index_batch):
    domains, ids = (np.asarray(a) for a in index_batch)
    rows = np.empty((domains.shape[0], self.windows.seq_len + 1), np.int32)
    for d in np.unique(domains):
      sel = np.flatnonzero(domains == d)
      rows[sel] = self.windows.read(int(d), ids[sel])
    return make_batch(rows, self.separator_id, self.document_masking)


def _tag(d: int, w):
  return np.int64(d), np.int64(w)


def domain_dataset(windows, d: int, *, shuffle: bool, seed: int) -> grain.MapDataset:
  """Domain d's (domain, window) indices in one global order, shuffled per domain from the seed, repeated."""
  n = windows.num_windows(d)
  ds = grain.MapDataset.range(n)
  if len(ds) == 0:
    raise DataError(f"domain {windows.domains[d]!r} has no window of seq_len+1 tokens; lower seq_len, drop the "
                    "domain from the weights, or add data.")
  if shuffle:
    ds = ds.shuffle(seed=seed32(seed, windows.domains[d]))
  return ds.repeat(None).map(functools.partial(_tag, d))
