"""PCFG corpus: parsing and validation of maxlm's and IB's rule formats, sampler vs inside probabilities, inside vs
brute-force enumeration, exact and estimated entropy rates, the word tokenizer (unknown words, HF export), and the
grain source built on it."""

import collections
import functools
import itertools
import math
import dataclasses
import os

import yaml

import numpy as np
import pytest

from maxlm.data_pipelines import build_eval_batches, build_train_iterator, describe
from maxlm.data_pipelines import pcfg
from maxlm.core.config import DataConfig
from maxlm.core.errors import DataError

# Ambiguous (two derivations of "a a a"), with a unary chain, a terminal inside a binary rule, finite language.
TINY = """
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

# Recursive: S -> S S with probability 0.25 (subcritical: 0.5 expected S children).
RECURSIVE = """
S S S 0.25
S x 0.45
S y 0.30
"""


def _derivations(rules, sym, depth):
  """Independent reference: every (yield, probability) of the derivations from sym within depth levels."""
  if sym not in rules:
    return [((sym,), 1.0)]
  if depth == 0:
    return []
  out = []
  for rhs, p in rules[sym]:
    combos = [((), p)]
    for s in rhs:
      combos = [(w + w2, q * q2) for w, q in combos for w2, q2 in _derivations(rules, s, depth - 1)]
    out += combos
  return out


def _sentence_table(text, depth):
  rules = collections.defaultdict(list)
  first = None
  for line in text.strip().splitlines():
    f = line.split()
    first = first or f[0]
    rules[f[0]].append((tuple(f[1:-1]), float(f[-1])))
  table = collections.Counter()
  for w, p in _derivations(rules, first, depth):
    table[w] += p
  return table


def test_inside_matches_brute_force_enumeration_finite():
  g = pcfg.parse_grammar(TINY, strict=True)
  table = _sentence_table(TINY, depth=12)
  assert math.isclose(sum(table.values()), 1.0, rel_tol=1e-12)
  sentences = list(table)
  got = g.sentence_logprobs([g.encode(" ".join(s)) for s in sentences])
  np.testing.assert_allclose(got, np.log([table[s] for s in sentences]), rtol=1e-12)
  # A sentence the grammar cannot produce has probability 0.
  assert g.sentence_logprob(g.encode("c a")) == -np.inf


@functools.lru_cache(maxsize=None)
def _recursive_prob(w: str) -> float:
  """Independent reference for RECURSIVE, straight from its rules: P(S => w) over all derivations."""
  p = {"x": 0.45, "y": 0.30}.get(w, 0.0) if len(w) == 1 else 0.0
  return p + 0.25 * sum(_recursive_prob(w[:k]) * _recursive_prob(w[k:]) for k in range(1, len(w)))


def _recursive_table(max_len):
  return {w: _recursive_prob(w) for n in range(1, max_len + 1)
          for w in ("".join(t) for t in itertools.product("xy", repeat=n))}


def test_inside_matches_brute_force_enumeration_recursive():
  g = pcfg.parse_grammar(RECURSIVE)
  # Derivation enumeration to depth 4 is exact for sentences of <= 3 words (no tree of 3 leaves is deeper).
  table = _sentence_table(RECURSIVE, depth=4)
  for s, p in table.items():
    if len(s) <= 3:
      assert math.isclose(g.sentence_logprob(g.encode(" ".join(s))), math.log(p), rel_tol=1e-10), s
  for w, p in _recursive_table(7).items():
    assert math.isclose(g.sentence_logprob(g.encode(" ".join(w))), math.log(p), rel_tol=1e-10), w


def test_inside_long_sentences_do_not_underflow():
  g = pcfg.parse_grammar("S S S 0.25\nS x 0.0001\nS y 0.7499")
  n = 200
  lp = g.sentence_logprob(g.encode(" ".join(["x"] * n)))
  # x^n: every binary tree with n leaves (Catalan(n-1) of them) has probability 1e-4^n 0.25^(n-1).
  catalan = math.comb(2 * (n - 1), n - 1) // n
  expected = n * math.log(1e-4) + (n - 1) * math.log(0.25) + math.log(catalan)
  assert expected < -1500  # far below float64's smallest positive number
  assert math.isclose(lp, expected, rel_tol=1e-10)


def test_sampled_frequencies_match_inside_probabilities():
  g = pcfg.parse_grammar(TINY)
  n = 40000
  sentences, _ = g.sample_sentences(n, seed=7)
  counts = collections.Counter(g.decode(s) for s in sentences)
  support = [" ".join(w) for w in _sentence_table(TINY, depth=12)]  # every sentence the grammar can make
  assert set(counts) <= set(support)
  probs = np.exp(g.sentence_logprobs([g.encode(w) for w in support]))
  # Pearson chi-square over sentences with expected count >= 5, the rest pooled into one cell.
  big = probs * n >= 5
  obs = np.array([counts[w] for w in support])
  o, e = obs[big], probs[big] * n
  if (~big).any():
    o, e = np.append(o, obs[~big].sum()), np.append(e, probs[~big].sum() * n)
  chi2 = float(((o - e) ** 2 / e).sum())
  k = len(o) - 1
  z = 3.719  # alpha = 1e-4; Wilson-Hilferty approximation of the chi-square quantile
  critical = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
  assert chi2 < critical, (chi2, critical)


def test_sampler_derivation_logprob_is_exact_for_unambiguous_sentence():
  g = pcfg.parse_grammar(TINY)
  sentences, dlogp = g.sample_sentences(2000, seed=1)
  for s, lp in zip(sentences, dlogp):
    if g.decode(s) == "c":
      assert math.isclose(lp, math.log(0.2 * 0.9))


def test_exact_entropy_of_finite_grammar():
  g = pcfg.parse_grammar(TINY)
  table = _sentence_table(TINY, depth=12)
  p = np.array(list(table.values()))
  h = float(-(p * np.log(p)).sum())
  mean_len = sum(q * len(s) for s, q in table.items())
  rep = g.entropy()
  assert rep.exact and rep.stderr == 0.0
  assert math.isclose(rep.sentence_entropy, h, rel_tol=1e-12)
  assert math.isclose(rep.tokens_per_sentence, mean_len + 1, rel_tol=1e-12)
  assert math.isclose(rep.entropy_per_token, h / (mean_len + 1), rel_tol=1e-12)
  assert rep.derivation_entropy > rep.sentence_entropy  # "a a a" has two derivations


def test_estimated_entropy_of_recursive_grammar_matches_enumeration():
  g = pcfg.parse_grammar(RECURSIVE)
  rep = g.entropy(num_samples=4000, seed=3)
  assert not rep.exact and rep.stderr > 0
  p = np.array(list(_recursive_table(14).values()))  # all sentences of <= 14 words
  h_trunc = float(-(p * np.log(p)).sum())
  assert 1 - p.sum() < 2e-3
  # The truncated mass adds at most a little entropy; the estimate must sit within 5 SE of the reference.
  assert abs(rep.sentence_entropy - h_trunc) < 5 * rep.stderr * rep.tokens_per_sentence + 0.05
  # E[words]: each S emits a word with prob 0.75 and makes 0.5 S children on average -> 0.75 / 0.5.
  assert math.isclose(rep.tokens_per_sentence, 0.75 / 0.5 + 1)


def test_parse_errors_are_clear():
  with pytest.raises(DataError, match="expected 'LHS RHS p'"):
    pcfg.parse_grammar("S a b c 0.5")
  with pytest.raises(DataError, match="must be a probability"):
    pcfg.parse_grammar("S a x")
  with pytest.raises(DataError, match="duplicate rule"):
    pcfg.parse_grammar("S a 0.5\nS a 0.5")
  with pytest.raises(DataError, match="duplicate rule S a .*format: ib"):  # maxlm's own format rejects duplicates
    pcfg.parse_grammar("S a 0.5\nS a 0.5", format="maxlm")
  with pytest.raises(DataError, match="sum to 1"):
    pcfg.parse_grammar("S a 0.5\nS b 0.4", strict=True)
  with pytest.raises(DataError, match="not consistent"):
    pcfg.parse_grammar("S S S 0.6\nS a 0.4")
  with pytest.raises(DataError, match="cycle"):
    pcfg.parse_grammar("S A 1.0\nA S 1.0")
  with pytest.raises(DataError, match="available: builtin:demo"):
    pcfg.load_grammar("builtin:nope")
  # Non-strict mode normalises per LHS.
  g = pcfg.parse_grammar("S a 2\nS b 6")
  assert math.isclose(g.sentence_logprob(g.encode("b")), math.log(0.75))


def test_tokenizer_ids_are_stable_and_round_trip():
  g = pcfg.parse_grammar(TINY)
  assert g.vocab == ["<eos>", "a", "b", "c", "<unk>"] and g.separator_id == 0
  assert g.decode(g.encode("a b c")) == "a b c"
  hf = g.to_hf_tokenizer()
  assert hf.encode("a b c").ids == g.encode("a b c")


def test_demo_grammar_is_rich_and_cheap():
  g = pcfg.load_grammar("builtin:demo")
  assert 300 <= g.vocab_size <= 1000 and g.recursive
  stream = g.sample_stream(200_000, seed=0)
  assert stream.shape == (200_000,)
  np.testing.assert_array_equal(stream[:5000], g.sample_stream(5000, seed=0))  # prefix-stable, deterministic
  assert not np.array_equal(stream[:5000], g.sample_stream(5000, seed=1))
  rep = pcfg.grammar_entropy("builtin:demo")
  assert rep.entropy_per_token < math.log(g.vocab_size) - 1.0
  assert rep.stderr < 0.01
  # The stream's separator frequency matches 1 / E[tokens per sentence].
  sep_rate = float(np.mean(stream == 0))
  assert abs(sep_rate - 1 / rep.tokens_per_sentence) < 0.005


def _cfg(**kw):
  base = dict(source="pcfg", grammar="builtin:demo", shuffle=True, document_masking=False, prefetch=2,
              num_workers=0)
  base.update(kw)
  return dataclasses.replace(DataConfig(), **base)


def test_pcfg_source_batches_resume_and_describe():
  cfg = _cfg(document_masking=True)
  it = build_train_iterator(cfg, seq_len=64, batch_size=4, seed=5)
  first = [next(it) for _ in range(6)]
  b = first[0]
  assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (4, 64)
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  g = pcfg.load_grammar("builtin:demo")
  stream = g.sample_stream(4 * 64 + 1, seed=5)
  np.testing.assert_array_equal(b["inputs"][0], stream[:64])  # window 0 of the seed's stream
  # Reference segment ids: a separator opens the next segment.
  seg, cur = [], 1
  for tok in b["inputs"][0]:
    cur += int(tok == 0)
    seg.append(cur)
  np.testing.assert_array_equal(b["segment_ids"][0], seg)
  state = it.get_state()
  rest = [next(it) for _ in range(3)]
  it2 = build_train_iterator(cfg, seq_len=64, batch_size=4, seed=5)
  it2.set_state(state)
  for r in rest:
    np.testing.assert_array_equal(next(it2)["inputs"], r["inputs"])
  it.close()
  it2.close()
  info = describe(cfg)
  assert info.vocab_size == g.vocab_size and info.domains == ["pcfg"] and info.separator_id == 0
  assert 0 < info.true_entropy_per_token < math.log(g.vocab_size) and info.true_entropy_stderr < 0.01
  assert info.decode([1, 2]) == g.decode([1, 2])


def test_pcfg_processes_split_the_stream():
  seq_len, per_chunk = 64, (1 << 17) // 64
  one = build_train_iterator(_cfg(), seq_len=seq_len, batch_size=per_chunk, seed=2)
  chunks = [next(one)["inputs"] for _ in range(2)]  # chunk 0 then chunk 1 of the stream
  half = per_chunk // 2  # two processes, each loading its half of every global batch
  p0 = build_train_iterator(_cfg(), seq_len=seq_len, batch_size=per_chunk, seed=2, rows=range(half))
  p1 = build_train_iterator(_cfg(), seq_len=seq_len, batch_size=per_chunk, seed=2, rows=range(half, per_chunk))
  for chunk in chunks:
    np.testing.assert_array_equal(next(p0)["inputs"], chunk[:half])
    np.testing.assert_array_equal(next(p1)["inputs"], chunk[half:])
  for it in (one, p0, p1):
    it.close()


def test_pcfg_finite_corpus_and_eval_are_disjoint_streams():
  cfg = _cfg(pcfg_tokens=20_000)
  it = build_train_iterator(cfg, seq_len=32, batch_size=8, seed=0)
  epoch = {tuple(r) for _ in range((20_000 - 1) // 32 // 8) for r in next(it)["inputs"]}
  g = pcfg.load_grammar("builtin:demo")
  stream = g.sample_stream(20_000, seed=0)
  windows = {tuple(stream[i * 32:i * 32 + 32]) for i in range((20_000 - 1) // 32)}
  assert len(epoch) > 500 and epoch <= windows  # one epoch: distinct windows of the pre-sampled corpus
  ev = build_eval_batches(cfg, seq_len=32, batch_size=8, num_batches=3)
  assert list(ev) == ["pcfg"] and len(ev["pcfg"]) == 3
  ev_rows = {tuple(r) for b in ev["pcfg"] for r in b["inputs"]}
  assert not ev_rows & epoch
  it.close()


# ------------------------------------------------------------------------------------ IB's rule format (seed 003)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
IB_TINY = os.path.join(DATA, "pcfg_ib_tiny.txt")  # IB's format, no header, three duplicate lines, finite language


def _ib_reference_rules(path):
  """Independent reading of IB's loader (pcfg/generate_downstream.py): 3 fields are unary when the LHS starts with
  'S', else a word; 4 fields binary; duplicate lines summed; then each LHS normalised. Words are tagged ('w', x)."""
  summed = {}
  for line in open(path):
    f = line.split()
    if len(f) == 3:
      rhs = (f[1],) if f[0][0] == "S" else (("w", f[1]),)
    else:
      rhs = (f[1], f[2])
    summed[(f[0], rhs)] = summed.get((f[0], rhs), 0.0) + float(f[-1])
  totals = collections.Counter()
  for (lhs, _), p in summed.items():
    totals[lhs] += p
  rules = collections.defaultdict(list)
  for (lhs, rhs), p in summed.items():
    if p > 0:
      rules[lhs].append((rhs, p / totals[lhs]))
  return rules


def _yields(rules, sym, memo=None):
  """{word tuple: P(sym =>* words)} by enumerating every derivation of a finite grammar."""
  memo = {} if memo is None else memo
  if isinstance(sym, tuple):
    return {(sym[1],): 1.0}
  if sym not in memo:
    table = collections.Counter()
    for rhs, p in rules[sym]:
      combos = [((), p)]  # a list: two splits of one rule can give the same words
      for s in rhs:
        combos = [(w + w2, q * q2) for w, q in combos for w2, q2 in _yields(rules, s, memo).items()]
      for w, q in combos:
        table[w] += q
    memo[sym] = dict(table)
  return memo[sym]


def test_ib_format_sums_duplicates_and_matches_brute_force():
  g = pcfg.load_grammar(IB_TINY)
  assert g.format == "ib" and g.start == "S" and g.merged_duplicates == 3
  assert any("merged 3 duplicate lines" in n for n in g.notes)
  table = _yields(_ib_reference_rules(IB_TINY), "S")
  assert math.isclose(sum(table.values()), 1.0, rel_tol=1e-12)
  sentences = list(table)
  got = g.sentence_logprobs([g.encode(" ".join(s)) for s in sentences])
  np.testing.assert_allclose(got, np.log([table[s] for s in sentences]), rtol=1e-12)
  # The true entropy of the finite language, exactly, against the enumeration.
  p = np.array(list(table.values()))
  rep = g.entropy()
  assert rep.exact and math.isclose(rep.sentence_entropy, float(-(p * np.log(p)).sum()), rel_tol=1e-12)
  mean_len = sum(q * len(s) for s, q in table.items())
  assert math.isclose(rep.entropy_per_token, rep.sentence_entropy / (mean_len + 1), rel_tol=1e-12)
  # Sampling follows the summed probabilities (chi-square over the 20 likeliest sentences, the rest pooled).
  n = 20000
  counts = collections.Counter(tuple(g.decode(s).split()) for s in g.sample_sentences(n, seed=4)[0])
  assert set(counts) <= set(table)
  top = sorted(table, key=table.get, reverse=True)[:20]
  obs = np.array([counts[s] for s in top] + [n - sum(counts[s] for s in top)])
  exp = np.array([table[s] * n for s in top] + [n * (1 - sum(table[s] for s in top))])
  assert float(((obs - exp) ** 2 / exp).sum()) < 50.0  # chi-square(20 dof) quantile 1 - 1e-5 is about 49


WORD_LIKE_NONTERMINAL = """S S1 1.0
S1 A A 1.0
A B 0.5
A b 0.5
B b 1.0
"""


def test_format_is_chosen_by_argument_spec_header_or_duplicates(tmp_path):
  # `A B` is a word rule in IB's format (LHS not 'S'), a unary rule onto the nonterminal B in maxlm's.
  ib = pcfg.parse_grammar(WORD_LIKE_NONTERMINAL, format="ib")
  assert ib.vocab == ["<eos>", "B", "b", "<unk>"]
  assert math.isclose(ib.sentence_logprob(ib.encode("B b")), math.log(0.25))
  mx = pcfg.parse_grammar(WORD_LIKE_NONTERMINAL)  # no header, no duplicates: maxlm's format
  assert mx.format == "maxlm" and mx.vocab == ["<eos>", "b", "<unk>"]
  assert math.isclose(mx.sentence_logprob(mx.encode("b b")), 0.0, abs_tol=1e-12)
  headed = pcfg.parse_grammar("# format: ib\n" + WORD_LIKE_NONTERMINAL)
  assert headed.format == "ib" and headed.text_hash == ib.text_hash and headed.text_hash != mx.text_hash
  path = tmp_path / "g.txt"
  path.write_text(WORD_LIKE_NONTERMINAL)
  assert pcfg.load_grammar(f"ib:{path}").vocab == ib.vocab
  assert pcfg.load_grammar(f"maxlm:{path}").vocab == mx.vocab
  assert pcfg.load_grammar(str(path), format="ib").vocab == ib.vocab
  with pytest.raises(DataError, match="header says '# format: ib' but format 'maxlm'"):
    pcfg.parse_grammar("# format: ib\n" + WORD_LIKE_NONTERMINAL, format="maxlm")
  with pytest.raises(DataError, match="unknown grammar format 'nltk'"):
    pcfg.parse_grammar("# format: nltk\nS a 1.0")
  # Duplicates without a header mean IB's format, unless a line reads differently in the two formats.
  with pytest.raises(DataError, match=r"line 3 \(A B 0.5\) means different things.*# format: ib"):
    pcfg.parse_grammar(WORD_LIKE_NONTERMINAL + "A b 0.1\n")
  # In IB's format an 'S' line is unary and binary rules name nonterminals: one without rules is an error.
  with pytest.raises(DataError, match="nonterminal 'x' .* has no rules"):
    pcfg.parse_grammar("S x 1.0\n", format="ib")
  with pytest.raises(DataError, match="nonterminal 'c' .* has no rules"):
    pcfg.parse_grammar("S A c 1.0\nA a 1.0\n", format="ib")


def test_builtin_ib_demo_grammar_loads_in_ib_format():
  g = pcfg.load_grammar("builtin:ib_demo")
  assert g.format == "ib" and g.merged_duplicates > 0 and g.start == "S"
  children = sorted(r.rhs[0] for r in g.rules if r.lhs == "S")
  assert children == [f"S{i}" for i in range(1, 7)] and not any(r.terminal[0] for r in g.rules if r.lhs == "S")
  assert "builtin:ib_demo" in ", ".join("builtin:" + n for n in pcfg.builtin_grammars())


# ------------------------------------------------------------------------------------ unknown-word token

def _demo_terminals():
  """Independent reading of demo.txt: the words are the symbols that are never an LHS, in sorted order."""
  rules = [line.split("#", 1)[0].split() for line in open(os.path.join(
      os.path.dirname(pcfg.__file__), "grammars", "demo.txt"))]
  rules = [f for f in rules if f]
  lhs = {f[0] for f in rules}
  return sorted({s for f in rules for s in f[1:-1]} - lhs)


def test_unknown_words_tokenize_to_unk_in_grammar_and_hf_export():
  transformers = pytest.importorskip("transformers")
  g = pcfg.load_grammar("builtin:demo")
  vocab = ["<eos>"] + _demo_terminals() + ["<unk>"]  # <eos> and the terminals keep their ids; <unk> is appended
  assert g.vocab == vocab and g.vocab_size == len(vocab) and g.unknown_id == len(vocab) - 1
  text = "the dog zebraquux chases a colourless cat"
  expected = [vocab.index(w) if w in vocab else len(vocab) - 1 for w in text.split()]
  assert expected.count(len(vocab) - 1) == 2 and g.encode(text) == expected
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=g.to_hf_tokenizer())
  assert fast(text, add_special_tokens=False)["input_ids"] == expected
  assert fast.convert_ids_to_tokens(g.unknown_id) == "<unk>" and fast.convert_tokens_to_ids("<eos>") == 0
  assert g.decode(g.encode(text)) == "the dog <unk> chases a <unk> cat"
  with pytest.raises(DataError, match="'zebraquux' is not a terminal"):
    g.encode(text, strict=True)
  assert g.sentence_logprob(g.encode("the dog zebraquux")) == -np.inf  # the grammar never makes <unk>
  demo = yaml.safe_load(open(os.path.join(os.path.dirname(pcfg.__file__), "..", "configs", "demo.yaml")))
  assert demo["model"]["vocab_size"] >= g.vocab_size


def test_pcfg_source_takes_a_grammar_file_path():
  for spec in (IB_TINY, "ib:" + IB_TINY):
    cfg = _cfg(grammar=spec)
    it = build_train_iterator(cfg, seq_len=16, batch_size=2, seed=3)
    g = pcfg.load_grammar(spec)
    np.testing.assert_array_equal(next(it)["inputs"][0], g.sample_stream(17, seed=3)[:16])
    it.close()
    info = describe(cfg)
    assert info.vocab_size == g.vocab_size == 6
    assert math.isclose(info.true_entropy_per_token, g.entropy().entropy_per_token) and info.true_entropy_stderr == 0
