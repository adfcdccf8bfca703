"""MAUVE (EMO's language-modelling metric): a checkpoint's continuations of held-out document prefixes against the
documents' own continuations, both featurized by a local Hugging Face model, scored by the mauve-text package.

    python -m maxlm.evaluate mauve --checkpoint PATH --data FILE --prefix-tokens N --max-new-tokens M
        --featurizer HF_DIR [--num-samples K] [--seed S] [--output OUT.json]
    python -m maxlm.evaluate mauve --checkpoint PATH --data FILE --split words --prefix-words 20
        --continuation-words 80 --max-new-tokens 80 --decoding unbiased --featurize-max-length 256 --featurizer HF_DIR

`--split tokens` cuts each document by tokens (prefix N tokens, both continuations exactly M tokens); `--split words`
is EMO's language-modelling split (DRSY/EMO language_modeling/test_utils.py test_batch): lines of at least 100
characters and prefix + continuation + 10 words without "==", the prefix their first P whitespace words, the human
continuation the next C words, the model's exactly M new tokens. `--decoding` names EMO's decoding modes.
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
from maxlm.core.outputs import check_file, write_text

COMMAND = "maxlm.evaluate mauve"

FEATURIZE_BATCH = 16
# As EMO's test_utils.test_batch: texts are prefix + continuation on both sides, and continuations have exactly the
# human continuation's length (transformers' min_new_tokens = max_new_tokens: no early EOS).
TEXTS = "prefix + continuation"
# EMO's run_lm.py --decoding_mode: the sampling each mode means (test_batch's generate arguments); typical is not here.
DECODING = {"unbiased": dict(temperature=1.0, top_k=0, top_p=1.0), "top_k": dict(temperature=1.0, top_k=50, top_p=1.0),
            "top_p": dict(temperature=1.0, top_k=0, top_p=0.95)}
# test_batch's filter: lines shorter than this many characters, or with fewer than prefix + continuation + this many
# words, or holding "==" (wikitext's headings) are skipped.
WORD_SPLIT_MIN_CHARS, WORD_SPLIT_SPARE_WORDS, WORD_SPLIT_SKIP = 100, 10, "=="


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


def held_out_word_prefixes(data: str, *, prefix_words: int, continuation_words: int, num_samples: int, log=print
                           ) -> tuple[list[str], list[str], dict]:
  """EMO's split of held-out documents (one per line of a text file, or JSONL `text`): (prefix texts, human
  continuation texts, counts); prefix = the first `prefix_words` whitespace words joined by single spaces, the human
  continuation the next `continuation_words`; documents filtered as WORD_SPLIT_* say; the first `num_samples` kept
  (0 = all)."""
  from maxlm.data_pipelines.raw_records import collect_documents  # pylint: disable=import-outside-toplevel
  if prefix_words < 1 or continuation_words < 1:
    raise DataError(f"--prefix-words ({prefix_words}) and --continuation-words ({continuation_words}) must be >= 1")
  docs = [d for group in collect_documents(data, log=log).values() for d in group if isinstance(d, str)]
  need = prefix_words + continuation_words + WORD_SPLIT_SPARE_WORDS
  kept = [d for d in docs if len(d) >= WORD_SPLIT_MIN_CHARS and len(d.split(" ")) >= need and WORD_SPLIT_SKIP not in d]
  if not kept:
    raise DataError(f"no document of {data} has {WORD_SPLIT_MIN_CHARS}+ characters and --prefix-words + "
                    f"--continuation-words + {WORD_SPLIT_SPARE_WORDS} = {need} words without {WORD_SPLIT_SKIP!r}: "
                    "lower them or pass longer documents")
  chosen = kept[:num_samples] if num_samples > 0 else kept
  # split(" ") as test_batch does: runs of spaces give empty words, which count.
  words = [d.split(" ") for d in chosen]
  prefixes = [" ".join(w[:prefix_words]) for w in words]
  human = [" ".join(w[prefix_words:prefix_words + continuation_words]) for w in words]
  return prefixes, human, {"read": len(docs), "long_enough": len(kept), "used": len(chosen)}


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


def mauve_eval(checkpoint_path: str, data: str, *, prefix_tokens: int = 0, max_new_tokens: int, featurizer: str,
               num_samples: int = 1000, sampling=None, featurize_max_length: int = 1024, split: str = "tokens",
               prefix_words: int = 20, continuation_words: int = 80,
               output: Optional[str] = None, overwrite: bool = False, log=print) -> dict:
  """MAUVE of a checkpoint on a data file: generates, featurizes, scores; writes the JSON report and a JSONL of the
  samples beside it (new files, or with `overwrite` earlier outputs of mauve); returns the report."""
  if output is not None:
    for path in (output, samples_path(output)):
      check_file(path, COMMAND, overwrite=overwrite)
  from maxlm import decoding as gen_lib  # pylint: disable=import-outside-toplevel
  sampling = sampling or gen_lib.Sampling(temperature=1.0)
  if split not in ("tokens", "words"):
    raise DataError(f"--split {split!r}: use tokens or words")
  if (split == "tokens" and prefix_tokens < 1) or max_new_tokens < 1:
    raise DataError(f"--prefix-tokens ({prefix_tokens}) and --max-new-tokens ({max_new_tokens}) must be >= 1")
  featurizer = os.path.abspath(os.path.expanduser(featurizer))
  check_featurizer(featurizer)  # before generating, which takes the longest
  t0 = time.perf_counter()
  gen, codec, pre = gen_lib.load_generator(checkpoint_path, batch_size=32)
  bos = codec.before  # a window is text from inside a document; the prompt starts as the tokenizer starts a text
  if split == "words":
    conts, human_texts, model_texts, counts = _continue_words(
        gen, codec, data, bos=bos, prefix_words=prefix_words, continuation_words=continuation_words,
        max_new_tokens=max_new_tokens, num_samples=num_samples, sampling=sampling,
        max_positions=pre.cfg.model.max_positions, log=log)
  else:
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
      "split": split, **({"prefix_words": prefix_words, "continuation_words": continuation_words} if split == "words"
                         else {"prefix_tokens": prefix_tokens}),
      "max_new_tokens": max_new_tokens, "num_samples": len(human_texts),
      "featurizer": featurizer, "featurize_max_length": featurize_max_length, "temperature": sampling.temperature,
      "top_k": sampling.top_k, "top_p": sampling.top_p, "seed": sampling.seed, "texts": TEXTS,
      "continuations": "exactly max_new_tokens tokens each (EOS suppressed)", "p": "human", "q": "model"}
  report["documents"] = counts
  report["seconds"] = {"generate": t1 - t0, "featurize": t2 - t1, "mauve": time.perf_counter() - t2}
  tag = os.path.basename(os.path.normpath(data)).split(".")[0]
  if output is None:
    output, overwrite = default_output(checkpoint_path, pre.step, "mauve", tag), True
  report["samples"] = _write(output, report, conts, human_texts, model_texts, overwrite)
  log(f"MAUVE {report['mauve']:.4f} (frontier integral {report['frontier_integral']:.4f}) over {len(human_texts)} "
      f"samples; wrote {output}")
  report["output"] = output
  return report


def _continue_words(gen, codec, data, *, bos, prefix_words, continuation_words, max_new_tokens, num_samples,
                    sampling, max_positions, log):
  """--split words: (Continuations, human texts, model texts, counts). Both texts are prefix + " " + continuation as
  test_batch joins the human side; the model's continuation is its exactly `max_new_tokens` tokens decoded."""
  from maxlm import decoding as gen_lib  # pylint: disable=import-outside-toplevel
  prefixes, human, counts = held_out_word_prefixes(data, prefix_words=prefix_words,
                                                   continuation_words=continuation_words, num_samples=num_samples,
                                                   log=log)
  prefix_ids = codec.encode_text(prefixes)
  longest = max(len(p) for p in prefix_ids)
  if len(bos) + longest + max_new_tokens > max_positions:
    raise DataError(f"a prefix of {prefix_words} words is {longest} tokens; with --max-new-tokens {max_new_tokens} "
                    f"that exceeds the model's max_positions {max_positions}: lower them")
  human_ids = codec.encode_text([" " + h for h in human])
  log(f"maxlm: continuing {len(prefixes)} prefixes of {prefix_words} words by {max_new_tokens} tokens")
  generated = gen([bos + p for p in prefix_ids], max_new_tokens=max_new_tokens, sampling=sampling,
                  eos_id=codec.eos_id, min_new_tokens=max_new_tokens)
  conts = Continuations([list(p) for p in prefix_ids], [list(h) for h in human_ids], generated)
  human_texts = [p + " " + h for p, h in zip(prefixes, human)]
  # The prefix's ids decode back to the prefix (byte-level BPE); the continuation's text then starts with its space.
  model_texts = [gen_lib.decode_ids(codec, list(p) + g) for p, g in zip(prefix_ids, generated)]
  return conts, human_texts, model_texts, counts


def samples_path(output: str) -> str:
  return os.path.splitext(os.path.abspath(os.path.expanduser(output)))[0] + ".samples.jsonl"


def _write(output: str, report: dict, conts: Continuations, human_texts, model_texts, overwrite: bool) -> str:
  samples = samples_path(output)
  lines = [json.dumps({"human": h, "model": m, "prefix_ids": conts.prefix[i], "human_ids": conts.human[i],
                       "model_ids": conts.generated[i]}, ensure_ascii=False) + "\n"
           for i, (h, m) in enumerate(zip(human_texts, model_texts))]
  write_text(samples, COMMAND, "".join(lines), overwrite=overwrite)
  write_text(output, COMMAND, json.dumps(dict(report, samples=samples), indent=2), overwrite=overwrite)
  return samples


# ----------------------------------------------------------------------------- CLI (python -m maxlm.evaluate mauve)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m maxlm.evaluate mauve", description=cli_description(__doc__))
  p.add_argument("--checkpoint", required=True, help="run directory, RUN@STEP or Hugging Face model directory")
  p.add_argument("--data", required=True, help="held-out documents: JSONL (text or ids) or plain text, one per line")
  p.add_argument("--split", choices=("tokens", "words"), default="tokens",
                 help="cut documents by tokens (--prefix-tokens) or as EMO does by words (--prefix-words, "
                      "--continuation-words)")
  p.add_argument("--prefix-tokens", type=int, default=0, help="--split tokens: tokens of each document given to the "
                                                             "model")
  p.add_argument("--prefix-words", type=int, default=20, help="--split words: words of the prefix (EMO: 20)")
  p.add_argument("--continuation-words", type=int, default=80, help="--split words: words of the human continuation")
  p.add_argument("--decoding", choices=sorted(DECODING), default=None,
                 help="EMO's decoding modes: unbiased = ancestral sampling (temperature 1, no top-k, no top-p), "
                      "top_k = 50, top_p = 0.95; replaces --temperature/--top-k/--top-p")
  p.add_argument("--max-new-tokens", type=int, required=True,
                 help="continuation length in tokens (model; and human with --split tokens)")
  p.add_argument("--featurizer", required=True, help="local HF model directory for the features (e.g. gpt2-large)")
  p.add_argument("--num-samples", type=int, default=1000, help="documents used, in file order (0 = all)")
  p.add_argument("--seed", type=int, default=0, help="sampling and MAUVE's k-means seed")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; default: pure sampling")
  p.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest tokens (0 = all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  p.add_argument("--featurize-max-length", type=int, default=1024, help="featurizer tokens per text (mauve's)")
  p.add_argument("--output", default=None, help="JSON path, a new file (default: "
                                                 "RUN_DIR/eval/mauve_stepN_DATA.json)")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier mauve output")
  return p


def decoding_knobs(decoding: Optional[str], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> dict:
  """Sampling knobs: a named EMO decoding mode, or the explicit ones (a mode with explicit knobs that differ from it
  is an error, not a silent choice)."""
  if decoding is None:
    return dict(temperature=temperature, top_k=top_k, top_p=top_p)
  knobs = DECODING[decoding]
  given = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  defaults = dict(temperature=1.0, top_k=0, top_p=1.0)
  clash = [k for k in given if given[k] != defaults[k] and given[k] != knobs[k]]
  if clash:
    raise DataError(f"--decoding {decoding} sets {knobs}; drop --{clash[0].replace('_', '-')} or --decoding")
  return dict(knobs)


def main(argv: Optional[list[str]] = None) -> int:
  args = build_parser().parse_args(argv)

  def run():
    from maxlm.decoding import Sampling  # pylint: disable=import-outside-toplevel
    sampling = Sampling(**decoding_knobs(args.decoding, args.temperature, args.top_k, args.top_p), seed=args.seed)
    if args.split == "tokens" and args.prefix_tokens < 1:
      raise DataError("--split tokens needs --prefix-tokens N (>= 1)")
    mauve_eval(args.checkpoint, args.data, prefix_tokens=args.prefix_tokens, max_new_tokens=args.max_new_tokens,
               split=args.split, prefix_words=args.prefix_words, continuation_words=args.continuation_words,
               featurizer=args.featurizer, num_samples=args.num_samples, sampling=sampling,
               featurize_max_length=args.featurize_max_length, output=args.output,
               overwrite=args.overwrite)

  return cli_exit_code(run)
