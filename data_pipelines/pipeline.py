"""The trainer's data interface: build_train_iterator / build_eval_batches / describe over every source (token
store, replay index, PCFG, seqio, instruction data), each looked up in the sources table by data.source.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from maxlm.core.errors import DataError
from maxlm.data_pipelines import masking
from maxlm.data_pipelines.batches import DataIterator, SourceInfo, check_rows
from maxlm.data_pipelines.sources import source


def build_train_iterator(cfg, *, seq_len: int, batch_size: int, seed: int,
                         rows: Optional[Sequence[int]] = None) -> DataIterator:
  """Infinite, deterministic batches {"inputs", "targets"[, "segment_ids"]} of int32 (len(rows), seq_len): this
  process's `rows` (default all) of each global batch of `batch_size` sequences. The global batch sequence depends
  on the data config, seed, seq_len and batch_size only, never on how many processes read it."""
  if seq_len < 1 or batch_size < 1:
    raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}.")
  rows = check_rows(rows, batch_size)
  fingerprint = {"source": cfg.source, "seed": int(seed), "seq_len": seq_len, "global_batch": batch_size,
                 "shuffle": bool(cfg.shuffle), "document_masking": bool(cfg.document_masking)}
  spec = masking_spec(cfg)
  if spec is not None:
    fingerprint["mlm"] = dataclasses.asdict(spec)
  it = source(cfg.source).build_train_iterator(cfg, seq_len=seq_len, batch_size=batch_size, rows=rows, seed=seed,
                                               fingerprint=fingerprint)
  return it if spec is None else masking.MaskingIterator(it, spec, seed, rows)


def build_eval_batches(cfg, *, seq_len: int, batch_size: int, num_batches: int,
                       rows: Optional[Sequence[int]] = None) -> dict[str, list[dict]]:
  """{domain: [batch]} of held-out data, in a fixed order: this process's `rows` of global batches of `batch_size`.
  Every process gets the same number of batches per domain (rows past the end are padding with targets -100), so
  collective eval steps line up."""
  rows = check_rows(rows, batch_size)
  batches = source(cfg.source).build_eval_batches(cfg, seq_len=seq_len, batch_size=batch_size,
                                                  num_batches=num_batches, rows=rows)
  spec = masking_spec(cfg)
  return batches if spec is None else masking.mask_eval_batches(batches, spec, rows)


def describe(cfg) -> SourceInfo:
  """Vocabulary, domains, tokenizer and (for PCFG) the true entropy rate of the configured source. With data.mlm the
  vocabulary includes the mask token (one more id when the tokenizer had none), and there is no entropy rate: the
  floor of masked-token CE is another quantity."""
  info = source(cfg.source).describe(cfg)
  if not getattr(cfg, "mlm", False):
    return info
  spec = masking.masking_spec(cfg, info.vocab_size, info.separator_id)
  return dataclasses.replace(info, vocab_size=spec.vocab_size, true_entropy_per_token=None, true_entropy_stderr=None,
                             mask_id=spec.mask_id)


def masking_spec(cfg) -> Optional[masking.MaskingSpec]:
  """The masked-LM settings of a data section over its source's tokenizer; None without data.mlm."""
  if not getattr(cfg, "mlm", False):
    return None
  info = source(cfg.source).describe(cfg)
  return masking.masking_spec(cfg, info.vocab_size, info.separator_id)
