"""maxlm.core.host: the CPU allocator tuning keeps XLA's per-execution temporary buffer resident across executions."""

import os
import platform
import subprocess
import sys

import pytest

from maxlm.core import host
from maxlm.core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One executable with a 128 MB temporary (the (8192, 4096) product feeds a second matmul), called 40 times; the
# kernel's count of minor page faults says whether a call touched fresh pages. argv[2] is a pause between calls:
# XLA's runtime frees the temporary on its own thread after the outputs are ready, so a call made at once can find
# the last one's block still held, and the heap then grows by one block (a few times in a run, then never again).
FAULTS = """
import resource, sys, time
from maxlm.core import host
applied = host.tune_cpu_malloc(sys.argv[1])
import jax, jax.numpy as jnp
x, y = jnp.ones((8192, 32)), jnp.ones((32, 4096))
compiled = jax.jit(lambda x, y: jnp.tanh(x @ y).T @ x).lower(x, y).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
for _ in range(2):
  compiled(x, y).block_until_ready()
faults = []
for _ in range(40):
  time.sleep(float(sys.argv[2]))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  compiled(x, y).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, temp, *faults)
"""


def run_faults(mode, pause=0.0):
  """(tuning applied, temporary bytes, minor faults of each of 40 calls)."""
  env = {k: v for k, v in os.environ.items() if k not in (host.ENV, "XLA_FLAGS")}
  out = subprocess.run([sys.executable, "-c", FAULTS, mode, str(pause)], capture_output=True, text=True, cwd=ROOT,
                       env=env, check=True, timeout=300).stdout.split()
  return out[0] == "True", int(out[1]), [int(f) for f in out[2:]]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_allocator_reuses_the_temporary_buffer():
  applied, temp, faults = run_faults("off")
  assert not applied
  pages = temp / 4096
  assert temp >= 64 << 20, "the probe needs a temporary above glibc's 32 MB mmap threshold"
  assert min(faults) >= 0.8 * pages  # glibc maps the temporary afresh: one fault per page, every call
  # The freed block is reused: calls 50 ms apart (the last temporary freed by then) touch no fresh page, but for a
  # rare late free on a loaded machine (a full suite beside other jobs saw 4 such calls of 40: 10% plus 2 pages).
  applied, _, faults = run_faults("on", pause=0.05)
  assert applied
  assert sum(faults) <= 0.2 * pages * len(faults)  # untuned, every call faults >= 0.8 of the pages (above)
  # Back to back, as a training loop calls: a call sometimes finds the last block still held and grows the heap by a
  # block (4-7 of 80 calls measured), never most of them.
  _, _, faults = run_faults("on")
  assert sum(f >= 0.5 * pages for f in faults) <= len(faults) // 2


def test_auto_follows_the_platform_jax_will_use(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host.jax_will_use_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host.jax_will_use_cpu()


def test_bad_mode_names_the_fix(monkeypatch):
  monkeypatch.setenv(host.ENV, "yes")
  with pytest.raises(ConfigError, match="auto, on or off"):
    host.tune_cpu_malloc()


def test_train_cli_tunes_only_as_the_process_entry():
  """`python -m maxlm.train` (argv from the command line) tunes; train.main([...]) called by a program does not."""
  code = ("import sys; from maxlm.core import host; from maxlm import train;"
          "sys.argv = ['maxlm.train', '--config=demo', '--dry-run'];"
          "assert train.main(['--config=demo', '--dry-run']) == 0; a = host._applied;"
          "assert train.main() == 0; print(a, host._applied)")
  env = {k: v for k, v in os.environ.items() if k not in (host.ENV, "JAX_PLATFORMS")}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True,
                       timeout=300).stdout.split()
  assert out[-2:] == ["False", "True" if host.jax_will_use_cpu() and platform.libc_ver()[0] == "glibc" else "False"]
