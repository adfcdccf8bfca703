"""`python -m maxlm.data`: prepare raw corpora into a token store, or inspect one.

Thin CLI over maxlm.data_pipelines.prepare / inspect_store; user errors print their fix and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys

from maxlm.errors import cli_exit_code


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m maxlm.data", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="tokenize raw text (JSONL/.gz/.zst, Parquet, text) into a token store")
  p.add_argument("--input", required=True, action="append",
                 help="glob of input files (quote it); repeat for several globs")
  p.add_argument("--tokenizer", required=True, help="local HF tokenizer.json or SentencePiece .model")
  p.add_argument("--output", required=True, help="store root: local path, gs://bucket/path or s3://bucket/path")
  p.add_argument("--domain-key", default="", help="field path of a record's domain, e.g. meta.pile_set_name")
  p.add_argument("--text-key", default="text", help="field path of a record's text (default: text)")
  p.add_argument("--default-domain", default="default", help="domain of records when --domain-key is not set")
  p.add_argument("--validation-fraction", type=float, default=0.0,
                 help="fraction of documents held out (by content hash) as the validation split")
  p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
  p.add_argument("--separator", default=None,
                 help="document separator token (default: the tokenizer's end-of-document token)")
  p.add_argument("--keep-parts", action="store_true", help="keep the per-file intermediate parts")
  p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
  i = sub.add_parser("inspect", help="per-domain counts, bad records and decoded samples of a store")
  i.add_argument("store")
  i.add_argument("--sample-tokens", type=int, default=48)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from maxlm import data_pipelines  # pylint: disable=import-outside-toplevel

  def body():
    if args.command == "prepare":
      data_pipelines.prepare(args.input, args.tokenizer, args.output, text_key=args.text_key,
                             domain_key=args.domain_key, default_domain=args.default_domain,
                             validation_fraction=args.validation_fraction, workers=args.workers,
                             separator=args.separator, keep_parts=args.keep_parts, progress=not args.quiet)
    else:
      print(data_pipelines.inspect_store(args.store, sample_tokens=args.sample_tokens))

  return cli_exit_code(body)

if __name__ == "__main__":
  sys.exit(main())
