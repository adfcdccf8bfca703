"""Training-step throughput, MFU and compile time for a preset, plus the --dry-run memory plans of the MiLe presets.

  python benchmarks/train_throughput.py --config demo
  python benchmarks/train_throughput.py --config demo --overrides model.hidden=768 model.layers=12 ...
  python benchmarks/train_throughput.py --plans            # dry-run memory for mile_468m/1b/7b on 1x8 and 16x8
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from maxlm.core import host
from maxlm import model as model_lib
from maxlm.state import plan
from maxlm.core import sharding
from maxlm.state import layout as state_lib
from maxlm.state import step as step_lib
from maxlm.core.config import load_config

# A ~100M-parameter LLaMA (GPT-2-small width) used as the "mid-size" CPU point.
MID_100M = ["model.vocab_size=32000", "model.hidden=768", "model.layers=12", "model.heads=12", "model.ffn=2048",
            "model.max_positions=256", "train.seq_len=256", "train.global_batch=4", "model.compute_dtype=float32",
            "model.remat=none"]


def measure(config: str, overrides: list[str], steps: int) -> dict:
  cfg = load_config(config, overrides, num_devices=jax.device_count())
  setup = state_lib.layout(cfg)
  step_fn, batch_shardings = step_lib.make_train_step(setup)
  state = state_lib.init_state(setup)
  rng = np.random.default_rng(0)
  B, T = cfg.train.global_batch, cfg.train.seq_len
  local = {"inputs": rng.integers(0, cfg.model.vocab_size, (B, T), dtype=np.int32),
           "targets": rng.integers(0, cfg.model.vocab_size, (B, T), dtype=np.int32)}
  batch = sharding.global_batch(setup.mesh, local)
  t0 = time.perf_counter()
  compiled = step_fn.lower(setup.abstract, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                                                  for k, v in batch.items()}).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(3):  # warm-up steps
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t0) / steps
  tokens = B * T
  flops = model_lib.flops_per_token(cfg.model, T) * tokens
  peak, source = plan.peak_flops_per_device()
  mem = compiled.memory_analysis()
  est = plan.memory_estimate(cfg, jax.device_count())
  return {"config": config, "params": setup.param_count, "tokens_per_step": tokens, "step_s": step_s,
          "tokens_per_sec": tokens / step_s, "mfu": flops / step_s / (peak * jax.device_count()),
          "peak": f"{peak / 1e9:.0f} GFLOP/s ({source})", "compile_s": compile_s,
          "xla_temp_mib": mem.temp_size_in_bytes / 2 ** 20 if mem else None,
          "xla_args_plus_temp_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2 ** 20 if mem else None,
          "dry_run_estimate_mib": est["total"] / 2 ** 20,
          "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "loss_impl": cfg.loss.impl,
          "objective": cfg.loss.objective}


def plans() -> list[dict]:
  rows = []
  for name in ("mile_468m", "mile_1b", "mile_7b"):
    for label, n, mesh in (("1x8", 8, ["mesh.data=1", "mesh.fsdp=8"]), ("16x8", 128, ["mesh.data=16", "mesh.fsdp=8"])):
      cfg = load_config(name, mesh, num_devices=n)
      est = plan.memory_estimate(cfg, n)
      rows.append({"preset": name, "mesh": label, "param_count": est["param_count"],
                   **{k: round(est[k] / 2 ** 30, 2) for k in ("params", "optimizer", "gradients", "activations",
                                                            "total")}})
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="demo")
  p.add_argument("--overrides", nargs="*", default=[])
  p.add_argument("--mid", action="store_true", help="the ~100M-parameter CPU configuration")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--plans", action="store_true")
  args = p.parse_args()
  host.tune_cpu_malloc()  # as `python -m maxlm.train` does, before jax starts (MAXLM_CPU_MALLOC=off: glibc's default)
  if args.plans:
    for row in plans():
      print(json.dumps(row))
    return
  overrides = (MID_100M if args.mid else []) + args.overrides + ["checkpoint.enabled=false"]
  print(json.dumps(measure(args.config, overrides, args.steps)))


if __name__ == "__main__":
  main()
