"""The trainer's data interface: build_train_iterator / build_eval_batches / describe over every source (token
store, replay index, PCFG, seqio, instruction data), as grain pipelines of seq_len+1 token windows with resumable state.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
from typing import Callable

import grain
import numpy as np

from maxlm.data_pipelines import mixture
from maxlm.data_pipelines import pcfg
from maxlm.data_pipelines.token_store import TokenStore
from maxlm.errors import DataError

IGNORE = -100
STATE_VERSION = 1
# The PCFG eval stream: a fixed seed and its own stream tag, so it is independent of every training stream.
_PCFG_EVAL_SEED, _PCFG_TRAIN_TAG, _PCFG_EVAL_TAG = 0, 0, 1
_PCFG_CHUNK_TOKENS = 1 << 17
_PCFG_INFINITE_WINDOWS = 1 << 40


@dataclasses.dataclass
class SourceInfo:
  vocab_size: int
  domains: list[str]
  true_entropy_per_token: float | None
  tokenizer_path: str | None
  separator_id: int
  decode: Callable | None
  true_entropy_stderr: float | None = None  # Monte Carlo standard error of true_entropy_per_token (0 if exact)


def _seed32(*parts) -> int:
  return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


# ------------------------------------------------------------------------------------------------ windows

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
  without pre-sampling. Process p owns chunks p, p+P, ...: no two processes sample the same chunk."""

  def __init__(self, grammar: str, seed: int, tag: int, seq_len: int, process_index: int, process_count: int):
    self.grammar, self.seed, self.tag, self.seq_len = grammar, seed, tag, seq_len
    self.process_index, self.process_count = process_index, process_count
    self.per_chunk = max(1, _PCFG_CHUNK_TOKENS // seq_len)
    self.domains = ["pcfg"]
    self._cache = collections.OrderedDict()

  def __getstate__(self):
    return dict(self.__dict__, _cache=collections.OrderedDict())

  def num_windows(self, d: int) -> int:
    return _PCFG_INFINITE_WINDOWS  # per process

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
      local_chunk, k = divmod(int(j), self.per_chunk)
      chunk = self._chunk(local_chunk * self.process_count + self.process_index)
      out[i] = chunk[k * self.seq_len:(k + 1) * self.seq_len + 1]
    return out


def make_batch(windows: np.ndarray, separator_id: int, document_masking: bool,
               valid_tokens: np.ndarray | None = None) -> dict:
  """(B, L+1) windows -> inputs/targets (B, L) [+ segment_ids]. valid_tokens[b]: real tokens in row b (rest is
  padding with target -100). A separator opens the next segment, so it predicts the next document's first
  token seeing only itself."""
  inputs = np.ascontiguousarray(windows[:, :-1], dtype=np.int32)
  targets = np.array(windows[:, 1:], dtype=np.int32)
  if valid_tokens is not None:
    targets[np.arange(targets.shape[1])[None, :] >= (valid_tokens[:, None] - 1)] = IGNORE
  batch = {"inputs": inputs, "targets": targets}
  if document_masking:
    batch["segment_ids"] = (1 + np.cumsum(inputs == separator_id, axis=1)).astype(np.int32)
  return batch


class _ReadBatch:
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


def _domain_dataset(windows, d: int, *, shuffle: bool, seed: int, process_index: int, process_count: int,
                    sharded: bool) -> grain.MapDataset:
  n = windows.num_windows(d)
  ds = grain.MapDataset.range(n)
  if not sharded:  # block-sharded sources (PCFG stream) already give each process its own windows
    ds = ds.slice(slice(process_index, None, process_count))
  if len(ds) == 0:
    raise DataError(f"domain {windows.domains[d]!r} has {n} windows of seq_len+1 tokens, too few for "
                    f"{process_count} processes; lower seq_len, drop the domain from the weights, or add data.")
  if shuffle:
    ds = ds.shuffle(seed=_seed32(seed, windows.domains[d]))
  return ds.repeat(None).map(functools.partial(_tag, d))


class DataIterator:
  """The training iterator: next() gives a batch dict; get_state()/set_state() resume exactly (JSON state)."""

  def __init__(self, dataset: grain.IterDataset, fingerprint: dict):
    self._dataset = dataset
    self._it = iter(dataset)
    self.fingerprint = fingerprint

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def close(self):
    """Stops prefetch threads and worker processes (grain otherwise tears them down noisily at exit)."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "grain": self._it.get_state()}

  def set_state(self, state: dict):
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "grain" not in state:
      raise DataError("the saved data-iterator state is not from this maxlm data pipeline version; restart "
                      "the data from the beginning (drop the data state from the checkpoint).")
    saved = state.get("fingerprint", {})
    diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
    if diff:
      listing = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
      raise DataError(f"the saved data-iterator state belongs to a different data setup ({listing}). Restore "
                      "those settings to resume exactly, or start the data stream afresh.")
    self._it.set_state(state["grain"])


def _to_iter(ds: grain.MapDataset, cfg) -> grain.IterDataset:
  prefetch = int(getattr(cfg, "prefetch", 4))
  workers = int(getattr(cfg, "num_workers", 0))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2 if prefetch > 0 else 0,
                                            prefetch_buffer_size=max(prefetch, 0)))
  if workers > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; unparsed flags (a plain python -m entry point) abort them.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
  return it


def _store_fingerprint(store: TokenStore) -> str:
  domains = {d: store.manifest["domains"][d]["train"]["tokens"] for d in store.domains}
  return hashlib.sha256(json.dumps([store.manifest["tokenizer"]["sha256"], domains]).encode()).hexdigest()[:16]


def build_train_iterator(cfg, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                         process_count: int = 1) -> DataIterator:
  """Infinite, deterministic batches {"inputs", "targets"[, "segment_ids"]} of int32 (batch_size, seq_len) for
  this process's shard (batch_size is per process)."""
  if seq_len < 1 or batch_size < 1:
    raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}.")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} not in [0, {process_count}).")
  source = getattr(cfg, "source", "store")
  masking = bool(getattr(cfg, "document_masking", False))
  shuffle = bool(getattr(cfg, "shuffle", True))
  fp = {"source": source, "seed": int(seed), "seq_len": seq_len, "batch_size": batch_size,
        "process_index": process_index, "process_count": process_count, "shuffle": shuffle,
        "document_masking": masking}
  if source == "seqio":
    from maxlm.data_pipelines import seqio_source  # pylint: disable=import-outside-toplevel
    return seqio_source.build_train_iterator(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                             process_index=process_index, process_count=process_count,
                                             fingerprint=fp)
  if source == "sft":
    from maxlm.data_pipelines import sft  # pylint: disable=import-outside-toplevel
    return sft.build_train_iterator(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                    process_index=process_index, process_count=process_count, fingerprint=fp)
  if source == "pcfg":
    g = pcfg.load_grammar(getattr(cfg, "grammar", "builtin:demo"))
    fp["grammar"] = g.text_hash[:16]
    num_tokens = int(getattr(cfg, "pcfg_tokens", 0))
    fp["pcfg_tokens"] = num_tokens
    if num_tokens > 0:
      windows = ArrayWindows(g.sample_stream(num_tokens, seed, _PCFG_TRAIN_TAG), seq_len, "pcfg")
      sharded = False
    else:
      windows = PCFGStreamWindows(getattr(cfg, "grammar", "builtin:demo"), seed, _PCFG_TRAIN_TAG, seq_len,
                                  process_index, process_count)
      sharded, shuffle = True, False  # an unbounded i.i.d. stream needs no shuffle
    datasets = [_domain_dataset(windows, 0, shuffle=shuffle, seed=seed, process_index=process_index,
                                process_count=process_count, sharded=sharded)]
    ds, sep = datasets[0], g.separator_id
  elif source in ("store", "replay"):
    store = TokenStore(getattr(cfg, "path", ""))
    fp["store"] = _store_fingerprint(store)
    sep = store.separator_id
    if source == "store":
      weights = mixture.resolve_weights(cfg, {d: store.num_tokens(d) for d in store.domains})
      fp["weights"] = weights
      windows = StoreWindows(store, "train", seq_len, list(weights))
      datasets = [_domain_dataset(windows, d, shuffle=shuffle, seed=seed, process_index=process_index,
                                  process_count=process_count, sharded=False) for d in range(len(weights))]
      ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, list(weights.values()))
    else:
      windows = StoreWindows(store, "train", seq_len, store.domains)
      ds = _replay_dataset(cfg, windows, process_index, process_count, fp)
  else:
    raise DataError(f"unknown data.source {source!r}; use store, pcfg, replay, seqio or sft.")
  ds = ds.batch(batch_size, drop_remainder=True).map(_ReadBatch(windows, sep, masking))
  return DataIterator(_to_iter(ds, cfg), fp)


class _ReplayIndex:
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


def _replay_dataset(cfg, windows: StoreWindows, process_index: int, process_count: int, fp: dict):
  path = getattr(cfg, "index_file", "")
  try:
    indices = np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise DataError(f"data.index_file {path!r} cannot be read as a .npy array of window indices ({e}); point "
                    "it at a global_indices.npy-style file.") from None
  counts = [windows.num_windows(d) for d in range(len(windows.domains))]
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  if indices.ndim != 1 or indices.shape[0] == 0:
    raise DataError(f"data.index_file {path}: expected a non-empty 1-D array, got shape {indices.shape}.")
  lo, hi = int(indices.min()), int(indices.max())
  if lo < 0 or hi >= offsets[-1]:
    raise DataError(f"data.index_file {path} holds window indices in [{lo}, {hi}] but the store has "
                    f"{offsets[-1]} windows of {windows.seq_len + 1} tokens (domains {windows.domains} in "
                    "order); it was made for another store or seq_len.")
  fp["index_file"] = hashlib.sha256(np.ascontiguousarray(indices[:4096]).tobytes()).hexdigest()[:16]
  # Fixed order by design: each process takes every process_count-th index (as OLMo's loader does); epochs
  # replay the same order.
  ds = grain.MapDataset.source(_ReplayIndex(path, offsets[:-1]))
  return ds.slice(slice(process_index, None, process_count)).repeat(None)


# ---------------------------------------------------------------------------------------------- evaluation

def build_eval_batches(cfg, *, seq_len: int, batch_size: int, num_batches: int, process_index: int = 0,
                       process_count: int = 1) -> dict[str, list[dict]]:
  """{domain: [batch]} of held-out data, in a fixed order. Every process gets the same number of batches per
  domain (rows past the end are padding with targets -100), so collective eval steps line up."""
  source = getattr(cfg, "source", "store")
  masking = bool(getattr(cfg, "document_masking", False))
  if source == "seqio":
    from maxlm.data_pipelines import seqio_source  # pylint: disable=import-outside-toplevel
    return seqio_source.build_eval_batches(cfg, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches,
                                           process_index=process_index, process_count=process_count)
  if source == "sft":
    from maxlm.data_pipelines import sft  # pylint: disable=import-outside-toplevel
    return sft.build_eval_batches(cfg, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches,
                                  process_index=process_index, process_count=process_count)
  if source == "pcfg":
    g = pcfg.load_grammar(getattr(cfg, "grammar", "builtin:demo"))
    need = num_batches * batch_size * process_count * seq_len + 1
    tokens = g.sample_stream(need, _PCFG_EVAL_SEED, _PCFG_EVAL_TAG)
    return {"pcfg": eval_windows(lambda s, e: tokens[s:e], need, seq_len, batch_size, num_batches,
                                 process_index, process_count, g.separator_id, masking)}
  if source not in ("store", "replay"):
    raise DataError(f"unknown data.source {source!r}; use store, pcfg, replay, seqio or sft.")
  store = TokenStore(getattr(cfg, "path", ""))
  out = {}
  for domain in store.domains:
    n = store.num_tokens(domain, "validation")
    if n >= 2:
      read = functools.partial(store.read, domain, "validation")
      out[domain] = eval_windows(read, n, seq_len, batch_size, num_batches, process_index, process_count,
                                 store.separator_id, masking)
  return out


def eval_windows(read, n_tokens, seq_len, batch_size, num_batches, process_index, process_count, sep, masking):
  """Validation batches over one token stream (`read(start, stop)` -> tokens), this process's share of them."""
  # Windows of seq_len+1 with stride seq_len cover every held-out token as a target exactly once; the last one
  # may be short.
  n_windows = -(-(n_tokens - 1) // seq_len)
  per_step = batch_size * process_count
  steps = min(num_batches, -(-n_windows // per_step))
  batches = []
  for step in range(steps):
    rows = np.full((batch_size, seq_len + 1), sep, np.int32)
    valid = np.zeros(batch_size, np.int64)
    for r in range(batch_size):
      w = step * per_step + r * process_count + process_index
      if w < n_windows:
        start = w * seq_len
        stop = min(start + seq_len + 1, n_tokens)
        rows[r, :stop - start] = read(start, stop)
        valid[r] = stop - start
    batches.append(make_batch(rows, sep, masking, valid_tokens=valid))
  return batches


# -------------------------------------------------------------------------------------------------- describe

def describe(cfg) -> SourceInfo:
  """Vocabulary, domains, tokenizer and (for PCFG) the true entropy rate of the configured source."""
  source = getattr(cfg, "source", "store")
  if source == "pcfg":
    spec = getattr(cfg, "grammar", "builtin:demo")
    g = pcfg.load_grammar(spec)
    report = pcfg.grammar_entropy(spec)
    return SourceInfo(g.vocab_size, ["pcfg"], report.entropy_per_token, None, g.separator_id, g.decode,
                      report.stderr)
  if source == "seqio":
    from maxlm.data_pipelines import seqio_source  # pylint: disable=import-outside-toplevel
    return seqio_source.describe(cfg)
  if source == "sft":
    from maxlm.data_pipelines import sft  # pylint: disable=import-outside-toplevel
    return sft.describe(cfg)
  if source not in ("store", "replay"):
    raise DataError(f"unknown data.source {source!r}; use store, pcfg, replay, seqio or sft.")
  store = TokenStore(getattr(cfg, "path", ""))
  override = getattr(cfg, "tokenizer", "")
  path = override or store.tokenizer_path()

  def decode(ids):
    return store.tokenizer(override).decode(ids)

  domains = [d for d in store.domains if store.num_tokens(d) > 0]
  return SourceInfo(store.vocab_size, domains, None, path, store.separator_id, decode if path else None)
