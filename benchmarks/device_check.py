"""Device check of the fused loss and the training step on one H100/H200: correctness, speed, MFU, as JSON lines.

Owns nothing the library uses: one prepared script that fits one 8-minute device run (docs/BENCHMARKS.md).

  python benchmarks/device_check.py --out $OUT                 # the GPU run: appends to $OUT/results.jsonl
  python benchmarks/device_check.py --cpu-smoke --out DIR      # every step, tiny, on CPU (Pallas in interpret mode)

Steps, each row appended to OUT/results.jsonl as soon as it exists (a timeout keeps what ran):
  env      jax, devices, whether maxlm / grain import;
  ceiling  a bf16 8192^3 matmul's TFLOP/s, the ceiling the loss figures are read against;
  correct  every impl (reference, blockwise with the CPU plan, blockwise with the GPU plan, pallas) on the
           device against the reference computed on the host CPU in fp32, at a small unaligned shape: fp32
           under matmul precision "highest" (IEEE, as JAX_DEFAULT_MATMUL_PRECISION=highest), and bf16;
  time     ms and TFLOP/s (8NdV basis: forward + a backward that recomputes the logits) of every impl for ce,
           mile and emo (dE=128 and dE=d) at N=16384, d=4096, V=32000, bf16; EMO also on 8NdV + 4NVdE;
  train    `python -m maxlm.train --config=mile_468m` (cuDNN attention, PCFG data, no checkpoints): the
           median `mfu` of its metrics.jsonl after the first logged window (needs grain: carry its wheel);
  summary  MiLe / EMO time over CE's per impl, CE's share of the measured ceiling.
The loss steps run in a child process and the training in another, so that each starts with the GPU's memory
free; a deadline (--budget-s) skips what would not fit, and each skip is a row too.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (impl spec, fused_loss options): blockwise:cpu / blockwise:gpu pick that platform's tile plan on this device.
IMPLS = (("reference", {}), ("blockwise:gpu", {"tile_plan": "gpu"}), ("blockwise:cpu", {"tile_plan": "cpu"}),
         ("pallas", {}))
# What each mode runs. The full run covers every impl x objective x dtype; the smoke run every step kind and
# every impl once at toy sizes (emo exercises every kernel term; cost widths that are no power of two).
FULL = dict(correct_shape=(1000, 256, 1000), correct_d_emb=768, shape=(16384, 4096, 32000), repeats=5,
            train_steps=40, train_batch=64,
            correct=[(dt, o, spec) for dt in ("float32", "bfloat16") for o in ("ce", "mile", "emo")
                     for spec, _ in IMPLS],
            time=[(o, e, spec) for o, e in (("ce", 0), ("mile", 0), ("emo", 128), ("emo", -1)) for spec, _ in IMPLS])
SMOKE = dict(correct_shape=(37, 16, 53), correct_d_emb=24, shape=(256, 64, 1000), repeats=1, train_steps=2,
             train_batch=2,
             correct=[("float32", "emo", spec) for spec, _ in IMPLS] + [("bfloat16", "emo", "blockwise:gpu")],
             time=[("ce", 0, spec) for spec, _ in IMPLS] + [("emo", -1, "blockwise:gpu")])
# Seconds kept for the training step when the loss steps decide what still fits; and the training's own cap.
TRAIN_RESERVE_S = {"full": 170, "smoke": 40}
# Tolerances against the fp32 host reference: ||got - ref|| / ||ref|| (METHOD.md's measure) for the gradients,
# relative error for loss and metrics. fp32 at IEEE precision lands far under 1e-4; bf16 hidden/head give exact
# products but bf16 gradients (2^-9 rounding) and bf16 unit cost rows.
TOLERANCE = {"float32": dict(loss=2e-5, grad=1e-4), "bfloat16": dict(loss=2e-3, grad=2e-2)}
DATASHEET_BF16_TFLOPS = {"h200": 989.0, "h100": 989.0}  # SXM dense bf16, for the record next to the ceiling


class Log:
  """Appends one JSON object per line to OUT/results.jsonl and echoes it."""

  def __init__(self, out_dir: pathlib.Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    self.path = out_dir / "results.jsonl"

  def __call__(self, **row):
    row["t"] = time.strftime("%H:%M:%S")
    line = json.dumps(row, default=str)
    print(line, flush=True)
    with open(self.path, "a") as f:
      f.write(line + "\n")

  def rows(self):
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- making maxlm importable


def maxlm_pythonpath() -> str | None:
  """A PYTHONPATH entry under which `import maxlm.kernels` works from this checkout, or None if it already does.

  The installed package maps kernels/ and data_pipelines/ under maxlm (pyproject's package-dir); a bare
  checkout on the device machine is not installed, so a shim folder links the same layout.
  """
  probe = subprocess.run([sys.executable, "-c", "import maxlm.kernels, maxlm.data_pipelines"], cwd="/",
                         capture_output=True)
  return None if probe.returncode == 0 else make_shim(pathlib.Path(tempfile.mkdtemp(prefix="maxlm_shim_")))


def make_shim(folder: pathlib.Path) -> str:
  """folder/maxlm: links to maxlm/'s files, and maxlm/kernels -> kernels/ etc.; returns the folder for the path."""
  shim = folder / "maxlm"
  shim.mkdir(parents=True)
  for entry in (ROOT / "maxlm").iterdir():
    if entry.name != "__pycache__":
      (shim / entry.name).symlink_to(entry)
  for package, source in (("kernels", "kernels"), ("data_pipelines", "data_pipelines"), ("configs", "configs")):
    (shim / package).symlink_to(ROOT / source)
  return str(folder)


# ----------------------------------------------------------------------------- loss steps (child process)


def make_inputs(shape, d_emb, dtype, seed):
  """Unit-order logits (h ~ N(0, 1/4), w ~ N(0, 16/d)), 10% of labels ignored, a fresh draw per seed."""
  import jax
  import jax.numpy as jnp
  n, d, v = shape
  k = jax.random.split(jax.random.key(seed), 4)
  hidden_NxD = (0.5 * jax.random.normal(k[0], (n, d), jnp.float32)).astype(dtype)
  w_DxV = (4.0 / d ** 0.5 * jax.random.normal(k[1], (d, v), jnp.float32)).astype(dtype)
  labels_N = jax.random.randint(k[2], (n,), 0, v)
  labels_N = jnp.where(jax.random.uniform(k[3], (n,)) < 0.1, -100, labels_N).astype(jnp.int32)
  cost_VxE = jax.random.normal(k[3], (v, d_emb), jnp.float32)
  return hidden_NxD, w_DxV, labels_N, cost_VxE


def value_and_grad(impl_spec, opts, objective):
  return _value_and_grad(impl_spec, tuple(sorted(opts.items())), objective)


@functools.lru_cache(maxsize=None)  # one jitted function per case: the host reference compiles once per shape
def _value_and_grad(impl_spec, opts, objective):
  import jax
  from maxlm.kernels import fused_loss
  impl, opts = impl_spec.split(":")[0], dict(opts)

  def f(h, w, y, c):
    return fused_loss(h, w, y, objective=objective, impl=impl, cost_embedding=c if objective == "emo" else None,
                      **opts)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def _rel(got, want):
  import numpy as np
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_one(log, cfg, impl_spec, opts, objective, dtype_name, seed):
  """One correctness row: impl on the device against the fp32 reference on the host CPU, same values."""
  import jax
  import jax.numpy as jnp
  d_emb = cfg["correct_d_emb"]
  inputs = make_inputs(cfg["correct_shape"], d_emb, jnp.dtype(dtype_name), seed)
  cpu = jax.devices("cpu")[0]
  host = [jax.device_put(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, cpu) for x in inputs]
  with jax.default_matmul_precision("highest"):
    (loss_w, metrics_w), grads_w = value_and_grad("reference", {}, objective)(*host)
    (loss_g, metrics_g), grads_g = value_and_grad(impl_spec, opts, objective)(*inputs)
  tol = TOLERANCE[dtype_name]
  loss_err = abs(float(loss_g) - float(loss_w)) / max(abs(float(loss_w)), 1e-6)
  metric_err = max(abs(float(metrics_g[k]) - float(metrics_w[k])) / max(abs(float(metrics_w[k])), 1e-6)
                   for k in metrics_w)
  grad_err = max(_rel(g, w) for g, w in zip(grads_g, grads_w))
  finite = all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads_g)
  ok = finite and max(loss_err, metric_err) <= tol["loss"] and grad_err <= tol["grad"]
  log(step="correct", impl=impl_spec, objective=objective, dE=d_emb if objective == "emo" else None,
      dtype=dtype_name, shape="x".join(map(str, cfg["correct_shape"])), loss=float(loss_g), ref=float(loss_w),
      loss_rel_err=loss_err, metric_rel_err=metric_err, grad_rel_err=grad_err, finite=finite, ok=bool(ok))


def time_one(log, cfg, impl_spec, opts, objective, d_emb, ceiling_tflops):
  """One timing row at the target shape: compile, XLA temp bytes, median ms of `repeats` runs after a warm-up."""
  import jax
  import jax.numpy as jnp
  n, d, v = cfg["shape"]
  args = make_inputs(cfg["shape"], d_emb, jnp.bfloat16, seed=1)
  t0 = time.perf_counter()
  compiled = value_and_grad(impl_spec, opts, objective).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(cfg["repeats"]):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
    if sum(times) > 3.0:  # a slow impl (the CPU plan's small tiles) is timed fewer times
      break
  seconds = statistics.median(times)
  flops = 8 * n * d * v
  row = dict(step="time", impl=impl_spec, objective=objective, dE=d_emb if objective == "emo" else None,
             shape=f"{n}x{d}x{v}", dtype="bfloat16", compile_s=round(compile_s, 2), temp_mib=round(temp / 2**20, 1),
             ms=round(seconds * 1e3, 3), runs=len(times), tflops_8NdV=round(flops / seconds / 1e12, 2),
             loss=float(out[0][0]))
  if objective == "emo":  # the similarity matmuls: 2 N V dE forward and again in the recomputing backward
    row["tflops_with_similarity"] = round((flops + 4 * n * v * d_emb) / seconds / 1e12, 2)
  if ceiling_tflops:
    row["share_of_ceiling"] = round(row["tflops_8NdV"] / ceiling_tflops, 3)
  log(**row)


def matmul_ceiling(log, smoke):
  """TFLOP/s of one large bf16 matmul through XLA (cuBLAS): the measured ceiling (METHOD.md)."""
  import jax
  import jax.numpy as jnp
  n = 512 if smoke else 8192
  k = jax.random.split(jax.random.key(7))
  a, b = (jax.random.normal(x, (n, n), jnp.float32).astype(jnp.bfloat16) for x in k)  # random, never zeros
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(3 if smoke else 10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - t0)
  tflops = 2 * n ** 3 / statistics.median(times) / 1e12
  kind = jax.devices()[0].device_kind
  datasheet = next((t for name, t in DATASHEET_BF16_TFLOPS.items() if name in kind.lower()), None)
  log(step="ceiling", what=f"bf16 {n}^3 matmul, median of {len(times)}", tflops=round(tflops, 3),
      datasheet_bf16_tflops=datasheet)
  return tflops


def guarded(log, deadline, fn, *args, free=False, **row_id):
  """fn(*args), or a `skipped` row past the deadline, or an `error` row if it raises (the run goes on).

  free: drop compiled executables and buffers afterwards (the 7B-shape steps: GPU memory for the next one)."""
  if time.time() > deadline:
    log(**row_id, skipped="time budget")
    return None
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except  # a failing impl must not end the check
    log(**row_id, error=f"{type(e).__name__}: {str(e)[:500]}")
    return None
  finally:
    if free:
      import jax
      _value_and_grad.cache_clear()
      jax.clear_caches()
      gc.collect()


def loss_phase(out_dir, smoke, deadline):
  """The env, ceiling, correct and time steps, in this (child) process."""
  import jax
  log, cfg = Log(out_dir), SMOKE if smoke else FULL
  impls = [(spec, dict(opts, interpret="gpu") if smoke and spec == "pallas" else opts) for spec, opts in IMPLS]
  log(step="env", jax=jax.__version__, python=sys.version.split()[0], backend=jax.default_backend(),
      devices=[str(d) for d in jax.devices()], kind=jax.devices()[0].device_kind,
      matmul_precision=str(jax.config.jax_default_matmul_precision), smoke=smoke)
  ceiling = guarded(log, deadline, matmul_ceiling, log, smoke, step="ceiling")
  opts_of = dict(impls)
  for seed, (dtype_name, objective, spec) in enumerate(cfg["correct"], start=100):  # a fresh draw per check
    guarded(log, deadline, check_one, log, cfg, spec, opts_of[spec], objective, dtype_name, seed,
            step="correct", impl=spec, objective=objective, dtype=dtype_name)
  for objective, d_emb, spec in cfg["time"]:
    d_emb = cfg["shape"][1] if d_emb < 0 else d_emb  # -1: dE = d, EMO with the model's own head width
    guarded(log, deadline, time_one, log, cfg, spec, opts_of[spec], objective, d_emb, ceiling, free=not smoke,
            step="time", impl=spec, objective=objective, dE=d_emb or None)


# ----------------------------------------------------------------------------- training step and summary


def train_command(run_dir: pathlib.Path, smoke: bool) -> list[str]:
  cfg = SMOKE if smoke else FULL
  cmd = [sys.executable, "-m", "maxlm.train", "--config=mile_468m", "data.source=pcfg",
         f"train.steps={cfg['train_steps']}", f"train.global_batch={cfg['train_batch']}",
         f"run.log_every={1 if smoke else 5}",
         f"run.dir={run_dir}", "run.tensorboard=false", "run.progress=false", "run.eval_batches=1",
         "checkpoint.enabled=false", f"optim.warmup_steps={min(10, cfg['train_steps'])}"]
  if smoke:  # the preset's structure at toy size; XLA attention (no cuDNN on a CPU)
    cmd += ["model.layers=1", "model.hidden=64", "model.heads=2", "model.ffn=128", "model.vocab_size=512",
            "train.seq_len=64", "model.attention=xla"]
  else:
    cmd += ["model.attention=cudnn"]
  return cmd


def train_phase(log, out_dir: pathlib.Path, smoke: bool, env: dict, deadline: float):
  if importlib.util.find_spec("grain") is None:
    log(step="train", skipped="grain is not installed here: carry its wheels (docs/BENCHMARKS.md, Fused loss)")
    return
  remaining = deadline - time.time()
  if remaining < 30:
    log(step="train", skipped="time budget")
    return
  # The run directory stays out of OUT (the device tool brings back at most 8 files); its metrics are copied.
  run_dir = pathlib.Path(tempfile.mkdtemp(prefix="maxlm_train_"))
  cmd = train_command(run_dir, smoke)
  log_path = out_dir / "train_468m.log"
  t0 = time.time()
  try:
    with open(log_path, "w") as f:
      proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=remaining)
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    rc = "timeout"
  wall = time.time() - t0
  metrics_path = run_dir / "metrics.jsonl"
  rows = [json.loads(x) for x in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
  if metrics_path.exists():
    (out_dir / "train_metrics.jsonl").write_text(metrics_path.read_text())
  mfu_rows = [r for r in rows if r.get("mfu") is not None]
  steady = mfu_rows[1:] or mfu_rows  # the first window holds the warm-up
  overrides = [c for c in cmd[4:] if not c.startswith("run.dir=")]
  row = dict(step="train", config="mile_468m", overrides=overrides, rc=rc, wall_s=round(wall, 1),
             mfu_windows=[round(r["mfu"], 4) for r in mfu_rows])
  if steady:
    row.update(mfu=statistics.median(r["mfu"] for r in steady),
               tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in steady))
  if rc != 0:
    row["log_tail"] = log_path.read_text()[-1500:]
  log(**row)


def summary(log):
  rows = [r for r in log.rows() if r.get("step") == "time" and "ms" in r]
  ms = {(r["impl"], r["objective"], r.get("dE")): r["ms"] for r in rows}
  out = {}
  for spec, _ in IMPLS:
    ce = ms.get((spec, "ce", None))
    if not ce:
      continue
    out[spec] = {"ce_ms": ce, **{f"{o}{'' if e is None else e}_over_ce": round(t / ce, 3)
                                 for (s, o, e), t in ms.items() if s == spec and o != "ce"}}
  failed = [f"{r['impl']} {r['objective']} {r['dtype']}" for r in log.rows() if r.get("step") == "correct"
            and not r.get("ok")]
  log(step="summary", per_impl=out, correctness_failures=failed)
  print("\nimpl           ce ms   mile/ce  emo128/ce  emo-d/ce", flush=True)
  for spec, s in out.items():
    ratios = [v for k, v in s.items() if k.endswith("_over_ce")]
    print(f"{spec:13s} {s['ce_ms']:8.2f}  " + "  ".join(f"{x:8.3f}" for x in ratios), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  parser.add_argument("--out", default=os.environ.get("OUT", "device_out"))
  parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, Pallas in interpret mode")
  parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 450 s, smoke 120 s)")
  parser.add_argument("--phase", choices=("loss",), default=None, help=argparse.SUPPRESS)  # the child's entry
  parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  out_dir = pathlib.Path(args.out).resolve()
  if args.phase == "loss":
    loss_phase(out_dir, args.cpu_smoke, args.deadline)
    return 0
  start = time.time()
  budget = args.budget_s if args.budget_s is not None else (120.0 if args.cpu_smoke else 450.0)
  deadline = start + budget
  env = dict(os.environ)
  shim = maxlm_pythonpath()
  if shim:
    env["PYTHONPATH"] = os.pathsep.join(p for p in (shim, env.get("PYTHONPATH")) if p)
  if args.cpu_smoke:
    env["JAX_PLATFORMS"] = "cpu"
  log = Log(out_dir)
  log(step="start", budget_s=budget, maxlm_shim=shim, grain=importlib.util.find_spec("grain") is not None)
  reserve = TRAIN_RESERVE_S["smoke" if args.cpu_smoke else "full"]
  loss_deadline = deadline - reserve
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--phase", "loss", "--out", str(out_dir),
         "--deadline", str(loss_deadline)] + (["--cpu-smoke"] if args.cpu_smoke else [])
  try:  # the child stops starting measurements at its deadline; the grace covers the one in flight
    rc = subprocess.run(cmd, env=env, timeout=max(loss_deadline - time.time(), 0) + 90).returncode
  except subprocess.TimeoutExpired:
    rc = "timeout"
  if rc != 0:
    log(step="loss", error=f"loss phase ended with {rc}")
  train_phase(log, out_dir, args.cpu_smoke, env, deadline)
  summary(log)
  log(step="done", wall_s=round(time.time() - start, 1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
