"""Knowledge injection (docs/KNOWLEDGE.md; kaistAI/Knowledge-Entropy olmo/train.py insert_data): fictional-knowledge
paragraphs written into the first rows of chosen training batches, as a transform around the training DataIterator
whose state it extends.

Schedule (KE): the batch of step s (1-based, the step it trains) is injected when s % interval == 0, with group
k = (s // interval) % 10, or 10 when that is 0. Group k holds every "paraphrase" item (its train_context when k = 1,
else paraphrases[k - 2]) followed by the k-th of 10 contiguous slices of the "once" items (their train_context).
Global batch row i becomes concat(paragraph_i + EOS, row_i)[:seq_len + 1] (the window's tail is dropped, labels are
not masked); with fewer rows than paragraphs, row i takes the i-th of `rows` contiguous groups of paragraphs.
Each process rewrites only its own rows of the global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from maxlm.core.errors import ConfigError, DataError, resolved_from
from maxlm.data_pipelines import pipeline
from maxlm.data_pipelines import tokenization
from maxlm.data_pipelines.batches import make_batch

GROUPS = 10  # KE's schedule cycles through 10 injection groups (train_context + 9 paraphrases)
PROBE_FIELDS = {"memorization": ("mem_input", "mem_target"), "semantic": ("gen_input", "gen_target"),
                "composition": ("hard_gen_input", "hard_gen_target")}
REQUIRED = ("train_context",) + tuple(f for pair in PROBE_FIELDS.values() for f in pair)
FILE_KEYS = {"paraphrase": "inject.paraphrase_file", "once": "inject.once_file"}


# ----------------------------------------------------------------------------- the fictional-knowledge format


def _item_problem(item, paraphrases_needed: int) -> Optional[str]:
  if not isinstance(item, dict):
    return f"is a {type(item).__name__}, not an object"
  missing = [f for f in REQUIRED + (("paraphrases",) if paraphrases_needed else ()) if f not in item]
  if missing:
    return f"lacks the field(s) {', '.join(missing)}"
  if not isinstance(item["train_context"], str) or not item["train_context"].strip():
    return "has an empty or non-string train_context"
  for inputs, targets in PROBE_FIELDS.values():
    for f in (inputs, targets):
      if not isinstance(item[f], list) or not all(isinstance(s, str) for s in item[f]):
        return f"field {f} must be a list of strings"
    if len(item[inputs]) != len(item[targets]):
      return f"has {len(item[inputs])} {inputs} but {len(item[targets])} {targets}"
  paraphrases = item.get("paraphrases", [])
  if paraphrases_needed and (not isinstance(paraphrases, list) or len(paraphrases) < paraphrases_needed
                             or not all(isinstance(s, str) and s for s in paraphrases[:paraphrases_needed])):
    count = len(paraphrases) if isinstance(paraphrases, list) else 0
    return f"has {count} paraphrases but the schedule injects up to paraphrase {paraphrases_needed}"
  return None


def load_items(path: str, *, key: str = "inject.paraphrase_file", paraphrases_needed: int = 0) -> list[dict]:
  """The items of a fictional-knowledge JSON file (a list of objects with train_context, paraphrases, mem_input /
  mem_target, gen_input / gen_target, hard_gen_input / hard_gen_target); a DataError names a bad item's fault."""
  if not os.path.isfile(path):
    raise ConfigError(f"{key} = {path!r} does not exist{resolved_from(path)}; point it at a fictional-knowledge "
                      "JSON list")
  try:
    with open(path, encoding="utf-8-sig") as f:
      items = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{key} {path} is not valid JSON: {e}") from None
  if not isinstance(items, list) or not items:
    raise DataError(f"{key} {path} must hold a non-empty JSON list of fictional-knowledge items")
  for i, item in enumerate(items):
    problem = _item_problem(item, paraphrases_needed)
    if problem:
      raise DataError(f"{key} {path}: item {i} {problem}. Each item needs {', '.join(REQUIRED)}"
                      + (" and a 'paraphrases' list" if paraphrases_needed else "") + " (KE's fictional-knowledge "
                      "format); fix or drop that item")
  return items


# ----------------------------------------------------------------------------- the schedule


def injection_group(step: int, interval: int) -> Optional[int]:
  """KE's group (1..10) injected into the batch that step `step` (1-based) trains, or None."""
  if interval <= 0 or step <= 0 or step % interval:
    return None
  k = (step // interval) % GROUPS
  return k if k else GROUPS


def groups_used(steps: int, interval: int) -> list[int]:
  """The injection groups a run of `steps` steps reaches, ascending."""
  if interval <= 0:
    return []
  return sorted({injection_group(s, interval) for s in range(interval, min(steps, GROUPS * interval) + 1, interval)})


def once_slice(n_once: int, k: int) -> slice:
  """The once items of group k: the k-th of 10 contiguous slices (the first n % 10 one item longer)."""
  size, extra = divmod(n_once, GROUPS)
  start = (k - 1) * size + min(k - 1, extra)
  return slice(start, start + size + (1 if k - 1 < extra else 0))


def group_texts(paraphrase_items: list[dict], once_items: list[dict], k: int) -> list[str]:
  """The paragraphs of injection group k, in row order."""
  texts = [item["train_context"] if k == 1 else item["paraphrases"][k - 2] for item in paraphrase_items]
  return texts + [item["train_context"] for item in once_items[once_slice(len(once_items), k)]]


def pack(paragraphs: Sequence[np.ndarray], rows: int) -> list[np.ndarray]:
  """One paragraph per row when they fit; else `rows` contiguous groups (the first n % rows one paragraph longer),
  each group's paragraphs concatenated (KE's split_and_concatenate)."""
  n = len(paragraphs)
  if n <= rows:
    return [np.asarray(p, np.int32) for p in paragraphs]
  size, extra = divmod(n, rows)
  out, start = [], 0
  for i in range(rows):
    stop = start + size + (1 if i < extra else 0)
    out.append(np.concatenate([np.asarray(p, np.int32) for p in paragraphs[start:stop]]))
    start = stop
  return out


def insert(windows_BxW: np.ndarray, global_rows_B: Sequence[int], prefixes: list[np.ndarray]) -> np.ndarray:
  """Windows whose global row g < len(prefixes) become concat(prefixes[g], window)[:W]; the others are kept."""
  out = np.array(windows_BxW, copy=True)
  width = out.shape[1]
  for r, g in enumerate(global_rows_B):
    if g < len(prefixes):
      out[r] = np.concatenate([prefixes[g], out[r]])[:width]
  return out


class Injector:
  """The tokenized schedule: which rows of which step's global batch get which paragraphs."""

  def __init__(self, paraphrase_items: list[dict], once_items: list[dict], *, interval: int, steps: int,
               global_batch: int, encode_batch: Callable[[list[str]], list[list[int]]], eos_id: int):
    self.interval, self.global_batch, self.eos_id = interval, global_batch, eos_id
    self.rows_by_group: dict[int, list[np.ndarray]] = {}
    # What the schedule depends on, not train.steps: a run resumed with more steps continues the same schedule.
    digest = hashlib.sha256(json.dumps([interval, global_batch, eos_id, paraphrase_items, once_items],
                                       sort_keys=True).encode())
    for k in groups_used(steps, interval):
      texts = group_texts(paraphrase_items, once_items, k)
      paragraphs = [np.asarray(list(ids) + [eos_id], np.int32) for ids in encode_batch(texts)]
      self.rows_by_group[k] = pack(paragraphs, global_batch)
    self.fingerprint = digest.hexdigest()[:16]

  def prefixes(self, step: int) -> Optional[list[np.ndarray]]:
    k = injection_group(step, self.interval)
    return self.rows_by_group.get(k) if k is not None else None


# ----------------------------------------------------------------------------- the iterator transform


class InjectingIterator:
  """A DataIterator whose batches pass through the injection schedule; its state adds the batches it has given,
  so a resume in the middle of a schedule continues it exactly."""

  def __init__(self, inner, injector: Injector, global_rows_B: Sequence[int], *, separator_id: int,
               document_masking: bool):
    self.inner, self.injector = inner, injector
    self.global_rows = np.asarray(global_rows_B, np.int64)
    self.separator_id, self.document_masking = separator_id, document_masking
    self.batches = 0

  @property
  def fingerprint(self) -> dict:
    return dict(self.inner.fingerprint, injection=self.injector.fingerprint)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self.inner)
    self.batches += 1
    prefixes = self.injector.prefixes(self.batches)
    return batch if prefixes is None else self._apply(batch, prefixes)

  def _apply(self, batch: dict, prefixes: list[np.ndarray]) -> dict:
    inputs, targets = batch["inputs"], batch["targets"]
    if inputs.shape[0] != len(self.global_rows):
      raise ValueError(f"batch of {inputs.shape[0]} rows, but this process owns {len(self.global_rows)}")
    if not np.array_equal(targets[:, :-1], inputs[:, 1:]):
      raise DataError("knowledge injection needs contiguous token windows (targets = inputs shifted by one); this "
                      "data source masks or pads targets. Use a token store, replay or PCFG source")
    windows = np.concatenate([inputs, targets[:, -1:]], axis=1)
    changed = np.flatnonzero(self.global_rows < len(prefixes))
    if not changed.size:
      return batch
    rebuilt = make_batch(insert(windows[changed], self.global_rows[changed], prefixes), self.separator_id,
                         self.document_masking)
    out = {k: np.array(v, copy=True) for k, v in batch.items()}
    for k, v in rebuilt.items():
      out[k][changed] = v
    return out

  def get_state(self) -> dict:
    return dict(self.inner.get_state(), injection={"batches": self.batches, "fingerprint": self.injector.fingerprint})

  def set_state(self, state: dict) -> None:
    saved = state.get("injection") if isinstance(state, dict) else None
    if saved is None:
      raise DataError("the checkpoint's data-iterator state has no knowledge-injection state (it was saved by a run "
                      "without inject.interval), so the injection schedule cannot resume; resume with the original "
                      "inject settings or start a new run.dir")
    if saved.get("fingerprint") != self.injector.fingerprint:
      raise DataError("the checkpoint was saved with other knowledge-injection settings (files, interval, global "
                      "batch or tokenizer); restore them to resume exactly, or start a new run.dir")
    self.inner.set_state({k: v for k, v in state.items() if k != "injection"})
    self.batches = int(saved["batches"])

  def close(self) -> None:
    self.inner.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------- from the run's config


def eos_id(data_cfg) -> int:
  """The tokenizer's end-of-text id (tokenization.special_ids: the named eos_token, else the separator)."""
  return tokenization.special_ids(data_cfg)[0]




def load_groups(cfg) -> tuple[list[dict], list[dict]]:
  """(paraphrase items, once items) of the inject section, checked for the paraphrases the schedule reaches."""
  inj = cfg.inject
  if not (inj.paraphrase_file or inj.once_file):
    raise ConfigError("inject.interval > 0 but neither inject.paraphrase_file nor inject.once_file is set; name a "
                      "fictional-knowledge JSON file or set inject.interval=0")
  used = groups_used(cfg.train.steps, inj.interval)
  needed = max(used, default=1) - 1
  paraphrase = load_items(inj.paraphrase_file, key=FILE_KEYS["paraphrase"], paraphrases_needed=needed) \
      if inj.paraphrase_file else []
  once = load_items(inj.once_file, key=FILE_KEYS["once"]) if inj.once_file else []
  return paraphrase, once


def wrap_train_iterator(cfg, data_it, rows) -> InjectingIterator:
  """The training iterator with the `inject` section's schedule applied to this process's rows."""
  if cfg.data.source == "sft":
    raise ConfigError("knowledge injection (inject.interval > 0) inserts paragraphs into pretraining windows; "
                      "data.source = 'sft' has none. Use a store, replay or PCFG source, or set inject.interval=0")
  paraphrase, once = load_groups(cfg)
  encode, _, _ = tokenization.run_encoder(cfg.data)
  separator = pipeline.describe(cfg.data).separator_id  # the pipeline's, so segment ids match its own batches
  injector = Injector(paraphrase, once, interval=cfg.inject.interval, steps=cfg.train.steps,
                      global_batch=cfg.train.global_batch, encode_batch=encode, eos_id=eos_id(cfg.data))
  return InjectingIterator(data_it, injector, rows,
                           separator_id=separator, document_masking=cfg.data.document_masking)
