"""Two real processes == one: `jax.distributed` over loopback on CPU (gloo), a 4-device global mesh of 2 processes
x 2 devices, each process feeding only its own rows through `sharding.global_batch`, gives the same losses and
parameters as a single-process run on 1 device."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import pytest


pytestmark = pytest.mark.multidevice

WORKER = r"""
import json, sys
import numpy as np
import jax

role, port, process_id, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if role == "worker":
  try:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
  except Exception as e:  # the environment, not maxlm: the test skips with this text
    print("DISTRIBUTED_INIT_FAILED: " + f"{type(e).__name__}: {e}".replace("\n", " "), flush=True)
    sys.exit(3)

from jax.experimental import multihost_utils
from maxlm import train
from maxlm.state import optim
from maxlm.state import plan
from maxlm.core import sharding
from maxlm.state import layout as state_lib
from maxlm.state import step as step_lib
from maxlm.core.config import load_config

TINY = ["model.vocab_size=64", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
        "model.ffn=64", "model.max_positions=32", "model.compute_dtype=float32", "model.remat=full",
        "train.seq_len=16", "train.global_batch=8", "train.steps=3", "optim.warmup_steps=1", "optim.lr=1e-2"]
CASES = json.loads(sys.argv[5])

def global_batches(seed):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(3):
    tokens = rng.integers(0, 64, size=(8, 17)).astype(np.int32)
    targets = tokens[:, 1:].copy()
    targets[rng.random(targets.shape) < 0.1] = -100
    out.append({"inputs": tokens[:, :-1], "targets": targets})
  return out

def local_rows(mesh, shape):
  # The rows of the global batch that live on this process's devices, as the batch sharding lays them out.
  idx = sharding.batch_sharding(mesh).addressable_devices_indices_map(shape).values()
  rows = sorted({r for i in idx for r in range(*i[0].indices(shape[0]))})
  assert rows == list(range(rows[0], rows[-1] + 1)), rows  # one contiguous block per process
  return rows

def split_across_processes(x):
  # True when this process's shards do not cover the whole array: part of it lives only on the other process.
  idx = {tuple(s.indices(n)[:2] for s, n in zip(i, x.shape))
         for i in x.sharding.addressable_devices_indices_map(x.shape).values()}
  return sum(int(np.prod([b - a for a, b in i])) for i in idx) < x.size

results = {}
for case in CASES:
  shape = tuple(case["mesh"]) if role == "worker" else (1, 1, 1)
  devices = jax.devices() if role == "worker" else jax.devices()[:1]
  cfg = load_config("demo", TINY + [f"loss.objective={case['objective']}", f"loss.impl={case['impl']}",
                                    f"train.microbatches={case['micro']}", f"mesh.data={shape[0]}",
                                    f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"], num_devices=len(devices))
  setup = state_lib.layout(cfg, sharding.make_mesh(shape, devices))
  step, _ = step_lib.make_train_step(setup)
  state = state_lib.init_state(setup)
  losses, rows, placed = [], None, True
  for b in global_batches(case["seed"]):
    rows = local_rows(setup.mesh, b["inputs"].shape)
    batch = sharding.global_batch(setup.mesh, {k: v[rows[0]:rows[-1] + 1] for k, v in b.items()})
    if role == "worker" and not losses:  # the assembled global array is exactly the global batch, rows in order
      placed &= all(np.array_equal(multihost_utils.process_allgather(batch[k], tiled=True), b[k]) for k in b)
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  params = state["params"]
  if role == "worker":
    params = multihost_utils.process_allgather(params, tiled=True)
  leaves = [np.asarray(x, np.float32) for x in jax.tree.leaves(jax.device_get(params))]
  if process_id == 0:
    np.savez(f"{out_dir}/{role}_{case['name']}.npz", *leaves)
  n_cross = sum(1 for x in jax.tree.leaves(state["params"]) if split_across_processes(x))
  results[case["name"]] = {"losses": losses, "rows": rows, "placed": bool(placed), "n_cross_process": n_cross}
print("RESULT " + json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                              "results": results}), flush=True)
"""

# blockwise: tensor parallelism inside each process, fsdp across the two; reference: data x fsdp over all four.
CASES = [
    {"name": "mile_blockwise", "objective": "mile", "impl": "blockwise", "micro": 1, "mesh": [1, 2, 2], "seed": 0},
    {"name": "ce_reference", "objective": "ce", "impl": "reference", "micro": 2, "mesh": [2, 2, 1], "seed": 1},
]
TIMEOUT_S = 300
PREEMPT_TIMEOUT_S = 90  # from SIGTERM to both processes gone; a multi-host preemption deadlock fails here
FAILED = "maxlm: error:"


def _free_port() -> int:
  try:
    import portpicker
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict:
  # Optimisation level 0 shortens LLVM's compile of every program about 3x on CPU; both sides of each comparison use it.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}
  # A proxy can hang the loopback coordinator; an outer SLURM/MPI/Kubernetes job must not leak into the children.
  for key in [k for k in env if k.lower().endswith("_proxy") or k.startswith(("SLURM_", "OMPI_", "PMI_"))
              or k == "KUBERNETES_SERVICE_HOST"]:
    env.pop(key)
  return {**env, **extra}


def _spawn(argv: list[str], env: dict, log_dir: str, name: str) -> tuple[subprocess.Popen, str]:
  # Output goes to files, not pipes, so the processes can be polled together without a full pipe blocking one.
  log = os.path.join(log_dir, f"{name}.log")
  with open(log, "w") as f:
    return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, text=True, env=env, cwd=log_dir), log


def _wait_all(procs: list[tuple[subprocess.Popen, str]], timeout_s: float) -> list[tuple[int, str]]:
  """Waits for all under one deadline; when one fails or the deadline passes, kills the others (no orphans)."""
  deadline = time.monotonic() + timeout_s
  try:
    while any(p.poll() is None for p, _ in procs):
      # A process that exited non-zero, or printed a maxlm error (it then waits in jax.distributed's shutdown
      # barrier for the others), has failed the run.
      if any(p.poll() not in (None, 0) or FAILED in open(log).read() for p, log in procs):
        break
      if time.monotonic() > deadline:
        logs = "\n".join(open(log).read()[-1500:] for _, log in procs)
        pytest.fail(f"multi-process run still going after {timeout_s}s (a deadlock between processes?):\n{logs}")
      time.sleep(0.2)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=30)
  return [(p.returncode, open(log).read()) for p, log in procs]


def _check_started(outs: list[tuple[int, str]]) -> None:
  """Skips, with JAX's error, where jax.distributed itself cannot start here (the machine, not maxlm)."""
  for rc, out in outs:
    if "DISTRIBUTED_INIT_FAILED: " in out:
      pytest.skip("jax.distributed cannot run here: " + out.split("DISTRIBUTED_INIT_FAILED: ")[-1].splitlines()[0])
    if rc != 0 and "    jax.distributed.initialize()\n" in out:  # the CLI's traceback ends in initialize()
      pytest.skip("jax.distributed cannot run here: " + out.strip().splitlines()[-1])


def _result(out: str) -> dict:
  return json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("multiprocess"))
  port, cases = str(_free_port()), json.dumps(CASES)
  argv = lambda role, i: [sys.executable, "-c", WORKER, role, port, str(i), out_dir, cases]
  procs = [_spawn(argv("worker", i), _env(2), out_dir, f"worker{i}") for i in range(2)]
  procs.append(_spawn(argv("single", 0), _env(1), out_dir, "single"))
  outs = _wait_all(procs, TIMEOUT_S)
  _check_started(outs)
  for rc, out in outs:
    assert rc == 0, f"exit {rc}\n{out[-5000:]}"
  workers = sorted((_result(o) for _, o in outs[:2]), key=lambda r: r["process_index"])
  return {"workers": workers, "single": _result(outs[2][1]), "dir": out_dir}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_two_processes_match_one(runs, case):
  name = case["name"]
  w0, w1 = (w["results"][name] for w in runs["workers"])
  single = runs["single"]["results"][name]["losses"]
  assert [w["process_count"] for w in runs["workers"]] == [2, 2]
  # Each process fed only its own half of the batch; together they cover it, and it landed in order.
  assert w0["rows"] == list(range(0, 4)) and w1["rows"] == list(range(4, 8)), (w0["rows"], w1["rows"])
  assert w0["placed"] and w1["placed"]
  # data=1: the fsdp axis spans the two processes, so weights are split across them; data=2: each process holds a
  # full fsdp-sharded copy and only gradients cross.
  assert (w0["n_cross_process"] > 0) == (case["mesh"][0] == 1), w0["n_cross_process"]
  assert w0["losses"] == w1["losses"]  # the loss is one global value, identical on every process
  for a, b in zip(single, w0["losses"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (single, w0["losses"])
  p1 = np.load(os.path.join(runs["dir"], f"single_{name}.npz"))
  p2 = np.load(os.path.join(runs["dir"], f"worker_{name}.npz"))
  assert len(p1.files) == len(p2.files) > 0
  diff = max(float(np.max(np.abs(p1[k] - p2[k]))) for k in p1.files)
  assert diff < 2e-5, diff
  assert single[-1] != single[0]  # the steps did update the model


# ----------------------------------------------------------------------------- the CLI, as slurm_gpu.sbatch runs it

CLI_OVERRIDES = [
    "model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2", "model.ffn=64",
    "model.max_positions=32", "model.compute_dtype=float32", "model.remat=none", "train.seq_len=16",
    "train.global_batch=8", "optim.warmup_steps=1", "run.progress=false", "run.tensorboard=false",
    "run.eval_batches=0", "run.log_every=1",
]


def _slurm_env(process_id: int, port: str) -> dict:
  # What `srun --ntasks=2` exports to task `process_id` on one node; jax.distributed.initialize() detects it.
  return _env(2, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_NUM_NODES="1", SLURM_NTASKS="2",
              SLURM_PROCID=str(process_id), SLURM_LOCALID=str(process_id), JAX_COORDINATOR_PORT=port)


def _logged_steps(run_dir: str) -> list[int]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l)["step"] for l in f if l.endswith("\n") and '"loss"' in l]


def _train_cli(run_dir: str, steps: int, name: str, *, sigterm_process_0_after: int = 0) -> list[tuple[int, str]]:
  port = str(_free_port())
  argv = [sys.executable, "-m", "maxlm.train", "--config=demo", "--distributed", "--preempt-exit-code=143", *CLI_OVERRIDES,
          f"train.steps={steps}", f"run.dir={run_dir}"]
  procs = [_spawn(argv, _slurm_env(i, port), os.path.dirname(run_dir), f"{name}{i}") for i in range(2)]
  if sigterm_process_0_after:
    # A preemption notice that reaches one host first: both must still stop after the same step, save, exit 0.
    deadline = time.monotonic() + TIMEOUT_S
    while len(_logged_steps(run_dir)) < sigterm_process_0_after and time.monotonic() < deadline:
      if any(p.poll() is not None for p, _ in procs):
        break
      time.sleep(0.2)
    procs[0][0].send_signal(signal.SIGTERM)
    outs = _wait_all(procs, PREEMPT_TIMEOUT_S)
  else:
    outs = _wait_all(procs, TIMEOUT_S)
  _check_started(outs)
  return outs


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp("cli") / "run")
  return run_dir, _train_cli(run_dir, 1000, "train", sigterm_process_0_after=2)


def test_cli_distributed_two_processes_stop_together_on_sigterm(cli_run):
  run_dir, outs = cli_run
  for rc, out in outs:
    assert rc == 143, f"exit {rc}\n{out[-5000:]}"  # saved after the SIGTERM; --preempt-exit-code, as launch/ sets it
  # One global mesh over both processes, said once: process 0 prints maxlm's lines, process 1 stays quiet.
  assert "mesh data=1 fsdp=4 tensor=1 (4 cpu devices) in 2 processes" in outs[0][1], outs[0][1][-3000:]
  assert not [l for l in outs[1][1].splitlines() if "maxlm:" in l], outs[1][1][-3000:]
  saved = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
  assert len(saved) == 1 and saved[0] >= 2, saved
  assert f"preempted (SIGTERM) at step {saved[0]}" in outs[0][1], outs[0][1][-3000:]
  assert _logged_steps(run_dir) == list(range(1, saved[0] + 1))


@pytest.mark.slow  # resume itself is covered single-process (test_resume) and the two-process run above
def test_cli_distributed_resume(cli_run):
  from maxlm.run.trackers import read_metrics
  run_dir, first = cli_run
  if any(rc != 143 for rc, _ in first):
    pytest.skip("the first run failed")
  stopped = max(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
  outs = _train_cli(run_dir, stopped + 1, "resume")
  for rc, out in outs:
    assert rc == 0, f"exit {rc}\n{out[-3000:]}"  # ran to train.steps: no preemption, exit 0
  assert "resumed from" in outs[0][1] and f"at step {stopped}" in outs[0][1], outs[0][1][-3000:]
  rows = [r for r in read_metrics(run_dir) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, stopped + 2))
  assert all(np.isfinite(r["loss"]) for r in rows)


# ----------------------------------------------------------------------------- batches by mesh position, any host count

RESIZE_STEPS, RESIZE_SAVED = 5, 3  # a run of 4 processes saves at step 3; resumes on 2 and on 1 run to step 5
CONSTANT_LR = "optim.schedule=constant"  # the curve of a run stopped at step 3 is then a prefix of one of 5 steps


def _cli(run_dir: str, processes: int, devices, name: str, *overrides: str,
         only: Optional[dict] = None) -> list[tuple[subprocess.Popen, str]]:
  """`python -m maxlm.train` as a user launches it on `processes` hosts of `devices` devices (or a list: each
  process's count), flags given by hand; `only`: {process: [overrides of that process alone]}."""
  port = str(_free_port())
  procs = []
  for i in range(processes):
    argv = [sys.executable, "-m", "maxlm.train", "--config=demo", *CLI_OVERRIDES, CONSTANT_LR, f"run.dir={run_dir}",
            *overrides, *(only or {}).get(i, [])]
    if processes > 1:
      argv[3:3] = ["--distributed", f"--coordinator-address=127.0.0.1:{port}", f"--num-processes={processes}",
                   f"--process-id={i}"]
    count = devices[i] if isinstance(devices, list) else devices
    procs.append(_spawn(argv, _env(count), os.path.dirname(run_dir), f"{name}{i}"))
  return procs


def _finish(procs) -> list[tuple[int, str]]:
  outs = _wait_all(procs, TIMEOUT_S)
  _check_started(outs)
  for rc, out in outs:
    assert rc == 0, f"exit {rc}\n{out[-4000:]}"
  return outs


def _losses(run_dir: str) -> dict[int, float]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _close(a: dict, b: dict) -> bool:
  return sorted(a) == sorted(b) and all(abs(a[s] - b[s]) <= 2e-5 * max(1.0, abs(a[s])) for s in a)


@pytest.fixture(scope="module")
def reference_and_tensor_peers(tmp_path_factory):
  """One process (the reference curve), and tensor parallelism across 2 processes of 1 device each, side by side."""
  root = tmp_path_factory.mktemp("peers")
  single = _cli(str(root / "single"), 1, 1, "single", f"train.steps={RESIZE_STEPS}")
  peers = _cli(str(root / "peers"), 2, 1, "peers", f"train.steps={RESIZE_SAVED}", "mesh.tensor=2", "mesh.fsdp=1")
  outs = _finish(single + peers)
  return _losses(str(root / "single")), _losses(str(root / "peers")), outs


def test_tensor_parallel_across_processes_equals_one_process(reference_and_tensor_peers):
  """Tensor peers on different hosts hold the same batch rows: each process loads all 8 (not 8 / 2), the step
  runs, and the curve is the single-process one."""
  single, peers, outs = reference_and_tensor_peers
  assert "mesh data=1 fsdp=1 tensor=2 (2 cpu devices)" in outs[1][1], outs[1][1][-2000:]
  assert _close(peers, {s: single[s] for s in range(1, RESIZE_SAVED + 1)}), (peers, single)
  assert single[1] != single[RESIZE_STEPS]


@pytest.fixture(scope="module")
def resized(tmp_path_factory, reference_and_tensor_peers):
  """4 processes train to step 3 and save; the run is then resumed on 2 processes and (a copy) on 1."""
  import shutil
  root = tmp_path_factory.mktemp("resize")
  four = str(root / "four")
  _finish(_cli(four, 4, 1, "four", f"train.steps={RESIZE_SAVED}"))
  at_four = _losses(four)
  shutil.copytree(four, str(root / "onto1"))
  outs = _finish(_cli(four, 2, 1, "onto2_", f"train.steps={RESIZE_STEPS}")
                 + _cli(str(root / "onto1"), 1, 1, "onto1_", f"train.steps={RESIZE_STEPS}"))
  return at_four, _losses(four), _losses(str(root / "onto1")), outs


@pytest.mark.slow  # 4 + 3 processes, about 2 minutes on 2 cores
def test_same_global_batches_on_1_2_and_4_processes_and_resume_across_counts(reference_and_tensor_peers, resized):
  """The global batch at a step is a function of the seed and the step alone: 4 processes follow the 1-process
  curve, and their checkpoint resumed on 2 processes and on 1 continues that curve (no flag needed)."""
  single = reference_and_tensor_peers[0]
  at_four, onto2, onto1, outs = resized
  assert _close(at_four, {s: single[s] for s in range(1, RESIZE_SAVED + 1)}), (at_four, single)
  for out in (outs[0][1], outs[2][1]):  # process 0 of the 2-process resume, and the 1-process one
    assert "resumed from" in out and f"at step {RESIZE_SAVED}" in out, out[-3000:]
  assert _close(onto2, single), (onto2, single)
  assert _close(onto1, single), (onto1, single)


# ----------------------------------------------------------------------------- one config, one stop


def test_a_config_that_differs_between_processes_stops_all_of_them_naming_the_keys(tmp_path):
  procs = _cli(str(tmp_path / "run"), 2, 1, "differ",
               only={0: ["train.steps=2"], 1: ["optim.lr=0.5", "train.steps=3"]})
  deadline = time.monotonic() + TIMEOUT_S
  while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
    time.sleep(0.2)
  outs = _wait_all(procs, 1)
  _check_started(outs)
  for rc, out in outs:
    assert rc == 2, f"exit {rc}\n{out[-3000:]}"
    assert "resolved different configs" in out and "optim.lr: 0.003 on process 0, 0.5 on process 1" in out, out[-3000:]
    assert "train.steps" in out and "parameters on mesh" not in out  # stopped before any setup


def test_ctrl_c_under_distributed_saves_and_exits_130_on_every_process(tmp_path):
  run_dir = str(tmp_path / "run")
  procs = _cli(run_dir, 2, 1, "ctrlc", "train.steps=1000")
  deadline = time.monotonic() + TIMEOUT_S
  while len(_logged_steps(run_dir)) < 2 and time.monotonic() < deadline and all(p.poll() is None for p, _ in procs):
    time.sleep(0.2)
  procs[1][0].send_signal(signal.SIGINT)  # Ctrl-C reaches one host
  deadline = time.monotonic() + PREEMPT_TIMEOUT_S  # exit 130 is the expected end here, not a failure to cut short
  while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
    time.sleep(0.2)
  outs = _wait_all(procs, 1)
  _check_started(outs)
  saved = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
  assert len(saved) == 1 and saved[0] >= 2, saved
  for rc, out in outs:
    assert rc == 130, f"exit {rc}\n{out[-3000:]}"
  assert f"preempted (SIGINT) at step {saved[0]}" in outs[0][1], outs[0][1][-2000:]


# ----------------------------------------------------------------------------- traces per process, unequal devices


def test_profile_steps_write_one_trace_per_process(tmp_path):
  run_dir = tmp_path / "run"
  _finish(_cli(str(run_dir), 2, 1, "profile", "train.steps=2", "run.profile_steps=0:1", "checkpoint.enabled=false"))
  for i in range(2):  # two processes on one host: each its own folder (one shared path held a single trace)
    traces = list((run_dir / "profile" / f"process_{i}").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1, sorted(str(p) for p in (run_dir / "profile").rglob("*"))


def test_unequal_devices_per_process_is_a_clear_error_that_leaves_nothing(tmp_path):
  run_dir = tmp_path / "run"
  procs = _cli(str(run_dir), 2, [2, 1], "unequal", "train.steps=2")
  deadline = time.monotonic() + TIMEOUT_S
  while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
    time.sleep(0.2)
  outs = _wait_all(procs, 1)
  _check_started(outs)
  for rc, out in outs:
    assert rc == 2, f"exit {rc}\n{out[-3000:]}"
    assert "unequal numbers of cpu devices (process 0 has 2, process 1 has 1)" in out, out[-3000:]
  assert not run_dir.exists()  # no lock, no run.dir
