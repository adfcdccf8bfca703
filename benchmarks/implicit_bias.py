"""The implicit-bias paper's question at PCFG scale: models with about the same validation loss, compared on the
trace of the loss Hessian and on downstream (PCFG task) probe accuracy.

    python benchmarks/implicit_bias.py [--workdir DIR] [--short-steps 300] [--long-steps 1200] [--factor 2]
                                       [--samples 256] [--hessian-batch 32] [--probe-rows 2000] [--finetune]
                                       [--quick]

Models (one CE run on builtin:ib_demo, an IB-shaped grammar, constant learning rate after warmup, checkpoints kept
at both step counts):
  short  the run at --short-steps (its loss curve flattening);
  long   the same run at --long-steps (trained on, as the paper's "train longer past the plateau" setting);
  wide   `widen` of short by --factor (exactly the same function, so exactly the same loss).
Each gets: validation CE (maxlm.evaluate on held-out sentences), Hessian trace (Rademacher probes, minibatches of
held-out sentences of at most 8 words, rows of 16), linear-probe accuracy on task A of the grammar (which of the
start symbol's 6 children S1..S6 best derives the sentence), and with --finetune the fine-tuning accuracy. Results
go to WORKDIR/implicit_bias.json as they come; docs/IMPLICIT_BIAS.md records a run.
"""

import argparse
import json
import os
import time

from maxlm import evaluate, train
from maxlm.analysis import hessian, probe, widen
from maxlm.core.config import load_config
from maxlm.data_pipelines import load_grammar, pcfg_tasks
from maxlm.core.errors import cli_description

MODEL = ["data.grammar=builtin:ib_demo", "model.vocab_size=128", "model.hidden=64", "model.layers=2", "model.heads=4",
         "model.ffn=192", "model.max_positions=64",
         "model.compute_dtype=float32", "model.remat=none", "train.seq_len=32", "train.global_batch=32",
         "optim.warmup_steps=20", "optim.schedule=constant", "loss.objective=ce", "run.progress=false",
         "run.tensorboard=false", "run.summary=false", "run.eval_batches=0"]


def held_out(workdir: str, grammar, probe_rows: int) -> dict:
  """Held-out sentences (JSONL text) and task A train / validation CSVs, each from its own seed."""
  paths = {"docs": os.path.join(workdir, "heldout.jsonl"), "train": os.path.join(workdir, "taskA_train.csv"),
           "validation": os.path.join(workdir, "taskA_val.csv")}
  with open(paths["docs"], "w") as f:
    for sentence in grammar.sample_sentences(512, 12345)[0]:
      f.write(json.dumps({"text": grammar.decode(sentence)}) + "\n")
  for key, seed, n in (("train", 1, probe_rows), ("validation", 2, probe_rows // 2)):
    task = pcfg_tasks.make_task(grammar, "A", n, seed)
    pcfg_tasks.write_csv(paths[key], task.rows)
  return paths


def measure(name: str, spec: str, paths: dict, args) -> dict:
  t0 = time.perf_counter()
  path, _, step = spec.partition("@")
  loss = evaluate.evaluate(path, paths["docs"], step=int(step) if step else None, seq_len=32, batch_size=16,
                           output=os.path.join(args.workdir, f"eval_{name}.json"), log=lambda *_: None)
  trace = hessian.hessian_trace(spec, paths["docs"], samples=args.samples, batch_size=args.hessian_batch, seq_len=16,
                                probe="rademacher", seed=0, progress=False)
  linear = probe.probe(spec, paths["train"], paths["validation"], mode="linear", log=lambda *_: None)
  row = {"model": name, "checkpoint": spec, "parameters": trace["parameters"],
         "validation_ce": loss["token_weighted"]["loss"], "hessian_trace": trace["trace"],
         "hessian_stderr": trace["stderr"], "linear_probe_accuracy": linear["accuracy"],
         "linear_probe_train_accuracy": linear["train_accuracy"], "majority_baseline": linear["majority_baseline"]}
  if args.finetune:
    tuned = probe.probe(spec, paths["train"], paths["validation"], mode="finetune", log=lambda *_: None)
    row["finetune_accuracy"] = tuned["accuracy"]
  row["seconds"] = round(time.perf_counter() - t0, 1)
  print(json.dumps(row), flush=True)
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=cli_description(__doc__))
  p.add_argument("--workdir", default="runs/implicit_bias")
  p.add_argument("--short-steps", type=int, default=300)
  p.add_argument("--long-steps", type=int, default=1200)
  p.add_argument("--factor", type=int, default=2)
  p.add_argument("--samples", type=int, default=256, help="Hutchinson probes per model")
  p.add_argument("--hessian-batch", type=int, default=32, help="held-out rows per probe's minibatch")
  p.add_argument("--probe-rows", type=int, default=2000, help="task A training rows (validation: half)")
  p.add_argument("--finetune", action="store_true", help="also fine-tune each model (slower)")
  p.add_argument("--quick", action="store_true", help="a smoke run: 150 / 600 steps, 64 probes, 600 task rows")
  args = p.parse_args()
  if args.quick:
    args.short_steps, args.long_steps, args.samples, args.probe_rows = 150, 600, 64, 600
  os.makedirs(args.workdir, exist_ok=True)
  run_dir = os.path.join(args.workdir, "run")
  cfg = load_config("demo", MODEL + [f"train.steps={args.long_steps}", f"checkpoint.every={args.short_steps}",
                                     "checkpoint.keep_last=0", f"run.dir={run_dir}"])
  t0 = time.perf_counter()
  train.train(cfg, verbose=False)
  print(f"trained {args.long_steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
  wide_dir = os.path.join(args.workdir, f"wide{args.factor}")
  widen.widen(f"{run_dir}@{args.short_steps}", wide_dir, factor=args.factor, overwrite=True)
  paths = held_out(args.workdir, load_grammar(cfg.data.grammar), args.probe_rows)
  results = {"command": "python benchmarks/implicit_bias.py " + " ".join(
      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not isinstance(v, bool)), "models": []}
  for name, spec in (("short", f"{run_dir}@{args.short_steps}"), ("long", f"{run_dir}@{args.long_steps}"),
                     (f"wide x{args.factor}", wide_dir)):
    results["models"].append(measure(name, spec, paths, args))
    with open(os.path.join(args.workdir, "implicit_bias.json"), "w") as f:
      json.dump(results, f, indent=2)
  print("| model | params | validation CE | Hessian trace | linear probe acc | fine-tune acc | majority |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in results["models"]:
    tuned = f"{r['finetune_accuracy']:.3f}" if "finetune_accuracy" in r else "-"
    print(f"| {r['model']} | {r['parameters']:,} | {r['validation_ce']:.4f} | {r['hessian_trace']:.2f} +- "
          f"{r['hessian_stderr']:.2f} | {r['linear_probe_accuracy']:.3f} | {tuned} | {r['majority_baseline']:.3f} |")


if __name__ == "__main__":
  main()
