"""Evaluation of a checkpoint: loss and perplexity in JAX (per domain) on a token store, text/JSONL file or the
run's own held-out data, and lm-evaluation-harness on the exported HF model (cached per step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

from maxlm import checkpoint, pretrained
from maxlm.config import Config
from maxlm.errors import CheckpointError, DataError, MaxlmError, cli_exit_code



# ----------------------------------------------------------------------------- text files


def text_batches(docs: dict[str, list[str]], encode, separator_id: int, *, seq_len: int, batch_size: int,
                 num_batches: int, document_masking: bool = False) -> dict[str, list[dict]]:
  """Per domain: documents joined with the separator, cut into the store's validation windows (every token after
  the first a target exactly once; padding targets ignored). num_batches 0 = all."""
  from maxlm.data_pipelines import eval_windows  # pylint: disable=import-outside-toplevel
  out = {}
  for domain, texts in sorted(docs.items()):
    stream = []
    for ids in encode(texts):
      stream.extend(ids)
      stream.append(separator_id)
    tokens = np.asarray(stream, np.int32)
    batches = eval_windows(lambda s, e: tokens[s:e], len(tokens), seq_len, batch_size, num_batches or sys.maxsize,
                           0, 1, separator_id, document_masking)
    if batches:
      out[domain] = batches
  return out


# ----------------------------------------------------------------------------- loss in JAX


def make_loss_fn(cfg: Config, compute_dtype: str):
  """jit(params, batch) -> (sum of token CE, valid token count), never materialising the (N, V) logits."""
  import jax  # pylint: disable=import-outside-toplevel
  from maxlm import model as model_lib  # pylint: disable=import-outside-toplevel
  from maxlm.step import output_loss  # pylint: disable=import-outside-toplevel

  graphdef = model_lib.abstract_model(cfg.model)[0]

  def loss(params, batch):
    _, metrics = output_loss(cfg, graphdef, params, batch, objective="ce", compute_dtype=compute_dtype,
                             ignore_index=cfg.loss.ignore_index)
    return metrics["ce"] * metrics["n_valid"], metrics["n_valid"]

  return jax.jit(loss)


def loss_report(cfg: Config, params: dict, batches: dict[str, list[dict]], *, compute_dtype: str) -> dict:
  """{'domains': {d: {loss, perplexity, tokens}}, 'uniform_avg', 'worst', 'token_weighted'} in nats/token."""
  import jax  # pylint: disable=import-outside-toplevel
  params = jax.device_put(params)
  loss_fn = make_loss_fn(cfg, compute_dtype)
  domains = {}
  for domain, domain_batches in batches.items():
    total, count = 0.0, 0.0
    for batch in domain_batches:
      s, n = loss_fn(params, {k: np.asarray(v) for k, v in batch.items()})
      total, count = total + float(s), count + float(n)
    if count:
      mean = total / count
      domains[domain] = {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(count)}
  if not domains:
    raise DataError("the evaluation data produced no target tokens (too short for one window?)")
  losses = [d["loss"] for d in domains.values()]
  weighted = sum(d["loss"] * d["tokens"] for d in domains.values()) / sum(d["tokens"] for d in domains.values())
  return {"domains": domains,
          "uniform_avg": {"loss": float(np.mean(losses)), "perplexity": math.exp(min(np.mean(losses), 700.0))},
          "worst": {"domain": max(domains, key=lambda d: domains[d]["loss"]), "loss": max(losses)},
          "token_weighted": {"loss": weighted, "perplexity": math.exp(min(weighted, 700.0))}}


def one_checkpoint(checkpoint_path: str, step: Optional[int] = None) -> tuple[str, Optional[int]]:
  """(path, step or None) of the one checkpoint a spec (RUN, RUN@STEP, HF directory) and an optional --step name."""
  path, named = pretrained.split_spec(checkpoint_path)
  if named == "all":
    raise CheckpointError(f"{checkpoint_path}: evaluation takes one checkpoint; name a step (RUN@STEP) or none")
  if named is not None:
    if step is not None and int(named) != step:
      raise CheckpointError(f"{checkpoint_path} and --step {step} name different steps; give one of them")
    step = int(named)
  return path, step


def load_one(checkpoint_path: str, step: Optional[int] = None):
  """The maxlm.pretrained.Pretrained of one checkpoint: a run directory (its newest step, or `step`), RUN@STEP, or
  a Hugging Face directory."""
  path, step = one_checkpoint(checkpoint_path, step)
  return pretrained.load(path if step is None else f"{path}@{step}")


def default_output(checkpoint_path: str, step: Optional[int], what: str, tag: str) -> str:
  """Where an evaluation's JSON goes by default: RUN_DIR/eval/WHAT_stepN_TAG.json for a run's step; for a Hugging
  Face directory (step None; often read-only, a shared cache), WHAT_NAME_TAG.json in the working directory."""
  path = pretrained.split_spec(checkpoint_path)[0]
  if step is not None:
    return os.path.join(os.path.dirname(checkpoint.checkpoint_dir(path)), "eval", f"{what}_step{step}_{tag}.json")
  return os.path.abspath(f"{what}_{os.path.basename(os.path.normpath(path))}_{tag}.json")


def evaluate(checkpoint_path: str, data: Optional[str] = None, *, step: Optional[int] = None,
             seq_len: Optional[int] = None, batch_size: int = 8, num_batches: int = 0,
             compute_dtype: Optional[str] = None, text_field: str = "text", domain_field: str = "",
             data_format: str = "text", output: Optional[str] = None, log=print) -> dict:
  """Loss and perplexity of a checkpoint on `data`: a token store directory, a .jsonl/.txt file, or (None) the
  run's own held-out data. num_batches 0 = all of a file / 64 batches of a store. data_format "sft": `data` is
  instruction data (Alpaca JSON / chat JSONL), scored on response tokens only. Writes and returns the JSON."""
  pre = load_one(checkpoint_path, step)
  cfg, params, step = pre.cfg, pre.params, pre.step
  if data is None and pre.kind == "hf":
    raise DataError(f"{checkpoint_path} is a Hugging Face directory, which has no run data: pass --data (a token "
                    "store directory or a .jsonl/.txt file)")
  seq_len = seq_len or cfg.train.seq_len
  if seq_len > cfg.model.max_positions:
    raise DataError(f"--seq-len {seq_len} exceeds the model's max_positions {cfg.model.max_positions}")
  t0 = time.perf_counter()
  if data_format == "sft":
    from maxlm.data_pipelines import sft  # pylint: disable=import-outside-toplevel
    if not data:
      raise DataError("--format sft needs --data FILE (Alpaca JSON or chat JSONL)")
    batches = sft.file_batches(cfg.data, data, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches,
                               log=log)
  elif data and os.path.isfile(data):
    from maxlm.data_pipelines.raw_records import collect_documents  # pylint: disable=import-outside-toplevel
    from maxlm.data_pipelines.tokenization import run_encoder  # pylint: disable=import-outside-toplevel
    encode, sep, _ = run_encoder(cfg.data)
    docs = collect_documents(data, text_key=text_field, domain_key=domain_field, log=log)
    batches = text_batches(docs, encode, sep, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches,
                           document_masking=cfg.data.document_masking)
  else:
    import dataclasses  # pylint: disable=import-outside-toplevel
    from maxlm import data_pipelines  # pylint: disable=import-outside-toplevel
    data_cfg = cfg.data
    if data:
      if not os.path.isdir(data) and "://" not in data:
        raise DataError(f"--data {data!r} does not exist: pass a token store directory or a .jsonl/.txt file")
      data_cfg = dataclasses.replace(cfg.data, source="store", path=data)
    batches = data_pipelines.build_eval_batches(data_cfg, seq_len=seq_len, batch_size=batch_size,
                                                num_batches=num_batches or 64)
  vocab_top = max((int(b["inputs"].max()) for bs in batches.values() for b in bs), default=0)
  if vocab_top >= cfg.model.vocab_size:
    raise DataError(f"the data holds token id {vocab_top} but the model's vocab_size is {cfg.model.vocab_size}: "
                    "it was tokenized with another tokenizer")
  # An HF directory has no run to take a dtype from: fp32, as transformers loads it and the analysis tools run.
  compute_dtype = compute_dtype or (cfg.model.compute_dtype if pre.kind == "run" else "float32")
  report = loss_report(cfg, params, batches, compute_dtype=compute_dtype)
  report.update(checkpoint=os.path.abspath(pretrained.split_spec(checkpoint_path)[0]), step=step,
                data=os.path.abspath(data) if data else f"run data ({cfg.data.source})",
                seq_len=seq_len, seconds=time.perf_counter() - t0)
  if output is None:
    tag = os.path.basename(os.path.normpath(data)).split(".")[0] if data else "run_data"
    output = default_output(checkpoint_path, step, "loss", tag)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(report, f, indent=2)
  for domain, r in sorted(report["domains"].items()):
    log(f"{domain:>24s}  loss {r['loss']:.4f}  ppl {r['perplexity']:10.3f}  ({r['tokens']:,} tokens)")
  log(f"{'uniform avg':>24s}  loss {report['uniform_avg']['loss']:.4f}  ppl "
      f"{report['uniform_avg']['perplexity']:10.3f}   worst: {report['worst']['domain']}")
  log(f"wrote {output}")
  report["output"] = output
  return report


# ----------------------------------------------------------------------------- lm-evaluation-harness


def export_cached(checkpoint_path: str, step: Optional[int] = None, *, dtype: str = "float32", log=print) -> str:
  """The HF export of a step under RUN_DIR/hf/step_N, written once (atomically) and reused afterwards."""
  from maxlm import convert  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint.open_checkpoints(checkpoint_path)
  try:
    step = ckpt.resolve_step(step)
  finally:
    ckpt.close()
  run_dir = os.path.dirname(checkpoint.checkpoint_dir(checkpoint_path))
  out = os.path.join(run_dir, "hf", f"step_{step}_{dtype}")
  marker = os.path.join(out, "maxlm_export.json")
  if os.path.isfile(marker):
    log(f"using the cached export {out}")
    return out
  return convert.to_hf(checkpoint_path, out, step=step, dtype=dtype, overwrite=True, log=log)


def harness(checkpoint_path: str, tasks: list[str], *, step: Optional[int] = None, num_fewshot: Optional[int] = None,
            limit: Optional[float] = None, batch_size: int = 1, device: str = "cpu", dtype: str = "float32",
            include_path: Optional[str] = None, output: Optional[str] = None, log=print) -> dict:
  """Runs lm-evaluation-harness (model 'hf') on the exported checkpoint; saves the results JSON in the run dir."""
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel
    from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise MaxlmError("lm-evaluation-harness is not installed: pip install 'maxlm[eval]'") from None
  from maxlm.data_pipelines.tokenization import tokenizer_file_in  # pylint: disable=import-outside-toplevel
  path, step = one_checkpoint(checkpoint_path, step)
  if pretrained.is_hf_dir(os.path.expanduser(path)):  # already what lm-eval's hf model reads
    if step is not None:
      raise CheckpointError(f"{checkpoint_path}: a Hugging Face directory has no steps; drop the step")
    hf_dir = os.path.abspath(os.path.expanduser(path))
    if not tokenizer_file_in(hf_dir):
      raise MaxlmError(f"{hf_dir} has no tokenizer.json or tokenizer.model, which the harness needs to tokenize "
                       "its tasks; save the model's tokenizer into it (tokenizer.save_pretrained)")
  else:
    hf_dir = export_cached(path, step, dtype=dtype, log=log)
    with open(os.path.join(hf_dir, "maxlm_export.json")) as f:
      step = json.load(f)["step"]
    if not tokenizer_file_in(hf_dir):
      raise MaxlmError(f"the export {hf_dir} has no tokenizer (the run names none); set data.tokenizer in the "
                       "run's config so the harness can tokenize its tasks")
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise MaxlmError(f"unknown lm-eval task(s) {', '.join(unknown)}; pass --include-path DIR for local YAML tasks")
  try:
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": hf_dir, "dtype": dtype},
                                      tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size, device=device,
                                      limit=limit, task_manager=manager, log_samples=False)
  except (ConnectionError, OSError) as e:  # the datasets library on a machine without the task's data or network
    raise DataError(f"lm-evaluation-harness could not load the data of {', '.join(tasks)}: {e}. Fetch the datasets "
                    "into the Hugging Face cache where a network is available (HF_DATASETS_CACHE), or write a local "
                    "task (a YAML with dataset_path: json and local data_files) and pass --include-path") from None
  if results is None:  # non-primary ranks of a distributed harness run
    return {}
  summary = {"checkpoint": os.path.abspath(path), "step": step, "hf_dir": hf_dir, "tasks": tasks,
             "num_fewshot": num_fewshot, "limit": limit, "results": results.get("results", {}),
             "versions": results.get("versions", {}), "n-samples": results.get("n-samples", {}),
             "config": results.get("config", {})}
  if output is None:
    output = default_output(checkpoint_path, step, "harness", "_".join(tasks))
  os.makedirs(os.path.dirname(output), exist_ok=True)
  with open(output, "w") as f:
    json.dump(summary, f, indent=2, default=str)
  for task, metrics in summary["results"].items():
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    log(f"{task}: {shown}")
  log(f"wrote {output}")
  summary["output"] = output
  return summary


# ----------------------------------------------------------------------------- CLI


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
                 help="results JSON (default: RUN_DIR/eval/harness_stepN_TASKS.json; for an HF directory "
                      "harness_NAME_TASKS.json in the working directory)")
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
                 help="JSON path (default: RUN_DIR/eval/loss_stepN_DATA.json; for an HF directory "
                      "loss_NAME_DATA.json in the working directory)")
  return p


def build_parsers() -> dict[str, argparse.ArgumentParser]:
  """The parsers of `python -m maxlm.evaluate` (loss), `... harness` and `... mauve`."""
  from maxlm import mauve_eval  # pylint: disable=import-outside-toplevel
  return {"loss": _loss_parser(), "harness": _harness_parser(), "mauve": mauve_eval.build_parser()}


def main(argv: Optional[list[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "mauve":
    from maxlm import mauve_eval  # pylint: disable=import-outside-toplevel
    return mauve_eval.main(argv[1:])
  if argv and argv[0] == "harness":
    args = _harness_parser().parse_args(argv[1:])
    run = lambda: harness(args.checkpoint, [t for t in args.tasks.split(",") if t], step=args.step,  # noqa: E731
                          num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                          device=args.device, dtype=args.dtype, include_path=args.include_path, output=args.output)
  else:
    args = _loss_parser().parse_args(argv)
    run = lambda: evaluate(args.checkpoint, args.data, step=args.step, seq_len=args.seq_len,  # noqa: E731
                           batch_size=args.batch_size, num_batches=args.num_batches,
                           compute_dtype=args.compute_dtype, text_field=args.text_field,
                           domain_field=args.domain_field, data_format=args.data_format, output=args.output)
  return cli_exit_code(run)


if __name__ == "__main__":
  sys.exit(main())
