"""The peak FLOP/s MFU divides by on a CPU: a nominal figure from the cores this process may use, their clock and
their fp32 FMA width (the same number on a busy or an idle machine, and the summary says how it was made), or the
figure MAXLM_PEAK_FLOPS names.
"""

from __future__ import annotations

import os
import re
from typing import Optional

ENV = "MAXLM_PEAK_FLOPS"


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  fields: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def _clock_ghz(info: dict[str, str]) -> tuple[Optional[float], str]:
  """(GHz, where it came from): the kernel's maximum frequency, else the model name's "@ 2.20GHz", else cpuinfo's
  "cpu MHz" (on virtual machines the host's nominal clock)."""
  try:
    with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", encoding="utf-8") as f:
      return int(f.read().strip()) / 1e6, "max frequency"
  except (OSError, ValueError):
    pass
  found = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
  if found:
    return float(found.group(1)), "model name"
  try:
    return round(float(info["cpu MHz"]) / 1e3, 1), "cpu MHz"
  except (KeyError, ValueError):
    return None, ""


def fp32_flops_per_cycle(flags: set[str]) -> tuple[int, str]:
  """fp32 FLOPs one core can issue per cycle, assuming two FMA pipes: (count, instruction set)."""
  if "avx512f" in flags:
    return 64, "AVX-512 FMA"
  if "avx2" in flags and "fma" in flags:
    return 32, "AVX2 FMA"
  if "avx" in flags:
    return 16, "AVX"
  if "asimd" in flags or "sve" in flags:
    return 16, "NEON FMA"
  return 8, "SSE"


def cpu_peak_flops() -> tuple[Optional[float], str]:
  """(peak fp32 FLOP/s of the cores this process may use, how it was made), or (None, why not) when the clock is
  unknown. MAXLM_PEAK_FLOPS, when set, is the figure."""
  given = os.environ.get(ENV, "").strip()
  if given:
    try:
      return float(given), f"{ENV}={given}"
    except ValueError:
      pass  # a bad value falls through to the nominal figure, which names itself
  info = _cpuinfo()
  ghz, clock_from = _clock_ghz(info)
  if not ghz:
    return None, "the CPU clock is unknown"
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  per_cycle, isa = fp32_flops_per_cycle(set((info.get("flags") or info.get("Features") or "").split()))
  return (cores * ghz * 1e9 * per_cycle,
          f"nominal {cores} cores x {ghz:g} GHz ({clock_from}) x {per_cycle} fp32 FLOP/cycle ({isa}); set {ENV} to "
          "use another figure")
