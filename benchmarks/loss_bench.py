"""Benchmark of maxlm.kernels.fused_loss: jitted value_and_grad time and XLA temp memory per impl x objective x shape.

Owns nothing the library uses; prints a markdown table (numbers come from here, not from tests).

  python benchmarks/loss_bench.py --shapes 8192x1024x32000 --impls reference,blockwise --objectives ce,mile,emo
  python benchmarks/loss_bench.py --compile-only --shapes 16384x4096x32000 --dtypes bfloat16 \
      --impls reference,blockwise:cpu,blockwise:gpu,blockwise:tpu --objectives ce,mile,emo --d-emb 128,4096

An impl `blockwise:PLAN` runs the blockwise path with platform PLAN's tile plan (kernels/tiling.py) on this
machine; `--compile-only` compiles at abstract shapes (no arrays, no run) and reports XLA's temp bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.kernels import fused_loss, tiling
from maxlm.core.errors import cli_description


def parse_shape(text: str) -> tuple[int, int, int]:
  try:
    n, d, v = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise SystemExit(f"bad shape {text!r}: use NxDxV, e.g. 8192x1024x32000")
  return n, d, v


def make_inputs(n, d, v, d_emb, dtype, seed=0):
  """Inputs scaled so logits have unit-order spread, like a trained head's (not a peaked softmax)."""
  rng = np.random.default_rng(seed)
  hidden_NxD = jnp.asarray(rng.standard_normal((n, d), np.float32), dtype)
  w_DxV = jnp.asarray(rng.standard_normal((d, v), np.float32) / np.sqrt(d), dtype)
  labels_N = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  cost_VxE = jnp.asarray(rng.standard_normal((v, d_emb), np.float32), jnp.float32)
  return hidden_NxD, w_DxV, labels_N, cost_VxE


def abstract_inputs(n, d, v, d_emb, dtype):
  return (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((v, d_emb), jnp.float32))


def impl_options(impl_spec, *, block_tokens=None, block_vocab=None, interpret=None):
  """(impl, fused_loss options, plan label) of an impl spec: "reference", "blockwise[:PLAN]" or "pallas"."""
  impl, _, plan = impl_spec.partition(":")
  if impl == "reference":
    return impl, {}, ""
  opts = {k: x for k, x in (("block_tokens", block_tokens), ("block_vocab", block_vocab)) if x is not None}
  if impl == "blockwise" and plan:
    opts["tile_plan"] = plan
  if impl == "pallas" and interpret is not None:
    opts["interpret"] = interpret
  return impl, opts, plan


def plan_label(impl, opts, shape):
  if impl != "blockwise":
    return ""
  n, _, v = shape
  plan = tiling.make_plan(n, v, platform=opts.get("tile_plan") or jax.default_backend(),
                          block_tokens=opts.get("block_tokens"), block_vocab=opts.get("block_vocab"))
  return plan.describe()


def bench_one(impl_spec, objective, shape, dtype, *, d_emb, repeats, memory_only, block_tokens, block_vocab,
              interpret=None, compile_only=False):
  n, d, v = shape
  impl, tiles, _ = impl_options(impl_spec, block_tokens=block_tokens, block_vocab=block_vocab, interpret=interpret)
  if compile_only:
    hidden_NxD, w_DxV, labels_N, cost_VxE = abstract_inputs(n, d, v, d_emb, dtype)
    memory_only = True
  else:
    hidden_NxD, w_DxV, labels_N, cost_VxE = make_inputs(n, d, v, d_emb, dtype)

  def loss(hidden_NxD, w_DxV, labels_N, cost_VxE):
    cost = cost_VxE if objective == "emo" else None
    return fused_loss(hidden_NxD, w_DxV, labels_N, objective=objective, impl=impl, cost_embedding=cost,
                      **tiles)[0]

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  args = (hidden_NxD, w_DxV, labels_N, cost_VxE)
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  row = dict(impl=impl_spec, objective=objective if objective != "emo" else f"emo dE={d_emb}", shape=f"{n}x{d}x{v}",
             dtype=jnp.dtype(dtype).name, plan=plan_label(impl, tiles, shape), temp_mb=mem.temp_size_in_bytes / 1e6,
             compile_s=compile_s, time_s=float("nan"), loss=float("nan"))
  if not memory_only:
    out = compiled(*args)
    jax.block_until_ready(out)  # warm-up
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
    row["time_s"] = statistics.median(times)
    row["loss"] = float(out[0])
  return row


def format_table(rows) -> str:
  ref = {(r["objective"], r["shape"], r["dtype"]): r for r in rows if r["impl"] == "reference"}
  lines = ["| impl | plan | objective | N x d x V | dtype | temp MB | vs ref temp | time s (median) | vs ref time "
           "| loss |",
           "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    base = ref.get((r["objective"], r["shape"], r["dtype"]))
    mem_ratio = f"1/{base['temp_mb'] / r['temp_mb']:.0f}" if base and r["impl"] != "reference" and r["temp_mb"] else ""
    time_ratio = f"{r['time_s'] / base['time_s']:.2f}x" if base and r["impl"] != "reference" else ""
    lines.append(f"| {r['impl']} | {r['plan']} | {r['objective']} | {r['shape']} | {r['dtype']} | {r['temp_mb']:.1f} "
                 f"| {mem_ratio} "
                 f"| {r['time_s']:.2f} | {time_ratio} | {r['loss']:.4f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=cli_description(__doc__))
  parser.add_argument("--shapes", default="8192x1024x32000", help="comma-separated NxDxV")
  parser.add_argument("--impls", default="reference,blockwise",
                      help="comma-separated: reference, blockwise, blockwise:cpu|gpu|tpu (that plan), pallas")
  parser.add_argument("--objectives", default="ce,mile,emo")
  parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
  parser.add_argument("--d-emb", default="1024", help="comma-separated cost embedding widths dE for emo")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--memory-only", action="store_true", help="compile and report temp bytes, no timing")
  parser.add_argument("--compile-only", action="store_true",
                      help="like --memory-only but at abstract shapes: no arrays are made (for the 7B shape on CPU)")
  parser.add_argument("--block-tokens", type=int, default=None)
  parser.add_argument("--block-vocab", type=int, default=None)
  parser.add_argument("--interpret", default=None, help="pallas on CPU: gpu or tpu interpret mode")
  args = parser.parse_args(argv)
  print(f"# jax {jax.__version__}, device: {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
  rows = []
  for shape in (parse_shape(s) for s in args.shapes.split(",")):
    for dtype in args.dtypes.split(","):
      for objective in args.objectives.split(","):
        for d_emb in ([int(x) for x in args.d_emb.split(",")] if objective == "emo" else [0]):
          for impl in args.impls.split(","):
            row = bench_one(impl, objective, shape, jnp.dtype(dtype), d_emb=max(d_emb, 1), repeats=args.repeats,
                            memory_only=args.memory_only, block_tokens=args.block_tokens,
                            block_vocab=args.block_vocab, interpret=args.interpret, compile_only=args.compile_only)
            print(f"# {row}", file=sys.stderr, flush=True)
            rows.append(row)
  print(format_table(rows))
  return rows


if __name__ == "__main__":
  main()
