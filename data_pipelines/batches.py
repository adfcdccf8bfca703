"""What every source hands the trainer: the batch dict (make_batch, eval_windows), the source description (SourceInfo)
and the resumable training iterator (DataIterator over a grain dataset, to_iter). Sources build on these; nothing
here knows a source.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import grain
import numpy as np

from maxlm.core.config import IGNORE_INDEX
from maxlm.core.errors import DataError

STATE_VERSION = 1


@dataclasses.dataclass
class SourceInfo:
  vocab_size: int
  domains: list[str]
  true_entropy_per_token: float | None
  tokenizer_path: str | None
  separator_id: int
  decode: Callable | None
  true_entropy_stderr: float | None = None  # Monte Carlo standard error of true_entropy_per_token (0 if exact)


def make_batch(windows: np.ndarray, separator_id: int, document_masking: bool,
               valid_tokens: np.ndarray | None = None) -> dict:
  """(B, L+1) windows -> inputs/targets (B, L) [+ segment_ids]. valid_tokens[b]: real tokens in row b (rest is
  padding with target -100). A separator opens the next segment, so it predicts the next document's first
  token seeing only itself."""
  inputs = np.ascontiguousarray(windows[:, :-1], dtype=np.int32)
  targets = np.array(windows[:, 1:], dtype=np.int32)
  if valid_tokens is not None:
    targets[np.arange(targets.shape[1])[None, :] >= (valid_tokens[:, None] - 1)] = IGNORE_INDEX
  batch = {"inputs": inputs, "targets": targets}
  if document_masking:
    batch["segment_ids"] = (1 + np.cumsum(inputs == separator_id, axis=1)).astype(np.int32)
  return batch


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


def to_iter(ds: grain.MapDataset, cfg) -> grain.IterDataset:
  """A batched map dataset as the iterator the trainer reads: data.prefetch batches ahead on threads, in
  data.num_workers processes when > 0."""
  prefetch, workers = int(cfg.prefetch), int(cfg.num_workers)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2 if prefetch > 0 else 0,
                                            prefetch_buffer_size=max(prefetch, 0)))
  if workers > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; unparsed flags (a plain python -m entry point) abort them.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
  return it


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
