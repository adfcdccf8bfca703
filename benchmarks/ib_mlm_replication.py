"""The implicit-bias paper's claim on masked LMs at PCFG scale: two MLM runs that reach about the same validation
loss by different routes, compared on the Hessian trace of masked-token CE and on linear-probe accuracy
(docs/IMPLICIT_BIAS.md).

    python benchmarks/ib_mlm_replication.py [--workdir DIR] [--small-steps 1500] [--large-steps 500] [--every 50]
                                            [--samples 64] [--hessian-batch 16] [--probe-rows 1000]

Both runs are the ib_mlm_demo preset (bidirectional LLaMA, builtin:ib_demo, rows of 32, IB's masking), constant
learning rate after warmup:
  small  hidden 32, 4 heads, ffn 96, trained --small-steps (the long route);
  large  hidden 128, 16 heads (head_dim 8 as small's), ffn 384, trained up to --large-steps with a checkpoint every
         --every steps; the checkpoint whose validation loss is nearest small's final one is the one compared;
  small x4  `widen` of small by 4: exactly small's function in large's shape, so its trace is measured in the same
         parameterisation as large's (IB's enlarge.py serves the same purpose).
Each gets: validation masked-token CE (the preset's fixed validation masks, 16 batches of 64 rows), Hessian trace
(Rademacher, minibatches of held-out sentences masked from the seed), linear-probe accuracy on task A. Results go to
WORKDIR/ib_mlm.json as they come.
"""

import argparse
import json
import os
import time

from maxlm import pretrained, train
from maxlm.analysis import hessian, probe, widen
from maxlm.core.config import load_config
from maxlm.core.errors import cli_description
from maxlm.data_pipelines import build_eval_batches, load_grammar
from maxlm.evals.loss import loss_report
from implicit_bias import held_out  # the same held-out sentences and task A files (run from benchmarks/)

QUIET = ["run.progress=false", "run.tensorboard=false", "run.summary=false", "checkpoint.keep_last=0",
         "run.eval_batches=16"]
SMALL = ["model.hidden=32", "model.heads=4", "model.ffn=96"]
LARGE = ["model.hidden=128", "model.heads=16", "model.ffn=384"]


def validation_ce(spec: str) -> float:
  """Masked-token CE on the preset's validation batches (fixed masks), token-weighted."""
  pre = pretrained.load(spec)
  batches = build_eval_batches(pre.cfg.data, seq_len=32, batch_size=64, num_batches=16)
  return loss_report(pre.cfg, pre.params, batches, compute_dtype="float32", progress=False)["token_weighted"]["loss"]


def measure(name: str, spec: str, paths: dict, args) -> dict:
  t0 = time.perf_counter()
  trace = hessian.hessian_trace(spec, paths["docs"], samples=args.samples, batch_size=args.hessian_batch, seq_len=16,
                                probe="rademacher", seed=0, progress=False, log=lambda *_: None)
  linear = probe.probe(spec, paths["train"], paths["validation"], mode="linear", log=lambda *_: None)
  row = {"model": name, "checkpoint": spec, "parameters": trace["parameters"], "validation_ce": validation_ce(spec),
         "hessian_trace": trace["trace"], "hessian_stderr": trace["stderr"],
         "linear_probe_accuracy": linear["accuracy"], "linear_probe_train_accuracy": linear["train_accuracy"],
         "majority_baseline": linear["majority_baseline"], "seconds": round(time.perf_counter() - t0, 1)}
  print(json.dumps(row), flush=True)
  return row


def run(name: str, overrides: list, steps: int, every: int, workdir: str) -> dict:
  cfg = load_config("ib_mlm_demo", QUIET + overrides + [f"train.steps={steps}", f"run.eval_every={every}",
                                                        f"checkpoint.every={every}",
                                                        f"run.dir={os.path.join(workdir, name)}"])
  t0 = time.perf_counter()
  summary = train.train(cfg, verbose=False)
  evals = {step: e["eval/pcfg"] for step, e in summary["evals"].items()}
  print(f"{name}: {steps} steps in {time.perf_counter() - t0:.0f}s; validation CE by step "
        + ", ".join(f"{s}: {v:.4f}" for s, v in sorted(evals.items())), flush=True)
  return evals


def main() -> None:
  p = argparse.ArgumentParser(description=cli_description(__doc__))
  p.add_argument("--workdir", default="runs/ib_mlm")
  p.add_argument("--small-steps", type=int, default=1500)
  p.add_argument("--large-steps", type=int, default=500)
  p.add_argument("--every", type=int, default=50, help="large: checkpoint and validation interval")
  p.add_argument("--samples", type=int, default=64, help="Hutchinson probes per model")
  p.add_argument("--hessian-batch", type=int, default=16, help="held-out sentences per probe's minibatch")
  p.add_argument("--probe-rows", type=int, default=1000, help="task A training rows (validation: half)")
  args = p.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  t_all = time.perf_counter()
  small_evals = run("small", SMALL, args.small_steps, args.small_steps, args.workdir)
  large_evals = run("large", LARGE, args.large_steps, args.every, args.workdir)
  target = small_evals[args.small_steps]
  match = min(large_evals, key=lambda s: abs(large_evals[s] - target))
  print(f"small's final validation CE {target:.4f}; large's nearest: step {match} ({large_evals[match]:.4f})")
  if abs(large_evals[match] - target) > 0.02:
    print(f"note: large never came within 0.02 nats of small's loss in {args.large_steps} steps: the pair is NOT at "
          "the same validation loss; raise --large-steps", flush=True)
  small, large = os.path.join(args.workdir, "small"), os.path.join(args.workdir, "large")
  wide = os.path.join(args.workdir, "small_x4")
  widen.widen(small, wide, factor=4, overwrite=True, log=lambda *_: None)
  paths = held_out(args.workdir, load_grammar("builtin:ib_demo"), args.probe_rows)
  results = {"command": "python benchmarks/ib_mlm_replication.py " + " ".join(
      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "small_evals": small_evals,
      "large_evals": large_evals, "large_step": match, "models": []}
  for name, spec in ((f"small ({args.small_steps} steps)", small), (f"large (step {match})", f"{large}@{match}"),
                     ("small x4 (widened)", wide)):
    results["models"].append(measure(name, spec, paths, args))
    with open(os.path.join(args.workdir, "ib_mlm.json"), "w") as f:
      json.dump(results, f, indent=2)
  print(f"total {time.perf_counter() - t_all:.0f}s wall")
  print("| model | params | validation masked CE | Hessian trace | linear probe acc | majority |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in results["models"]:
    print(f"| {r['model']} | {r['parameters']:,} | {r['validation_ce']:.4f} | {r['hessian_trace']:.2f} +- "
          f"{r['hessian_stderr']:.2f} | {r['linear_probe_accuracy']:.3f} | {r['majority_baseline']:.3f} |")


if __name__ == "__main__":
  main()
