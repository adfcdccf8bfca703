"""Host-process tuning for XLA's CPU runtime: glibc malloc keeps each step's temporary buffer instead of remapping it.

Owns `tune_cpu_malloc` (called by the CLIs before jax creates its CPU client) and the decision of when it applies.

XLA's CPU runtime allocates an executable's temporary buffer afresh at every execution (293 MB for a demo training
step, 2.4 GB for a 134M model's). glibc serves a request that large with a fresh mmap and returns it with munmap on
free, so every step pays a page fault per 4 KiB page touched: 0.2 s of kernel time in a 0.5 s demo step, 2.6 s in a
9 s mid-size step (docs/BENCHMARKS.md). With one arena, no mmap and no trimming, the freed block stays in the heap
and the next step reuses its pages: the kernel time goes to ~0. The cost: the process keeps its peak heap resident,
and the heap grows to a few temporaries (the runtime frees a step's temporary on its own thread, so the next step
sometimes finds it still held, and small allocations split freed blocks): peak RSS 1.7 vs 0.9 GB for the demo step,
12.8 vs 4.6 GB for a 134M model's (docs/BENCHMARKS.md); a machine short of memory sets MAXLM_CPU_MALLOC=off.
An accelerator host gains nothing (step buffers live on the device), so `auto` applies it only where jax will run
on the CPU. `MAXLM_CPU_MALLOC=off` turns it off, `on` forces it.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

from maxlm.core.errors import ConfigError

ENV = "MAXLM_CPU_MALLOC"

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# jax finds PJRT plugins as modules under the `jax_plugins` namespace or through that entry-point group.
_ACCELERATOR_MODULES = ("jax_plugins", "libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")

_applied = False


def jax_will_use_cpu() -> bool:
  """True when jax's default backend will be the CPU: JAX_PLATFORMS names cpu first, or no accelerator plugin is
  installed. Decided without creating a jax backend (the malloc settings must precede its threads)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  if any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_MODULES):
    return False
  return not list(importlib.metadata.entry_points(group="jax_plugins"))


def tune_cpu_malloc(mode: str | None = None) -> bool:
  """Makes glibc reuse large freed blocks (one arena, no mmap, no trim) when jax will run on the CPU; returns
  whether the settings are in effect. mode: "auto" (default: $MAXLM_CPU_MALLOC, else auto), "on" or "off".

  Call it before the first jax computation: threads that already hold an arena keep allocating from it. A
  process that is not on glibc (macOS, musl) is left alone.
  """
  global _applied
  mode = (mode or os.environ.get(ENV) or "auto").strip().lower()
  if mode not in ("auto", "on", "off"):
    raise ConfigError(f"{ENV}={mode!r}: set it to auto, on or off (or unset it)")
  if _applied or mode == "off" or (mode == "auto" and not jax_will_use_cpu()):
    return _applied
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # One arena: glibc's per-thread arenas serve requests above their 64 MB heap size by mmap whatever M_MMAP_MAX
  # says, and XLA's worker threads are the ones allocating. -1 as the trim threshold is SIZE_MAX: never trim.
  _applied = all(mallopt(param, value) == 1 for param, value in
                 ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  return _applied
