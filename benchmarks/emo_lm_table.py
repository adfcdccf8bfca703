"""EMO's language-modelling table (EMO paper; DRSY/EMO language_modeling/run_lm_gpt2.sh) in one command: import a GPT-2,
fine-tune it with each objective, continue held-out prefixes by unbiased sampling, score MAUVE, print the table.

    python benchmarks/emo_lm_table.py --corpus FILE --gpt2 HF_DIR [--featurizer HF_DIR] [--demo] [--out DIR]

FILE is a text file, one document per line (wikitext-2-raw's lines as the script reads them). Its lines are split by
content hash (as `maxlm.data prepare --validation-fraction` splits them) into the training corpus and the held-out
documents, which serve both the validation CE and MAUVE's prefixes (the script takes two halves of wikitext's
validation split for those). Each objective runs the preset emo_lm_gpt2_{objective} (the `_demo` twin with --demo)
for one epoch of the store's training windows, from the same import. Then `evaluate` (validation CE / ppl over the
held-out store split) and `evaluate mauve --split words --prefix-words 20 --continuation-words 80 --max-new-tokens 80
--decoding unbiased --featurize-max-length 256` once per MAUVE seed (the script: 5 draws; mean and std here).

--demo: CPU scale. If --gpt2 names no model yet, a tiny random GPT-2 (transformers) with a byte-level BPE tokenizer
trained on the corpus' training lines is written there; it is first trained with CE on the corpus for
--demo-base-steps (the stand-in for a pretrained GPT-2, whose export is also the featurizer), then each objective
fine-tunes from that base. Writes OUT/emo_lm_table.json (settings, per objective and seed) and prints the table.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

OBJECTIVES = ("mle", "mixce", "tvd", "emo", "adaptive_emo")
DEFAULT_OBJECTIVES = "mle,mixce,tvd,emo"
TINY_GPT2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)
TINY_VOCAB = 1024


def split_corpus(corpus: str, out: str, fraction: float) -> tuple[str, int, int]:
  """Writes OUT/heldout.txt: the corpus lines `prepare` holds out at `fraction` (same content hash); returns its path
  and the counts (train, held out) of non-blank lines."""
  from maxlm.data_pipelines.prepare import is_validation
  with open(corpus, encoding="utf-8") as f:
    lines = [l.rstrip("\n") for l in f if l.strip()]
  held = [l for l in lines if is_validation(l.encode("utf-8"), fraction)]
  path = os.path.join(out, "heldout.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(held) + "\n")
  return path, len(lines) - len(held), len(held)


def make_tiny_gpt2(directory: str, corpus: str, fraction: float, seed: int = 0) -> None:
  """A random GPT2LMHeadModel of TINY_GPT2's size with a byte-level BPE tokenizer (TINY_VOCAB entries, <|endoftext|>
  as GPT-2's bos/eos) trained on the corpus' training lines, saved as a Hugging Face directory."""
  import tokenizers
  import torch
  import transformers
  from maxlm.data_pipelines.prepare import is_validation
  with open(corpus, encoding="utf-8") as f:
    train_lines = [l.strip() for l in f if l.strip() and not is_validation(l.rstrip("\n").encode("utf-8"), fraction)]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(train_lines, trainer)
  fast = transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
  eos = fast.convert_tokens_to_ids("<|endoftext|>")
  config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos, **TINY_GPT2)
  torch.manual_seed(seed)
  transformers.GPT2LMHeadModel(config).save_pretrained(directory)
  fast.save_pretrained(directory)


def train_run(preset: str, overrides: list[str]) -> dict:
  from maxlm.core.config import load_config
  from maxlm.run.loop import train
  cfg = load_config(preset, overrides)
  summary = train(cfg)
  losses = summary["losses"]
  return {"final_train_loss": float(losses[max(losses)]) if losses else float("nan"), "steps": summary["steps"]}


def validation(run_dir: str, store: str, out: str) -> dict:
  from maxlm.evals.loss import evaluate
  report = evaluate(run_dir, store, output=os.path.join(out, "validation.json"), overwrite=True, progress=False,
                    num_batches=0, log=lambda *_: None)
  ce = float(report["token_weighted"]["loss"])
  return {"validation_ce": ce, "validation_ppl": math.exp(ce)}


def mauve_runs(run_dir: str, heldout: str, featurizer: str, out: str, args) -> dict:
  from maxlm.decoding import Sampling
  from maxlm.evals.mauve import DECODING, mauve_eval
  scores = []
  for seed in args.mauve_seeds:
    report = mauve_eval(run_dir, heldout, split="words", prefix_words=args.prefix_words,
                        continuation_words=args.continuation_words, max_new_tokens=args.new_tokens,
                        featurizer=featurizer, num_samples=args.num_samples,
                        sampling=Sampling(**DECODING["unbiased"], seed=seed), featurize_max_length=256,
                        output=os.path.join(out, f"mauve_seed{seed}.json"), overwrite=True, log=lambda *_: None)
    scores.append(report["mauve"])
    samples = report["settings"]["num_samples"]
  return {"mauve": scores, "mauve_mean": statistics.mean(scores),
          "mauve_std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "mauve_samples": samples}


def table(rows: dict) -> str:
  head = f"{'objective':<14}{'train loss':>11}{'val CE':>9}{'val ppl':>10}{'MAUVE (mean +- std)':>23}"
  lines = [head, "-" * len(head)]
  for name, r in rows.items():
    train_loss = f"{r['final_train_loss']:.4f}" if "final_train_loss" in r else "-"
    lines.append(f"{name:<14}{train_loss:>11}{r['validation_ce']:>9.4f}{r['validation_ppl']:>10.2f}"
                 f"{r['mauve_mean']:>15.4f} +- {r['mauve_std']:.4f}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--corpus", required=True, help="text file, one document per line")
  p.add_argument("--gpt2", required=True, help="Hugging Face GPT-2 directory (with --demo: created if missing)")
  p.add_argument("--featurizer", default="", help="HF directory for MAUVE's features (the paper: gpt2-large; "
                                                  "default: --gpt2, with --demo the trained base)")
  p.add_argument("--demo", action="store_true", help="CPU scale: the *_demo presets, a tiny GPT-2 and its base run")
  p.add_argument("--out", default="", help="work directory (default runs/emo_lm_table, or runs/emo_lm_demo)")
  p.add_argument("--objectives", default=DEFAULT_OBJECTIVES, help=f"comma list from {','.join(OBJECTIVES)}")
  p.add_argument("--validation-fraction", type=float, default=None,
                 help="share of corpus lines held out (default 0.05; --demo 0.25, for enough MAUVE samples)")
  p.add_argument("--epochs", type=float, default=1.0, help="passes over the training windows (the script: 1)")
  p.add_argument("--mauve-seeds", default="0,1,2,3,4", help="sampling + k-means seeds, one MAUVE each")
  p.add_argument("--num-samples", type=int, default=4000, help="held-out documents continued (the script: 4000)")
  p.add_argument("--prefix-words", type=int, default=20)
  p.add_argument("--continuation-words", type=int, default=80)
  p.add_argument("--new-tokens", type=int, default=80)
  p.add_argument("--demo-base-steps", type=int, default=300, help="--demo: CE steps of the tiny base")
  args = p.parse_args(argv)
  if args.validation_fraction is None:
    args.validation_fraction = 0.25 if args.demo else 0.05
  args.mauve_seeds = [int(s) for s in args.mauve_seeds.split(",") if s.strip()]
  objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
  bad = [o for o in objectives if o not in OBJECTIVES]
  if bad:
    p.error(f"unknown objective(s) {bad}; choose from {OBJECTIVES}")
  out = os.path.abspath(args.out or ("runs/emo_lm_demo" if args.demo else "runs/emo_lm_table"))
  os.makedirs(out, exist_ok=True)
  suffix = "_demo" if args.demo else ""
  t_start = time.perf_counter()

  from maxlm.core.config import load_config
  from maxlm.data_pipelines.prepare import prepare
  from maxlm.hf.export import to_hf
  from maxlm.hf.imports import from_hf

  gpt2 = os.path.abspath(args.gpt2)
  if not os.path.isfile(os.path.join(gpt2, "config.json")):
    if not args.demo:
      p.error(f"--gpt2 {gpt2} holds no config.json: save GPT-2 there (transformers save_pretrained) first")
    print(f"building a tiny random GPT-2 with a BPE tokenizer trained on {args.corpus} in {gpt2}")
    make_tiny_gpt2(gpt2, args.corpus, args.validation_fraction)
  heldout, n_train, n_held = split_corpus(args.corpus, out, args.validation_fraction)
  store = os.path.join(out, "store")
  if not os.path.isfile(os.path.join(store, "manifest.json")):
    prepare([args.corpus], gpt2, store, validation_fraction=args.validation_fraction, text_lines=True, workers=1,
            progress=False)
  manifest = json.load(open(os.path.join(store, "manifest.json")))
  imported = os.path.join(out, "import")
  if not os.path.isdir(imported):
    from_hf(gpt2, imported, log=lambda *_: None)

  preset_cfg = load_config(f"emo_lm_gpt2_mle{suffix}")
  seq_len, batch = preset_cfg.train.seq_len, preset_cfg.train.global_batch
  train_tokens = sum(d["train"]["tokens"] for d in manifest["domains"].values())
  windows = (train_tokens - 1) // seq_len
  steps = max(1, math.ceil(args.epochs * windows / batch))
  print(f"corpus: {n_train} training lines ({train_tokens} tokens = {windows} windows of {seq_len}), {n_held} held "
        f"out; one epoch = {steps} steps of {batch}")

  start, featurizer = imported, os.path.abspath(args.featurizer) if args.featurizer else gpt2
  rows, settings = {}, {"corpus": os.path.abspath(args.corpus), "gpt2": gpt2, "demo": args.demo, "steps": steps,
                        "train_tokens": train_tokens, "heldout_documents": n_held,
                        "mauve_seeds": args.mauve_seeds, "prefix_words": args.prefix_words,
                        "continuation_words": args.continuation_words, "new_tokens": args.new_tokens,
                        "decoding": "unbiased", "featurize_max_length": 256}
  if args.demo:
    base = os.path.join(out, "base")
    if not os.path.isdir(os.path.join(base, "checkpoints")):
      train_run(f"emo_lm_gpt2_mle{suffix}", [f"run.dir={base}", f"checkpoint.init_from={imported}", f"data.path={store}",
                                            f"train.steps={args.demo_base_steps}", "optim.lr=3e-3",
                                            "optim.warmup_steps=20", "optim.schedule=cosine", "optim.min_lr_ratio=0.1",
                                            "run.progress=false"])
    start = base
    if not args.featurizer:
      featurizer = os.path.join(out, "base_hf")
      if not os.path.isfile(os.path.join(featurizer, "config.json")):
        to_hf(base, featurizer, dtype="float32")
    settings["demo_base_steps"] = args.demo_base_steps
  settings["featurizer"] = featurizer
  report_path = os.path.join(out, "emo_lm_table.json")

  def save():
    with open(report_path, "w") as f:
      json.dump({"settings": settings, "rows": rows}, f, indent=2)

  print("scoring the starting model (no fine-tuning)")
  rows["(start)"] = {**validation(start, store, os.path.join(out, "start")),
                     **mauve_runs(start, heldout, featurizer, os.path.join(out, "start"), args)}
  save()
  for obj in objectives:
    run_dir = os.path.join(out, obj)
    t0 = time.perf_counter()
    result = train_run(f"emo_lm_gpt2_{obj}{suffix}", [f"run.dir={run_dir}", f"checkpoint.init_from={start}",
                                                      f"data.path={store}", f"train.steps={steps}",
                                                      "run.progress=false"])
    result["train_seconds"] = time.perf_counter() - t0
    result.update(validation(run_dir, store, run_dir))
    result.update(mauve_runs(run_dir, heldout, featurizer, os.path.join(run_dir, "eval"), args))
    rows[obj] = result
    save()
    print(f"{obj}: {json.dumps({k: v for k, v in result.items() if k != 'mauve'})}")
  settings["seconds"] = time.perf_counter() - t_start
  save()
  print(table(rows))
  print(f"wrote {report_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
