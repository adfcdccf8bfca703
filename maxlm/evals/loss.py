"""Loss and perplexity of a checkpoint in JAX, per domain, on a token store, a text/JSONL file or the run's own
held-out data (SFT records with prompt tokens ignored), never building the (tokens x vocab) logits."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

from maxlm import pretrained
from maxlm.checkpoint.spec import default_output, spec_path
from maxlm.core.config import Config
from maxlm.core.errors import DataError
from maxlm.core.outputs import check_file, write_text

COMMAND = "maxlm.evaluate"


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
    batches = eval_windows(lambda s, e: tokens[s:e], len(tokens), seq_len, batch_size, None,
                           num_batches or sys.maxsize, separator_id, document_masking)
    if batches:
      out[domain] = batches
  return out


# ----------------------------------------------------------------------------- loss in JAX


def make_loss_fn(cfg: Config, compute_dtype: str):
  """jit(params, batch) -> (sum of token CE, valid token count) by maxlm.state.step.ce_sum, never materialising the
  (N, V) logits; one device."""
  import jax  # pylint: disable=import-outside-toplevel
  from maxlm import model as model_lib  # pylint: disable=import-outside-toplevel
  from maxlm.state.step import ce_sum  # pylint: disable=import-outside-toplevel

  graphdef = model_lib.abstract_model(cfg.model)[0]
  return jax.jit(lambda params, batch: ce_sum(cfg, graphdef, params, batch, compute_dtype=compute_dtype))


def loss_report(cfg: Config, params: dict, batches: dict[str, list[dict]], *, compute_dtype: str,
                progress: bool = True) -> dict:
  """{'domains': {d: {loss, perplexity, tokens}}, 'uniform_avg', 'worst', 'token_weighted'} in nats/token; a
  progress bar on stderr over the batches unless `progress` is False."""
  import jax  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  params = jax.device_put(params)
  loss_fn = make_loss_fn(cfg, compute_dtype)
  domains = {}
  bar = tqdm(total=sum(len(b) for b in batches.values()), desc="evaluate", unit="batch", disable=not progress,
             file=sys.stderr, dynamic_ncols=True)
  for domain, domain_batches in batches.items():
    total, count = 0.0, 0.0
    bar.set_postfix(domain=domain)
    for batch in domain_batches:
      s, n = loss_fn(params, {k: np.asarray(v) for k, v in batch.items()})
      total, count = total + float(s), count + float(n)
      bar.update(1)
    if count:
      mean = total / count
      domains[domain] = {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(count)}
  bar.close()
  if not domains:
    raise DataError("the evaluation data produced no target tokens (too short for one window?)")
  losses = [d["loss"] for d in domains.values()]
  weighted = sum(d["loss"] * d["tokens"] for d in domains.values()) / sum(d["tokens"] for d in domains.values())
  return {"domains": domains,
          "uniform_avg": {"loss": float(np.mean(losses)), "perplexity": math.exp(min(np.mean(losses), 700.0))},
          "worst": {"domain": max(domains, key=lambda d: domains[d]["loss"]), "loss": max(losses)},
          "token_weighted": {"loss": weighted, "perplexity": math.exp(min(weighted, 700.0))}}


def evaluate(checkpoint_path: str, data: Optional[str] = None, *, step: Optional[int] = None,
             seq_len: Optional[int] = None, batch_size: int = 8, num_batches: int = 0,
             compute_dtype: Optional[str] = None, text_field: str = "text", domain_field: str = "",
             data_format: str = "text", output: Optional[str] = None, overwrite: bool = False, progress: bool = True,
             log=print) -> dict:
  """Loss and perplexity of a checkpoint on `data`: a token store directory, a .jsonl/.txt file, or (None) the
  run's own held-out data. num_batches 0 = all of a file / 64 batches of a store. data_format "sft": `data` is
  instruction data (Alpaca JSON / chat JSONL), scored on response tokens only. Writes and returns the JSON
  (`output`: a new file, or with `overwrite` an earlier output of evaluate; the default RUN_DIR/eval/ name replaces
  only evaluate's own earlier file)."""
  for flag, value, least in (("--batch-size", batch_size, 1), ("--num-batches", num_batches, 0),
                             ("--seq-len", seq_len if seq_len is not None else 1, 1)):
    if value < least:
      raise DataError(f"{flag} {value} must be >= {least}")
  if output is not None:
    output = check_file(output, COMMAND, overwrite=overwrite)  # before the work, not after it
  pre = pretrained.load_one(checkpoint_path, step)
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
  report = loss_report(cfg, params, batches, compute_dtype=compute_dtype, progress=progress)
  report.update(checkpoint=os.path.abspath(spec_path(checkpoint_path)), step=step,
                data=os.path.abspath(data) if data else f"run data ({cfg.data.source})",
                seq_len=seq_len, seconds=time.perf_counter() - t0)
  if output is None:
    tag = os.path.basename(os.path.normpath(data)).split(".")[0] if data else "run_data"
    output, overwrite = default_output(checkpoint_path, step, "loss", tag), True
  output = write_text(output, COMMAND, json.dumps(report, indent=2), overwrite=overwrite)
  for domain, r in sorted(report["domains"].items()):
    log(f"{domain:>24s}  loss {r['loss']:.4f}  ppl {r['perplexity']:10.3f}  ({r['tokens']:,} tokens)")
  log(f"{'uniform avg':>24s}  loss {report['uniform_avg']['loss']:.4f}  ppl "
      f"{report['uniform_avg']['perplexity']:10.3f}   worst: {report['worst']['domain']}")
  log(f"wrote {output}")
  report["output"] = output
  return report
