"""A run's setup: checks that need the data source and init_from, the initial state (resume, init_from or fresh),
the train step compiled ahead of time, and the hooks the loop calls."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from maxlm import data_pipelines
from maxlm import model as model_lib
from maxlm import pretrained
from maxlm.checkpoint.params import check_pin, pin
from maxlm.checkpoint.spec import split_spec
from maxlm.core import sharding
from maxlm.core.config import Config, absolute_paths, finalize, profile_range, set_value
from maxlm.core.errors import CheckpointError, ConfigError, DataError
from maxlm.data_pipelines.tokenization import run_tokenizer
from maxlm.run import hooks as hooks_lib
from maxlm.run import knowledge_probes as probes
from maxlm.run import resume as resume_lib
from maxlm.state import frozen as frozen_lib
from maxlm.state import layout as state_lib
from maxlm.state import plan
from maxlm.state import step as step_lib


def prepare(cfg: Config, say) -> tuple[object, "state_lib.StateLayout"]:
  """Checks that depend on run.dir, the data source and checkpoint.init_from (run.dir/config.yaml is written once
every check passed: maxlm.run.resume.save_run_config)."""
  resume_lib.check_fresh_start(cfg)

  if cfg.checkpoint.init_from:
    source_cfg = state_lib.init_source_config(cfg)
    state_lib.inherit_architecture(cfg, source_cfg, cfg.checkpoint.init_from)
    _inherit_tokenizer(cfg, source_cfg, say)
    finalize(cfg, num_devices=jax.device_count())
  try:
    info = data_pipelines.describe(cfg.data)
  except DataError as e:  # name the keys that pointed there, and who set them
    keys = ["data.source"] + [f"data.{k}" for k in ("path", "tokenizer") if getattr(cfg.data, k)]
    raise DataError(f"{e} [{'; '.join(cfg.said(k) for k in keys)}]") from None
  if cfg.data.source == "pcfg":
    for note in data_pipelines.load_grammar(cfg.data.grammar).notes:
      say(f"maxlm: grammar {cfg.data.grammar}: {note}")
  if info.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"the tokenizer has {info.vocab_size} tokens but {cfg.said('model.vocab_size')}; "
                      f"set model.vocab_size >= {info.vocab_size}")
  absolute_paths(cfg)  # what the run saves reads the same files from any working directory
  return info, state_lib.layout(cfg)


def _inherit_tokenizer(cfg: Config, source: Config, say) -> None:
  """Sources that tokenize text themselves (sft) take the init_from source's tokenizer when data.tokenizer is empty."""
  if cfg.data.source != "sft" or cfg.data.tokenizer:
    return
  kind, path = run_tokenizer(source.data)
  if kind == "file":
    set_value(cfg, "data.tokenizer", path, f"checkpoint.init_from {cfg.checkpoint.init_from}")
    say(f"maxlm: data.tokenizer = {path} (the tokenizer of checkpoint.init_from)")


def initial_state(cfg: Config, lay, checkpointer, data_it, say) -> tuple[dict, int]:
  """Resume from run.dir's newest readable checkpoint, else start from checkpoint.init_from, else a fresh init."""
  if checkpointer is not None and cfg.checkpoint.resume and checkpointer.steps():
    requested = cfg.checkpoint.resume_step if cfg.checkpoint.resume_step >= 0 else None
    frozen_lib.check_resume(cfg, checkpointer, requested)
    _check_resume_config(cfg, checkpointer, requested)
    step, state, data_state = checkpointer.restore_for_resume(lay.saved_abstract, requested, log=say)
    state = rebuild_unsaved(lay, state)
    if data_state is not None:
      try:
        data_it.set_state(data_state)
      except DataError as e:
        if not cfg.checkpoint.allow_data_restart:
          raise
        say(f"maxlm: warning: {e}")
        data_state = None
    if data_state is None and cfg.checkpoint.allow_data_restart:
      say(f"maxlm: warning: checkpoint step {step} has no data-iterator state this run can continue; the data order "
          f"restarts from train.seed (checkpoint.allow_data_restart=true)")
    elif data_state is None:
      raise CheckpointError(f"checkpoint step {step} in {cfg.run.dir} has no data-iterator state, so resuming would "
                            "silently restart the data order from train.seed. Set checkpoint.allow_data_restart=true "
                            "to accept that, or resume from a step that has it (checkpoint.resume_step=STEP)")
    say(f"maxlm: resumed from {cfg.run.dir} at step {step}")
    return state, step
  if cfg.checkpoint.init_from:
    # The step read is recorded (config.yaml, each checkpoint's config and meta): a resume that rebuilds a LoRA base
    # and every later read of this run get these weights, not the source's newest step.
    pinned = pin(cfg.checkpoint.init_from)
    cfg.checkpoint.init_from = f"{pinned['path']}@{pinned['step']}"
    state = init_from(lay, cfg.checkpoint.init_from)
    say(f"maxlm: initialised from {cfg.checkpoint.init_from}")
    return state, 0
  return state_lib.init_state(lay), 0


def _check_resume_config(cfg: Config, checkpointer, requested) -> None:
  try:
    step = checkpointer.resolve_step(requested)
    saved = checkpointer.config(step)
    _, meta = checkpointer.metadata(step)
  except CheckpointError:
    return  # an unreadable step: restore_for_resume sets it aside and says so
  mine, theirs = split_spec(cfg.checkpoint.init_from)[0], split_spec(saved.checkpoint.init_from)[0]
  if mine and theirs and os.path.abspath(mine) == os.path.abspath(theirs):
    cfg.checkpoint.init_from = saved.checkpoint.init_from  # the same source: keep the step the run recorded
  resume_lib.check_resume(cfg, saved, step)
  for pinned in (meta.get("pins") or {}).values():  # a LoRA base rebuilt on resume: the very weights it started on
    check_pin({"path": split_spec(cfg.checkpoint.init_from)[0], **pinned}, f"the run in {cfg.run.dir} (step {step})")


def _pinned_source(spec: str):
  """What a checkpoint records of a source its unsaved frozen entries are rebuilt from: its path, step, fingerprint."""
  return pin(spec) if spec and "://" not in spec else spec


def compile_step(cfg: Config, lay, say):
  """The train step compiled ahead of time, so an out-of-memory configuration fails in seconds."""
  step_fn, batch_shardings = step_lib.make_train_step(lay)
  abstract_batch = {k: jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len), jnp.int32, sharding=s)
                    for k, s in batch_shardings.items()}
  t0 = time.perf_counter()
  compiled = step_fn.lower(lay.abstract, abstract_batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  if mem is not None:
    say(f"maxlm: step compiled in {seconds:.1f}s; per-device memory: arguments "
        f"{mem.argument_size_in_bytes / 2**20:.1f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
        f"outputs {mem.output_size_in_bytes / 2**20:.1f} MiB")
  return compiled, batch_shardings, seconds


def build_hooks(cfg: Config, lay, run: hooks_lib.Run, batch_shardings, verbose: bool) -> list:
  peak, _ = plan.peak_flops_per_device()
  tokens = cfg.train.global_batch * cfg.train.seq_len
  metrics = hooks_lib.MetricsHook(cfg, flops_per_step=model_lib.flops_per_token(cfg.model, cfg.train.seq_len) * tokens,
                                  peak_flops=peak, show_progress=cfg.run.progress and run.primary and verbose)
  out = [metrics]
  if cfg.run.eval_batches > 0:
    batches = data_pipelines.build_eval_batches(
        cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.global_batch, num_batches=cfg.run.eval_batches,
        rows=sharding.process_rows(lay.mesh, cfg.train.global_batch))
    if batches:
      out.append(hooks_lib.EvalHook(cfg, step_lib.make_eval_step(lay, batch_shardings), batches, batch_shardings))
  if cfg.run.profile_steps:
    out.append(hooks_lib.ProfilerHook(cfg, *profile_range(cfg.run.profile_steps)))
  if probes.wanted(cfg):
    out.append(probes.KnowledgeProbeHook(cfg, lay))
  if run.checkpointer is not None:  # last: a save at step S comes after everything the step logs
    sources = {n: _pinned_source(cfg.checkpoint.init_from) for n, e in lay.frozen.items() if not e.saved}
    out.append(hooks_lib.CheckpointHook(cfg, metrics, step_lib.make_state_check(lay), sources))
  return out


def init_from(lay: state_lib.StateLayout, path: str) -> dict:
  """Step 0 with a fresh optimizer, the decoder's weights (and derived frozen entries) from checkpoint `path`.

  Frozen entries derived from the weights take the source's saved copy when it has one of the same shape (an
  EMO snapshot taken at import stays the import's head); entries read from a host source are read afresh.
  """
  derived = {n: lay.abstract[n] for n, e in lay.frozen.items() if e.from_params is not None and e.saved}
  _, params, found = pretrained.load_params(path, abstract={"params": lay.model_abstract, **derived})
  known = {n: v for n, v in found.items() if n in derived}
  return state_lib.from_weights(lay, params, None, 0, known)


def rebuild_unsaved(lay: state_lib.StateLayout, restored: dict) -> dict:
  """After a resume: frozen entries that are not checkpointed (a LoRA base) rebuilt from checkpoint.init_from."""
  unsaved = [n for n, e in lay.frozen.items() if not e.saved]
  if not unsaved:
    return restored
  source = lay.cfg.checkpoint.init_from
  if not source:
    raise CheckpointError(f"frozen entries {unsaved} are rebuilt from checkpoint.init_from on resume, but it is empty; "
                          "set it to the checkpoint this run started from")
  _, params, _ = pretrained.load_params(source, abstract={"params": lay.model_abstract})
  entries = {n: lay.frozen[n] for n in unsaved}
  values = jax.jit(lambda p: {n: e.from_params(p) for n, e in entries.items()},
                   out_shardings={n: lay.shardings[n] for n in unsaved})(params)
  return {**restored, **values}
