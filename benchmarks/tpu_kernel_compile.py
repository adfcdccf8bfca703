"""Compiles the Mosaic fused loss (impl="pallas", value and grad) for TPU targets on a CPU host with libtpu's compiler.

Owns nothing the library uses: it checks that the VMEM-sized tile plan (kernels/tiling.py) compiles on each chip.

  JAX_PLATFORMS=cpu PYTHONPATH=.:$HOME/.cache/maxlm/compilers/tpu python benchmarks/tpu_kernel_compile.py \
      --targets v4,v5e,v5p,v6e --d 1024,2048,4096 --objectives ce,mile,emo128,emod

Needs libtpu importable (the side folder of `python -m maxlm.train --install-compilers=tpu` on PYTHONPATH, or a
jax[tpu] environment); no TPU. Each target is a 2x2 slice from
jax.experimental.topologies (as MaxText's train_compile.py does); the tokens are split over its devices (N per
device = --tokens-per-chip), the head is replicated. Per case it prints the tiles the planner chose for the
target's device_kind, the planner's VMEM estimate against its budget, whether XLA:TPU compiled the program (or
the first line of its error), the compile seconds and the compiled program's temp bytes. --blocks BTxBV forces
the kernel's blocks (e.g. 1024x512, the plan that assumed 64 MiB of VMEM on every chip).

  ... benchmarks/tpu_kernel_compile.py --measure-vmem --targets v4,v5p,v5e,v6e

measures instead the VMEM each Mosaic kernel (fwd, dh, dw) needs at the blocks of MEASURE_CASES: the smallest
vmem_limit_bytes (to 0.25 MiB) at which it compiles, found by bisection; tiling.tpu_kernel_vmem must bound these.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices come from the topology, not a backend
# libtpu keeps a lockfile per host; a compile-only process needs no exclusive claim on a (non-existent) TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from maxlm.kernels import fused_loss, tiling  # noqa: E402

# target -> (topology_name, chip_config_name) of jax.experimental.topologies.get_topology_desc. v4 and v5p are
# megacore chips (one device = two TensorCores); v5e and v6e have one TensorCore per chip.
TARGETS = {
  "v4": ("v4:2x2x1", "megacore"),
  "v5e": ("v5e:2x2", "default"),
  "v5p": ("v5:2x2x1", "megacore"),
  "v6e": ("v6e:2x2", "default"),
}
# (kernel, block_tokens, block_vocab, d, dE or 0, itemsize) whose VMEM --measure-vmem bisects for.
MEASURE_CASES = [(k, bt, bv, 1024, e, 2) for k in ("fwd", "dh", "dw") for e in (0, 128)
                 for bt, bv in ((1024, 512), (512, 256), (256, 128))]
MEASURE_CASES += [("dh", 256, 128, 4096, 0, 2), ("dw", 256, 128, 4096, 0, 2), ("dh", 256, 256, 4096, 128, 2),
                  ("dh", 1024, 512, 1024, 0, 4)]
# objective name -> (fused_loss objective, cost width: 0 none, -1 = d)
OBJECTIVES = {"ce": ("ce", 0), "mile": ("mile", 0), "emo128": ("emo", 128), "emod": ("emo", -1)}


def topology_devices(target: str):
  """The compile-only devices of a 2x2 slice of `target` (no TPU needed: libtpu describes it)."""
  from jax.experimental import topologies
  name, chip_config = TARGETS[target]
  topology = topologies.get_topology_desc(topology_name=name, platform="tpu", chip_config_name=chip_config,
                                          chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
  return topology.devices


def compile_case(devices, d: int, objective: str, *, tokens_per_chip: int, vocab: int, blocks=None) -> dict:
  """Compiles jit(value_and_grad(fused_loss impl=pallas)) over a data-parallel mesh of `devices`; one result row."""
  fused_objective, d_emb = OBJECTIVES[objective]
  d_emb = d if d_emb == -1 else d_emb
  kind = devices[0].device_kind
  n = tokens_per_chip * len(devices)
  user = dict(block_tokens=blocks[0], block_vocab=blocks[1]) if blocks else {}
  plan = tiling.tpu_kernel_blocks(tokens_per_chip, d, vocab, d_emb or None, 2, device_kind=kind, **user)
  row = dict(device_kind=kind, devices=len(devices), d=d, objective=objective, d_emb=d_emb or None,
             tokens_per_chip=tokens_per_chip, vocab=vocab, tiles=f"{plan['block_tokens']}x{plan['block_vocab']}",
             estimate_mib=round(tiling.tpu_kernel_vmem_bytes(plan["block_tokens"], plan["block_vocab"], d,
                                                             d_emb or None, 2) / tiling.MIB, 1),
             budget_mib=round(tiling.tpu_vmem_budget(kind) / tiling.MIB, 1))
  mesh = Mesh(np.asarray(devices).reshape(-1, 1, 1), ("data", "fsdp", "tensor"))

  def loss(hidden, lm_head, labels, cost):
    return fused_loss(hidden, lm_head, labels, objective=fused_objective, impl="pallas", mesh=mesh,
                      cost_embedding=cost, **user)[0]

  sharded = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
  args = [sharded((n, d), jnp.bfloat16, P("data", None)), sharded((d, vocab), jnp.bfloat16, P()),
          sharded((n,), jnp.int32, P("data")),
          sharded((vocab, d_emb), jnp.bfloat16, P()) if d_emb else None]
  start = time.perf_counter()
  try:
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    row.update(compiled=True, result="compiled", temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
  except Exception as e:  # noqa: BLE001 - the compiler's error is the result
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    row.update(compiled=False, result=lines[0][:160] if lines else type(e).__name__, temp_bytes=None)
  row["compile_s"] = round(time.perf_counter() - start, 1)
  return row


def kernel_compiles(device, kernel: str, bt: int, bv: int, d: int, d_emb: int, itemsize: int, limit: int) -> bool:
  """Whether one Mosaic fused-loss kernel alone (fwd, dh or dw; two blocks each way) compiles under `limit` bytes."""
  from maxlm.kernels import pallas_common, pallas_tpu
  cfg = pallas_common.KernelConfig(backend="tpu", block_tokens=bt, block_vocab=bv, block_d=tiling.round_up(d, 128),
                                   block_e=128, ignore_index=-100, vocab_axis=None, interpret=False,
                                   vmem_limit_bytes=limit)
  dtype = {2: jnp.bfloat16, 4: jnp.float32}[itemsize]

  def run(hidden, w, labels, cost, col_N):
    padded = pallas_common.pad_operands(cfg, hidden, w, labels, cost if d_emb else None)
    if kernel == "fwd":
      return pallas_tpu.forward(cfg, padded)
    col = col_N[:, None]
    grads = pallas_tpu.backward(cfg, padded, col, col, col, col, col if d_emb else None)
    return grads[0] if kernel == "dh" else grads[1]

  sharding = jax.sharding.SingleDeviceSharding(device)
  struct = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  n, v = 2 * bt, 2 * bv
  args = (struct((n, d), dtype), struct((d, v), dtype), struct((n,), jnp.int32),
          struct((v, max(d_emb, 1)), jnp.float32), struct((n,), jnp.float32))
  try:
    jax.jit(run).lower(*args).compile()
    return True
  except Exception as e:  # noqa: BLE001
    if "vmem" not in str(e).lower():
      raise
    return False


def measure_vmem(target: str, cases=MEASURE_CASES) -> list[dict]:
  """Per case, the smallest VMEM limit (MiB, to 0.25) at which the kernel compiles on `target`, and the estimate."""
  device = topology_devices(target)[0]
  cap = tiling.tpu_vmem_bytes(device.device_kind) / tiling.MIB
  rows = []
  for kernel, bt, bv, d, d_emb, itemsize in cases:
    fits = lambda mib: kernel_compiles(device, kernel, bt, bv, d, d_emb, itemsize, int(mib * tiling.MIB))
    needs = None
    if fits(cap):
      lo, hi = 0.0, cap
      while hi - lo > 0.25:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
      needs = hi
    estimate = tiling.tpu_kernel_vmem(bt, bv, d, d_emb or None, itemsize)[kernel] / tiling.MIB
    rows.append(dict(target=target, device_kind=device.device_kind, kernel=kernel, tiles=f"{bt}x{bv}", d=d,
                     d_emb=d_emb or None, itemsize=itemsize, needs_mib=needs, estimate_mib=round(estimate, 2)))
  return rows


def markdown(rows) -> str:
  out = ["| target | device_kind | d | objective | tiles (bt x bv) | VMEM est / budget MiB | result | compile s |"
         " temp MiB |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    temp = "-" if r["temp_bytes"] is None else f"{r['temp_bytes'] / tiling.MIB:.0f}"
    out.append(f"| {r['target']} | {r['device_kind']} | {r['d']} | {r['objective']} | {r['tiles']} |"
               f" {r['estimate_mib']} / {r['budget_mib']} | {r['result']} | {r['compile_s']} | {temp} |")
  return "\n".join(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--targets", default="v4,v5e,v5p,v6e")
  parser.add_argument("--d", default="1024,2048,4096")
  parser.add_argument("--objectives", default="ce,mile,emo128,emod", help=f"of {list(OBJECTIVES)}")
  parser.add_argument("--tokens-per-chip", type=int, default=8192)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--blocks", default=None, help="BTxBV: force the kernel's blocks instead of the planner's")
  parser.add_argument("--json", default=None, help="also append each row as a JSON line to this file")
  parser.add_argument("--measure-vmem", action="store_true", help="bisect each kernel's VMEM at MEASURE_CASES")
  args = parser.parse_args(argv)
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    raise SystemExit("tpu_kernel_compile needs libtpu: put the compilers' side folder on PYTHONPATH "
                     "(PYTHONPATH=.:$HOME/.cache/maxlm/compilers/tpu, after python -m maxlm.train --install-compilers=tpu)")
  blocks = tuple(int(x) for x in args.blocks.lower().split("x")) if args.blocks else None
  print(f"jax {jax.__version__}; libtpu compile-only targets", flush=True)
  if args.measure_vmem:
    for target in args.targets.split(","):
      for row in measure_vmem(target):
        print(json.dumps(row), flush=True)
    return 0
  rows = []
  for target in args.targets.split(","):
    devices = topology_devices(target)
    for d in (int(x) for x in args.d.split(",")):
      for objective in args.objectives.split(","):
        row = dict(target=target, **compile_case(devices, d, objective, tokens_per_chip=args.tokens_per_chip,
                                                 vocab=args.vocab, blocks=blocks))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
          with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
  print(markdown(rows))
  return 0 if all(r["compiled"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
