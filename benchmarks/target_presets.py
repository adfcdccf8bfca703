"""The paper presets compiled for their hardware on this CPU host: one `python -m maxlm.train --dry-run --topology`
per row, the compiled per-chip figures and kernels parsed from its report, one JSON line per row as it finishes.

  python benchmarks/target_presets.py --out target_presets.jsonl            # every row (tens of minutes)
  python benchmarks/target_presets.py --only mile_7b --out rows.jsonl       # rows whose preset matches
  python benchmarks/target_presets.py --variants --checks --out rows.jsonl  # and the plan's fit and check rows
  python benchmarks/target_presets.py --markdown --out rows.jsonl           # the docs table of those rows

Needs the side-folder compilers (`python -m maxlm.train --install-compilers=tpu,gpu`). Rows whose compiled peak
passes the 92% limit are recorded too (the command exits 2 there): the table shows what does not fit.
"""

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import time

# (preset, target, overrides): every paper preset on its GPU count from the papers and on a TPU slice.
ROWS = [
    ("mile_468m", "h100-16", ()),
    ("mile_468m", "v5e-16", ()),
    ("mile_1b", "h100-32", ()),
    ("mile_1b", "v5p-32", ()),
    ("mile_7b", "h100-128", ()),
    ("mile_7b", "v5p-128", ()),
    ("emo_lora_7b", "h100-1", ()),
    ("emo_lora_7b", "v5p-8", ()),
    ("emo_sft_7b", "h100-4", ()),
    ("emo_sft_7b", "v5p-8", ()),
    ("ke_olmo1b_inject", "h100-4", ()),
    ("ke_olmo1b_inject", "v5e-8", ()),
]

# The rows maxlm.state.plan.KEEPS was fitted to beside ROWS: fewer or more tokens per chip (microbatches, other chip
# counts), tensor parallelism, remat=dots, XLA's attention (docs/BENCHMARKS.md, "The plan beside the compilers").
VARIANTS = [
    ("mile_468m", "h100-16", ("train.microbatches=4",)),
    ("mile_1b", "h100-32", ("train.microbatches=2",)),
    ("mile_7b", "h100-128", ("train.microbatches=2",)),
    ("ke_olmo1b_inject", "h100-4", ("train.microbatches=4",)),
    ("emo_sft_7b", "h100-4", ("train.microbatches=4",)),
    ("mile_468m", "h100-16", ("mesh.tensor=2", "mesh.fsdp=-1")),
    ("mile_7b", "h100-128", ("mesh.tensor=4", "mesh.fsdp=-1")),
    ("ke_olmo1b_inject", "h100-4", ("model.remat=dots",)),
    ("mile_468m", "h100-16", ("model.attention=xla",)),
    ("mile_7b", "h100-128", ("model.attention=xla",)),
    ("mile_1b", "h100-32", ("model.attention=xla", "train.microbatches=2")),
    ("mile_1b", "h100-16", ()),
    ("emo_sft_7b", "h100-8", ()),
    ("mile_468m", "h100-8", ("mesh.tensor=2", "mesh.fsdp=-1")),
    ("ke_olmo1b_inject", "h100-8", ("train.microbatches=2",)),
    ("mile_7b", "h100-64", ("train.microbatches=2",)),
    ("emo_lora_7b", "h100-1", ("train.global_batch=64",)),
    ("mile_468m", "v5e-16", ("train.microbatches=4",)),
    ("mile_1b", "v5p-32", ("train.microbatches=4",)),
    ("mile_7b", "v5p-128", ("train.microbatches=4",)),
    ("ke_olmo1b_inject", "v5e-8", ("train.microbatches=2",)),
    ("emo_sft_7b", "v5p-8", ("train.microbatches=4",)),
    ("mile_468m", "v5e-16", ("mesh.tensor=2", "mesh.fsdp=-1")),
    ("mile_7b", "v5p-128", ("mesh.tensor=4", "mesh.fsdp=-1")),
    ("ke_olmo1b_inject", "v5e-8", ("model.remat=dots", "train.microbatches=2")),
    ("mile_468m", "v5e-16", ("model.attention=xla", "train.microbatches=4")),
    ("mile_1b", "v5p-32", ("model.attention=xla",)),
    ("mile_7b", "v5p-128", ("model.attention=xla", "train.microbatches=2")),
    ("mile_1b", "v5p-16", ()),
    ("mile_468m", "v5e-8", ("train.microbatches=2",)),
    ("ke_olmo1b_inject", "v5e-16", ()),
    ("emo_sft_7b", "v5p-16", ()),
    ("mile_7b", "v5p-64", ("train.microbatches=4",)),
]
# Rows compiled after KEEPS was fixed, never fitted: how the plan does on settings it has not seen.
CHECKS = [
    ("mile_468m", "h100-32", ()),
    ("ke_olmo1b_inject", "h100-16", ("mesh.tensor=2", "mesh.fsdp=-1")),
    ("emo_sft_7b", "h100-4", ("train.microbatches=2",)),
    ("mile_7b", "h100-256", ()),
    ("mile_468m", "v5e-32", ()),
    ("mile_1b", "v5p-64", ()),
    ("ke_olmo1b_inject", "v5e-8", ("train.microbatches=4",)),
    ("mile_7b", "v5p-256", ()),
    ("mile_7b", "2xv5p-128", ()),  # two slices joined by DCN: mesh.slices=2, mesh.data=2
    ("mile_468m", "h100-16", ("loss.impl=pallas",)),  # the Triton fused loss
    ("mile_468m", "v5e-16", ("loss.impl=pallas",)),  # the Mosaic fused loss
    ("demo", "h100-8", ("model.family=gpt2", "model.vocab_size=50304", "model.hidden=1024", "model.layers=24",
                        "model.heads=16", "model.kv_heads=16", "model.ffn=4096", "model.max_positions=1024",
                        "model.compute_dtype=bfloat16", "model.remat=full", "model.scan_unroll=1", "train.seq_len=1024",
                        "train.global_batch=256")),  # a GPT-2-medium-sized GELU model: one up projection, no gate
]

BYTES = re.compile(r"compiled bytes \(train step\): (.*)")
KERNEL = re.compile(r"^(attention|loss) kernel: (\S+)", re.M)
MESH = re.compile(r"mesh: (data=\d+ fsdp=\d+ tensor=\d+)")
SECONDS = re.compile(r"compile seconds: train step ([\d.]+)")


def compile_row(preset: str, target: str, overrides) -> dict:
  cmd = [sys.executable, "-m", "maxlm.train", f"--config={preset}", "--dry-run", f"--topology={target}", *overrides]
  t0 = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  out = proc.stdout + proc.stderr
  row = {"preset": preset, "target": target, "overrides": list(overrides), "rc": proc.returncode,
         "wall_s": round(time.time() - t0, 1), "command": " ".join(cmd[1:])}
  found = BYTES.search(out)
  if not found:
    row["error"] = out.strip().splitlines()[-1] if out.strip() else "no output"
    return row
  fields = dict(kv.split("=") for kv in found.group(1).split())
  row.update({k: int(v) for k, v in fields.items()})
  row["peak_gib"] = round(row["peak"] / 2**30, 2)
  row["hbm_gib"] = round(row["hbm"] / 2**30, 2)
  row["peak_share"] = round(row["peak"] / row["hbm"], 3)
  for kind, name in KERNEL.findall(out):
    row[f"{kind}_kernel"] = name
  row["allocated_gib"] = round(row["allocated"] / 2**30, 2)
  row["plan_gib"] = round(row["plan"] / 2**30, 2)
  row["plan_over_peak"] = round(row["plan"] / row["peak"], 3)
  for key, pattern in (("mesh", MESH), ("compile_s", SECONDS)):
    m = pattern.search(out)
    if m:
      row[key] = m.group(1)
  return row


def replan(row: dict) -> float:
  """The analytic plan of a row's preset and target by the current maxlm.state.plan (no compile)."""
  from maxlm.core import targets  # pylint: disable=import-outside-toplevel
  from maxlm.core.config import load_config  # pylint: disable=import-outside-toplevel
  from maxlm.state import plan, target_compile  # pylint: disable=import-outside-toplevel
  target = targets.parse(row["target"])
  overrides = list(row["overrides"])
  overrides += target_compile.slice_overrides(row["preset"], overrides, target)  # as --dry-run --topology adds them
  cfg = load_config(row["preset"], overrides, num_devices=target.chips)
  return plan.memory_estimate(cfg, target.chips, target.platform)["total"]


def markdown(path: str) -> str:
  """The docs/BENCHMARKS.md table of a JSONL file of rows, the plan column recomputed by the current plan."""
  lines = ["| preset | target | overrides | mesh | attention | compiled peak | allocated | peak / HBM | plan | "
           "plan / peak | compile s |", "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  with open(path) as f:
    for row in map(json.loads, f):
      if "peak" not in row:
        lines.append(f"| {row['preset']} | {row['target']} | {' '.join(row['overrides'])} | error: {row['error']} |")
        continue
      mesh = row.get("mesh", "").replace("data=", "").replace(" fsdp=", ", ").replace(" tensor=", ", ")
      planned = replan(row)
      lines.append(f"| {row['preset']} | {row['target']} | {' '.join(row['overrides'])} | {mesh} | "
                   f"{row.get('attention_kernel', '')} | {row['peak'] / 2**30:.2f} | {row['allocated'] / 2**30:.2f} | "
                   f"{100 * row['peak'] / row['hbm']:.1f}% | {planned / 2**30:.2f} | {planned / row['peak']:.2f} | "
                   f"{float(row.get('compile_s', 0)):.0f} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="JSONL file the rows are appended to")
  parser.add_argument("--only", default="", help="only rows whose preset or target contains this")
  parser.add_argument("--variants", action="store_true", help="also the rows the plan was fitted to (VARIANTS)")
  parser.add_argument("--checks", action="store_true", help="also the rows that check the plan (CHECKS)")
  parser.add_argument("--jobs", type=int, default=1, help="compiles at a time (each is one process)")
  parser.add_argument("--markdown", action="store_true", help="print the table of the rows in --out and exit")
  args = parser.parse_args()
  if args.markdown:
    print(markdown(args.out))
    return 0
  rows = [r for r in ROWS + (VARIANTS if args.variants else []) + (CHECKS if args.checks else [])
          if not args.only or args.only in r[0] or args.only in r[1]]
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for row in pool.map(lambda r: compile_row(*r), rows):  # in table order, as each finishes
      print(json.dumps(row), flush=True)
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
