"""Writes paraphrase.json and once.json here: small fictional-knowledge files (KE's format) whose text is sentences
of the builtin demo PCFG, so the demo tokenizer covers every word. `python tests/data/knowledge/make_fictional.py`.
"""

import json
import os

import numpy as np

from maxlm.data_pipelines import load_grammar

SENTENCES_PER_ITEM = 5  # one memorization / semantic / composition probe per sentence, as KE's 5 per item
PARAPHRASES = 9


def sentences(grammar, count: int, seed: int, min_words: int = 6) -> list[list[str]]:
  out, batch = [], 0
  while len(out) < count:
    ids, _ = grammar.sample_sentences(256, seed * 1000 + batch)
    out += [grammar.decode(s).split() for s in ids if len(s) >= min_words]
    batch += 1
  return out[:count]


def item(grammar, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  sents = sentences(grammar, SENTENCES_PER_ITEM, seed)
  orders = [rng.permutation(SENTENCES_PER_ITEM) for _ in range(PARAPHRASES)]
  join = lambda order: " ".join(" ".join(sents[i]) for i in order)  # noqa: E731
  halves = [len(s) // 2 for s in sents]
  return {
      "train_context": join(range(SENTENCES_PER_ITEM)),
      "paraphrases": [join(o) for o in orders],
      "mem_input": [" ".join(s[:-2]) for s in sents], "mem_target": [" ".join(s[-2:]) for s in sents],
      "gen_input": [" ".join(sents[(i + 1) % SENTENCES_PER_ITEM] + s[:-2]) for i, s in enumerate(sents)],
      "gen_target": [" ".join(s[-2:]) for s in sents],
      "hard_gen_input": [" ".join(s[:h]) for s, h in zip(sents, halves)],
      "hard_gen_target": [" ".join(s[h:]) for s, h in zip(sents, halves)],
  }


def main(out_dir: str = os.path.dirname(os.path.abspath(__file__))) -> None:
  grammar = load_grammar("builtin:demo")
  for name, count, base in (("paraphrase.json", 6, 100), ("once.json", 10, 200)):
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump([item(grammar, base + i) for i in range(count)], f, indent=1)


if __name__ == "__main__":
  main()
