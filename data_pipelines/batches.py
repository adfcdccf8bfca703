"""What every source hands the trainer: the batch dict (make_batch, eval_windows), the source description (SourceInfo)
and the resumable training iterator (DataIterator over global batch indices, to_iter). Sources build on these; nothing
here knows a source.

Batches are global (Levanter's loader): element b * global_batch + r of a source's one global order is row r of
batch b, and a process loads only `rows`, the rows its devices hold. The batch sequence is a function of the seed
and the step alone, and the iterator's state is the next batch index, whatever the process count.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional, Sequence

import grain
import numpy as np

from maxlm.core.config import IGNORE_INDEX
from maxlm.core.errors import DataError

STATE_VERSION = 2  # {"batch": the next global batch index}; 1 was grain's per-process state


@dataclasses.dataclass
class SourceInfo:
  vocab_size: int
  domains: list[str]
  true_entropy_per_token: float | None
  tokenizer_path: str | None
  separator_id: int
  decode: Callable | None
  true_entropy_stderr: float | None = None  # Monte Carlo standard error of true_entropy_per_token (0 if exact)
  mask_id: int | None = None  # data.mlm: the mask token's id


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


def check_rows(rows: Optional[Sequence[int]], batch_size: int) -> tuple[int, ...]:
  """This process's rows of a global batch of `batch_size` (default: all of them), checked sorted and in range."""
  rows = tuple(range(batch_size)) if rows is None else tuple(int(r) for r in rows)
  if not rows or list(rows) != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= batch_size:
    raise DataError(f"the rows {rows} a process loads must be distinct, sorted and within the global batch of "
                    f"{batch_size}")
  return rows


def block_of(rows: Sequence[int], batch_size: int) -> tuple[int, int]:
  """(index, count) of this process's block among equal contiguous blocks of the global batch: the shard a stream
  source that cannot read by index reads (processes holding the same rows, tensor peers, read the same shard)."""
  n = len(rows)
  if batch_size % n or rows[0] % n or list(rows) != list(range(rows[0], rows[0] + n)):
    raise DataError(f"a stream source (seqio) needs each process's rows to be one contiguous block of the global "
                    f"batch; rows {rows[0]}..{rows[-1]} of {batch_size} are not")
  return rows[0] // n, batch_size // n


def eval_windows(read, n_tokens, seq_len, batch_size, rows, num_batches, sep, masking):
  """Validation batches over one token stream (`read(start, stop)` -> tokens): window s * batch_size + r is row r of
  batch s; this process's `rows` of each. Every process gets the same number of batches."""
  # Windows of seq_len+1 with stride seq_len cover every held-out token as a target exactly once; the last one
  # may be short.
  rows = check_rows(rows, batch_size)
  n_windows = -(-(n_tokens - 1) // seq_len)
  steps = min(num_batches, -(-n_windows // batch_size))
  batches = []
  for step in range(steps):
    out = np.full((len(rows), seq_len + 1), sep, np.int32)
    valid = np.zeros(len(rows), np.int64)
    for i, r in enumerate(rows):
      w = step * batch_size + r
      if w < n_windows:
        start = w * seq_len
        stop = min(start + seq_len + 1, n_tokens)
        out[i, :stop - start] = read(start, stop)
        valid[i] = stop - start
    batches.append(make_batch(out, sep, masking, valid_tokens=valid))
  return batches


def _stack(items: list):
  first = items[0]
  if isinstance(first, dict):
    return {k: np.stack([i[k] for i in items]) for k in first}
  if isinstance(first, tuple):
    return tuple(np.stack(c) for c in zip(*items))
  return np.stack(items)


class TakeRows:
  """grain map: a global batch index -> this process's rows of it, as elements of the global order stacked."""

  def __init__(self, elements: grain.MapDataset, batch_size: int, rows: Sequence[int]):
    self.elements, self.batch_size, self.rows = elements, batch_size, tuple(rows)

  def __call__(self, b):
    return _stack([self.elements[int(b) * self.batch_size + r] for r in self.rows])


def global_batches(elements: grain.MapDataset, batch_size: int, rows: Sequence[int], read: Callable, cfg,
                   fingerprint: dict) -> "DataIterator":
  """The training iterator over a source's one global order of elements (an infinite MapDataset): batch b holds
  elements b * batch_size + r for this process's rows r, each batch mapped through `read`."""
  rows = check_rows(rows, batch_size)

  def from_batch(start: int) -> grain.IterDataset:
    ds = grain.MapDataset.range(start, sys.maxsize).map(TakeRows(elements, batch_size, rows)).map(read)
    return to_iter(ds, cfg)

  return DataIterator(from_batch, fingerprint)


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
  """The training iterator: next() gives this process's rows of the next global batch; get_state()/set_state()
  resume exactly: the state is the next global batch index (JSON), the same on every process and for any process
  count, so a resume on another number of hosts continues the same batch sequence."""

  def __init__(self, from_batch: Callable[[int], grain.IterDataset], fingerprint: dict):
    self._from_batch = from_batch
    self.fingerprint = fingerprint
    self._start(0)

  def _start(self, batch: int) -> None:
    self.batch = int(batch)
    self._it = iter(self._from_batch(self.batch))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    out = next(self._it)
    self.batch += 1
    return out

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
    return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "batch": self.batch}

  def set_state(self, state: dict):
    state = upgrade_state(state)
    if state is None:
      raise DataError("the saved data-iterator state is not from this maxlm data pipeline version; restart "
                      "the data from the beginning (checkpoint.allow_data_restart=true).")
    saved = state.get("fingerprint", {})
    diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
    if diff:
      listing = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
      raise DataError(f"the saved data-iterator state belongs to a different data setup ({listing}). Restore "
                      "those settings to resume exactly, or start the data stream afresh "
                      "(checkpoint.allow_data_restart=true).")
    self.close()
    self._start(state["batch"])


def upgrade_state(state) -> Optional[dict]:
  """A saved state in this version's form: version 2 as is; a version-1 state of a single process (grain's
  next_index counted global batches then) converted; None when it cannot be."""
  if not isinstance(state, dict):
    return None
  if state.get("version") == STATE_VERSION and "batch" in state:
    return state
  old = state.get("fingerprint", {})
  grain_state = state.get("grain")
  if (state.get("version") == 1 and old.get("process_count") == 1 and isinstance(grain_state, dict)
      and "next_index" in grain_state):
    fingerprint = {k: v for k, v in old.items() if k not in ("process_index", "process_count", "batch_size")}
    return {"version": STATE_VERSION, "fingerprint": dict(fingerprint, global_batch=old.get("batch_size")),
            "batch": int(grain_state["next_index"]), **{k: v for k, v in state.items()
                                                        if k not in ("version", "fingerprint", "grain")}}
  return None


def is_global_state(state) -> bool:
  """Whether a saved data state holds for any process count (this version's global batch index)."""
  return isinstance(state, dict) and state.get("version") == STATE_VERSION and "batch" in state
