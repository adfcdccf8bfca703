"""Text generation from any checkpoint: batched prompts, left-padded, through maxlm.model's KV cache (one prefill, then
one jitted decode step per token), greedy or sampled (temperature, top-k, top-p, seed), stopping at EOS per row.

    python -m maxlm.generate --checkpoint PATH (--prompt TEXT | --prompts FILE.jsonl) [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--output FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from maxlm.core.errors import DataError, cli_exit_code
from maxlm.core.outputs import check_file, write_text
from maxlm.data_pipelines.raw_records import is_valid_unicode
from maxlm.decoding import Sampling, check_vocabulary, completion_text, load_generator

COMMAND = "maxlm.generate"


def read_prompts(path: str) -> list:
  """The prompts of a JSONL file: each line an object with a "prompt" (or "text") string, or "ids" (token ids used
  as they are, for a model without a tokenizer); blank lines skipped."""
  if not os.path.isfile(path):
    raise DataError(f"--prompts {path!r} does not exist: pass a JSONL file, one {{\"prompt\": ...}} per line")
  prompts = []
  with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first prompt
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise DataError(f"{path}:{n} is not valid JSON ({e}): one object per line, e.g. {{\"prompt\": \"...\"}}") \
            from None
      text = record.get("prompt", record.get("text", record.get("ids"))) if isinstance(record, dict) else None
      ids = isinstance(text, list) and text and all(isinstance(i, int) and not isinstance(i, bool) for i in text)
      if not isinstance(text, str) and not ids:
        raise DataError(f"{path}:{n} has no string \"prompt\" (or \"text\") field and no \"ids\" list of token ids")
      if isinstance(text, str) and not is_valid_unicode(text):
        raise DataError(f"{path}:{n}: the prompt holds a lone surrogate (a JSON \\ud800-\\udfff escape), which no "
                        "tokenizer can encode; fix or drop that line")
      prompts.append(text)
  if not prompts:
    raise DataError(f"{path} holds no prompts")
  return prompts


def generate(checkpoint_path: str, prompts: list, *, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
             output: Optional[str] = None, compute_dtype: Optional[str] = None, overwrite: bool = False,
             log=print) -> list[dict]:
  """Completions of prompts (text, encoded as transformers' tokenizer(prompt) does, LLaMA's <s> included; or lists
  of token ids, used as they are): [{"prompt", "completion", "completion_ids"}] in prompt order, written as JSONL
  to `output` (or printed to stdout). compute_dtype: default the checkpoint's (a run's model.compute_dtype, an HF
  directory's stored dtype). `output`: a new file, or with `overwrite` an earlier output of generate."""
  if output:
    output = check_file(output, COMMAND, overwrite=overwrite)
  texts = [p for p in prompts if isinstance(p, str)]
  gen, codec, pre = load_generator(checkpoint_path, compute_dtype=compute_dtype, need_tokenizer=bool(texts))
  encoded = iter(codec.encode_batch(texts) if texts else [])
  prompt_ids = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
  check_vocabulary(prompt_ids, pre.cfg.model.vocab_size)
  t0 = time.perf_counter()
  new_ids = gen(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
               eos_id=codec.eos_id if codec is not None else None)
  seconds = time.perf_counter() - t0
  records = [{"prompt": p, "completion": completion_text(codec, ids, new) if codec is not None else None,
              "completion_ids": new} for p, ids, new in zip(prompts, prompt_ids, new_ids)]
  lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  if output:
    write_text(output, COMMAND, lines, overwrite=overwrite)
  else:
    sys.stdout.write(lines)
    sys.stdout.flush()
  n_new = sum(len(r["completion_ids"]) for r in records)
  log(f"maxlm: {len(records)} completion(s), {n_new} new tokens in {seconds:.2f} s (compile included)"
      + (f"; wrote {output}" if output else ""))
  return records


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m maxlm.generate",
                              description="Continue prompts with a checkpoint's model (a KV cache: one prefill, then "
                                          "one jitted step per token); greedy, temperature, top-k, top-p.")
  p.add_argument("--checkpoint", required=True, help="run directory, RUN@STEP or Hugging Face model directory")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="one prompt")
  source.add_argument("--prompts", help="JSONL file, one {\"prompt\": TEXT} (or \"text\", or \"ids\": [token ids]) "
                                       "per line")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=None,
                 help="0 = greedy; default 0, or 1 when --top-k or --top-p is given")
  p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
  p.add_argument("--top-p", type=float, default=1.0, help="sample within the top-p probability mass (1 = off)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default=None, help="JSONL output, a new file (default: stdout)")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier generate output")
  p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                 help="dtype of the forward pass (default: the checkpoint's, a run's model.compute_dtype or an HF "
                      "directory's stored dtype; float32 reproduces transformers' fp32 greedy output)")
  return p


def main(argv: Optional[list[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  temperature = args.temperature
  if temperature is None:
    temperature = 1.0 if args.top_k or args.top_p < 1 else 0.0

  def run():
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    sampling = Sampling(temperature=temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    generate(args.checkpoint, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, output=args.output,
             compute_dtype=args.compute_dtype, overwrite=args.overwrite, log=lambda msg: print(msg, file=sys.stderr))

  return cli_exit_code(run)


if __name__ == "__main__":
  sys.exit(main())
