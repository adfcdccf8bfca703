"""The processes of one job: jax.distributed started with maxlm's timeouts and port, equal devices per process and
the resolved config compared across processes at startup (all stop, naming what differs), a stop request shared
between them, and who prints: process 0 alone prints maxlm's progress; every process prints its errors, and its
Python warnings with a `[process I/N]` prefix (a warning may concern one host only)."""

from __future__ import annotations

import collections
import json
import os
import warnings
from typing import Any, Optional, Sequence

import jax

from maxlm.core.config import Config
from maxlm.core.errors import ConfigError, MaxlmError

CONFIG_KEY = "maxlm/config/{}"
SIGINT_KEY = "maxlm/stop/sigint"
CONFIG_TIMEOUT_MS = 5 * 60 * 1000


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


def initialize(*, coordinator_address: Optional[str], num_processes: Optional[int], process_id: Optional[int],
               coordinator_port: Optional[int], init_timeout_s: int, heartbeat_timeout_s: int) -> None:
  """jax.distributed.initialize with the initialization and heartbeat timeouts given (a peer that stops answering
  for heartbeat_timeout_s fails the job). `coordinator_port` replaces the port JAX derives from the cluster (SLURM's
  61440 + job id % 4096 is the same for two steps of one allocation: give each step its own)."""
  if coordinator_port is not None:
    if coordinator_address:
      coordinator_address = f"{coordinator_address.rsplit(':', 1)[0]}:{coordinator_port}"
    else:
      os.environ["JAX_COORDINATOR_PORT"] = str(coordinator_port)  # read by JAX's SLURM / Kubernetes detection
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=init_timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).replace("\n", " ")
    if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower() or "Barrier" in text:
      raise MaxlmError(
          f"jax.distributed could not connect all {num_processes or 'the'} processes to the coordinator "
          f"{coordinator_address or '(detected from the cluster)'} within --init-timeout={init_timeout_s}s: a "
          "process did not start, or another job holds that port (--coordinator-port=PORT). JAX said: "
          f"{text[:300]}") from None
    raise
  check_equal_devices()
  prefix_warnings()


def check_equal_devices(devices: Optional[Sequence[Any]] = None) -> None:
  """Every process must drive the same number of devices (the mesh and the batch rows are laid out per process): a
  ConfigError naming the counts otherwise, raised alike on every process (jax.devices() is the same list on all)."""
  devices = list(devices if devices is not None else jax.devices())
  counts = collections.Counter(d.process_index for d in devices)
  if len(set(counts.values())) > 1:
    shown = ", ".join(f"process {p} has {n}" for p, n in sorted(counts.items()))
    raise ConfigError(f"the {len(counts)} processes of this job drive unequal numbers of {devices[0].platform} devices "
                      f"({shown}); every process must drive the same number: give each the same devices "
                      "(CUDA_VISIBLE_DEVICES or JAX_LOCAL_DEVICE_IDS per task, the same --ntasks-per-node and GPUs per "
                      "node; on CPU the same XLA_FLAGS=--xla_force_host_platform_device_count=N)")


def prefix_warnings() -> None:
  """Under several processes, Python warnings name the process they come from ("[process 1/4] ...")."""
  if jax.process_count() == 1 or getattr(warnings.formatwarning, "maxlm_prefixed", False):
    return
  plain, tag = warnings.formatwarning, f"[process {jax.process_index()}/{jax.process_count()}] "

  def formatwarning(*args, **kwargs):
    return tag + plain(*args, **kwargs)

  formatwarning.maxlm_prefixed = True
  warnings.formatwarning = formatwarning


def check_same_config(cfg: Config) -> None:
  """Every process publishes its resolved config and reads every other's: a difference stops all of them with the
  same error, naming the keys and which processes hold which value (one process's optim.lr or train.steps must not
  train silently apart or deadlock)."""
  if jax.process_count() == 1 or not jax.distributed.is_initialized():
    return
  client = _client()
  flat = _flatten(cfg.to_dict())
  client.key_value_set(CONFIG_KEY.format(jax.process_index()), json.dumps(flat, sort_keys=True, default=str))
  configs = [json.loads(client.blocking_key_value_get(CONFIG_KEY.format(p), CONFIG_TIMEOUT_MS))
             for p in range(jax.process_count())]
  keys = sorted({k for c in configs for k in c if len({json.dumps(c.get(k), default=str) for c in configs}) > 1})
  if keys:
    shown = []
    for k in keys[:8]:
      values = {}
      for p, c in enumerate(configs):
        values.setdefault(json.dumps(c.get(k), default=str), []).append(p)
      shown.append(f"{k}: " + ", ".join(f"{v} on process{'es' if len(ps) > 1 else ''} {','.join(map(str, ps))}"
                                         for v, ps in values.items()))
    raise ConfigError(f"the {jax.process_count()} processes of this job resolved different configs; every process "
                      "must run the same command line and files. Differing keys: " + "; ".join(shown)
                      + (f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""))


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and k != "weights":
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def share_sigint() -> bool:
  """Marks, for every process, that one of them got Ctrl-C; False when there is no job-wide store."""
  if not jax.distributed.is_initialized():
    return False
  try:
    _client().key_value_set(SIGINT_KEY, str(jax.process_index()))
  except Exception:  # pylint: disable=broad-except  (already set by another process)
    pass
  return True


def sigint_seen() -> bool:
  """Whether any process of the job got Ctrl-C (share_sigint)."""
  if not jax.distributed.is_initialized():
    return False
  try:
    return _client().key_value_try_get(SIGINT_KEY) is not None
  except Exception:  # pylint: disable=broad-except  (not found)
    return False
