"""The trainer's data interface: build_train_iterator / build_eval_batches / describe over every source (token
store, replay index, PCFG, seqio, instruction data), each looked up in the sources table by data.source.
"""

from __future__ import annotations

from maxlm.core.errors import DataError
from maxlm.data_pipelines.batches import DataIterator, SourceInfo
from maxlm.data_pipelines.sources import source


def build_train_iterator(cfg, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                         process_count: int = 1) -> DataIterator:
  """Infinite, deterministic batches {"inputs", "targets"[, "segment_ids"]} of int32 (batch_size, seq_len) for
  this process's shard (batch_size is per process)."""
  if seq_len < 1 or batch_size < 1:
    raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}.")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} not in [0, {process_count}).")
  fingerprint = {"source": cfg.source, "seed": int(seed), "seq_len": seq_len, "batch_size": batch_size,
                 "process_index": process_index, "process_count": process_count, "shuffle": bool(cfg.shuffle),
                 "document_masking": bool(cfg.document_masking)}
  return source(cfg.source).build_train_iterator(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                                 process_index=process_index, process_count=process_count,
                                                 fingerprint=fingerprint)


def build_eval_batches(cfg, *, seq_len: int, batch_size: int, num_batches: int, process_index: int = 0,
                       process_count: int = 1) -> dict[str, list[dict]]:
  """{domain: [batch]} of held-out data, in a fixed order. Every process gets the same number of batches per
  domain (rows past the end are padding with targets -100), so collective eval steps line up."""
  return source(cfg.source).build_eval_batches(cfg, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches,
                                               process_index=process_index, process_count=process_count)


def describe(cfg) -> SourceInfo:
  """Vocabulary, domains, tokenizer and (for PCFG) the true entropy rate of the configured source."""
  return source(cfg.source).describe(cfg)
