"""The table of data sources: data.source -> its row (build_train_iterator, build_eval_batches, describe). The token
store, replay and PCFG rows are defined here over windows.py; seqio and sft are their modules, imported on first use.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Callable, Protocol

import grain
import numpy as np

from maxlm.core.errors import DataError
from maxlm.data_pipelines import mixture
from maxlm.data_pipelines import pcfg
from maxlm.data_pipelines.batches import DataIterator, SourceInfo, eval_windows, global_batches
from maxlm.data_pipelines.token_store import TokenStore
from maxlm.data_pipelines.windows import ArrayWindows, PCFGStreamWindows, ReadBatch, ReplayIndex, StoreWindows
from maxlm.data_pipelines.windows import domain_dataset

# The PCFG eval stream: a fixed seed and its own stream tag, so it is independent of every training stream.
PCFG_EVAL_SEED, PCFG_TRAIN_TAG, PCFG_EVAL_TAG = 0, 0, 1


class Source(Protocol):
  """A row of the table. `fingerprint` holds the settings common to every source; a row adds its own, and a saved
  iterator state resumes only under an equal fingerprint."""

  def build_train_iterator(self, cfg, *, seq_len: int, batch_size: int, rows: tuple[int, ...], seed: int,
                           fingerprint: dict):
    """Infinite batches: this process's rows of each global batch of batch_size, with get_state / set_state."""

  def build_eval_batches(self, cfg, *, seq_len: int, batch_size: int, rows: tuple[int, ...],
                         num_batches: int) -> dict[str, list[dict]]:
    """{name: [batch]} of held-out data (this process's rows), the same number of batches on every process."""

  def describe(self, cfg) -> SourceInfo:
    """Vocabulary, domains, separator and tokenizer of the source."""


def _window_iterator(cfg, ds: grain.MapDataset, windows, separator_id: int, batch_size: int, rows,
                     fingerprint: dict) -> DataIterator:
  """`ds`: the source's one global order of (domain, window) elements, infinite."""
  return global_batches(ds, batch_size, rows, ReadBatch(windows, separator_id, cfg.document_masking), cfg,
                        fingerprint)


# ----------------------------------------------------------------------------- token store and replay


def _store_fingerprint(store: TokenStore) -> str:
  domains = {d: store.manifest["domains"][d]["train"]["tokens"] for d in store.domains}
  return hashlib.sha256(json.dumps([store.manifest["tokenizer"]["sha256"], domains]).encode()).hexdigest()[:16]


class StoreSource:
  """A token store: windows from each domain's train split mixed by weight, per-domain validation."""

  def build_train_iterator(self, cfg, *, seq_len, batch_size, rows, seed, fingerprint):
    store = TokenStore(cfg.path)
    fingerprint["store"] = _store_fingerprint(store)
    weights = mixture.resolve_weights(cfg, {d: store.num_tokens(d) for d in store.domains})
    fingerprint["weights"] = weights
    windows = StoreWindows(store, "train", seq_len, list(weights))
    datasets = [domain_dataset(windows, d, shuffle=cfg.shuffle, seed=seed) for d in range(len(weights))]
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, list(weights.values()))
    return _window_iterator(cfg, ds, windows, store.separator_id, batch_size, rows, fingerprint)

  def build_eval_batches(self, cfg, *, seq_len, batch_size, rows, num_batches):
    store = TokenStore(cfg.path)
    out = {}
    for domain in store.domains:
      n = store.num_tokens(domain, "validation")
      if n >= 2:
        read = functools.partial(store.read, domain, "validation")
        out[domain] = eval_windows(read, n, seq_len, batch_size, rows, num_batches, store.separator_id,
                                   cfg.document_masking)
    return out

  def describe(self, cfg) -> SourceInfo:
    store = TokenStore(cfg.path)
    override = cfg.tokenizer
    if override:  # checked now, not at the first decode: a run would train on ids of one tokenizer and export another
      store.check_tokenizer(override)
    path = override or store.tokenizer_path()

    def decode(ids):
      return store.tokenizer(override).decode(ids)

    domains = [d for d in store.domains if store.num_tokens(d) > 0]
    return SourceInfo(store.vocab_size, domains, None, path, store.separator_id, decode if path else None)


class ReplaySource(StoreSource):
  """A token store read in the fixed order of a global index file (OLMo's global_indices.npy); validation and
  description as the store's."""

  def build_train_iterator(self, cfg, *, seq_len, batch_size, rows, seed, fingerprint):
    store = TokenStore(cfg.path)
    fingerprint["store"] = _store_fingerprint(store)
    windows = StoreWindows(store, "train", seq_len, store.domains)
    path = cfg.index_file
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
    fingerprint["index_file"] = hashlib.sha256(np.ascontiguousarray(indices[:4096]).tobytes()).hexdigest()[:16]
    # Fixed order by design: index i is element i of the global order (batch i // global_batch, row
    # i % global_batch, as OLMo's loader reads it); epochs replay the same order.
    ds = grain.MapDataset.source(ReplayIndex(path, offsets[:-1])).repeat(None)
    return _window_iterator(cfg, ds, windows, store.separator_id, batch_size, rows, fingerprint)


# ----------------------------------------------------------------------------- PCFG


class PCFGSource:
  """A PCFG's sentences: a finite pre-sampled corpus (data.pcfg_tokens > 0) or an unbounded stream sampled on
  demand; validation from its own fixed stream; the true entropy rate in the description."""

  def build_train_iterator(self, cfg, *, seq_len, batch_size, rows, seed, fingerprint):
    g = pcfg.load_grammar(cfg.grammar)
    fingerprint["grammar"] = g.text_hash[:16]
    num_tokens = int(cfg.pcfg_tokens)
    fingerprint["pcfg_tokens"] = num_tokens
    shuffle = cfg.shuffle
    if num_tokens > 0:
      windows = ArrayWindows(g.sample_stream(num_tokens, seed, PCFG_TRAIN_TAG), seq_len, "pcfg")
    else:
      windows = PCFGStreamWindows(cfg.grammar, seed, PCFG_TRAIN_TAG, seq_len)
      shuffle = False  # an unbounded i.i.d. stream needs no shuffle
    ds = domain_dataset(windows, 0, shuffle=shuffle, seed=seed)
    return _window_iterator(cfg, ds, windows, g.separator_id, batch_size, rows, fingerprint)

  def build_eval_batches(self, cfg, *, seq_len, batch_size, rows, num_batches):
    g = pcfg.load_grammar(cfg.grammar)
    need = num_batches * batch_size * seq_len + 1
    tokens = g.sample_stream(need, PCFG_EVAL_SEED, PCFG_EVAL_TAG)
    return {"pcfg": eval_windows(lambda s, e: tokens[s:e], need, seq_len, batch_size, rows, num_batches,
                                 g.separator_id, cfg.document_masking)}

  def describe(self, cfg) -> SourceInfo:
    g = pcfg.load_grammar(cfg.grammar)
    report = pcfg.grammar_entropy(cfg.grammar)
    return SourceInfo(g.vocab_size, ["pcfg"], report.entropy_per_token, None, g.separator_id, g.decode,
                      report.stderr)


# ----------------------------------------------------------------------------- the table


def _seqio() -> Source:
  # seqio_source reaches seqio and TensorFlow (~3 GB, an extra) only when a task is read: load it only when named.
  from maxlm.data_pipelines import seqio_source  # pylint: disable=import-outside-toplevel
  return seqio_source


def _sft() -> Source:
  from maxlm.data_pipelines import sft  # pylint: disable=import-outside-toplevel
  return sft


_STORE, _REPLAY, _PCFG = StoreSource(), ReplaySource(), PCFGSource()
SOURCES: dict[str, Callable[[], Source]] = {  # data.source -> its row's loader
    "store": lambda: _STORE,
    "pcfg": lambda: _PCFG,
    "replay": lambda: _REPLAY,
    "seqio": _seqio,
    "sft": _sft,
}


def source(name: str) -> Source:
  """The row of data.source `name`; a DataError names the known ones."""
  if name not in SOURCES:
    *rest, last = SOURCES
    raise DataError(f"unknown data.source {name!r}; use {', '.join(rest)} or {last}.")
  return SOURCES[name]()
