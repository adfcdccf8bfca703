"""PCFG downstream tasks (seed 003): span inside probabilities against brute-force enumeration of derivations,
task A/B/C labels (ties, underived spans) against a direct per-nonterminal computation, determinism, CSV and CLI."""

import collections
import csv
import json
import os

import numpy as np
import pytest

from maxlm import data as data_cli
from maxlm.data_pipelines import pcfg
from maxlm.data_pipelines import pcfg_tasks
from maxlm.core.errors import DataError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# IB's format, no header: S -> S1 | S2 | S3, duplicate lines, E and F with identical rules (exact ties), sentences
# of 2..6 words, and 4-word prefixes that no nonterminal derives.
IB_TINY = os.path.join(DATA, "pcfg_ib_tiny.txt")

# maxlm's format: ambiguous, a unary chain (S -> C -> D), a terminal inside a binary rule, finite language.
MAXLM_TINY = """
S A B 0.5
S A X 0.3
S C 0.2
X A B 1.0
A a 0.7
A B a 0.3
B b 0.6
B a 0.4
C D 1.0
D c 0.9
D c b 0.1
"""


def _reference_rules(text, fmt):
  """Independent reading of a rule file: {lhs: [(rhs, p)]}, words tagged ('w', x); IB: duplicates summed."""
  lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
  lhs_names = {f[0] for f in lines}
  summed = {}
  for f in lines:
    if fmt == "ib":
      rhs = ((f[1],) if f[0][0] == "S" else (("w", f[1]),)) if len(f) == 3 else (f[1], f[2])
    else:
      rhs = tuple(s if s in lhs_names else ("w", s) for s in f[1:-1])
    summed[(f[0], rhs)] = summed.get((f[0], rhs), 0.0) + float(f[-1])
  totals = collections.Counter()
  for (lhs, _), p in summed.items():
    totals[lhs] += p
  rules = collections.defaultdict(list)
  for (lhs, rhs), p in summed.items():
    if p > 0:
      rules[lhs].append((rhs, p / totals[lhs]))
  return rules


def _yields(rules, sym, memo):
  """{word tuple: P(sym =>* words)}, enumerating every derivation of a finite grammar."""
  if isinstance(sym, tuple):
    return {(sym[1],): 1.0}
  if sym not in memo:
    table = collections.Counter()
    for rhs, p in rules[sym]:
      combos = [((), p)]
      for s in rhs:
        combos = [(w + w2, q * q2) for w, q in combos for w2, q2 in _yields(rules, s, memo).items()]
      for w, q in combos:
        table[w] += q
    memo[sym] = dict(table)
  return memo[sym]


def _brute(text, fmt):
  rules = _reference_rules(text, fmt)
  memo = {}
  return rules, {a: _yields(rules, a, memo) for a in rules}


@pytest.mark.parametrize("fmt", ["ib", "maxlm"])
def test_span_inside_matches_brute_force_enumeration(fmt):
  text = open(IB_TINY).read() if fmt == "ib" else MAXLM_TINY
  g = pcfg.parse_grammar(text, format=fmt)
  _, tables = _brute(text, fmt)
  sentences = sorted(tables["S"])
  assert len(sentences) > 20
  ids = [g.encode(" ".join(s)) for s in sentences]
  spans = {(i, j) for s in sentences for i in range(len(s)) for j in range(i + 1, len(s) + 1)}
  for i, j in sorted(spans):
    rows = [k for k, s in enumerate(sentences) if j <= len(s)]
    got = pcfg_tasks.span_inside(g, [ids[k] for k in rows], i, j)
    want = np.array([[tables[a].get(sentences[k][i:j], 0.0) for a in g.nonterminals] for k in rows])
    with np.errstate(divide="ignore"):
      np.testing.assert_allclose(got, np.log(want), rtol=1e-12, err_msg=f"span [{i}, {j})")


def _reference_label(tables, classes, words):
  values = [tables[c].get(tuple(words), 0.0) for c in classes]
  top = max(values)
  # Ties (here E and F, identical rules) go to the first candidate (IB's order: S1, S2, ..., then names sorted).
  return classes[next(k for k, v in enumerate(values) if v >= top * (1 - 1e-9))], top > 0


def test_task_labels_match_direct_computation():
  text = open(IB_TINY).read()
  g = pcfg.load_grammar(IB_TINY)
  rules, tables = _brute(text, "ib")
  numbered = sorted((n for n in rules if n[0] == "S" and n[1:].isdigit()), key=lambda n: int(n[1:]))
  ib_order = numbered + sorted(n for n in rules if n not in numbered)
  classes = {"A": sorted(r[0] for r, _ in rules["S"]), "B": ib_order, "C": ib_order}
  assert classes["A"] == ["S1", "S2", "S3"]
  ties = collections.Counter()
  for task, span in (("A", None), ("B", (0, 4)), ("C", (0, 2))):
    data = pcfg_tasks.make_task(g, task, 600, seed=5)
    assert data.classes == classes[task] and len(data.rows) == 600
    underived = 0
    for text_, label in data.rows:
      words = text_.split()
      assert 5 <= len(words) and tables["S"].get(tuple(words), 0) > 0  # a sentence of the grammar, > 4 words
      want, derived = _reference_label(tables, classes[task], words[slice(*(span or (None,)))])
      assert label == want, (task, text_)
      underived += not derived
      top = sorted((tables[c].get(tuple(words[slice(*(span or (None,)))]), 0.0) for c in classes[task]))
      ties[task] += top[-1] > 0 and top[-1] == top[-2]
    assert data.underived == underived
    assert data.label_counts == dict(sorted(collections.Counter(lab for _, lab in data.rows).items()))
  assert ties["C"] > 50                          # E/F ties occurred and went to E
  assert pcfg_tasks.make_task(g, "B", 600, seed=5).underived > 20  # underived 4-word prefixes occurred


def test_make_task_is_deterministic_prefix_stable_and_skips_underived():
  g = pcfg.load_grammar(IB_TINY)
  small = pcfg_tasks.make_task(g, "B", 50, seed=2)
  big = pcfg_tasks.make_task(g, "B", 900, seed=2)
  assert small.rows == big.rows[:50] and small.rows == pcfg_tasks.make_task(g, "B", 50, seed=2).rows
  assert small.rows != pcfg_tasks.make_task(g, "B", 50, seed=3).rows
  _, tables = _brute(open(IB_TINY).read(), "ib")
  derived = [r for r in big.rows if any(tables[a].get(tuple(r[0].split()[:4]), 0) > 0 for a in tables)]
  skipped = pcfg_tasks.make_task(g, "B", 300, seed=2, skip_underived=True)
  assert skipped.underived == 0 and skipped.rows == derived[:300]
  capped = pcfg_tasks.make_task(g, "A", 300, seed=2, max_words=5)
  assert {len(t.split()) for t, _ in capped.rows} == {5}


def test_cli_writes_csv_and_refuses_task_a_without_unary_start(tmp_path, capsys):
  out = tmp_path / "c.csv"
  assert data_cli.main(["pcfg-tasks", "--grammar", IB_TINY, "--task", "C", "--num", "40", "--seed", "1",
                        "--output", str(out)]) == 0
  assert "merged 3 duplicate lines" in capsys.readouterr().err
  with open(out, newline="") as f:
    rows = list(csv.reader(f))
  g = pcfg.load_grammar(IB_TINY)
  assert rows[0] == ["text", "label"]
  # IB's integer labels (task C: the position among all nonterminals sorted by name), the names beside the CSV.
  names = json.loads((tmp_path / "c.labels.json").read_text())["labels"]
  assert [(t, names[i]) for t, i in rows[1:]] == pcfg_tasks.make_task(g, "C", 40, seed=1).rows
  assert [names[str(i)] for i in range(len(names))] == sorted(g.nonterminals)
  # builtin:demo's start symbol has only binary rules: task A is refused with the fix, B works.
  assert data_cli.main(["pcfg-tasks", "--task", "A", "--num", "5", "--output", str(tmp_path / "a.csv")]) == 2
  err = capsys.readouterr().err
  assert "start symbol S has none" in err and "--task B or C" in err and "builtin:ib_demo" in err
  assert not (tmp_path / "a.csv").exists()
  demo = pcfg_tasks.make_task(pcfg.load_grammar("builtin:demo"), "B", 100, seed=0, skip_underived=True)
  assert set(demo.label_counts) <= set(pcfg.load_grammar("builtin:demo").nonterminals) and demo.underived == 0
  ib_demo = pcfg_tasks.make_task(pcfg.load_grammar("builtin:ib_demo"), "A", 300, seed=0)
  assert ib_demo.classes == [f"S{i}" for i in range(1, 7)] and len(ib_demo.label_counts) == 6


def test_task_errors_are_clear():
  g = pcfg.load_grammar(IB_TINY)
  with pytest.raises(DataError, match="unknown PCFG task 'D'"):
    pcfg_tasks.make_task(g, "D", 5, seed=0)
  with pytest.raises(DataError, match="--max-words must be at least 5"):
    pcfg_tasks.make_task(g, "A", 5, seed=0, max_words=4)
  with pytest.raises(DataError, match="more than 4 words"):
    pcfg_tasks.label_sentences(g, [g.encode("x y")], "B")
  short = pcfg.parse_grammar("S a B 0.5\nS c 0.5\nB b 1.0")  # at most 2 words
  with pytest.raises(DataError, match="made no usable sentence of 5..31 words"):
    pcfg_tasks.make_task(short, "B", 5, seed=0)
  assert np.isneginf(pcfg_tasks.span_inside(g, [g.encode("x zzz")], 0, 2)).all()  # <unk> derives nothing
