"""PCFG downstream tasks (docs/IMPLICIT_BIAS.md; IB pcfg/generate_downstream.py): sampled sentences of more than 4
words, each labelled by the nonterminal with the largest inside probability of a span, written as CSV `text,label`
with IB's integer labels.

Tasks (inside probabilities P(A =>* words[i:j]) of the span alone, as IB computes them):
  A  whole sentence, argmax over the start symbol's unary children (IB: S -> S1 | ... | Sn, one class per Si),
     not weighted by P(S -> Si), as IB. builtin:demo's start symbol S has only binary rules, so task A is refused
     there with the fix (tasks B/C, or a grammar in IB's shape such as builtin:ib_demo or IB's rule file).
  B  span [0, 4), argmax over all nonterminals.
  C  span [0, 2), argmax over all nonterminals.
Ties, including spans no candidate derives (all zero), go to the first candidate in IB's order: S1, S2, ... (numbered
S-classes by number), then the other names sorted; IB's own list is S1..S9, A1_0..A4_9, so an all-zero span is S1
there too (skip_underived leaves such rows out). Labels in the CSV are IB's integers: task A the class's position
in that order (S1 -> 0), tasks B and C the nonterminal's position among all nonterminals sorted by name (IB's
nont_dict); `labels_json` writes the names beside the CSV. IB's chart skips unary rules; maxlm's includes unary
chains, which only matters for grammars with unary rules below the start symbol.
Checked against IB's own code (nltk) on IB's rule file (pcfg/rule_deep_mlm.txt): identical labels for tasks A, B and C.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re

import numpy as np

from maxlm.data_pipelines.pcfg import Grammar
from maxlm.core.errors import DataError
from maxlm.core.outputs import atomic_file, check_file, write_text

COMMAND = "maxlm.data pcfg-tasks"
TASKS = ("A", "B", "C")
TASK_SPANS = {"A": None, "B": (0, 4), "C": (0, 2)}  # None: the whole sentence
MIN_WORDS = 5               # "sentences of more than 4 words" (IB)
TIE_RTOL = 1e-9             # relative gap under which two classes' inside probabilities count as a tie
DEFAULT_MAX_WORDS = 31      # IB's --length-limit 32 (exclusive)
_CHUNK_SENTENCES = 4096     # fixed, so a task with fewer rows is a prefix of one with more
_EMPTY_CHUNKS_LIMIT = 8     # chunks without one usable sentence before the grammar is declared unfit
_STREAM_TAG = 0x7A5C        # keeps task sentences apart from the training stream of the same seed


@dataclasses.dataclass
class TaskData:
  """Rows of one task and what a person checks before using them."""
  task: str
  rows: list                  # [(text, label name)]
  classes: list               # candidate labels, in tie order (module docstring)
  label_counts: dict          # label name -> rows
  underived: int              # rows whose span no candidate derives (labelled classes[0] by the tie rule)
  notes: list                 # the grammar's loading notes
  label_ids: dict = dataclasses.field(default_factory=dict)  # label name -> IB's integer label

  def csv_rows(self) -> list[tuple[str, int]]:
    return [(text, self.label_ids[label]) for text, label in self.rows]


def ib_order(names) -> list[str]:
  """IB's candidate order: S1, S2, ... by number, then the other names sorted."""
  numbered = [n for n in names if re.fullmatch(r"S[0-9]+", n)]
  return sorted(numbered, key=lambda n: int(n[1:])) + sorted(n for n in names if n not in numbered)


def task_classes(grammar: Grammar, task: str) -> list[str]:
  """Candidate nonterminals of a task in tie order (module docstring)."""
  if task not in TASKS:
    raise DataError(f"unknown PCFG task {task!r}; use A, B or C.")
  if task != "A":
    return ib_order(grammar.nonterminals)
  children = ib_order({r.rhs[0] for r in grammar.rules
                       if r.lhs == grammar.start and len(r.rhs) == 1 and not r.terminal[0]})
  if not children:
    raise DataError(f"task A labels a sentence by the start symbol's unary children (IB's S -> S1 | ... | Sn), but "
                    f"{grammar.name}'s start symbol {grammar.start} has none; use --task B or C, or a grammar whose "
                    "start symbol has unary rules (builtin:ib_demo, or IB's rule file).")
  return children


def label_ids(grammar: Grammar, task: str) -> dict[str, int]:
  """IB's integer label of each candidate: task A its position in task_classes (S1 -> 0), tasks B and C the
  nonterminal's position among all nonterminals sorted by name."""
  names = task_classes(grammar, task) if task == "A" else sorted(grammar.nonterminals)
  return {name: i for i, name in enumerate(names)}


def span_inside(grammar: Grammar, sentences, start: int = 0, end: int | None = None) -> np.ndarray:
  """log P(A =>* s[start:end]) for every sentence s (token ids) and nonterminal A, shape (num sentences, number of
  nonterminals) in grammar.nonterminals order; -inf where A cannot derive the span."""
  values, scale = _span_values(grammar, sentences, start, end)
  with np.errstate(divide="ignore"):
    return np.log(values) + scale[:, None]


def _span_values(grammar: Grammar, sentences, start: int, end: int | None):
  """Scaled inside values (rows comparable exactly) and log scales, spans of equal length parsed together."""
  spans = [np.asarray(s, np.int64)[start:end] for s in sentences]
  values = np.zeros((len(spans), len(grammar.nonterminals)))
  scale = np.full(len(spans), -np.inf)
  by_len = collections.defaultdict(list)
  for i, s in enumerate(spans):
    if s.size == 0:
      raise DataError(f"span [{start}, {end}) is empty for sentence {i} of {len(sentences[i])} words.")
    by_len[s.size].append(i)
  for idx in by_len.values():
    values[idx], scale[idx] = grammar.inside_scaled(np.stack([spans[i] for i in idx]))
  return values, scale


def label_sentences(grammar: Grammar, sentences, task: str) -> tuple[list[str], int]:
  """(label name per sentence, how many had no candidate deriving the span): argmax of the span's inside probability
  over task_classes; ties go to the first candidate in their order."""
  labels, derived = _labels_and_derived(grammar, sentences, task, task_classes(grammar, task))
  return labels, len(derived) - int(np.sum(derived))


def _labels_and_derived(grammar: Grammar, sentences, task: str, classes: list[str]):
  short = [i for i, s in enumerate(sentences) if len(s) < MIN_WORDS]
  if short:
    raise DataError(f"task {task} needs sentences of more than 4 words; sentence {short[0]} has "
                    f"{len(sentences[short[0]])}.")
  values, _ = _span_values(grammar, sentences, *(TASK_SPANS[task] or (0, None)))
  cand = values[:, [grammar.nt_id[c] for c in classes]]
  # Ties go to the first candidate (classes are in tie order). Rules that tie exactly, like two identical ones, can
  # come out of the scaled inside pass a few ulps apart, by summation order that differs between CPUs; within
  # TIE_RTOL of the maximum counts as a tie.
  top = cand.max(axis=1, keepdims=True)
  best = np.argmax(cand >= top * (1 - TIE_RTOL), axis=1)
  return [classes[i] for i in best], top[:, 0] > 0


def _sentence_chunks(grammar: Grammar, seed: int, max_words: int):
  """Sentences of MIN_WORDS..max_words words of the grammar's task stream for `seed`, one list per sampled chunk."""
  if max_words < MIN_WORDS:
    raise DataError(f"--max-words must be at least {MIN_WORDS} (tasks use sentences of more than 4 words).")
  chunk = 0
  while True:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_TAG, chunk]))
    stream = grammar.sample_chunk(rng, _CHUNK_SENTENCES)[0]
    ends = np.flatnonzero(stream == grammar.separator_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    yield [stream[s:e] for s, e in zip(starts, ends) if MIN_WORDS <= e - s <= max_words]
    chunk += 1


def _fill(chunks, num: int, grammar: Grammar, max_words: int, what: str) -> list:
  """The first `num` items of a stream of chunks; a DataError after _EMPTY_CHUNKS_LIMIT empty chunks in a row."""
  out, empty = [], 0
  for items in chunks:
    out.extend(items)
    if len(out) >= num:
      return out[:num]
    empty = 0 if items else empty + 1
    if empty >= _EMPTY_CHUNKS_LIMIT:
      raise DataError(f"{grammar.name} made no usable {what} of {MIN_WORDS}..{max_words} words in "
                      f"{empty * _CHUNK_SENTENCES} samples; use a grammar with longer sentences or raise --max-words"
                      + ("." if what == "sentence" else ", or drop --skip-underived."))
  return out


def make_task(grammar: Grammar, task: str, num: int, seed: int, max_words: int = DEFAULT_MAX_WORDS,
              skip_underived: bool = False) -> TaskData:
  """`num` labelled rows of task A, B or C (module docstring) from sentences sampled with `seed`. skip_underived:
  leave out sentences whose span no candidate derives (they would all get the tie label classes[0])."""
  classes = task_classes(grammar, task)
  if num < 1:
    raise DataError(f"--num must be at least 1, got {num}.")

  def labelled_chunks():
    done = 0
    for sentences in _sentence_chunks(grammar, seed, max_words):
      if not skip_underived:
        sentences = sentences[:num - done]  # label only what is kept
      labels, derived = _labels_and_derived(grammar, sentences, task, classes) if sentences else ([], [])
      rows = [(grammar.decode(s), label, bool(ok)) for s, label, ok in zip(sentences, labels, derived)
              if ok or not skip_underived]
      done += len(rows)
      yield rows

  rows = _fill(labelled_chunks(), num, grammar, max_words, "span" if skip_underived else "sentence")
  counts = dict(sorted(collections.Counter(label for _, label, _ in rows).items()))
  return TaskData(task, [(text, label) for text, label, _ in rows], classes, counts,
                  sum(not ok for _, _, ok in rows), list(grammar.notes), label_ids(grammar, task))


def check_output(path: str, *, overwrite: bool = False) -> None:
  """Fails before any sampling when the CSV (or its labels file) cannot be written where asked: a missing directory,
  a directory, a run's file, an existing file that is not an earlier output of pcfg-tasks (with `overwrite`)."""
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise DataError(f"cannot write {path}: directory {parent} does not exist; create it or choose another --output.")
  if os.path.isdir(path):
    raise DataError(f"--output {path} is a directory; give a CSV file name.")
  for target in (path, labels_path(path)):
    check_file(target, COMMAND, overwrite=overwrite)


def write_csv(path: str, rows, *, overwrite: bool = False) -> None:
  """CSV with a `text,label` header, one row per sentence."""
  check_output(path, overwrite=overwrite)
  with atomic_file(path, COMMAND, overwrite=overwrite) as tmp:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(["text", "label"])
      writer.writerows(rows)


def labels_path(csv_path: str) -> str:
  return os.path.splitext(csv_path)[0] + ".labels.json"


def write_task(path: str, data: TaskData, *, overwrite: bool = False) -> None:
  """The CSV (IB's integer labels) and, beside it, NAME.labels.json: {"task", "labels": {integer: nonterminal}}."""
  write_csv(path, data.csv_rows(), overwrite=overwrite)
  write_text(labels_path(path), COMMAND, json.dumps({"task": data.task, "labels": {
      str(i): name for name, i in data.label_ids.items()}}, indent=1), overwrite=overwrite)


def summarize(data: TaskData, path: str) -> str:
  lines = [f"task {data.task}: {len(data.rows)} rows -> {path} (label names: {labels_path(path)}); "
           f"{len(data.label_counts)} of {len(data.classes)} classes used: "
           + ", ".join(f"{k} (label {data.label_ids[k]}) {v}" for k, v in data.label_counts.items())]
  if data.underived:
    lines.append(f"  {data.underived} rows: no candidate derives the span; labelled {data.classes[0]} (ties go to the "
                 "first candidate: S1, S2, ..., then the other names sorted)")
  lines += [f"  grammar: {note}" for note in data.notes]
  return "\n".join(lines)
