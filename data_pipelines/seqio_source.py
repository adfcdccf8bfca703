"""seqio tasks and mixtures as a training source (the optional `maxlm[seqio]` extra: seqio pulls TensorFlow).

The task's "targets" token streams are concatenated and cut into seq_len+1 windows, like the token store.
"""

from __future__ import annotations

import numpy as np

from maxlm.core.errors import DataError
from maxlm.data_pipelines.batches import SourceInfo, block_of, make_batch

_FEATURE = "targets"


def _seqio():
  try:
    import seqio  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError("data.source=seqio needs seqio (and TensorFlow): pip install 'maxlm[seqio]'. Register your "
                    "task by importing its module before training, or use the token store instead.") from None
  return seqio


def _task(cfg):
  seqio = _seqio()
  name = cfg.seqio_task
  if not name:
    raise DataError("data.source=seqio needs data.seqio_task: the name of a registered seqio task or mixture.")
  try:
    return seqio, seqio.get_mixture_or_task(name)
  except ValueError:
    raise DataError(f"seqio task or mixture {name!r} is not registered; import the module that registers it "
                    "(e.g. via a sitecustomize or your launcher) before maxlm.train.") from None


def _vocabulary(task):
  if _FEATURE not in task.output_features:
    raise DataError(f"seqio task {task.name} has no '{_FEATURE}' feature; decoder-LM training reads targets.")
  return task.output_features[_FEATURE].vocabulary


def _windows(cfg, *, seq_len, split, shuffle, seed, process_index, process_count):
  """Yields (seq_len+1,) windows from the concatenated targets of this process's shard, forever if training."""
  seqio, task = _task(cfg)
  vocab = _vocabulary(task)
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                        shard_info=seqio.ShardInfo(index=process_index, num_shards=process_count),
                        num_epochs=None if split == "train" else 1, use_cached=False)
  sep = vocab.eos_id if vocab.eos_id is not None else 0
  buf = np.zeros(0, np.int32)
  for ex in ds.as_numpy_iterator():
    toks = np.asarray(ex[_FEATURE], np.int32)
    if toks.size == 0 or toks[-1] != sep:  # documents must stay separated in the packed stream
      toks = np.append(toks, sep)
    buf = np.concatenate([buf, toks])
    while buf.shape[0] >= seq_len + 1:
      yield buf[:seq_len + 1]
      buf = buf[seq_len:]


class SeqioIterator:
  """Batches from a seqio task. tf.data state is not JSON: the state is the batch count, and set_state replays
  that many batches from the deterministic (seeded) stream, so a resume is exact but costs O(steps) reads.
  A stream cannot be read by global index: each block of the global batch reads its own seqio shard (tensor peers
  holding the same block read the same one), so the batch sequence depends on the block count, which the
  fingerprint records."""

  def __init__(self, cfg, *, seq_len, batch_size, rows, seed, fingerprint):
    index, count = block_of(rows, batch_size)
    self._args = dict(cfg=cfg, seq_len=seq_len, split="train", shuffle=bool(cfg.shuffle),
                      seed=seed, process_index=index, process_count=count)
    self.batch_size = len(rows)
    self.fingerprint = dict(fingerprint, seqio_task=cfg.seqio_task, seqio_shards=count)
    self.masking = bool(cfg.document_masking)
    self.sep = describe(cfg).separator_id
    self._restart(0)

  def _restart(self, skip):
    self._gen = _windows(**self._args)
    self.batches = 0
    for _ in range(skip):
      next(self)

  def __iter__(self):
    return self

  def __next__(self):
    rows = np.stack([next(self._gen) for _ in range(self.batch_size)])
    self.batches += 1
    return make_batch(rows, self.sep, self.masking)

  def close(self):
    self._gen.close()

  def get_state(self):
    return {"version": 1, "fingerprint": self.fingerprint, "batches": self.batches}

  def set_state(self, state):
    if state.get("fingerprint") != self.fingerprint:
      raise DataError("the saved data-iterator state belongs to a different seqio setup (a seqio stream is read in "
                      "one shard per block of the global batch, so its order depends on the process count); "
                      "restore the settings it was saved with, or start the data stream afresh "
                      "(checkpoint.allow_data_restart=true).")
    self._restart(int(state["batches"]))


def build_train_iterator(cfg, *, seq_len, batch_size, rows, seed, fingerprint):
  return SeqioIterator(cfg, seq_len=seq_len, batch_size=batch_size, rows=rows, seed=seed, fingerprint=fingerprint)


def build_eval_batches(cfg, *, seq_len, batch_size, rows, num_batches):
  info = describe(cfg)
  masking = bool(cfg.document_masking)
  index, count = block_of(rows, batch_size)
  gen = _windows(cfg, seq_len=seq_len, split="validation", shuffle=False, seed=0, process_index=index,
                 process_count=count)
  batches = []
  local = len(rows)
  for _ in range(num_batches):
    rows = [w for _, w in zip(range(local), gen)]
    if len(rows) < local:
      break
    batches.append(make_batch(np.stack(rows), info.separator_id, masking))
  return {cfg.seqio_task: batches}


def describe(cfg):
  _, task = _task(cfg)
  vocab = _vocabulary(task)
  sep = vocab.eos_id if vocab.eos_id is not None else 0
  return SourceInfo(vocab.vocab_size, [cfg.seqio_task], None, None, sep, lambda ids: vocab.decode(list(ids)))
