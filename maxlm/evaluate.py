"""Evaluation of a checkpoint: loss and perplexity in JAX (per domain) on a token store, text/JSONL file or the
run's own held-out data, and lm-evaluation-harness on the exported HF model (cached per step).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from maxlm.core.errors import cli_exit_code
from maxlm.evals.harness import harness
from maxlm.evals.loss import evaluate



def _harness_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m maxlm.evaluate harness",
                              description="lm-evaluation-harness on the exported checkpoint")
  p.add_argument("--checkpoint", required=True, help="run directory, RUN@STEP or Hugging Face model directory")
  p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
  p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest finalised)")
  p.add_argument("--limit", type=float, default=None, help="examples per task (for quick checks)")
  p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
  p.add_argument("--device", default="cpu", help="torch device for lm-eval's hf model (cpu, cuda, cuda:0, ...)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the export and run")
  p.add_argument("--include-path", default=None, help="directory of local lm-eval task YAMLs")
  p.add_argument("--output", default=None,
                 help="results JSON, a new file (default: RUN_DIR/eval/harness_stepN_TASKS.json; for an HF directory "
                      "harness_NAME_TASKS.json in the working directory)")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier harness output")
  return p


def _loss_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m maxlm.evaluate",
                              description="loss and perplexity of a checkpoint (or: `harness --help`, `mauve -h`)")
  p.add_argument("--checkpoint", required=True, help="run directory, RUN@STEP or Hugging Face model directory")
  p.add_argument("--data", default=None, help="token store dir or .jsonl/.txt file (default: the run's data)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest finalised)")
  p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's train.seq_len)")
  p.add_argument("--batch-size", type=int, default=8, help="windows per batch")
  p.add_argument("--num-batches", type=int, default=0, help="per domain; 0 = a whole file / 64 store batches")
  p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"],
                 help="matmul dtype (default: the run's model.compute_dtype; float32 for an HF directory)")
  p.add_argument("--text-field", default="text", help="JSONL field path of a record's text")
  p.add_argument("--domain-field", default="", help="JSONL field path of the domain (default: domain, "
                                                   "meta.pile_set_name)")
  p.add_argument("--format", default="text", choices=["text", "sft"], dest="data_format",
                 help="sft: --data is instruction data (Alpaca JSON or chat JSONL), CE on response tokens only")
  p.add_argument("--output", default=None,
                 help="JSON path, a new file (default: RUN_DIR/eval/loss_stepN_DATA.json; for an HF directory "
                      "loss_NAME_DATA.json in the working directory)")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier evaluate output")
  return p


def build_parsers() -> dict[str, argparse.ArgumentParser]:
  """The parsers of `python -m maxlm.evaluate` (loss), `... harness` and `... mauve`."""
  from maxlm.evals import mauve as mauve_eval  # pylint: disable=import-outside-toplevel
  return {"loss": _loss_parser(), "harness": _harness_parser(), "mauve": mauve_eval.build_parser()}


def main(argv: Optional[list[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "mauve":
    from maxlm.evals import mauve as mauve_eval  # pylint: disable=import-outside-toplevel
    return mauve_eval.main(argv[1:])
  if argv and argv[0] == "harness":
    args = _harness_parser().parse_args(argv[1:])
    run = lambda: harness(args.checkpoint, [t for t in args.tasks.split(",") if t], step=args.step,  # noqa: E731
                          num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                          device=args.device, dtype=args.dtype, include_path=args.include_path, output=args.output,
                          overwrite=args.overwrite)
  else:
    args = _loss_parser().parse_args(argv)
    run = lambda: evaluate(args.checkpoint, args.data, step=args.step, seq_len=args.seq_len,  # noqa: E731
                           batch_size=args.batch_size, num_batches=args.num_batches,
                           compute_dtype=args.compute_dtype, text_field=args.text_field,
                           domain_field=args.domain_field, data_format=args.data_format, output=args.output,
                           overwrite=args.overwrite)
  return cli_exit_code(run)


if __name__ == "__main__":
  sys.exit(main())
