"""Token difficulty (the MiLe paper's analysis; maxlm's definition): CE, perplexity and predictive entropy of target
tokens bucketed by their training frequency, for one or more checkpoints, as JSON and a grouped bar plot.

Buckets: token types sorted by training count (descending, ties by id); a type's share is the fraction of training
occurrences held by the types before it; frequent: share < 0.80, medium: < 0.95, rare: the rest (unseen types too).
So the type that crosses 80% is frequent, and the buckets hold about 80 / 15 / 5% of the training occurrences.
Evaluation: documents as hessian-trace reads them (labels = input ids, pads ignored); a target token is counted in
its type's bucket; per bucket the mean CE over those targets, exp of it, and the mean entropy (natural log) of the
prediction. The occurrence-weighted mean of the bucket CEs is the overall CE.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from maxlm import pretrained
from maxlm.analysis.common import analysis_config, check_output_dir, load_on_mesh, savefig, scoring_batch
from maxlm.analysis.common import scored_rows, write_json
from maxlm.core import sharding
from maxlm.core.compile_cache import CompileCache
from maxlm.core.errors import DataError, cli_description

COMMAND = "maxlm.analyze token-difficulty"
BUCKETS = (("frequent", 0.80), ("medium", 0.95), ("rare", 1.0))
COUNT_CHUNK = 1 << 22  # tokens read from a store per request


# ----------------------------------------------------------------------------- counts and buckets


def store_counts(path: str, split: str = "train") -> np.ndarray:
  """(vocab,) int64 occurrences of every token id in a token store's `split`, over all its domains."""
  from maxlm.data_pipelines.token_store import TokenStore  # pylint: disable=import-outside-toplevel
  store = TokenStore(path)
  counts = np.zeros(store.vocab_size, np.int64)
  for domain in store.domains:
    n = store.num_tokens(domain, split)
    for start in range(0, n, COUNT_CHUNK):
      tokens = np.asarray(store.read(domain, split, start, min(start + COUNT_CHUNK, n)), np.int64)
      counts += np.bincount(tokens, minlength=len(counts))[:len(counts)]
  return counts


def load_counts(spec: str, vocab_size: int, tokenizer_vocab: Optional[int] = None) -> np.ndarray:
  """Training counts from a store directory (its train split) or a (vocab,) .npy array, padded with zeros to the
  model's vocabulary (ids a store never saw are unseen types). Their length must be the model's vocabulary or its
  tokenizer's (`tokenizer_vocab`, when known): counts of any other length come from another tokenizer."""
  if os.path.isdir(spec):
    counts = store_counts(spec)
  elif spec.endswith(".npy") and os.path.isfile(spec):
    try:
      counts = np.load(spec, allow_pickle=False)
    except ValueError as e:
      raise DataError(f"--counts {spec} is not a readable .npy array: {e}") from None
  else:
    raise DataError(f"--counts {spec!r} is neither a token store directory nor an existing .npy file of per-token "
                    "training counts (shape (vocab,))")
  if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.number):
    raise DataError(f"--counts {spec}: expected a 1-D numeric array of per-token counts, got {counts.dtype} "
                    f"{counts.shape}")
  if np.any(counts < 0) or not np.all(np.isfinite(counts)):
    raise DataError(f"--counts {spec} holds negative or non-finite counts")
  allowed = sorted({vocab_size} | ({tokenizer_vocab} if tokenizer_vocab else set()))
  if len(counts) not in allowed:
    tok = f" and its tokenizer {tokenizer_vocab}" if tokenizer_vocab and tokenizer_vocab != vocab_size else ""
    raise DataError(f"--counts {spec} has {len(counts)} entries but the model's vocabulary has {vocab_size}{tok}: "
                    "the counts come from another tokenizer; count the checkpoint's own training data (its token "
                    "store directory, or a .npy of one count per token id)")
  if counts.sum() <= 0:
    raise DataError(f"--counts {spec} holds no occurrences")
  return np.concatenate([counts.astype(np.float64), np.zeros(vocab_size - len(counts))])


def bucket_of_types(counts: np.ndarray) -> np.ndarray:
  """(vocab,) bucket index (0 frequent, 1 medium, 2 rare) of every token type (module docstring)."""
  order = np.lexsort((np.arange(len(counts)), -counts))  # count descending, then id ascending
  share_before = np.concatenate([[0.0], np.cumsum(counts[order])[:-1]]) / counts.sum()
  bucket = np.zeros(len(counts), np.int64)
  bucket[order] = np.searchsorted(np.asarray([b for _, b in BUCKETS[:-1]]), share_before, side="right")
  return bucket


# ----------------------------------------------------------------------------- scoring


def token_stats(pre: pretrained.Pretrained, batch: dict, *, batch_size: int = 16) -> dict:
  """Per-target ce, entropy and the target ids (flat, valid targets only) of a model on an LM batch, through
  maxlm.state.step.token_statistics (the logits are never built), fp32. The params are placed already (load_on_mesh
  on one device)."""
  import jax  # pylint: disable=import-outside-toplevel
  cfg = analysis_config(pre.cfg)
  step = STATS_STEPS(cfg.model, cfg.loss.ignore_index)
  ce, entropy, targets = [], [], []
  n = len(batch["inputs"])
  for start in range(0, n, batch_size):
    part = {"inputs": _padded(batch["inputs"][start:start + batch_size], batch_size, 0),
            "targets": _padded(batch["targets"][start:start + batch_size], batch_size, cfg.loss.ignore_index)}
    if "segment_ids" in batch:  # a masked LM's rows: padding is its own segment
      part["segment_ids"] = _padded(batch["segment_ids"][start:start + batch_size], batch_size, 0)
    stats = jax.device_get(step(pre.params, part))
    valid = stats["mask"] > 0
    ce.append(stats["ce"][valid])
    entropy.append(stats["entropy"][valid])
    targets.append(part["targets"][valid])
  return {"ce": np.concatenate(ce).astype(np.float64), "entropy": np.concatenate(entropy).astype(np.float64),
          "targets": np.concatenate(targets)}


def _build_stats_step(model_cfg, ignore_index: int):
  """The jitted token_statistics of one model (fp32)."""
  from maxlm import model as model_lib  # pylint: disable=import-outside-toplevel
  from maxlm.core.config import Config  # pylint: disable=import-outside-toplevel
  from maxlm.state.step import make_token_stats_step  # pylint: disable=import-outside-toplevel
  cfg = Config(model=model_cfg)
  cfg.loss.ignore_index = ignore_index
  return make_token_stats_step(cfg, model_lib.abstract_model(model_cfg)[0], compute_dtype="float32")


# One compile per model: the checkpoints of a run share it.
STATS_STEPS = CompileCache(_build_stats_step)


def _padded(x: np.ndarray, rows: int, fill: int) -> np.ndarray:
  """A last partial chunk filled to `rows` rows (targets ignored there), so the step compiles once."""
  if len(x) == rows:
    return x
  return np.concatenate([x, np.full((rows - len(x),) + x.shape[1:], fill, x.dtype)])


def bucket_report(stats: dict, bucket: np.ndarray) -> dict:
  """{bucket name: {types, occurrences, ce, ppl, entropy}} plus "overall" (ce/ppl/entropy None for an empty one)."""
  report = {}
  target_bucket = bucket[stats["targets"]]
  for index, (name, _) in enumerate(BUCKETS + (("overall", None),)):
    chosen = target_bucket == index if name != "overall" else np.ones(len(target_bucket), bool)
    types = int(np.sum(bucket == index)) if name != "overall" else int(len(bucket))
    n = int(chosen.sum())
    ce = float(stats["ce"][chosen].mean()) if n else None
    report[name] = {"types": types, "occurrences": n, "ce": ce,
                    "ppl": math.exp(min(ce, 700.0)) if ce is not None else None,
                    "entropy": float(stats["entropy"][chosen].mean()) if n else None}
  return report


def token_difficulty(checkpoints: list[str], data: str, counts: str, *, seq_len: Optional[int] = None,
                     max_docs: int = 0, batch_size: int = 16, log=print) -> dict:
  """The per-bucket report of every checkpoint (RUN@all expands) on one data file; all share the buckets of
  `counts`, so their vocabularies must agree."""
  specs = [s for spec in checkpoints for s in pretrained.expand(spec)]
  out = {"data": os.path.abspath(data), "counts": os.path.abspath(counts),
         "buckets": {name: share for name, share in BUCKETS}, "checkpoints": []}
  bucket, vocab = None, None
  for spec in specs:
    pre, _ = load_on_mesh(spec, lambda cfg: sharding.single_device_mesh(), dtype=np.float32)
    if vocab is None:
      vocab = pre.cfg.model.vocab_size
      train_counts = load_counts(counts, vocab, _tokenizer_vocab(pre.cfg))
      bucket = bucket_of_types(train_counts)
      out["train_occurrences"] = {name: float(train_counts[bucket == i].sum()) for i, (name, _) in
                                  enumerate(BUCKETS)}
    elif pre.cfg.model.vocab_size != vocab:
      raise DataError(f"{spec} has vocab_size {pre.cfg.model.vocab_size} but {specs[0]} has {vocab}: compare "
                      "checkpoints of one tokenizer")
    length = seq_len or pre.cfg.train.seq_len
    rows = scored_rows(pre, data, seq_len=length, max_docs=max_docs, log=log)
    # A masked LM is scored on masked-token CE, the masks fixed (seed 0): the occurrences are the masked targets.
    stats = token_stats(pre, scoring_batch(pre.cfg, rows.ids, rows.mask), batch_size=batch_size)
    out["checkpoints"].append({"checkpoint": spec, "step": pre.step, "seq_len": length,
                               "buckets": bucket_report(stats, bucket)})
  return out


def _tokenizer_vocab(cfg) -> Optional[int]:
  """How many ids the checkpoint's tokenizer has (a PCFG's words, a tokenizer file's), or None when unknown."""
  from maxlm.data_pipelines.text_tokenizer import tokenizer_vocab_size  # pylint: disable=import-outside-toplevel
  from maxlm.data_pipelines.tokenization import run_tokenizer  # pylint: disable=import-outside-toplevel
  kind, what = run_tokenizer(cfg.data)
  try:
    if kind == "pcfg":
      return what.vocab_size
    return tokenizer_vocab_size(what) if kind == "file" else None
  except DataError:
    return None


# ----------------------------------------------------------------------------- plot and CLI


def plot(report: dict, path: str, *, overwrite: bool = False) -> None:
  """Grouped bars: per bucket (and overall), one bar per checkpoint; CE on the left, entropy on the right."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = [n for n, _ in BUCKETS] + ["overall"]
  runs = report["checkpoints"]
  width = 0.8 / max(1, len(runs))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in ((axes[0], "ce", "mean CE (nats)"), (axes[1], "entropy", "mean entropy (nats)")):
    for i, run in enumerate(runs):
      values = [run["buckets"][n][key] if run["buckets"][n][key] is not None else 0.0 for n in names]
      ax.bar(np.arange(len(names)) + (i - (len(runs) - 1) / 2) * width, values, width, label=_short(run))
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel(label)
  axes[0].legend(fontsize="small")
  fig.suptitle("token difficulty by training frequency (frequent 80% / medium 15% / rare 5% of occurrences)")
  fig.tight_layout()
  try:
    savefig(fig, path, COMMAND, overwrite=overwrite, dpi=120)
  finally:
    plt.close(fig)


def _short(run: dict) -> str:
  path, step = pretrained.split_spec(run["checkpoint"])
  name = os.path.basename(os.path.normpath(path))
  return f"{name}@{run['step']}" if run["step"] is not None else name


def add_parser(subparsers) -> None:
  p = subparsers.add_parser("token-difficulty", help="CE / entropy by training-frequency bucket (MiLe analysis)",
                            description=cli_description(__doc__))
  p.add_argument("--checkpoint", required=True, action="append",
                 help="run dir, RUN@STEP, RUN@all or HF model dir; repeat to compare several")
  p.add_argument("--data", required=True, help="JSONL (`text` or `ids`) or plain text, one document per line")
  p.add_argument("--seq-len", type=int, default=None, help="row length (default: each run's train.seq_len)")
  p.add_argument("--counts", required=True,
                 help="token store directory (its train split is counted) or a (vocab,) .npy array of counts")
  p.add_argument("--max-docs", type=int, default=0, help="first N documents only (0 = all)")
  p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
  p.add_argument("--output", required=True, help="directory for token_difficulty.json and token_difficulty.png")
  p.add_argument("--overwrite", action="store_true",
                 help="replace those two files if they are an earlier output of token-difficulty")
  p.set_defaults(func=_cli)


def _cli(args) -> dict:
  output = check_output_dir(args.output, COMMAND, ("token_difficulty.json", "token_difficulty.png"),
                            overwrite=args.overwrite)
  report = token_difficulty(args.checkpoint, args.data, args.counts, seq_len=args.seq_len, max_docs=args.max_docs,
                            batch_size=args.batch_size)
  write_json(os.path.join(output, "token_difficulty.json"), report, COMMAND, overwrite=args.overwrite)
  plot(report, os.path.join(output, "token_difficulty.png"), overwrite=args.overwrite)
  for run in report["checkpoints"]:
    cells = "  ".join(f"{n} {b['ce']:.3f}" if b["ce"] is not None else f"{n} -" for n, b in run["buckets"].items())
    print(f"{_short(run)}: CE {cells}")
  print(f"wrote {os.path.join(args.output, 'token_difficulty.json')} and token_difficulty.png")
  return report
