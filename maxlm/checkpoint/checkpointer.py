"""Orbax checkpoints of a run: train state, data-iterator state and resolved config per step, under RUN_DIR/checkpoints.
The params-only reads and writes are maxlm.checkpoint.params'."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from maxlm import __version__
from maxlm.core import files
from maxlm.core.config import CheckpointConfig, Config, config_from_dict
from maxlm.core.errors import CheckpointError, ConfigError
from maxlm.core.trees import describe_mismatch, flat_tree, key_name

CHECKPOINTS = "checkpoints"
SET_ASIDE = "checkpoints.unreadable"  # unreadable steps moved out of the way on resume (never deleted)
SUPERSEDED = "checkpoints.superseded"  # steps newer than an explicit checkpoint.resume_step (never deleted)
FORMAT = 2


class CorruptCheckpointError(CheckpointError):
  """A step that exists but cannot be read (partial, corrupt or deleted files), as opposed to a mismatch."""


class DataStateMismatch(CheckpointError):
  """A step whose data-iterator state this run cannot continue (checkpoint.allow_data_restart=true accepts that)."""


def _handlers() -> dict:
  import grain  # pylint: disable=import-outside-toplevel
  return {"state": ocp.PyTreeCheckpointHandler(), "data_state": grain.checkpoint.CheckpointHandler(),
          "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class IteratorState:
  """One process's data-iterator state as grain's checkpoint handler saves it (process_I-of-N.json per process,
  written by every process itself): exact JSON of the iterator's get_state(), bytes kept as base64."""

  def __init__(self, state: Any = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(_to_json(self.state)).encode()

  def set_state(self, blob: bytes) -> None:
    self.state = _from_json(json.loads(blob))

  def start_prefetch(self) -> None:  # grain's handler calls it after a restore
    pass


def checkpoint_dir(path: str) -> str:
  """RUN_DIR/checkpoints for a run dir; a path that already is a checkpoints dir is kept."""
  path = files.absolute(path)  # a gs:// URL stays one
  return path if os.path.basename(path) == CHECKPOINTS else os.path.join(path, CHECKPOINTS)


def _listdir(path: str) -> list[str]:
  return files.listdir(path)


def interrupted_saves(directory: str) -> list[str]:
  """Temporary directories of saves that never finalised (a kill mid-save); orbax ignores them."""
  return sorted(n for n in _listdir(directory) if ".orbax-checkpoint-tmp" in n)


# ----------------------------------------------------------------------------- JSON items


def _to_json(value: Any) -> Any:
  """Data-iterator states may hold bytes (grain) and numpy scalars: keep them exact in JSON."""
  if isinstance(value, bytes):
    return {"__bytes__": base64.b64encode(value).decode("ascii")}
  if isinstance(value, dict):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
  return value


def _from_json(value: Any) -> Any:
  if isinstance(value, dict):
    if set(value) == {"__bytes__"}:
      return base64.b64decode(value["__bytes__"])
    if set(value) == {"__ndarray__", "dtype"}:
      return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    return {k: _from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_json(v) for v in value]
  return value


@jax.jit
def _all_finite(x):
  return jax.numpy.isfinite(x).all()


def _save_args(state: dict) -> Any:
  """One storage chunk per layer for stacked `layers` arrays (params and optimizer moments alike), so export and
  analysis tools read a single layer without pulling every layer of that weight from disk."""
  def args(path, leaf):
    stacked = any(key_name(k) == "layers" for k in path) and getattr(leaf, "ndim", 0) >= 2
    return ocp.SaveArgs(shard_axes=(0,)) if stacked else ocp.SaveArgs()
  return jax.tree_util.tree_map_with_path(args, state)


# ----------------------------------------------------------------------------- the run's checkpointer


class Checkpointer:
  """Saves and restores a run's state with orbax: async, keep-last-N plus every K-th, atomic per step."""

  def __init__(self, run_dir: str, cfg: CheckpointConfig, *, read_only: bool = False):
    self.cfg = cfg
    self.directory = checkpoint_dir(run_dir)
    if read_only and not files.isdir(self.directory):
      raise CheckpointError(f"no checkpoints at {self.directory}: pass a run directory that holds "
                            f"'{CHECKPOINTS}/' (written by maxlm.train or `maxlm.convert from-hf`)")
    every = max(int(cfg.every), 1)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_last if cfg.keep_last > 0 else None,
        keep_period=cfg.keep_every if cfg.keep_every > 0 else None,
        # Our own interval rule: orbax's default also saves the first step it sees, which a resumed run
        # would turn into an off-schedule checkpoint.
        should_save_fn=lambda step, last: step % every == 0,
        enable_async_checkpointing=bool(cfg.async_save) and not read_only,
        # Readers (conversion, evaluation) never write; orbax's own read_only flag only logs a warning per call.
        create=not read_only,
        # Leftovers of a save killed before finalisation: never listed as steps, removed on the next start.
        cleanup_tmp_directories=not read_only,
    )
    self._in_flight: Optional[int] = None
    # The newest step whose save started: a failure orbax reports only later (at wait or close, after poll saw the
    # save finish) is that step's, never "step -1".
    self._last_started: Optional[int] = None
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
    except (OSError, ValueError) as e:
      raise CheckpointError(f"cannot open checkpoints at {self.directory}: {e}") from None

  # ---------------------------------------------------------------------------- listing

  def steps(self) -> list[int]:
    """Finalised steps, oldest first (saves still in flight or interrupted are not listed)."""
    in_flight = getattr(self._manager, "is_saving_in_progress", lambda: False)()
    if not in_flight:  # pick up steps written by other processes (a trainer, while evaluation reads)
      self._manager.reload()
    return sorted(self._manager.all_steps())

  def resolve_step(self, step: Optional[int]) -> int:
    steps = self.steps()
    if not steps:
      partial = interrupted_saves(self.directory)
      why = (f"; {len(partial)} interrupted save(s) ({', '.join(partial)}) never finalised" if partial else "")
      raise CheckpointError(f"no finalised checkpoint in {self.directory}{why}")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise CheckpointError(f"step {step} has no checkpoint in {self.directory}; "
                            f"available steps: {', '.join(map(str, steps))}")
    return step

  def state_metadata(self, step: int) -> Any:
    """orbax's TreeMetadata of a finalised step's state (`.tree`: ArrayMetadata with name, shape, dtype, storage);
    a CheckpointError when the step is partial or corrupt."""
    step_dir = os.path.join(self.directory, str(step))
    for item in ("state", "config"):
      if not files.isdir(os.path.join(step_dir, item)):
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: its '{item}' item is missing; "
                              f"restore another step (available: {', '.join(map(str, self.steps()))})")
    try:
      md = self._manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None
    if md is None or getattr(md, "tree", None) is None:
      raise self._unreadable(step, "no readable state metadata")
    return md

  def metadata(self, step: int) -> tuple[dict[str, Any], dict]:
    """(flat {key: ArrayMetadata} of the saved state, meta item) of a finalised step."""
    return flat_tree(self.state_metadata(step).tree), self._read_json(step, "meta") or {}

  def fingerprint(self, step: int) -> str:
    """Names one save of a step: the step number and a hash of orbax's commit record (its save timestamps), so a step
    deleted and saved again (other weights under the same number) reads as another."""
    try:
      record = files.read_bytes(os.path.join(self.directory, str(step), "_CHECKPOINT_METADATA"))
    except OSError:
      record = b""
    return f"{step}:" + hashlib.sha256(record).hexdigest()[:16]

  def _unreadable(self, step: int, cause: Any) -> CheckpointError:
    why = f"{type(cause).__name__}: {str(cause)[:300]}" if isinstance(cause, BaseException) else str(cause)
    others = ", ".join(str(s) for s in self.steps() if s != step) or "none"
    return CorruptCheckpointError(
        f"checkpoint step {step} in {self.directory} is unreadable (corrupt or partially deleted): {why} ... "
        f"Other steps: {others} (choose one with checkpoint.resume_step=STEP when training, --step STEP or "
        f"RUN@STEP elsewhere).")

  def _read_json(self, step: int, item: str) -> Any:
    if not files.isdir(os.path.join(self.directory, str(step), item)):
      return None
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot read the {item!r} item of checkpoint step {step} in {self.directory}: "
                            f"{type(e).__name__}: {e}") from None
    return out[item]

  def config(self, step: Optional[int] = None) -> Config:
    step = self.resolve_step(step)
    data = self._read_json(step, "config")
    if data is None:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} has no saved config")
    try:
      return config_from_dict(data)
    except ConfigError as e:
      raise CheckpointError(f"the config saved with step {step} in {self.directory} is invalid for this "
                            f"version of maxlm: {e}") from None

  # ---------------------------------------------------------------------------- save

  def save(self, step: int, state: dict, *, data_state: Optional[dict], config: Config,
           force: bool = False, kind: str = "train", sources: Optional[dict] = None) -> bool:
    """Saves `state` at `step` if the schedule (every N) says so or `force`; returns whether a save started.

    A failure of the previous (async) save is raised here, naming that step, before anything new is written.
    `sources`: where entries that are not saved come from (e.g. a LoRA base): recorded in the meta item (local
    paths made absolute), and those entries are left out of the saved state.
    """
    if not self.cfg.enabled and not force:
      return False
    step = int(step)
    if not force and step % max(int(self.cfg.every), 1):
      return False
    self.wait()
    if step in self._manager.all_steps():
      return False  # e.g. the final step coincides with a periodic save
    sources = dict(sources or {})
    # A source given as {"path", "step", "fingerprint"} (a LoRA base) is pinned: readers use that step or refuse.
    pins = {k: {"step": int(v["step"]), "fingerprint": v["fingerprint"]} for k, v in sources.items()
            if isinstance(v, dict)}
    sources = {k: v["path"] if isinstance(v, dict) else v for k, v in sources.items()}
    sources = {k: v if not v or "://" in v else os.path.abspath(v) for k, v in sources.items()}
    state = {k: v for k, v in state.items() if k not in sources}
    meta = {"format": FORMAT, "kind": kind, "step": step, "maxlm_version": __version__,
            "items": sorted(state), "sources": sources}
    if pins:
      meta["pins"] = pins
    items = dict(state=ocp.args.PyTreeSave(state, save_args=_save_args(state)),
                 config=ocp.args.JsonSave(config.to_dict()), meta=ocp.args.JsonSave(meta))
    if data_state is not None:
      import grain  # pylint: disable=import-outside-toplevel
      items["data_state"] = grain.checkpoint.CheckpointSave(IteratorState(data_state))
    try:
      started = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from None
    self._in_flight = step if started else None
    if started:
      self._last_started = step
    return started

  def _save_failed(self, step: int, cause: BaseException) -> CheckpointError:
    self._in_flight = None
    try:
      intact = [s for s in self.steps() if s != step]
    except Exception:  # pylint: disable=broad-except
      intact = []
    on_disk = f"the newest intact checkpoint is step {intact[-1]}" if intact else "no intact checkpoint is on disk"
    text = str(cause)
    full = "No space left on device" in text or "os_error_code='28'" in text or getattr(cause, "errno", None) == 28
    why = "No space left on device (the filesystem is full)" if full else f"{type(cause).__name__}: {text[:300]}"
    return CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed: {why}. "
        f"Step {step} is not on disk; {on_disk}. Free space on that filesystem (or set run.dir to another one) and "
        f"rerun the same command to resume" + (f" from step {intact[-1]}." if intact else "."))

  def poll(self) -> None:
    """Raises (naming its step) if the async save in flight has failed; cheap enough to call every step."""
    if self._in_flight is None or getattr(self._manager, "is_saving_in_progress", lambda: False)():
      return
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from None

  def wait(self) -> None:
    """Blocks until the save in flight is on disk; its failure is a CheckpointError naming the step."""
    step = getattr(self, "_in_flight", None)
    try:
      self._manager.wait_until_finished()
      if step is not None:
        self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      failed = step if step is not None else getattr(self, "_last_started", None)
      if failed is None:
        raise CheckpointError(f"a checkpoint save to {self.directory} failed: {type(e).__name__}: {str(e)[:300]}. "
                              "Free space on that filesystem (or set run.dir to another one) and rerun the same "
                              "command to resume") from None
      raise self._save_failed(failed, e) from None
    self._in_flight = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()

  # ---------------------------------------------------------------------------- restore

  def restore(self, abstract_state: dict, step: Optional[int] = None) -> tuple[dict, Optional[dict]]:
    """Restores `step` (default: the latest) into the shardings of `abstract_state` (ShapeDtypeStructs), and
    this process's data-iterator state (None when the step has none).

    The shardings may belong to a different mesh or device count than the one that saved.
    """
    step = self.resolve_step(step)
    found, meta = self.metadata(step)
    expected = flat_tree(abstract_state)
    problems = describe_mismatch(expected, found)
    if problems:
      hint = ""
      if meta.get("kind") == "params" and any(k.startswith("opt_state") for k in expected):
        hint = (" This checkpoint holds parameters only (written by `maxlm.convert from-hf`): start a run "
                "from it with checkpoint.init_from=RUN_DIR and a fresh run.dir instead of resuming.")
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match this run's state: "
                            + "; ".join(problems) + "." + hint)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None
    self._check_finite(step, out["state"])
    return out["state"], self._process_data_state(step)

  def restore_for_resume(self, abstract_state: dict, step: Optional[int] = None,
                         log: Callable[[str], Any] = print) -> tuple[int, dict, Optional[dict]]:
    """(step, state, data state) of `step`, or of the newest READABLE step: an unreadable step is moved aside to
    RUN_DIR/checkpoints.unreadable/ (kept, never deleted), said, and the next older step tried."""
    if step is not None:
      restored = self.restore(abstract_state, step)
      for later in [s for s in self.steps() if s > step]:
        # Steps past the chosen one belong to the trajectory this resume abandons: kept, but never resumed from.
        moved = self.set_aside(later, SUPERSEDED)
        log(f"maxlm: step {later} is newer than checkpoint.resume_step={step}; moved it aside to {moved}")
      return step, *restored
    for candidate in reversed(self.steps()):
      try:
        return candidate, *self.restore(abstract_state, candidate)
      except CorruptCheckpointError as e:
        moved = self.set_aside(candidate)
        log(f"maxlm: {e}\nmaxlm: moved step {candidate} aside to {moved}; trying the next older step")
    raise CheckpointError(f"no readable checkpoint in {self.directory} (unreadable steps were moved to "
                          f"{os.path.join(os.path.dirname(self.directory), SET_ASIDE)}); start afresh in another "
                          "run.dir or restore the files")

  def set_aside(self, step: int, folder: str = "") -> str:
    """Moves a step's directory to RUN_DIR/FOLDER/STEP-TIME (default checkpoints.unreadable; process 0 moves, all
    processes wait)."""
    target = os.path.join(os.path.dirname(self.directory), folder or SET_ASIDE,
                          f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      files.makedirs(os.path.dirname(target))
      files.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"maxlm_set_aside_{step}")
    self._manager.reload()
    return target

  def data_state_files(self, step: int) -> list[str]:
    return sorted(n for n in _listdir(os.path.join(self.directory, str(step), "data_state")) if n.endswith(".json"))

  def _process_data_state(self, step: int) -> Optional[dict]:
    """This process's data-iterator state at `step` (each process saved its own); None when the step has none.
    A step written by another number of processes: its state holds for any process count when it is a global
    batch index (maxlm's pipelines since the global-batch loader), and is read from the first process's file;
    otherwise a DataStateMismatch (its states cannot be mapped exactly)."""
    names = self.data_state_files(step)
    if not names:
      return None
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if mine not in names:
      from maxlm.data_pipelines.batches import is_global_state  # pylint: disable=import-outside-toplevel
      path = os.path.join(self.directory, str(step), "data_state", names[0])
      try:
        holder = IteratorState()
        holder.set_state(files.read_bytes(path))
      except (OSError, ValueError) as e:
        raise self._unreadable(step, e) from None
      if is_global_state(holder.state):
        return holder.state
      if self.cfg.allow_data_restart:
        return None  # the caller says the data order restarts
      raise DataStateMismatch(
          f"checkpoint step {step} in {self.directory} holds per-process data-iterator states of another process "
          f"count ({', '.join(names)}); this run has {jax.process_count()} process(es), so that data order cannot "
          "continue exactly. Resume with the same number of processes, or set checkpoint.allow_data_restart=true "
          "to restart the data order from train.seed (documents seen before the checkpoint may be seen again)")
    import grain  # pylint: disable=import-outside-toplevel
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          data_state=grain.checkpoint.CheckpointRestore(IteratorState())))
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None
    return out["data_state"].state

  def restore_subtree(self, keys: tuple[str, ...], step: Optional[int] = None,
                      shardings: Optional[dict] = None) -> dict:
    """Restores only the top-level entries `keys` of the saved state (those present).

    Without `shardings`: host numpy arrays. With `shardings` ({key: tree of NamedSharding}): each process reads
    only the shards its devices hold, so a 7B import never sits whole on one host.
    """
    step = self.resolve_step(step)
    md = self.state_metadata(step).tree
    sub = {k: md[k] for k in keys if k in md and (shardings is None or k in shardings)}
    if shardings is None:
      item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), sub)
      restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), sub)
    else:
      item = {k: jax.tree.map(lambda m, sh: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh), sub[k], shardings[k])
              for k in sub}
      restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None
    self._check_finite(step, out["state"])
    return out["state"]

  def _check_finite(self, step: int, state: dict) -> None:
    """A CorruptCheckpointError naming the arrays of a restored step that hold NaN or Inf. No save writes one (the
    state is checked finite before each), so one read back means its files changed on disk. One reduction per array,
    where its shards live (no host copy); bytes flipped to other finite values are not caught (no checksums)."""
    flat = {k: v for k, v in flat_tree(state).items()
            if jax.numpy.issubdtype(getattr(v, "dtype", np.int32), jax.numpy.inexact)}
    finite = jax.device_get({k: (np.isfinite(v).all() if isinstance(v, np.ndarray) else _all_finite(v))
                             for k, v in flat.items()})
    bad = [k for k, ok in finite.items() if not bool(ok)]
    if bad:
      raise CorruptCheckpointError(
          f"checkpoint step {step} in {self.directory} is damaged: {', '.join(bad[:5])}"
          f"{f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''} read back holding NaN or Inf, which no maxlm save "
          "writes (each saved state is checked finite): its files changed on disk. Other steps: "
          f"{', '.join(str(s) for s in self.steps() if s != step) or 'none'} (choose one with "
          "checkpoint.resume_step=STEP when training, --step STEP or RUN@STEP elsewhere).")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
