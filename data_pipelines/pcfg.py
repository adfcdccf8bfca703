"""Probabilistic context-free grammars (docs/IMPLICIT_BIAS.md): two rule file formats, vectorised sampling, a word
tokenizer, exact sentence and span inside probabilities and the true per-token entropy rate of the token stream.

Rule files, one rule per line, fields split on whitespace (`#` starts a comment; blank lines are skipped):
  maxlm's format:
    LHS RHS p        unary: RHS is a nonterminal if it appears as an LHS, else a terminal word
    LHS B C p        binary: B and C are nonterminals or terminals (a terminal gets an implicit preterminal)
    A rule given twice is an error.
  IB's format (Liuhong99/implicitbiasmlmcode pcfg/*.py, read exactly as its loader reads it):
    LHS X p          unary (X a nonterminal) when LHS starts with 'S', else a terminal rule (X a word)
    LHS B C p        binary: B and C are nonterminals
    Duplicate lines are summed (IB's generator wrote some rules twice); `Grammar.merged_duplicates` counts the
    lines merged, `Grammar.notes` says so. IB's grammars start with `S -> S1 | ... | Sn`, each Si one binary rule.
Both: the start symbol is the LHS of the first rule; a zero probability switches a rule off; the probabilities
of each LHS are normalised to sum to 1 (strict=True: they must already, within 1e-6).

How a file's format is chosen, first match wins (`format=` of parse_grammar/load_grammar is "auto" by default):
  1. `format="ib"` or `"maxlm"`, or a spec `ib:PATH` / `maxlm:PATH` for load_grammar (and so for data.grammar);
  2. a header comment before the first rule: `# format: ib` or `# format: maxlm` (an explicit choice that
     contradicts it is an error);
  3. otherwise IB's format if the file has a duplicate rule (maxlm's format rejects those, so the file can only
     be IB's), else maxlm's. The two readings differ only when a line is read differently (a non-'S' unary onto a
     nonterminal, an 'S' line onto a word, a binary rule with a word): such a file needs step 1 or 2.
Token ids: 0 is the sentence separator `<eos>`, the terminals follow in sorted order, and the last id is the
unknown-word token `<unk>`, so any text tokenizes (ids of `<eos>` and the terminals do not move).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import logging
import math
import os
import re

import numpy as np

from maxlm.core.errors import DataError

SEPARATOR = "<eos>"
UNKNOWN = "<unk>"
FORMATS = ("maxlm", "ib")
_FORMAT_HEADER = re.compile(r"#\s*format\s*:\s*(\S+)\s*$")
_LOG = logging.getLogger(__name__)
# Sentences sampled together; fixed so that a stream with more tokens extends one with fewer (prefix-stable).
_CHUNK_SENTENCES = 16384
_MAX_DEPTH = 100_000


@dataclasses.dataclass(frozen=True)
class Rule:
  lhs: str
  rhs: tuple[str, ...]
  prob: float
  line: int
  # Per RHS symbol: True for a terminal word. None: by name, as in maxlm's format (a nonterminal is an LHS).
  terminal: tuple[bool, ...] | None = None


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

  def __init__(self, rules: list[Rule], *, name: str = "<grammar>", fmt: str = "maxlm", notes=(),
               merged_duplicates: int = 0):
    self.name = name
    self.format = fmt
    self.notes = list(notes)              # what loading changed in the file's rules, in words
    self.merged_duplicates = merged_duplicates
    lhs_order = list(dict.fromkeys(r.lhs for r in rules))
    self.start = lhs_order[0]
    self.nonterminals = lhs_order
    self.nt_id = {a: i for i, a in enumerate(lhs_order)}
    self.rules = [self._resolve(r) for r in rules]
    self.terminals = sorted({s for r in self.rules for s, t in zip(r.rhs, r.terminal) if t})
    reserved = {SEPARATOR, UNKNOWN} & (set(self.terminals) | set(lhs_order))
    if reserved:
      raise DataError(f"{name}: the symbols {SEPARATOR} and {UNKNOWN} are reserved for the sentence separator and "
                      f"the unknown word; rename {', '.join(sorted(reserved))}.")
    self.vocab = [SEPARATOR] + self.terminals + [UNKNOWN]
    self.token_id = {w: i for i, w in enumerate(self.vocab)}
    self.text_hash = hashlib.sha256("\n".join(_rule_text(r, self.nt_id) for r in self.rules).encode()).hexdigest()
    self._build_tables()
    self._check_consistent()

  def _resolve(self, r: Rule) -> Rule:
    if r.terminal is None:
      return dataclasses.replace(r, terminal=tuple(s not in self.nt_id for s in r.rhs))
    for s, t in zip(r.rhs, r.terminal):
      if not t and s not in self.nt_id:
        raise DataError(f"{self.name}:{r.line}: nonterminal {s!r} (in {r.lhs} -> {' '.join(r.rhs)}) has no rules. In "
                        "IB's format a 3-field line is unary only when its LHS starts with 'S' and binary rules name "
                        "nonterminals; add rules for it, or mark the file '# format: maxlm' if it is a word.")
    return r

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def separator_id(self) -> int:
    return 0

  @property
  def unknown_id(self) -> int:
    return len(self.vocab) - 1

  def _build_tables(self):
    n, v = len(self.nonterminals), self.vocab_size
    # Sampling: a symbol code < v is a token id, code >= v is nonterminal (code - v). Rules of one LHS are
    # contiguous; cum_offset[r] = lhs + cumulative probability, so one searchsorted picks rules for all LHSs.
    order = sorted(range(len(self.rules)), key=lambda i: (self.nt_id[self.rules[i].lhs], i))
    rules = [self.rules[i] for i in order]
    code = lambda s, term: self.token_id[s] if term else v + self.nt_id[s]
    self.rule_lhs = np.array([self.nt_id[r.lhs] for r in rules], np.int64)
    self.rule_prob = np.array([r.prob for r in rules], np.float64)
    self.rule_len = np.array([len(r.rhs) for r in rules], np.int64)
    self.rule_rhs = np.array([[code(r.rhs[0], r.terminal[0]), code(r.rhs[-1], r.terminal[-1])] for r in rules],
                             np.int64)
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
        if not r.terminal[0]:
          self.unary[a, self.nt_id[s]] += r.prob
        else:
          self.lex[a, self.token_id[s]] += r.prob
      else:
        kids = []
        for s, term in zip(r.rhs, r.terminal):
          if not term:
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
    # Binary rules are sorted by LHS: a segment sum per LHS (reduceat) turns rule scores into LHS scores.
    self.bin_starts = np.flatnonzero(np.r_[True, self.bin_lhs[1:] != self.bin_lhs[:-1]]) if bin_lhs else None
    self.parse_size = m
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
      for s, term in zip(r.rhs, r.terminal):
        if not term:
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

  def encode(self, text: str, *, strict: bool = False) -> list[int]:
    """Word ids of whitespace-separated text; a word outside the grammar is `<unk>` (strict=True: an error)."""
    words = text.split()
    if strict:
      unknown = [w for w in words if w not in self.token_id or w == UNKNOWN]
      if unknown:
        raise DataError(f"{self.name}: word {unknown[0]!r} is not a terminal of the grammar.")
    unk = self.unknown_id
    return [self.token_id.get(w, unk) for w in words]

  def decode(self, ids) -> str:
    """Words of token ids; ids past the grammar's vocabulary (a model's padded vocab) read as <unk>."""
    unk = self.vocab[-1]
    return " ".join(self.vocab[int(i)] if 0 <= int(i) < len(self.vocab) else unk for i in ids)

  def to_hf_tokenizer(self):
    """The word-level tokenizer as a `tokenizers.Tokenizer` (same ids, unknown words -> `<unk>`), e.g. to save
    next to an HF export."""
    import tokenizers  # pylint: disable=import-outside-toplevel
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(dict(self.token_id), unk_token=UNKNOWN))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([SEPARATOR, UNKNOWN])
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
    values, scale = self.inside_scaled(ids)
    with np.errstate(divide="ignore"):
      return np.log(values[:, self.nt_id[self.start]]) + scale

  def inside_scaled(self, ids_BxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inside probabilities of whole id sequences for every nonterminal, as (values_BxA, log_scale_B):
    P(A =>* ids[b]) = values[b, A] * exp(log_scale[b]), A in `nonterminals` order, unary chains included.
    Each row is scaled so its largest entry (preterminals counted) is 1, so comparing entries of one row is
    exact; a row no symbol derives is all 0 with log_scale -inf."""
    ids_BxN = np.asarray(ids_BxN, np.int64)
    b, n = ids_BxN.shape
    if n == 0:
      raise ValueError("inside_scaled needs sequences of at least one token")
    # chart[l] holds spans of length l: values (B, n-l+1, M) scaled so each span's max is 1, and log scales
    # (B, n-l+1); scaling keeps long sentences from underflowing float64.
    closure_t = self.unary_closure.T
    val = self.parse_lex[:, ids_BxN].transpose(1, 2, 0) @ closure_t
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
      val = np.zeros(acc.shape[:-1] + (self.parse_size,))
      if self.bin_starts is not None:
        val[..., self.bin_lhs[self.bin_starts]] = np.add.reduceat(acc, self.bin_starts, axis=-1)
      val = val @ closure_t
      chart[length] = _rescale(val, np.where(np.isfinite(top), top, -np.inf))
    v, s = chart[n]
    return v[:, 0, :len(self.nonterminals)], s[:, 0]

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
      if sym in memo:
        return memo[sym]
      table = {}
      for r in self._sorted_rules:
        if r.lhs != sym:
          continue
        parts = [{(self.token_id[s],): 1.0} if term else expand(s) for s, term in zip(r.rhs, r.terminal)]
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


def _rule_text(r: Rule, nt_id: dict) -> str:
  text = f"{r.lhs} {' '.join(r.rhs)} {r.prob!r}"
  # Kinds only where the name does not imply them (IB's format), so a grammar's hash does not depend on its format.
  if r.terminal != tuple(s not in nt_id for s in r.rhs):
    text += " " + "".join("t" if t else "n" for t in r.terminal)
  return text


def _rule_lines(text: str, name: str) -> tuple[str | None, list]:
  """(format named by a header comment or None, [(line number, fields, probability)]) of a rule file."""
  header, lines = None, []
  for lineno, raw in enumerate(text.splitlines(), 1):
    match = _FORMAT_HEADER.fullmatch(raw.strip())
    if match and not lines:
      header = match.group(1).lower()
      if header not in FORMATS:
        raise DataError(f"{name}:{lineno}: unknown grammar format {match.group(1)!r}; use '# format: ib' or "
                        "'# format: maxlm'.")
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
    lines.append((lineno, fields, prob))
  return header, lines


def _ib_terminal(fields) -> tuple[bool, ...]:
  # IB's loader: a 3-field line is unary (a nonterminal RHS) iff its LHS starts with 'S', else a word; 4 fields
  # name two nonterminals.
  return (not fields[0].startswith("S"),) if len(fields) == 3 else (False, False)


def _choose_format(requested: str, header, lines, name: str) -> tuple[str, str]:
  """(format, why) by the rules of the module docstring."""
  if requested not in ("auto",) + FORMATS:
    raise DataError(f"{name}: unknown grammar format {requested!r}; use auto, ib or maxlm.")
  if requested != "auto":
    if header is not None and header != requested:
      raise DataError(f"{name}: its header says '# format: {header}' but format {requested!r} was asked for; "
                      "drop one of them.")
    return requested, "asked for"
  if header is not None:
    return header, "its '# format:' header"
  keys = [(f[0], tuple(f[1:-1])) for _, f, _ in lines]
  if len(set(keys)) == len(keys):
    return "maxlm", "no format header and no duplicate rules"
  # Duplicates: IB's format, but only when no line reads differently in maxlm's, else ask for a header.
  lhs = {f[0] for _, f, _ in lines}
  for lineno, f, _ in lines:
    if _ib_terminal(f) != tuple(s not in lhs for s in f[1:-1]):
      raise DataError(
          f"{name}: it has duplicate rules, as IB's format allows, but line {lineno} ({' '.join(f)}) means "
          "different things in IB's format and maxlm's; start the file with '# format: ib' or '# format: maxlm' "
          "(or load it as ib:PATH / maxlm:PATH).")
  return "ib", "no format header, duplicate rules"


def _merge_ib(lines, name: str) -> tuple[list[Rule], int]:
  """IB's rules with duplicate lines summed, in order of first appearance; and how many lines were merged."""
  merged, count = {}, 0
  for lineno, f, prob in lines:
    key = (f[0], tuple(f[1:-1]))
    if key in merged:
      merged[key][1] += prob
      count += 1
    else:
      merged[key] = [lineno, prob, _ib_terminal(f)]
  rules = [Rule(lhs, rhs, p, lineno, term) for (lhs, rhs), (lineno, p, term) in merged.items() if p > 0]
  if count:
    _LOG.info("%s: merged %d duplicate rule lines (IB's format sums them)", name, count)
  return rules, count


def _maxlm_rules(lines, name: str) -> list[Rule]:
  rules, seen = [], {}
  for lineno, f, prob in lines:
    key = (f[0], tuple(f[1:-1]))
    if key in seen:
      raise DataError(f"{name}:{lineno}: duplicate rule {' '.join(f[:-1])} (first at line {seen[key]}); merge them "
                      "(or, for a file in IB's format, which sums duplicates, start it with '# format: ib').")
    seen[key] = lineno
    if prob > 0:  # a zero-probability rule is a rule switched off
      rules.append(Rule(f[0], tuple(f[1:-1]), prob, lineno))
  return rules


def parse_grammar(text: str, *, name: str = "<grammar>", strict: bool = False,
                  format: str = "auto") -> Grammar:  # pylint: disable=redefined-builtin
  """Parses a rule file in maxlm's or IB's format (module docstring: format "auto" | "ib" | "maxlm").
  strict=True: each LHS's probabilities must sum to 1 (within 1e-6); else they are normalised."""
  header, lines = _rule_lines(text, name)
  fmt, why = _choose_format(format, header, lines, name)
  merged, notes = 0, []
  if fmt == "ib":
    rules, merged = _merge_ib(lines, name)
    notes.append(f"read in IB's format ({why}); merged {merged} duplicate lines by summing their probabilities")
  else:
    rules = _maxlm_rules(lines, name)
  if not rules:
    raise DataError(f"{name}: no rules with positive probability.")
  totals = {}
  for r in rules:
    totals[r.lhs] = totals.get(r.lhs, 0.0) + r.prob
  off = {a: t for a, t in totals.items() if abs(t - 1.0) > 1e-6}
  if strict and off:
    listing = ", ".join(f"{a}: {t:.6g}" for a, t in off.items())
    raise DataError(f"{name}: rule probabilities per LHS must sum to 1 (strict mode): {listing}")
  if off:
    worst = max(off, key=lambda a: abs(off[a] - 1.0))
    notes.append(f"normalised {len(off)} left-hand sides whose probabilities did not sum to 1 "
                 f"(furthest: {worst}, summing to {off[worst]:.9g})")
    _LOG.info("%s: %s", name, notes[-1])
  rules = [dataclasses.replace(r, prob=r.prob / totals[r.lhs]) for r in rules]
  return Grammar(rules, name=name, fmt=fmt, notes=notes, merged_duplicates=merged)


def builtin_grammars() -> list[str]:
  root = importlib.resources.files("maxlm.data_pipelines") / "grammars"
  return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".txt"))


@functools.lru_cache(maxsize=8)
def load_grammar(spec: str, format: str = "auto") -> Grammar:  # pylint: disable=redefined-builtin
  """`builtin:NAME` (data_pipelines/grammars/NAME.txt) or a rule file path, either optionally prefixed by `ib:` or
  `maxlm:` to choose its format (module docstring); `format` does the same."""
  for fmt in FORMATS:
    if spec.startswith(fmt + ":"):
      if format not in ("auto", fmt):
        raise DataError(f"grammar {spec!r} names format {fmt!r} but format {format!r} was asked for; drop one.")
      return load_grammar(spec[len(fmt) + 1:], fmt)
  if spec.startswith("builtin:"):
    name = spec[len("builtin:"):]
    path = importlib.resources.files("maxlm.data_pipelines") / "grammars" / f"{name}.txt"
    if not path.is_file():
      raise DataError(f"unknown built-in grammar {spec!r}; available: "
                      f"{', '.join('builtin:' + g for g in builtin_grammars())}, or give a rule file path.")
    return parse_grammar(path.read_text(), name=spec, format=format)
  if not os.path.isfile(spec):
    raise DataError(f"grammar file {spec!r} not found; set data.grammar to a rule file (ib:PATH for one in IB's "
                    "format) or builtin:demo.")
  with open(spec, encoding="utf-8") as f:
    return parse_grammar(f.read(), name=spec, format=format)


@functools.lru_cache(maxsize=8)
def grammar_entropy(spec: str, num_samples: int = 4000) -> EntropyReport:
  return load_grammar(spec).entropy(num_samples=num_samples)
