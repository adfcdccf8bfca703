"""MAUVE (EMO's language-modelling metric): a checkpoint's continuations of held-out document prefixes against the
documents' own continuations, both featurized by a local Hugging Face model, scored by the mauve-text package.

    python -m maxlm.evaluate mauve --checkpoint PATH --data FILE --prefix-tokens N --max-new-tokens M
        --featurizer HF_DIR [--num-samples K] [--seed S] [--output OUT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Optional

import numpy as np

from maxlm.checkpoint.spec import default_output, spec_path
from maxlm import model_text
from maxlm.core.errors import DataError, MaxlmError, cli_description, cli_exit_code

FEATURIZE_BATCH = 16
# As EMO's test_utils.test_batch: texts are prefix + continuation on both sides, and continuations have exactly the
# human continuation's length (transformers' min_new_tokens = max_new_tokens: no early EOS).
TEXTS = "prefix + continuation"


@dataclasses.dataclass
class Continuations:
  """Token ids per sample: the prefix, the document's next tokens (human) and the model's (generated)."""
  prefix: list[list[int]]
  human: list[list[int]]
  generated: list[list[int]]


def held_out_prefixes(data: str, codec, *, prefix_tokens: int, continuation_tokens: int, num_samples: int,
                      vocab_size: int, log=print) -> tuple[np.ndarray, dict]:
  """The first `num_samples` documents of `data` with at least prefix + continuation tokens, cut to that length
  (N, prefix + continuation); and counts of what was read."""
  need = prefix_tokens + continuation_tokens
  rows = model_text.document_rows(data, codec, seq_len=need, vocab_size=vocab_size, special_tokens=False, log=log)
  long_enough = np.flatnonzero(rows.mask.sum(axis=1) == need)
  if len(long_enough) == 0:
    raise DataError(f"no document of {data} has --prefix-tokens + --max-new-tokens = {need} tokens: lower them or "
                    f"pass longer documents")
  chosen = long_enough[:num_samples] if num_samples > 0 else long_enough
  counts = {"read": int(len(rows.ids)), "long_enough": int(len(long_enough)), "used": int(len(chosen))}
  return rows.ids[chosen], counts


def continue_prefixes(gen, codec, windows: np.ndarray, *, prefix_tokens: int, sampling, bos: list[int]
                      ) -> Continuations:
  """The model's continuations of each window's prefix, exactly as long as the window's rest (EOS suppressed)."""
  prefix = [[int(t) for t in w[:prefix_tokens]] for w in windows]
  human = [[int(t) for t in w[prefix_tokens:]] for w in windows]
  new = len(human[0])
  generated = gen([bos + p for p in prefix], max_new_tokens=new, sampling=sampling, eos_id=codec.eos_id,
                  min_new_tokens=new)
  return Continuations(prefix, human, generated)


def featurize(texts: list[str], featurizer: str, *, max_length: int = 1024, batch_size: int = FEATURIZE_BATCH
              ) -> np.ndarray:
  """(n, d) features as mauve computes them: each text tokenized by the featurizer's tokenizer (truncated to
  max_length), the last layer's hidden state at its last token; from a local HF directory, nothing downloaded."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoModel, AutoTokenizer  # pylint: disable=import-outside-toplevel
  check_featurizer(featurizer)
  try:
    tokenizer = AutoTokenizer.from_pretrained(featurizer, local_files_only=True)
    model = AutoModel.from_pretrained(featurizer, local_files_only=True).eval()
  except (OSError, ValueError) as e:
    raise DataError(f"cannot load the featurizer {featurizer}: {e}") from None
  encoded = [tokenizer.encode(t, truncation=True, max_length=max_length) for t in texts]
  empty = [i for i, e in enumerate(encoded) if not e]
  if empty:
    raise DataError(f"text {empty[0]} tokenizes to nothing with the featurizer's tokenizer")
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = model.to(device)
  features = []
  with torch.no_grad():
    for first in range(0, len(encoded), batch_size):
      chunk = encoded[first:first + batch_size]
      lengths = torch.tensor([len(e) for e in chunk])
      ids = torch.zeros((len(chunk), int(lengths.max())), dtype=torch.long)
      for i, e in enumerate(chunk):
        ids[i, :len(e)] = torch.tensor(e)
      mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
      out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                  return_dict=True)
      last = out.hidden_states[-1]
      features.append(last[torch.arange(len(chunk)), lengths.to(device) - 1].float().cpu().numpy())
  return np.concatenate(features)


def check_featurizer(featurizer: str) -> None:
  if not os.path.isfile(os.path.join(featurizer, "config.json")):
    raise DataError(f"--featurizer {featurizer!r} is not a local Hugging Face model directory (config.json, weights "
                    "and tokenizer, e.g. a saved gpt2-large): nothing is downloaded")


def score(p_features: np.ndarray, q_features: np.ndarray, *, seed: int) -> dict:
  """mauve.compute_mauve on precomputed features (p = human, q = model), with mauve's defaults otherwise."""
  try:
    import mauve  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise MaxlmError("mauve-text is not installed: pip install 'maxlm[eval]'") from None
  out = mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed, verbose=False)
  return {"mauve": float(out.mauve), "frontier_integral": float(out.frontier_integral),
          "mauve_star": float(out.mauve_star), "frontier_integral_star": float(out.frontier_integral_star),
          "num_buckets": int(out.num_buckets)}


def mauve_eval(checkpoint_path: str, data: str, *, prefix_tokens: int, max_new_tokens: int, featurizer: str,
               num_samples: int = 1000, sampling=None, featurize_max_length: int = 1024,
               output: Optional[str] = None, log=print) -> dict:
  """MAUVE of a checkpoint on a data file: generates, featurizes, scores; writes the JSON report and a JSONL of the
  samples beside it; returns the report."""
  from maxlm import decoding as gen_lib  # pylint: disable=import-outside-toplevel
  sampling = sampling or gen_lib.Sampling(temperature=1.0)
  if prefix_tokens < 1 or max_new_tokens < 1:
    raise DataError(f"--prefix-tokens ({prefix_tokens}) and --max-new-tokens ({max_new_tokens}) must be >= 1")
  featurizer = os.path.abspath(os.path.expanduser(featurizer))
  check_featurizer(featurizer)  # before generating, which takes the longest
  t0 = time.perf_counter()
  gen, codec, pre = gen_lib.load_generator(checkpoint_path, batch_size=32)
  bos = codec.before  # a window is text from inside a document; the prompt starts as the tokenizer starts a text
  if len(bos) + prefix_tokens + max_new_tokens > pre.cfg.model.max_positions:
    raise DataError(f"--prefix-tokens {prefix_tokens} + --max-new-tokens {max_new_tokens} exceed the model's "
                    f"max_positions {pre.cfg.model.max_positions}: lower them")
  windows, counts = held_out_prefixes(data, codec, prefix_tokens=prefix_tokens, continuation_tokens=max_new_tokens,
                                      num_samples=num_samples, vocab_size=pre.cfg.model.vocab_size, log=log)
  log(f"maxlm: continuing {len(windows)} prefixes of {prefix_tokens} tokens by {max_new_tokens} tokens")
  conts = continue_prefixes(gen, codec, windows, prefix_tokens=prefix_tokens, sampling=sampling, bos=bos)
  human_texts = [gen_lib.decode_ids(codec, p + h) for p, h in zip(conts.prefix, conts.human)]
  model_texts = [gen_lib.decode_ids(codec, p + g) for p, g in zip(conts.prefix, conts.generated)]
  t1 = time.perf_counter()
  p_features = featurize(human_texts, featurizer, max_length=featurize_max_length)
  q_features = featurize(model_texts, featurizer, max_length=featurize_max_length)
  t2 = time.perf_counter()
  report = score(p_features, q_features, seed=sampling.seed)
  report["settings"] = {
      "checkpoint": os.path.abspath(spec_path(checkpoint_path)), "step": pre.step,
      "data": os.path.abspath(data),
      "prefix_tokens": prefix_tokens, "max_new_tokens": max_new_tokens, "num_samples": len(windows),
      "featurizer": featurizer, "featurize_max_length": featurize_max_length, "temperature": sampling.temperature,
      "top_k": sampling.top_k, "top_p": sampling.top_p, "seed": sampling.seed, "texts": TEXTS,
      "continuations": "exactly max_new_tokens tokens each (EOS suppressed)", "p": "human", "q": "model"}
  report["documents"] = counts
  report["seconds"] = {"generate": t1 - t0, "featurize": t2 - t1, "mauve": time.perf_counter() - t2}
  tag = os.path.basename(os.path.normpath(data)).split(".")[0]
  output = output or default_output(checkpoint_path, pre.step, "mauve", tag)
  report["samples"] = _write(output, report, conts, human_texts, model_texts)
  log(f"MAUVE {report['mauve']:.4f} (frontier integral {report['frontier_integral']:.4f}) over {len(windows)} "
      f"samples; wrote {output}")
  report["output"] = output
  return report


def _write(output: str, report: dict, conts: Continuations, human_texts, model_texts) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  samples = os.path.splitext(output)[0] + ".samples.jsonl"
  with open(samples, "w", encoding="utf-8") as f:
    for i, (h, m) in enumerate(zip(human_texts, model_texts)):
      f.write(json.dumps({"human": h, "model": m, "prefix_ids": conts.prefix[i], "human_ids": conts.human[i],
                          "model_ids": conts.generated[i]}, ensure_ascii=False) + "\n")
  with open(output, "w") as f:
    json.dump(dict(report, samples=samples), f, indent=2)
  return samples


# ----------------------------------------------------------------------------- CLI (python -m maxlm.evaluate mauve)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m maxlm.evaluate mauve", description=cli_description(__doc__))
  p.add_argument("--checkpoint", required=True, help="run directory, RUN@STEP or Hugging Face model directory")
  p.add_argument("--data", required=True, help="held-out documents: JSONL (text or ids) or plain text, one per line")
  p.add_argument("--prefix-tokens", type=int, required=True, help="tokens of each document given to the model")
  p.add_argument("--max-new-tokens", type=int, required=True, help="continuation length (model and human)")
  p.add_argument("--featurizer", required=True, help="local HF model directory for the features (e.g. gpt2-large)")
  p.add_argument("--num-samples", type=int, default=1000, help="documents used, in file order (0 = all)")
  p.add_argument("--seed", type=int, default=0, help="sampling and MAUVE's k-means seed")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; default: pure sampling")
  p.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest tokens (0 = all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  p.add_argument("--featurize-max-length", type=int, default=1024, help="featurizer tokens per text (mauve's)")
  p.add_argument("--output", default=None, help="JSON path (default: RUN_DIR/eval/mauve_stepN_DATA.json)")
  return p


def main(argv: Optional[list[str]] = None) -> int:
  args = build_parser().parse_args(argv)

  def run():
    from maxlm.decoding import Sampling  # pylint: disable=import-outside-toplevel
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    mauve_eval(args.checkpoint, args.data, prefix_tokens=args.prefix_tokens, max_new_tokens=args.max_new_tokens,
               featurizer=args.featurizer, num_samples=args.num_samples, sampling=sampling,
               featurize_max_length=args.featurize_max_length, output=args.output)

  return cli_exit_code(run)
