"""`python -m maxlm.data`: prepare raw corpora into a token store, inspect one, or write PCFG downstream tasks.

Thin CLI over maxlm.data_pipelines.prepare / inspect_store / pcfg_tasks; user errors print their fix and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from maxlm.core.errors import cli_description, cli_exit_code


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m maxlm.data", description=cli_description(__doc__))
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="tokenize raw text (JSONL/.gz/.zst, Parquet, text) into a token store")
  p.add_argument("--input", required=True, action="append",
                 help="glob of input files (quote it); repeat for several globs")
  p.add_argument("--tokenizer", required=True,
                 help="local HF tokenizer.json, SentencePiece .model, or a Hugging Face model directory holding one")
  p.add_argument("--output", required=True, help="store root: local path, gs://bucket/path or s3://bucket/path")
  p.add_argument("--domain-key", default="", help="field path of a record's domain, e.g. meta.pile_set_name")
  p.add_argument("--text-key", default="text", help="field path of a record's text (default: text)")
  p.add_argument("--default-domain", default="default", help="domain of records when --domain-key is not set")
  p.add_argument("--validation-fraction", type=float, default=0.0,
                 help="fraction of documents held out (by content hash) as the validation split")
  p.add_argument("--workers", type=int, default=None, help="processes, >= 1 (default: one per core)")
  p.add_argument("--separator", default=None,
                 help="document separator token (default: the tokenizer's end-of-document token)")
  p.add_argument("--keep-parts", action="store_true", help="keep the per-file intermediate parts")
  p.add_argument("--text-lines", action="store_true",
                 help="plain-text inputs: one document per non-blank line (default: one document per file)")
  p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
  i = sub.add_parser("inspect", help="per-domain counts, bad records and decoded samples of a store")
  i.add_argument("store")
  i.add_argument("--sample-tokens", type=int, default=48)
  t = sub.add_parser(
      "pcfg-tasks", help="labelled PCFG sentences (the implicit-bias paper's downstream tasks A/B/C) as CSV text,label",
      description="Sentences of more than 4 words sampled from a grammar, each labelled by the nonterminal with the "
      "largest inside probability of a span (ties: S1, S2, ... first, then the other names sorted, as IB). A: the "
      "whole sentence, over the start symbol's unary children (IB's S1..Sn; builtin:demo's start symbol has none, so "
      "A is refused there: use builtin:ib_demo or an IB rule file); B: span [0,4) and C: span [0,2), over all "
      "nonterminals. Labels are IB's integers (A: S1 -> 0, ...; B/C: the position among all nonterminals sorted by "
      "name); OUTPUT.labels.json beside the CSV names them.")
  t.add_argument("--grammar", default="builtin:demo",
                 help="builtin:NAME, a rule file path, or ib:PATH / maxlm:PATH to force its format (default: "
                 "builtin:demo)")
  t.add_argument("--task", required=True, choices=("A", "B", "C"), help="which span and label set (see above)")
  t.add_argument("--num", type=int, required=True, help="number of sentences (rows)")
  t.add_argument("--seed", type=int, default=0, help="sampling seed (default 0); rows are a prefix-stable stream")
  t.add_argument("--max-words", type=int, default=31,
                 help="longest sentence kept (default 31, as IB's --length-limit 32)")
  t.add_argument("--skip-underived", action="store_true",
                 help="leave out sentences whose span no candidate nonterminal derives (otherwise they get the tie "
                 "label, S1 or the first candidate; the summary counts them)")
  t.add_argument("--output", required=True, help="CSV file to write, a new file (columns text,label; plus "
                 "OUTPUT.labels.json)")
  t.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier pcfg-tasks output")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from maxlm import data_pipelines  # pylint: disable=import-outside-toplevel

  def body():
    if args.command == "prepare":
      data_pipelines.prepare(args.input, args.tokenizer, args.output, text_key=args.text_key,
                             domain_key=args.domain_key, default_domain=args.default_domain,
                             validation_fraction=args.validation_fraction, workers=args.workers,
                             separator=args.separator, keep_parts=args.keep_parts, progress=not args.quiet,
                             text_lines=args.text_lines)
    elif args.command == "inspect":
      print(data_pipelines.inspect_store(args.store, sample_tokens=args.sample_tokens))
    else:
      from maxlm.data_pipelines import pcfg_tasks  # pylint: disable=import-outside-toplevel
      pcfg_tasks.check_output(args.output, overwrite=args.overwrite)
      task = pcfg_tasks.make_task(data_pipelines.load_grammar(args.grammar), args.task, args.num, args.seed,
                                  max_words=args.max_words, skip_underived=args.skip_underived)
      pcfg_tasks.write_task(args.output, task, overwrite=args.overwrite)
      print(pcfg_tasks.summarize(task, args.output), file=sys.stderr)

  return cli_exit_code(body)

if __name__ == "__main__":
  sys.exit(main())
