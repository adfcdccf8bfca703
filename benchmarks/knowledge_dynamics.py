"""The knowledge-entropy paper's effects at demo scale: knowledge entropy over a run's checkpoints, memorization
probes of injected fictional knowledge against a control run, and a resuscitated checkpoint's knowledge entropy against its source.

  python benchmarks/knowledge_dynamics.py --out runs/knowledge_dynamics           # ke_inject_demo, ~10 min on 2 CPUs
  python benchmarks/knowledge_dynamics.py --out runs/kd_small --overrides train.steps=100 inject.interval=10

Writes OUT/knowledge_dynamics.json (every figure) and prints the tables docs/KNOWLEDGE.md records.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from maxlm.checkpoint import params as ckpt_params
from maxlm import train
from maxlm import model as model_lib
from maxlm.analysis import knowledge_entropy as ke
from maxlm.analysis import resuscitate as rs
from maxlm.core.config import load_config
from maxlm.data_pipelines import load_grammar
from maxlm.run.trackers import read_metrics
from maxlm.core.errors import cli_description

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWLEDGE = os.path.join(ROOT, "tests", "data", "knowledge")


def analysis_documents(path: str, count: int, seq_len: int) -> str:
  """Held-out PCFG documents (a seed the training stream never uses), one line each, about seq_len words."""
  grammar = load_grammar("builtin:demo")
  sentences = [grammar.decode(s) for s in grammar.sample_sentences(count * seq_len // 4, seed=12345)[0]]
  docs, current = [], []
  for s in sentences:
    current.append(s)
    if sum(len(c.split()) for c in current) >= seq_len:
      docs.append(" ".join(current))
      current = []
    if len(docs) == count:
      break
  with open(path, "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")
  return path


def run_config(out: str, name: str, overrides: list[str]):
  return load_config("ke_inject_demo", [f"run.dir={os.path.join(out, name)}", "run.progress=false",
                                        f"inject.paraphrase_file={os.path.join(KNOWLEDGE, 'paraphrase.json')}",
                                        f"inject.once_file={os.path.join(KNOWLEDGE, 'once.json')}", *overrides])


def probe_table(run_dir: str) -> dict[int, dict]:
  return {r["step"]: {k: v for k, v in r.items() if k.startswith("probe/") and not k.endswith("/ppl")}
          for r in read_metrics(run_dir) if any(k.startswith("probe/") for k in r)}


def main() -> None:
  parser = argparse.ArgumentParser(description=cli_description(__doc__))
  parser.add_argument("--out", default="runs/knowledge_dynamics")
  parser.add_argument("--overrides", nargs="*", default=[], help="key=value for both runs (e.g. train.steps=100)")
  parser.add_argument("--docs", type=int, default=64, help="documents for knowledge entropy")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  report: dict = {"overrides": args.overrides}
  t0 = time.perf_counter()

  inject_cfg = run_config(args.out, "inject", args.overrides)
  seq_len = inject_cfg.train.seq_len
  init_dir = os.path.join(args.out, "init")  # the weights before step 1 (train.seed), as a step-0 checkpoint
  if not os.path.isdir(init_dir):
    ckpt_params.save_params(init_dir, inject_cfg, model_lib.init_params(inject_cfg.model, inject_cfg.train.seed))
  for name, extra in (("inject", []), ("control", ["inject.interval=0"])):
    cfg = run_config(args.out, name, args.overrides + extra)
    if not os.path.isfile(os.path.join(cfg.run.dir, "metrics.jsonl")):
      print(f"training {name} ...", flush=True)
      train.train(cfg, verbose=False)
  report["train_seconds"] = time.perf_counter() - t0

  # 1. Knowledge entropy over the injected run's checkpoints (init = step 0).
  data = analysis_documents(os.path.join(args.out, "ke_docs.jsonl"), args.docs, seq_len)
  series = ke.knowledge_entropy_series([init_dir, f"{inject_cfg.run.dir}@all"], data, seq_len=seq_len,
                                       batch_size=16, progress=False)
  ke.write_outputs(series, "valid", os.path.join(args.out, "ke"), overwrite=True)
  report["knowledge_entropy"] = [{"step": r.step, "ke": r.knowledge_entropy} for r in series]

  # 2. Probes: injected run against the control run (same data, same seed, nothing injected).
  inject_probes, control_probes = probe_table(inject_cfg.run.dir), probe_table(os.path.join(args.out, "control"))
  report["probes"] = {"inject": inject_probes, "control": control_probes, "interval": inject_cfg.inject.interval}

  # 3. Resuscitation of the final checkpoint (p = 0.5, q = 2) and its knowledge entropy.
  last = series[-1]
  np.save(os.path.join(args.out, "final_coefficients.npy"), last.coefficients)
  resuscitated = os.path.join(args.out, "resuscitated")
  if not os.path.isdir(resuscitated):
    rs.resuscitate(last.checkpoint, os.path.join(args.out, "final_coefficients.npy"), ratio=0.5, factor=2.0,
                   output=resuscitated)
  (after,) = ke.knowledge_entropy_series([resuscitated], data, seq_len=seq_len, batch_size=16, progress=False)
  report["resuscitation"] = {"source": last.checkpoint, "ke_source": last.knowledge_entropy,
                             "ke_resuscitated": after.knowledge_entropy, "ratio": 0.5, "factor": 2.0,
                             "per_layer_source": last.per_layer.tolist(), "per_layer_resuscitated":
                             after.per_layer.tolist()}
  report["seconds"] = time.perf_counter() - t0
  with open(os.path.join(args.out, "knowledge_dynamics.json"), "w") as f:
    json.dump(report, f, indent=1)
  print_tables(report, inject_cfg)


def print_tables(report: dict, cfg) -> None:
  print("\n| step | knowledge entropy |\n| --- | --- |")
  for r in report["knowledge_entropy"]:
    print(f"| {r['step']} | {r['ke']:.4f} |")
  inject, control = report["probes"]["inject"], report["probes"]["control"]
  interval = report["probes"]["interval"]
  keys = [f"probe/{g}/memorization" for g in ("paraphrase", "once")]
  print("\n| step | " + " | ".join(f"{k[6:]} inject | control" for k in keys) + " |")
  print("| --- |" + " --- | --- |" * len(keys))
  for step in sorted(inject):
    mark = " (injected)" if interval and step and step % interval == 0 else ""
    cells = " | ".join(f"{inject[step][k]:.3f} | {control.get(step, {}).get(k, float('nan')):.3f}" for k in keys)
    print(f"| {step}{mark} | {cells} |")
  r = report["resuscitation"]
  print(f"\nresuscitation p={r['ratio']} q={r['factor']} of {r['source']}: knowledge entropy {r['ke_source']:.4f} -> "
        f"{r['ke_resuscitated']:.4f}")
  print(f"({cfg.train.steps} steps, injection every {interval}; {report['seconds']:.0f}s in all)")


if __name__ == "__main__":
  main()
