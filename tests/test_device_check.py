"""benchmarks/device_check.py: its CPU smoke mode runs every step and writes well-formed result rows.

The GPU figures themselves come from a device run (docs/BENCHMARKS.md); here the script's plumbing is checked:
every impl's correctness against the host reference, timing rows, the training CLI's MFU, the time budget, and
the import shim a bare checkout on the device machine needs.
"""

import json
import os
import pathlib
import site
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.py"
IMPLS = {"reference", "blockwise:gpu", "blockwise:cpu", "pallas"}


def run_check(tmp_path, *extra, timeout=600):
  result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]  # every line is one JSON object


def by_step(rows, step):
  return [r for r in rows if r["step"] == step]


def test_cpu_smoke_runs_every_step(tmp_path):
  # No time budget: on a loaded machine the script's own deadline would skip steps this test needs (CI saw it).
  rows = run_check(tmp_path, "--budget-s", "1e9", timeout=1800)
  assert [r["step"] for r in rows][:3] == ["start", "env", "ceiling"] and rows[-1]["step"] == "done"
  assert not [r for r in rows if "error" in r or "skipped" in r], [r for r in rows if "error" in r or "skipped" in r]
  correct = by_step(rows, "correct")
  assert {r["impl"] for r in correct} == IMPLS and {r["dtype"] for r in correct} == {"float32", "bfloat16"}
  for r in correct:  # each impl against the fp32 reference computed separately on the host
    assert r["ok"] and r["grad_rel_err"] < (1e-4 if r["dtype"] == "float32" else 2e-2), r
  timed = by_step(rows, "time")
  assert {r["impl"] for r in timed} == IMPLS
  for r in timed:
    assert r["ms"] > 0 and r["tflops_8NdV"] >= 0 and r["temp_mib"] >= 0, r
  assert any(r["objective"] == "emo" and "tflops_with_similarity" in r for r in timed)
  (train,) = by_step(rows, "train")
  # MFU > 0 only: on a CPU the peak is a matmul measured at start, which a loaded machine measures low.
  assert train["rc"] == 0 and train["mfu"] > 0 and train["tokens_per_sec"] > 0, train
  (summary,) = by_step(rows, "summary")
  assert summary["correctness_failures"] == [] and set(summary["per_impl"]) == IMPLS


def test_time_budget_skips_what_does_not_fit(tmp_path):
  rows = run_check(tmp_path, "--budget-s", "0", timeout=300)
  measured = [r for r in rows if r["step"] in ("ceiling", "correct", "time", "train")]
  assert measured and all(r.get("skipped") == "time budget" for r in measured), measured
  assert rows[-1]["step"] == "done"


def test_shim_makes_a_bare_checkout_importable(tmp_path):
  sys.path.insert(0, str(SCRIPT.parent))
  try:
    import device_check
  finally:
    sys.path.pop(0)
  shim = device_check.make_shim(tmp_path / "shim")
  # -S: no site processing, so no .pth file (and no editable install of maxlm) is seen, as on the device machine.
  paths = os.pathsep.join([shim, *site.getsitepackages()])
  code = "import maxlm.kernels.tiling as t, maxlm.data_pipelines, maxlm.configs; print(t.__file__)"
  result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd="/",
                          env={**os.environ, "PYTHONPATH": paths, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert pathlib.Path(result.stdout.strip()).resolve() == (ROOT / "kernels" / "tiling.py").resolve()
  probe = subprocess.run([sys.executable, "-S", "-c", "import maxlm.kernels"], capture_output=True, cwd="/",
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())})
  assert probe.returncode != 0  # without the shim the bare checkout is not importable: the shim is what helps
