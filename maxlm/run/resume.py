"""What a rerun in an existing run.dir may do: a run that starts from step 0 never mixes with the run already there,
a resume keeps every key that says what is trained, and the keys it may change are recorded in config.yaml's history.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import jax

from maxlm.core import files
from maxlm.core.config import Config, save_config
from maxlm.core.errors import CheckpointError, ConfigError
from maxlm.run.trackers import METRICS_FILE

# A resume continues one run: these say what is trained (the model, the objective and its parameters, the adapters
# and the optimizer's update rule), so a resume that changes any of them is refused.
FIXED_SECTIONS = ("model", "loss", "lora")
FIXED_KEYS = ("optim.b1", "optim.b2", "optim.eps", "optim.weight_decay")
# ...except how the same model and loss are computed; every other key (train.steps, optim.lr and its schedule, data,
# run, mesh, checkpoint) may change on resume, and a change is recorded in config.yaml's history. The data order has
# its own check (the data-iterator state's fingerprint: train.global_batch, seq_len, seed, the data source).
COMPUTE_ONLY = ("model.compute_dtype", "model.attention", "model.remat", "model.scan_unroll", "model.init_std",
                "loss.impl")
HISTORY = "# history: "


def _flat(cfg: Config) -> dict[str, Any]:
  return {f"{section}.{k}": v for section, values in cfg.to_dict().items() if isinstance(values, dict)
          for k, v in values.items()}


def is_fixed(key: str, cfg: Config) -> bool:
  if key in COMPUTE_ONLY:
    return False
  if key == "checkpoint.init_from":  # a LoRA run's base: the frozen weights its adapters were trained on
    return cfg.lora.rank > 0
  return key.split(".")[0] in FIXED_SECTIONS or key in FIXED_KEYS


def changed_keys(cfg: Config, saved: Config) -> dict[str, tuple[Any, Any]]:
  mine, theirs = _flat(cfg), _flat(saved)
  return {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}


def check_resume(cfg: Config, saved: Config, step: int) -> None:
  """A CheckpointError naming every key that changes what is trained between step `step`'s config and this one."""
  fixed = {k: ab for k, ab in changed_keys(cfg, saved).items() if is_fixed(k, saved)}
  if fixed:
    listing = "; ".join(f"{cfg.said(k)}, the run has {a!r}" for k, (a, _) in fixed.items())
    raise CheckpointError(
        f"{cfg.run.dir} (step {step}) was trained with other settings of what is trained: {listing}. A resume "
        "continues one run and keeps them: drop those settings to resume, or train the change as a new run "
        f"(a new run.dir, with checkpoint.init_from={cfg.run.dir}@{step} to start from this one's weights)")


def existing_run(run_dir: str) -> Optional[str]:
  """What of an earlier run run_dir holds (checkpoint steps, logged metrics), in words; None when nothing."""
  held = []
  steps = sorted(int(n) for n in files.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit())
  if steps:
    held.append(f"checkpoint steps {', '.join(map(str, steps))}")
  metrics = os.path.join(run_dir, METRICS_FILE)
  if files.isfile(metrics) and files.size(metrics) > 0:
    held.append(f"metrics in {METRICS_FILE}")
  return " and ".join(held) or None


def check_fresh_start(cfg: Config) -> None:
  """A run that will not resume (checkpoint.resume=false, or checkpoints off) is refused in a run.dir holding another
  run: it would delete that run's later metrics, skip its own saves where a newer old step exists, and leave the old
  steps for the next plain rerun to resume."""
  resume = cfg.checkpoint.resume and cfg.checkpoint.enabled
  held = existing_run(cfg.run.dir)
  if resume or held is None:
    return
  if cfg.checkpoint.enabled or "checkpoint steps" in held:
    why = ("checkpoint.resume = false" if cfg.checkpoint.enabled else "checkpoint.enabled = false")
    raise ConfigError(
        f"run.dir {cfg.run.dir} already holds a run ({held}), and {why} starts a new one from step 0 there, which "
        "would mix the two (the old run's metrics deleted, its newer steps resumed by the next rerun). Name a new "
        "run.dir for the new run (or move the old one away first); to continue the old run, drop "
        f"{'checkpoint.resume=false' if cfg.checkpoint.enabled else 'checkpoint.enabled=false'}")


def save_run_config(cfg: Config, checkpointer, start: int) -> None:
  """Writes run.dir/config.yaml (after every check passed): the config of this run, headed by its history, one line
  per resume that changed keys (which, from which step)."""
  saved = None
  if start > 0 and checkpointer is not None:  # on every process: orbax's restore is collective
    try:
      saved = checkpointer.config(start)
    except CheckpointError:
      saved = None
  if jax.process_index() != 0:
    return
  path = os.path.join(cfg.run.dir, "config.yaml")
  history = []
  if files.isfile(path):
    history = [line for line in files.read_text(path).split("\n") if line.startswith(HISTORY)]
  if saved is not None:
    changed = changed_keys(cfg, saved)
    if changed:
      when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
      history.append(f"{HISTORY}from step {start} (resumed {when}): "
                     + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
  save_config(cfg, path, header="".join(line + "\n" for line in history))
