"""Probabilistic context-free grammars (seed 003): the rule file format, vectorised sampling, a word tokenizer,
exact sentence log-probabilities by the inside algorithm and the true per-token entropy rate of the token stream.

Rule format, one rule per line (`#` starts a comment):
    LHS RHS p        unary: RHS is a terminal word, or a nonterminal (any symbol that appears as an LHS)
    LHS B C p        binary: B and C are nonterminals or terminals
The start symbol is the LHS of the first rule. Probabilities of one LHS are normalised to sum to 1 (or, with
strict=True, must already do so). Token ids: 0 is the sentence separator `<eos>`, terminals follow in sorted order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import math
import os

import numpy as np

from maxlm.errors import DataError

SEPARATOR = "<eos>"
# Sentences sampled together; fixed so that a stream with more tokens extends one with fewer (prefix-stable).
_CHUNK_SENTENCES = 16384
_MAX_DEPTH = 100_000


@dataclasses.dataclass(frozen=True)
class Rule:
  lhs: str
  rhs: tuple[str, ...]
  prob: float
  line: int


@dataclasses.dataclass(frozen=True)
class EntropyReport:
  """True entropy of the PCFG token stream (sentences joined by the separator), in nats."""
  entropy_per_token: float      # H(sentence) / E[tokens per sentence incl. separator]
  stderr: float                 # standard error of entropy_per_token (0.0 when exact)
  exact: bool                   # True: computed in closed form; False: Monte Carlo over num_samples sentences
  sentence_entropy: float       # H(sentence)
  derivation_entropy: float     # H(derivation) >= H(sentence); equal when the grammar is unambiguous
  tokens_per_sentence: float    # E[words] + 1 (the separator)
  num_samples: int


class Grammar:
  """A parsed PCFG with dense tables for sampling (codes) and parsing (nonterminal indices)."""

  def __init__(self, rules: list[Rule], *, name: str = "<grammar>"):
    self.name = name
    self.rules = rules
    lhs_order = list(dict.fromkeys(r.lhs for r in rules))
    self.start = lhs_order[0]
    symbols = {s for r in rules for s in r.rhs}
    self.nonterminals = lhs_order
    self.terminals = sorted(symbols - set(lhs_order))
    if SEPARATOR in set(self.terminals) | set(lhs_order):
      raise DataError(f"{name}: the symbol {SEPARATOR} is reserved for the sentence separator; rename it.")
    self.vocab = [SEPARATOR] + self.terminals
    self.token_id = {w: i for i, w in enumerate(self.vocab)}
    self.nt_id = {a: i for i, a in enumerate(lhs_order)}
    self.text_hash = hashlib.sha256(
        "\n".join(f"{r.lhs} {' '.join(r.rhs)} {r.prob!r}" for r in rules).encode()).hexdigest()
    self._build_tables()
    self._check_consistent()

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def separator_id(self) -> int:
    return 0

  def _build_tables(self):
    n, v = len(self.nonterminals), self.vocab_size
    # Sampling: a symbol code < v is a token id, code >= v is nonterminal (code - v). Rules of one LHS are
    # contiguous; cum_offset[r] = lhs + cumulative probability, so one searchsorted picks rules for all LHSs.
    order = sorted(range(len(self.rules)), key=lambda i: (self.nt_id[self.rules[i].lhs], i))
    rules = [self.rules[i] for i in order]
    code = lambda s: self.token_id[s] if s in self.token_id else v + self.nt_id[s]
    self.rule_lhs = np.array([self.nt_id[r.lhs] for r in rules], np.int64)
    self.rule_prob = np.array([r.prob for r in rules], np.float64)
    self.rule_len = np.array([len(r.rhs) for r in rules], np.int64)
    self.rule_rhs = np.array([[code(r.rhs[0]), code(r.rhs[-1])] for r in rules], np.int64)
    self.rule_logp = np.log(self.rule_prob)
    cum = np.empty(len(rules))
    for a in range(n):
      idx = np.flatnonzero(self.rule_lhs == a)
      c = np.cumsum(self.rule_prob[idx])
      c[-1] = 1.0  # exact upper edge: a + u with u in [0, 1) always lands inside a's block
      cum[idx] = a + c
    self.cum_offset = cum
    self._sorted_rules = rules

    # Parsing tables over nonterminals; terminals inside binary rules get an implicit preterminal.
    self.lex = np.zeros((n, v))                      # P(A -> w)
    self.unary = np.zeros((n, n))                    # P(A -> B)
    bin_lhs, bin_left, bin_right, bin_p = [], [], [], []
    extra_pre = {}                                   # terminal -> row in self.pre_lex
    for r in rules:
      a = self.nt_id[r.lhs]
      if len(r.rhs) == 1:
        s = r.rhs[0]
        if s in self.nt_id:
          self.unary[a, self.nt_id[s]] += r.prob
        else:
          self.lex[a, self.token_id[s]] += r.prob
      else:
        kids = []
        for s in r.rhs:
          if s in self.nt_id:
            kids.append(self.nt_id[s])
          else:
            kids.append(n + extra_pre.setdefault(s, len(extra_pre)))
        bin_lhs.append(a)
        bin_left.append(kids[0])
        bin_right.append(kids[1])
        bin_p.append(r.prob)
    # Preterminals for terminals used in binary rules are appended after the real nonterminals.
    m = n + len(extra_pre)
    lex = np.zeros((m, v))
    lex[:n] = self.lex
    for w, j in extra_pre.items():
      lex[n + j, self.token_id[w]] = 1.0
    unary = np.zeros((m, m))
    unary[:n, :n] = self.unary
    self.parse_lex = lex
    self.bin_lhs = np.array(bin_lhs, np.int64)
    self.bin_left = np.array(bin_left, np.int64)
    self.bin_right = np.array(bin_right, np.int64)
    self.bin_p = np.array(bin_p, np.float64)
    self.bin_onehot = np.zeros((len(bin_lhs), m))
    self.bin_onehot[np.arange(len(bin_lhs)), self.bin_lhs] = 1.0
    radius = np.max(np.abs(np.linalg.eigvals(unary))) if m else 0.0
    if radius >= 1.0 - 1e-12:
      raise DataError(f"{self.name}: unary rules form a cycle taken with probability 1 (e.g. A -> B, B -> A); "
                      "give every nonterminal in the cycle a rule that leaves it.")
    # inside(A) = sum_B closure[A, B] * direct(B): sums over chains of unary rules of any length.
    self.unary_closure = np.linalg.inv(np.eye(m) - unary)

  def _check_consistent(self):
    n = len(self.nonterminals)
    # mean[A, B]: expected number of B among the children of one expansion of A.
    mean = np.zeros((n, n))
    terms = np.zeros(n)
    hrule = np.zeros(n)
    for r in self._sorted_rules:
      a = self.nt_id[r.lhs]
      hrule[a] -= r.prob * math.log(r.prob)
      for s in r.rhs:
        if s in self.nt_id:
          mean[a, self.nt_id[s]] += r.prob
        else:
          terms[a] += r.prob
    radius = np.max(np.abs(np.linalg.eigvals(mean))) if n else 0.0
    if radius >= 1.0 - 1e-9:
      raise DataError(
          f"{self.name}: the grammar is not consistent: each nonterminal expects {radius:.3f} >= 1 nonterminal "
          "descendants per expansion, so sentences are infinitely long with positive probability. Lower the "
          "probabilities of recursive rules (e.g. NP -> NP PP).")
    start = np.zeros(n)
    start[self.nt_id[self.start]] = 1.0
    self.expected_counts = np.linalg.solve((np.eye(n) - mean).T, start)
    self.expected_words = float(self.expected_counts @ terms)
    self.derivation_entropy = float(self.expected_counts @ hrule)
    # Recursive iff some nonterminal can reach itself; a finite language otherwise.
    adj = (mean > 0).astype(np.int64)
    reach = adj.copy()
    for _ in range(n):
      reach = ((reach + reach @ adj) > 0).astype(np.int64)
    self.recursive = bool(np.trace(reach) > 0)

  # ----------------------------------------------------------------------------------------------- sampling

  def sample_chunk(self, rng: np.random.Generator, num_sentences: int):
    """Samples num_sentences sentences; returns (stream, sentence_logp) where stream is the token ids of all
    sentences each followed by the separator, and sentence_logp the log-probability of each sampled derivation."""
    v = self.vocab_size
    start = v + self.nt_id[self.start]
    syms = np.empty(2 * num_sentences, np.int64)
    syms[0::2] = start
    syms[1::2] = self.separator_id
    sent = np.repeat(np.arange(num_sentences), 2)
    logp = np.zeros(num_sentences)
    # Expand every nonterminal of every sentence in parallel, one tree level per pass; order is kept, so the
    # final array is the concatenated yields.
    for _ in range(_MAX_DEPTH):
      is_nt = syms >= v
      if not is_nt.any():
        return syms.astype(np.int32), logp
      lhs = syms[is_nt] - v
      rule = np.searchsorted(self.cum_offset, lhs + rng.random(lhs.shape[0]), side="right")
      logp += np.bincount(sent[is_nt], weights=self.rule_logp[rule], minlength=num_sentences)
      lengths = np.ones(syms.shape[0], np.int64)
      lengths[is_nt] = self.rule_len[rule]
      ends = np.cumsum(lengths)
      starts = ends - lengths
      out = np.empty(int(ends[-1]), np.int64)
      out[starts[~is_nt]] = syms[~is_nt]
      nt_starts = starts[is_nt]
      out[nt_starts] = self.rule_rhs[rule, 0]
      binary = self.rule_len[rule] == 2
      out[nt_starts[binary] + 1] = self.rule_rhs[rule[binary], 1]
      sent = np.repeat(sent, lengths)
      syms = out
    raise DataError(f"{self.name}: a sentence did not finish after {_MAX_DEPTH} levels; lower recursion.")

  def sample_sentences(self, num_sentences: int, seed: int):
    """Returns (list of token-id arrays without separator, derivation log-probs)."""
    stream, logp = self.sample_chunk(np.random.default_rng(seed), num_sentences)
    ends = np.flatnonzero(stream == self.separator_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s:e] for s, e in zip(starts, ends)], logp

  def stream_chunk(self, seed: int, stream_tag: int, chunk: int) -> np.ndarray:
    """Chunk `chunk` of the infinite token stream for (seed, stream_tag): _CHUNK_SENTENCES whole sentences."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream_tag, chunk]))
    return self.sample_chunk(rng, _CHUNK_SENTENCES)[0]

  def sample_stream(self, num_tokens: int, seed: int, stream_tag: int = 0) -> np.ndarray:
    """The first num_tokens tokens of the deterministic stream for (seed, stream_tag)."""
    parts, total, chunk = [], 0, 0
    while total < num_tokens:
      parts.append(self.stream_chunk(seed, stream_tag, chunk))
      total += parts[-1].shape[0]
      chunk += 1
    return np.concatenate(parts)[:num_tokens] if parts else np.zeros(0, np.int32)

  # -------------------------------------------------------------------------------------------- tokenizer

  def encode(self, text: str) -> list[int]:
    try:
      return [self.token_id[w] for w in text.split()]
    except KeyError as e:
      raise DataError(f"{self.name}: word {e.args[0]!r} is not a terminal of the grammar.") from None

  def decode(self, ids) -> str:
    return " ".join(self.vocab[int(i)] for i in ids)

  def to_hf_tokenizer(self):
    """The word-level tokenizer as a `tokenizers.Tokenizer` (same ids), e.g. to save next to an HF export."""
    import tokenizers  # pylint: disable=import-outside-toplevel
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(dict(self.token_id), unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([SEPARATOR])
    return tok

  # ------------------------------------------------------------------------------------ inside algorithm

  def sentence_logprob(self, ids) -> float:
    return float(self.sentence_logprobs([ids])[0])

  def sentence_logprobs(self, sentences) -> np.ndarray:
    """log P(sentence) summed over all derivations (inside algorithm), for token-id sequences without the
    separator. Sentences of one length are parsed together; -inf where the grammar cannot derive a sentence."""
    out = np.empty(len(sentences))
    by_len = {}
    for i, s in enumerate(sentences):
      by_len.setdefault(len(s), []).append(i)
    for n, idx in by_len.items():
      if n == 0:
        out[idx] = -np.inf
        continue
      ids = np.array([np.asarray(sentences[i], np.int64) for i in idx])
      if ids.min() < 1 or ids.max() >= self.vocab_size:
        raise DataError(f"{self.name}: token ids must be terminal ids in [1, {self.vocab_size}).")
      out[idx] = self._inside(ids)
    return out

  def _inside(self, ids: np.ndarray) -> np.ndarray:
    # chart[l] holds spans of length l: values (B, n-l+1, M) scaled so each span's max is 1, and log scales
    # (B, n-l+1); scaling keeps long sentences from underflowing float64.
    b, n = ids.shape
    closure_t = self.unary_closure.T
    val = self.parse_lex[:, ids].transpose(1, 2, 0) @ closure_t
    chart = {1: _rescale(val, np.zeros((b, n)))}
    for length in range(2, n + 1):
      spans = n - length + 1
      parts, scales = [], []
      for m in range(1, length):
        lv, ls = chart[m]
        rv, rs = chart[length - m]
        left, right = lv[:, :spans], rv[:, m:m + spans]
        parts.append(left[..., self.bin_left] * right[..., self.bin_right] * self.bin_p)
        scales.append(ls[:, :spans] + rs[:, m:m + spans])
      scales = np.stack(scales)                     # (splits, B, spans)
      top = np.max(scales, axis=0)
      safe_top = np.where(np.isfinite(top), top, 0.0)
      weights = np.exp(scales - safe_top)
      acc = sum(w[..., None] * p for w, p in zip(weights, parts))
      val = (acc @ self.bin_onehot) @ closure_t
      chart[length] = _rescale(val, np.where(np.isfinite(top), top, -np.inf))
    v, s = chart[n]
    with np.errstate(divide="ignore"):
      return np.log(v[:, 0, self.nt_id[self.start]]) + s[:, 0]

  # ------------------------------------------------------------------------------------------ entropy

  def entropy(self, num_samples: int = 4000, seed: int = 0, max_enumerate: int = 200_000) -> EntropyReport:
    """True per-token entropy rate of the separator-joined sentence stream: H(sentence) / E[len + 1].

    Exact when the language is finite with at most max_enumerate distinct sentences. Otherwise
    H(sentence) = H(derivation) - E[log P(s) - log P(d)]: H(derivation) is exact (expected rule counts), the
    correction (0 for unambiguous sentences) is averaged over sampled (s, d) pairs with inside-algorithm
    log-probabilities, which has far lower variance than averaging -log P(s) itself.
    """
    per = self.expected_words + 1.0
    if not self.recursive:
      table = self._enumerate(max_enumerate)
      if table is not None:
        p = np.array(list(table.values()))
        h = float(-(p * np.log(p)).sum())
        return EntropyReport(h / per, 0.0, True, h, self.derivation_entropy, per, 0)
    sentences, dlogp = self.sample_sentences(num_samples, seed)
    slogp = self.sentence_logprobs(sentences)
    gap = slogp - dlogp
    h = self.derivation_entropy - float(gap.mean())
    se = float(gap.std(ddof=1) / math.sqrt(num_samples)) if num_samples > 1 else float("inf")
    return EntropyReport(h / per, se / per, False, h, self.derivation_entropy, per, num_samples)

  def _enumerate(self, limit: int):
    """{sentence tuple: probability} for a non-recursive grammar, or None if it has more than `limit`."""
    memo = {}

    def expand(sym):
      if sym not in self.nt_id:
        return {(self.token_id[sym],): 1.0}
      if sym in memo:
        return memo[sym]
      table = {}
      for r in self._sorted_rules:
        if r.lhs != sym:
          continue
        parts = [expand(s) for s in r.rhs]
        if any(p is None for p in parts) or math.prod(len(p) for p in parts) > limit:
          memo[sym] = None
          return None
        combos = parts[0].items()
        for nxt in parts[1:]:
          combos = [(a + b, pa * pb) for a, pa in combos for b, pb in nxt.items()]
        for s, p in combos:
          table[s] = table.get(s, 0.0) + r.prob * p
        if len(table) > limit:
          memo[sym] = None
          return None
      memo[sym] = table
      return table

    return expand(self.start)


def _rescale(val, scale):
  top = val.max(axis=-1)
  ok = top > 0
  val = val / np.where(ok, top, 1.0)[..., None]
  with np.errstate(divide="ignore"):
    return val, np.where(ok, scale + np.log(np.where(ok, top, 1.0)), -np.inf)


def parse_grammar(text: str, *, name: str = "<grammar>", strict: bool = False) -> Grammar:
  """Parses the rule text format (module docstring). strict=True: each LHS's probabilities must sum to 1."""
  rules, seen = [], {}
  for lineno, raw in enumerate(text.splitlines(), 1):
    line = raw.split("#", 1)[0].strip()
    if not line:
      continue
    fields = line.split()
    where = f"{name}:{lineno}"
    if len(fields) not in (3, 4):
      raise DataError(f"{where}: expected 'LHS RHS p' or 'LHS B C p', got {len(fields)} fields: {raw.strip()!r}")
    try:
      prob = float(fields[-1])
    except ValueError:
      raise DataError(f"{where}: the last field must be a probability, got {fields[-1]!r}") from None
    if not math.isfinite(prob) or prob < 0:
      raise DataError(f"{where}: probability must be finite and >= 0, got {fields[-1]}")
    key = (fields[0], tuple(fields[1:-1]))
    if key in seen:
      raise DataError(f"{where}: duplicate rule {' '.join(fields[:-1])} (first at line {seen[key]}); merge them.")
    seen[key] = lineno
    if prob > 0:  # a zero-probability rule is a rule switched off
      rules.append(Rule(fields[0], tuple(fields[1:-1]), prob, lineno))
  if not rules:
    raise DataError(f"{name}: no rules with positive probability.")
  totals = {}
  for r in rules:
    totals[r.lhs] = totals.get(r.lhs, 0.0) + r.prob
  if strict:
    bad = {a: t for a, t in totals.items() if abs(t - 1.0) > 1e-6}
    if bad:
      listing = ", ".join(f"{a}: {t:.6g}" for a, t in bad.items())
      raise DataError(f"{name}: rule probabilities per LHS must sum to 1 (strict mode): {listing}")
  rules = [dataclasses.replace(r, prob=r.prob / totals[r.lhs]) for r in rules]
  return Grammar(rules, name=name)


def builtin_grammars() -> list[str]:
  root = importlib.resources.files("maxlm.data_pipelines") / "grammars"
  return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".txt"))


@functools.lru_cache(maxsize=8)
def load_grammar(spec: str) -> Grammar:
  """`builtin:NAME` (data_pipelines/grammars/NAME.txt) or a path to a rule file."""
  if spec.startswith("builtin:"):
    name = spec[len("builtin:"):]
    path = importlib.resources.files("maxlm.data_pipelines") / "grammars" / f"{name}.txt"
    if not path.is_file():
      raise DataError(f"unknown built-in grammar {spec!r}; available: "
                      f"{', '.join('builtin:' + g for g in builtin_grammars())}, or give a rule file path.")
    return parse_grammar(path.read_text(), name=spec)
  if not os.path.isfile(spec):
    raise DataError(f"grammar file {spec!r} not found; set data.grammar to a rule file or builtin:demo.")
  with open(spec, encoding="utf-8") as f:
    return parse_grammar(f.read(), name=spec)


@functools.lru_cache(maxsize=8)
def grammar_entropy(spec: str, num_samples: int = 4000) -> EntropyReport:
  return load_grammar(spec).entropy(num_samples=num_samples)
