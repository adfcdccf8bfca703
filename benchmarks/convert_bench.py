"""Benchmark of HF conversion: export time and peak host memory (RSS) of `maxlm.convert to-hf` on a preset-sized
checkpoint, against the model's size, to show that export streams one tensor at a time; optionally from-hf too.

    python benchmarks/convert_bench.py --config mile_1b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from maxlm.checkpoint import params as ckpt_params
from maxlm import pretrained
from maxlm.core.errors import cli_description


def child_peak_rss(cmd: list[str]) -> tuple[float, float, str]:
  """(seconds, peak RSS in MiB, output) of a command run in a fresh process."""
  t0 = time.perf_counter()
  # The child reports its own VmHWM: Linux carries ru_maxrss over fork+exec, so getrusage would report the
  # parent's peak (this script's, after it generated the checkpoint) instead of the converter's.
  code = ("import runpy, sys; sys.argv = sys.argv[1:]; "
          "rc = 0\n"
          "try:\n  runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
          "except SystemExit as e:\n  rc = e.code or 0\n"
          "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
          "print('PEAK_RSS_KB', hwm); sys.exit(rc)")
  out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if out.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  peak_kb = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
  return seconds, peak_kb / 1024, out.stdout


def make_checkpoint(config: str, run_dir: str, seed: int = 0) -> dict:
  """A params-only checkpoint of the preset's shapes, filled leaf by leaf on the host (no optimizer state)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from maxlm import model  # pylint: disable=import-outside-toplevel
  from maxlm.core.config import load_config  # pylint: disable=import-outside-toplevel
  cfg = load_config(config)
  shapes = model.abstract_model(cfg.model)[1]
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.02), shapes)
  t0 = time.perf_counter()
  ckpt_params.save_params(run_dir, cfg, params)
  return {"params": int(model.param_count(shapes)), "save_seconds": time.perf_counter() - t0,
          "largest_tensor_mib": max(int(np.prod(s.shape[1:] if len(s.shape) == 3 else s.shape)) * 4
                                    for s in jax.tree.leaves(shapes)) / 2 ** 20}


def verify_export(run_dir: str, hf_dir: str, dtype: str) -> int:
  """Number of tensors checked; raises if any exported tensor differs from the checkpoint's (in HF layout)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  from maxlm.hf import names as hf_names  # pylint: disable=import-outside-toplevel
  from maxlm.hf.tensors import np_dtype  # pylint: disable=import-outside-toplevel
  _, params, _ = pretrained.load_params(run_dir)
  index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))["weight_map"]
  checked = 0
  for t in hf_names.tensors(params):
    array = params
    for k in t.key:
      array = array[k]
    expected = hf_names.to_hf(t, np.asarray(array if t.layer is None else array[t.layer])).astype(np_dtype(dtype))
    with safe_open(os.path.join(hf_dir, index[t.hf_name]), framework="numpy") as f:
      got = f.get_tensor(t.hf_name)
    if got.dtype != expected.dtype or got.shape != expected.shape or got.tobytes() != expected.tobytes():
      raise SystemExit(f"exported tensor {t.hf_name} differs from the checkpoint")
    checked += 1
  return checked


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
  p = argparse.ArgumentParser(description=cli_description(__doc__))
  p.add_argument("--config", default="mile_1b", help="preset whose model shapes to convert")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--workdir", default="/tmp/maxlm_convert_bench")
  p.add_argument("--from-hf", action="store_true", help="also time the import of the export (holds the model)")
  p.add_argument("--keep", action="store_true", help="keep the checkpoint and export afterwards")
  p.add_argument("--reuse", action="store_true", help="reuse a checkpoint kept in --workdir by --keep")
  p.add_argument("--verify", action="store_true",
                 help="check every exported tensor byte for byte against the checkpoint's params cast to --dtype")
  args = p.parse_args()
  run_dir, hf_dir = os.path.join(args.workdir, "run"), os.path.join(args.workdir, "hf")
  info_path = os.path.join(args.workdir, "checkpoint_info.json")
  if args.reuse and os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
    for d in (hf_dir, os.path.join(args.workdir, "imported")):
      shutil.rmtree(d, ignore_errors=True)
  else:
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    info = make_checkpoint(args.config, run_dir)
    with open(info_path, "w") as f:
      json.dump(info, f)
  # What importing jax, tensorstore, orbax and maxlm costs before any tensor is read.
  _, baseline_mib, _ = child_peak_rss(["maxlm.convert", "--help"])
  seconds, peak_mib, _ = child_peak_rss(["maxlm.convert", "to-hf", "--checkpoint", run_dir, "--output", hf_dir,
                                         "--dtype", args.dtype])
  result = {"config": args.config, "params": info["params"], "dtype": args.dtype,
            "checkpoint_gib": dir_bytes(run_dir) / 2 ** 30, "export_gib": dir_bytes(hf_dir) / 2 ** 30,
            "largest_tensor_mib_fp32": info["largest_tensor_mib"], "export_seconds": seconds,
            "export_peak_rss_mib": peak_mib, "import_baseline_rss_mib": baseline_mib,
            "model_fp32_mib": info["params"] * 4 / 2 ** 20}
  if args.verify:
    result["tensors_byte_identical"] = verify_export(run_dir, hf_dir, args.dtype)
  if args.from_hf:
    seconds, peak_mib, _ = child_peak_rss(["maxlm.convert", "from-hf", "--model", hf_dir, "--output",
                                           os.path.join(args.workdir, "imported"), "--config", args.config])
    result.update(from_hf_seconds=seconds, from_hf_peak_rss_mib=peak_mib)
  print(json.dumps(result, indent=2))
  if not args.keep:
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
