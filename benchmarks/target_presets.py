"""The paper presets compiled for their hardware on this CPU host: one `python -m maxlm.train --dry-run --topology`
per row, the compiled per-chip figures and kernels parsed from its report, one JSON line per row as it finishes.

  python benchmarks/target_presets.py --out target_presets.jsonl            # every row (tens of minutes)
  python benchmarks/target_presets.py --only mile_7b --out rows.jsonl       # rows whose preset matches

Needs the side-folder compilers (`python -m maxlm.train --install-compilers=tpu,gpu`). Rows whose compiled peak
passes the 92% limit are recorded too (the command exits 2 there): the table shows what does not fit.
"""

import argparse
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

BYTES = re.compile(r"compiled bytes \(train step\): (.*)")
KERNEL = re.compile(r"^(attention|loss) kernel: (\S+)", re.M)
PLAN = re.compile(r"total\s+([\d.]+) (MiB|GiB)")
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
  plan = PLAN.search(out)
  if plan:
    row["plan_gib"] = round(float(plan.group(1)) / (1024 if plan.group(2) == "MiB" else 1), 2)
  for key, pattern in (("mesh", MESH), ("compile_s", SECONDS)):
    m = pattern.search(out)
    if m:
      row[key] = m.group(1)
  return row


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="JSONL file the rows are appended to")
  parser.add_argument("--only", default="", help="only rows whose preset or target contains this")
  args = parser.parse_args()
  for preset, target, overrides in ROWS:
    if args.only and args.only not in preset and args.only not in target:
      continue
    row = compile_row(preset, target, overrides)
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
