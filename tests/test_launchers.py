"""The launchers of launch/, each run against what can run here: shellcheck on the shell scripts, the SLURM script
under stub `srun` / `scontrol` / python, the TPU script under a stub `gcloud`, and the JobSet's fields read back from
its YAML."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest
import yaml

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SAVE_7B_S = 300  # the least warning a 7B save gets (84 GB of weights and Adam moments at a few hundred MB/s)

RECORDER = """#!/bin/bash
# Records its arguments (one per line) and environment, then does what the test asked.
n=$(ls "$STUB_DIR" | grep -c "^{name}\\..*\\.args$" || true)
printf '%s\\n' "$@" > "$STUB_DIR/{name}.$n.args"
env > "$STUB_DIR/{name}.$n.env"
{body}
"""


def _stub(bin_dir: pathlib.Path, name: str, body: str) -> None:
  path = bin_dir / name
  path.write_text(RECORDER.replace("{name}", name).replace("{body}", body))
  path.chmod(0o755)


def _calls(stub_dir: pathlib.Path, name: str) -> list[tuple[list[str], dict]]:
  out = []
  for i in range(len(list(stub_dir.glob(f"{name}.*.args")))):
    args = (stub_dir / f"{name}.{i}.args").read_text().splitlines()
    env = dict(l.split("=", 1) for l in (stub_dir / f"{name}.{i}.env").read_text().splitlines() if "=" in l)
    out.append((args, env))
  return out


@pytest.mark.parametrize("script", ["slurm_gpu.sbatch", "tpu_pod.sh"])
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", str(LAUNCH / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


# ----------------------------------------------------------------------------- SLURM


def test_slurm_directives_give_a_7b_save_time_and_requeue():
  directives = [l.split(None, 1)[1] for l in (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines()
                if l.startswith("#SBATCH ")]
  signal = [d for d in directives if d.startswith("--signal=")]
  assert len(signal) == 1 and signal[0].startswith("--signal=TERM@"), directives  # to the steps, not only the shell
  assert int(signal[0].split("@")[1]) >= SAVE_7B_S
  assert "--requeue" in directives


@pytest.fixture
def slurm(tmp_path):
  """Runs slurm_gpu.sbatch as sbatch would, with srun running its command as one task of step STEP, and the task's
  python a stub exiting with EXIT."""
  stub_dir, bin_dir = tmp_path / "calls", tmp_path / "bin"
  stub_dir.mkdir()
  bin_dir.mkdir()
  # srun: skip its own options, then run the task's command in the environment srun gives a task.
  _stub(bin_dir, "srun", 'while [[ "$1" == -* ]]; do shift; done\n'
                         'export SLURM_STEP_ID="$STEP" SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=16\nexec "$@"')
  _stub(bin_dir, "scontrol", "exit 0")
  _stub(bin_dir, "python", 'exit "$EXIT"')

  def run(*args: str, step: int = 0, exit_code: int = 0, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "XLA_"))}
    environ.update(PATH=f"{bin_dir}:{environ['PATH']}", STUB_DIR=str(stub_dir), STEP=str(step), EXIT=str(exit_code),
                   PYTHON=str(bin_dir / "python"), SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(tmp_path), **env)
    return subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), *args], env=environ, capture_output=True,
                          text=True, timeout=60)

  return run, stub_dir


def test_slurm_runs_maxlm_distributed_with_a_port_per_step(slurm):
  run, stub_dir = slurm
  for step in (0, 1):  # two steps of one allocation
    result = run("run.dir=/shared/runs/a", "train.steps=5", step=step)
    assert result.returncode == 0, result.stderr
  (first, env), (second, _) = _calls(stub_dir, "python")
  assert first[:4] == ["-m", "maxlm.train", "--config=mile_7b", "--distributed"], first
  assert first[-3:] == ["--preempt-exit-code=143", "run.dir=/shared/runs/a", "train.steps=5"], first
  ports = [int(next(a for a in args if a.startswith("--coordinator-port=")).split("=")[1]) for args in (first, second)]
  assert ports[0] != ports[1] and all(61440 <= p < 65536 for p in ports), ports
  # The collective settings of MaxText's GPU scripts reach the task.
  assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_NVLS_ENABLE"] == "0" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"], env["XLA_FLAGS"]
  assert not _calls(stub_dir, "scontrol")  # the run finished: no requeue


def test_slurm_requeues_after_a_sigterm_save_and_not_after_a_failure(slurm):
  run, stub_dir = slurm
  result = run(exit_code=143)  # maxlm saved after the --signal TERM and exited with --preempt-exit-code
  assert result.returncode == 0, result.stderr
  assert [args for args, _ in _calls(stub_dir, "scontrol")] == [["requeue", "4242"]]
  result = run(exit_code=1)
  assert result.returncode == 1 and len(_calls(stub_dir, "scontrol")) == 1


def test_slurm_one_task_per_node_drives_every_gpu_and_the_environment_wins(slurm):
  run, stub_dir = slurm
  result = run(SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4", NCCL_DEBUG="INFO", COORDINATOR_PORT="7000")
  assert result.returncode == 0, result.stderr
  args, env = _calls(stub_dir, "python")[0]
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3" and env["NCCL_DEBUG"] == "INFO"
  assert "--coordinator-port=7000" in args


# ----------------------------------------------------------------------------- Kubernetes JobSet


def test_jobset_grace_period_failure_policy_and_command():
  docs = {d["kind"]: d for d in yaml.safe_load_all((LAUNCH / "k8s_jobset.yaml").read_text())}
  jobset = docs["JobSet"]
  assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
  policy = jobset["spec"]["failurePolicy"]
  assert policy["maxRestarts"] >= 1
  assert {"name": "preemption", "action": "RestartJobSetAndIgnoreMaxRestarts",
          "onJobFailureReasons": ["PodFailurePolicy"]} in policy["rules"]
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  pod = job["template"]["spec"]
  assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0  # podFailurePolicy needs Never
  assert pod["terminationGracePeriodSeconds"] >= SAVE_7B_S
  rules = job["podFailurePolicy"]["rules"]
  assert {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
  container = pod["containers"][0]
  assert {"action": "FailJob", "onExitCodes": {"containerName": container["name"], "operator": "In",
                                                "values": [143]}} in rules
  command = container["command"]
  assert command[:4] == ["python", "-m", "maxlm.train", "--config=mile_7b"], command
  assert "--distributed" in command and "--preempt-exit-code=143" in command
  assert job["parallelism"] == job["completions"] and job["completionMode"] == "Indexed"


# ----------------------------------------------------------------------------- Cloud TPU


@pytest.fixture
def tpu(tmp_path):
  """Runs tpu_pod.sh against a stub gcloud: a queued resource that becomes ACTIVE when created, and training
  commands that exit with the codes listed in CODES, one per run."""
  stub_dir, bin_dir = tmp_path / "calls", tmp_path / "bin"
  stub_dir.mkdir()
  bin_dir.mkdir()
  _stub(bin_dir, "gcloud", """
case "$*" in
  *"queued-resources describe"*) [[ -f "$STUB_DIR/state" ]] && cat "$STUB_DIR/state" || exit 1 ;;
  *"queued-resources create"*) echo ACTIVE > "$STUB_DIR/state" ;;
  *"queued-resources delete"*) rm -f "$STUB_DIR/state" ;;
  *maxlm.train*) read -r code rest < "$STUB_DIR/codes"; echo "$rest" > "$STUB_DIR/codes"; exit "$code" ;;
esac
exit 0""")

  def run(*args: str, codes=(0,), **env: str) -> subprocess.CompletedProcess:
    (stub_dir / "codes").write_text(" ".join(map(str, codes)) + "\n")
    environ = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_DIR": str(stub_dir),
               "TPU_NAME": "pod", "ZONE": "us-east5-a", "RETRY_WAIT": "0", **env}
    return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], env=environ, capture_output=True, text=True,
                          timeout=60)

  def calls(word: str) -> list[list[str]]:
    return [args for args, _ in _calls(stub_dir, "gcloud") if word in " ".join(args)]

  return run, calls


def test_tpu_queues_for_the_slice_and_retries_a_preempted_run(tpu):
  run, calls = tpu
  result = run("run.dir=/mnt/shared/runs/a", codes=(143, 0), CREATE="1", ACCELERATOR_TYPE="v5p-8",
               RUNTIME_VERSION="v2-alpha-tpuv5", SPOT="1")
  assert result.returncode == 0, result.stderr
  create = calls("queued-resources create")
  assert len(create) == 1 and "--node-id=pod" in create[0] and "--accelerator-type=v5p-8" in create[0]
  assert "--spot" in create[0]
  trains = calls("maxlm.train")
  assert len(trains) == 2 and len(calls("tpu-vm scp")) == 1  # retried once, installed once (same slice)
  command = next(a for a in trains[0] if "maxlm.train" in a)
  assert "--distributed" in command and "--preempt-exit-code=143" in command
  assert "run.dir=/mnt/shared/runs/a" in shlex.split(command.split("exec ", 1)[1])
  assert "retry 1 of 3" in result.stderr


def test_tpu_does_not_retry_a_config_error_and_needs_a_shared_run_dir(tpu):
  run, calls = tpu
  assert run("run.dir=/mnt/shared/runs/a", codes=(2, 0), SKIP_INSTALL="1").returncode == 2
  assert len(calls("maxlm.train")) == 1
  result = run("train.steps=10", SKIP_INSTALL="1")
  assert result.returncode == 2 and "needs run.dir=/an/absolute/path" in result.stderr
  assert len(calls("maxlm.train")) == 1
