"""Where the XLA TPU and GPU compilers behind `--dry-run --topology` come from: a side folder of pip packages matched
to the installed jaxlib ($MAXLM_COMPILERS, default ~/.cache/maxlm/compilers, with tpu/ and gpu/), its installer, and
the environment of the subprocess that compiles with them.

They stay out of the main environment: with libtpu importable every jax start probes for a TPU, and with the CUDA
plugin every start prints cudart_stub lines even under JAX_PLATFORMS=cpu.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Sequence

from maxlm.core.errors import ConfigError

KINDS = ("tpu", "gpu")
INSTALL_COMMAND = "python -m maxlm.train --install-compilers=tpu,gpu"
CHILD_ENV = "MAXLM_TOPOLOGY_COMPILE"  # set in the compiling subprocess: the CLI compiles instead of spawning
_MARKER = ".maxlm-compilers"  # written last by install(): the jaxlib version the folder was filled for
# The CUDA plugin's [with-cuda] extra also pulls cupti, nvcc, the runtime, cufft, cusolver, cusparse, nccl, nvjitlink
# and nvshmem; a compile-only client loads none of them. cuDNN (fused attention) needs cuBLAS; nvrtc is loaded with
# them by the plugin's cuDNN handle.
_GPU_LIBRARIES = ("nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-nvrtc-cu12")


def root() -> str:
  return os.path.expanduser(os.environ.get("MAXLM_COMPILERS") or os.path.join("~", ".cache", "maxlm", "compilers"))


def folder(kind: str) -> str:
  return os.path.join(root(), kind)


def jaxlib_version() -> str:
  return importlib.metadata.version("jaxlib")


def check_installed(kind: str) -> str:
  """The side folder of `kind`'s compiler, or one ConfigError naming the install command."""
  path = folder(kind)
  marker = os.path.join(path, _MARKER)
  if not os.path.exists(marker):
    raise ConfigError(f"--topology needs the XLA {kind.upper()} compiler in {path} (missing): run `{INSTALL_COMMAND}` "
                      "(or set MAXLM_COMPILERS to the folder that holds tpu/ and gpu/)")
  with open(marker, encoding="utf-8") as f:
    built_for = f.read().strip()
  if built_for != jaxlib_version():
    raise ConfigError(f"the {kind.upper()} compiler in {path} was installed for jaxlib {built_for}, this environment "
                      f"has jaxlib {jaxlib_version()}: run `{INSTALL_COMMAND}` again")
  return path


def tpu_requirements() -> list[str]:
  """libtpu as jax's own `tpu` extra pins it for this jax (e.g. libtpu==0.0.42.*)."""
  for req in importlib.metadata.requires("jax") or ():
    spec, _, marker = req.partition(";")
    if re.match(r"libtpu\b", spec.strip()) and re.search(r"extra\s*==\s*['\"]tpu['\"]", marker):
      return [spec.strip().replace(" ", "")]
  raise ConfigError("this jax declares no libtpu in its `tpu` extra; install a jax release that does")


def _gpu_plugin() -> list[str]:
  v = jaxlib_version()
  return [f"jax-cuda12-plugin=={v}", f"jax-cuda12-pjrt=={v}"]


def _gpu_libraries(target: str) -> list[str]:
  """The CUDA libraries the plugin (already in `target`) declares, with its version bounds, limited to those a
  compile-only client loads."""
  dist = next(iter(importlib.metadata.distributions(name="jax-cuda12-plugin", path=[target])), None)
  if dist is None:
    raise ConfigError(f"jax-cuda12-plugin did not install into {target}")
  picked = {}
  for req in dist.requires or ():
    spec = req.partition(";")[0].strip()
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()
    if name in _GPU_LIBRARIES:
      picked[name] = spec.replace(" ", "")
  return [picked.get(name, name) for name in _GPU_LIBRARIES]


def _pip(target: str, packages: Sequence[str], say: Callable[[str], None]) -> None:
  say(f"maxlm: pip install --target {target} --no-deps {' '.join(packages)}")
  cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet", "--no-deps",
         "--target", target, *packages]
  if subprocess.run(cmd, check=False).returncode:
    raise ConfigError(f"pip could not install {' '.join(packages)} into {target} (see pip's message above)")


def install(kinds: Sequence[str], say: Callable[[str], None] = print) -> None:
  """Fills folder(kind) for each kind with exactly the compiler packages matching the installed jaxlib: a fresh
  folder, swapped in whole once pip succeeded (a failed install leaves the old one)."""
  unknown = [k for k in kinds if k not in KINDS]
  if unknown or not kinds:
    raise ConfigError(f"--install-compilers takes a comma-separated subset of {','.join(KINDS)}, got {list(kinds)}")
  for kind in kinds:
    path = folder(kind)
    staging = path + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    if kind == "tpu":
      _pip(staging, tpu_requirements(), say)
    else:
      _pip(staging, _gpu_plugin(), say)
      _pip(staging, _gpu_libraries(staging), say)
    with open(os.path.join(staging, _MARKER), "w", encoding="utf-8") as f:
      f.write(jaxlib_version() + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)
    say(f"maxlm: the XLA {kind.upper()} compiler for jaxlib {jaxlib_version()} is in {path}")


def subprocess_env(kind: str) -> dict[str, str]:
  """The environment of a compile for a `kind` target: CPU as the only local backend (no device probe), libtpu
  allowed beside another process's, and the side folder first on the import path."""
  path = check_installed(kind)
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH", "")) if p)
  return env


def run_compile(kind: str, args: Sequence[str]) -> int:
  """Runs `python -m maxlm.train ARGS` in `kind`'s compiler environment: its stdout (the report) passes through as it
  comes, its stderr keeps only maxlm's own lines (libtpu and the CUDA plugin print start-up noise on a host without
  their devices). A MaxlmError of the subprocess is raised here as a ConfigError; a crash shows the stderr's tail."""
  env = subprocess_env(kind)
  env[CHILD_ENV] = "1"
  with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
    proc = subprocess.Popen([sys.executable, "-m", "maxlm.train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=err, text=True)
    for line in proc.stdout:
      print(line, end="", flush=True)
    code = proc.wait()
    err.seek(0)
    lines = err.read().splitlines()
  ours = [line for line in lines if line.startswith("maxlm:")]
  errors = [line[len("maxlm: error: "):] for line in ours if line.startswith("maxlm: error: ")]
  for line in ours:
    if not line.startswith("maxlm: error: "):
      print(line, file=sys.stderr)
  if code == 2 and errors:
    raise ConfigError("\n".join(errors))
  if code:
    print("\n".join(lines[-40:]), file=sys.stderr)
    print(f"maxlm: the {kind.upper()} compile subprocess exited with status {code}", file=sys.stderr)
  return code
