"""Conversion between maxlm checkpoints and Hugging Face directories (LlamaForCausalLM, OlmoForCausalLM).

to-hf streams tensors from the checkpoint into safetensors shards of bounded size; from-hf imports an HF directory as
a params-only checkpoint. Outputs appear only when complete. The thin CLI over maxlm.hf.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from maxlm.core.config import check_command_line_overrides
from maxlm.core.errors import cli_description, cli_exit_code
from maxlm.hf.export import to_hf
from maxlm.hf.imports import from_hf
from maxlm.hf.tensors import DEFAULT_SHARD_BYTES, DTYPES



def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m maxlm.convert", description=cli_description(__doc__))
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("to-hf", help="maxlm checkpoint -> Hugging Face directory (config.json, safetensors, tokenizer)")
  p.add_argument("--checkpoint", required=True, help="run directory holding checkpoints/ (a training run, an import "
                                                      "or a derived checkpoint), or RUN@STEP")
  p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest finalised)")
  p.add_argument("--output", required=True, help="new directory for the HF model (written atomically)")
  p.add_argument("--dtype", default=None, choices=list(DTYPES),
                 help="dtype of the exported weights (default: the checkpoint's parameter dtype, float32 for maxlm's "
                      "presets, so transformers reproduces maxlm's logits; bfloat16 halves the files)")
  p.add_argument("--shard-size-mb", type=int, default=DEFAULT_SHARD_BYTES // 2 ** 20,
                 help="largest safetensors shard in MiB; export holds one shard in host memory at a time")
  p.add_argument("--overwrite", action="store_true",
                 help="replace --output if it is an earlier maxlm export (anything else is refused)")
  p.add_argument("--adapter", action="store_true",
                 help="LoRA runs: write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) "
                      "instead of the merged model")
  p = sub.add_parser("from-hf", help="Hugging Face directory (a family of docs/FAMILIES.md) -> maxlm checkpoint")
  p.add_argument("--model", required=True, help="local HF model directory (config.json + safetensors or .bin)")
  p.add_argument("--output", required=True, help="new run directory for the params-only checkpoint")
  p.add_argument("--config", default=None, help="preset or YAML for everything but the model (default: base)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace --output if it is an earlier maxlm import (anything else is refused)")
  p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. loss.objective=emo")
  return parser


def main(argv: Optional[list[str]] = None) -> int:
  args = build_parser().parse_args(argv)

  def body():
    if args.command == "to-hf":
      to_hf(args.checkpoint, args.output, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
            max_shard_bytes=args.shard_size_mb * 2 ** 20, adapter=args.adapter)
    else:
      check_command_line_overrides(args.overrides)
      from_hf(args.model, args.output, config=args.config, overrides=tuple(args.overrides),
              overwrite=args.overwrite)

  return cli_exit_code(body)


if __name__ == "__main__":
  sys.exit(main())
