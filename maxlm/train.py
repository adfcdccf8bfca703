"""The training entry point: setup (lock, config, state, data, compiled step), then a loop of steps and hooks.

`python -m maxlm.train --config=NAME [key=value ...] [--dry-run]`; `train(cfg)` is what the CLI and tests call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxlm import frozen as frozen_lib
from maxlm import hooks as hooks_lib
from maxlm import host
from maxlm import model as model_lib
from maxlm import plan, sharding
from maxlm import state as state_lib
from maxlm import step as step_lib
from maxlm.config import (Config, absolute_paths, check_command_line_overrides, finalize, load_config, preset_names,
                          profile_range, save_config, set_value)
from maxlm.errors import CheckpointError, ConfigError, DataError, cli_description, cli_exit_code


def _prepare(cfg: Config, say) -> tuple[object, "state_lib.StateLayout"]:
  """Checks that depend on the data source and on checkpoint.init_from, then writes run.dir/config.yaml."""
  from maxlm import data_pipelines  # pylint: disable=import-outside-toplevel
  from maxlm.checkpoint import open_checkpoints  # pylint: disable=import-outside-toplevel

  if cfg.checkpoint.init_from:
    with open_checkpoints(cfg.checkpoint.init_from) as source:
      source_cfg = source.config()
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
  if jax.process_index() == 0:
    save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
  return info, state_lib.layout(cfg)


def _inherit_tokenizer(cfg: Config, source: Config, say) -> None:
  """Sources that tokenize text themselves (sft) take the init_from source's tokenizer when data.tokenizer is empty."""
  from maxlm.data_pipelines.tokenization import run_tokenizer  # pylint: disable=import-outside-toplevel
  if cfg.data.source != "sft" or cfg.data.tokenizer:
    return
  kind, path = run_tokenizer(source.data)
  if kind == "file":
    set_value(cfg, "data.tokenizer", path, f"checkpoint.init_from {cfg.checkpoint.init_from}")
    say(f"maxlm: data.tokenizer = {path} (the tokenizer of checkpoint.init_from)")


def _initial_state(cfg: Config, lay, checkpointer, data_it, say) -> tuple[dict, int]:
  """Resume from run.dir's newest readable checkpoint, else start from checkpoint.init_from, else a fresh init."""
  if checkpointer is not None and cfg.checkpoint.resume and checkpointer.steps():
    requested = cfg.checkpoint.resume_step if cfg.checkpoint.resume_step >= 0 else None
    frozen_lib.check_resume(cfg, checkpointer, requested)
    step, state, data_state = checkpointer.restore_for_resume(lay.saved_abstract, requested, log=say)
    state = state_lib.rebuild_unsaved(lay, state)
    if data_state is not None:
      data_it.set_state(data_state)
    elif cfg.checkpoint.allow_data_restart:
      say(f"maxlm: warning: checkpoint step {step} has no data-iterator state; the data order restarts from "
          f"train.seed (checkpoint.allow_data_restart=true)")
    else:
      raise CheckpointError(f"checkpoint step {step} in {cfg.run.dir} has no data-iterator state, so resuming would "
                            "silently restart the data order from train.seed. Set checkpoint.allow_data_restart=true "
                            "to accept that, or resume from a step that has it (checkpoint.resume_step=STEP)")
    say(f"maxlm: resumed from {cfg.run.dir} at step {step}")
    return state, step
  if cfg.checkpoint.init_from:
    state = state_lib.init_from(lay, cfg.checkpoint.init_from)
    say(f"maxlm: initialised from {cfg.checkpoint.init_from}")
    return state, 0
  return state_lib.init_state(lay), 0


def _compile(cfg: Config, lay, say):
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


def _hooks(cfg: Config, lay, run: hooks_lib.Run, batch_shardings, verbose: bool) -> list:
  from maxlm import data_pipelines  # pylint: disable=import-outside-toplevel
  peak, _ = plan.peak_flops_per_device()
  tokens = cfg.train.global_batch * cfg.train.seq_len
  metrics = hooks_lib.MetricsHook(cfg, flops_per_step=model_lib.flops_per_token(cfg.model, cfg.train.seq_len) * tokens,
                                  peak_flops=peak, show_progress=cfg.run.progress and run.primary and verbose)
  out = [metrics]
  if cfg.run.eval_batches > 0:
    batches = data_pipelines.build_eval_batches(
        cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.global_batch // jax.process_count(),
        num_batches=cfg.run.eval_batches, process_index=jax.process_index(), process_count=jax.process_count())
    if batches:
      out.append(hooks_lib.EvalHook(cfg, step_lib.make_eval_step(lay, batch_shardings), batches, batch_shardings))
  if cfg.run.profile_steps:
    out.append(hooks_lib.ProfilerHook(cfg, *profile_range(cfg.run.profile_steps)))
  from maxlm import probes  # pylint: disable=import-outside-toplevel
  if probes.wanted(cfg):
    out.append(probes.ProbeHook(cfg, lay))
  if run.checkpointer is not None:  # last: a save at step S comes after everything the step logs
    sources = {n: cfg.checkpoint.init_from for n, e in lay.frozen.items() if not e.saved}
    out.append(hooks_lib.CheckpointHook(cfg, metrics, step_lib.make_state_check(lay), sources))
  return out


def run_loop(run: hooks_lib.Run, compiled, batch_shardings, hooks: list, signals: hooks_lib.StopSignals) -> None:
  """Next batch, step, then each hook; until train.steps or a stop signal."""
  for hook in hooks:
    hook.on_start(run)
  while run.step < run.cfg.train.steps and not signals.stop_after(run):
    local = next(run.data_it)
    batch = sharding.global_batch(run.lay.mesh, {k: local[k] for k in batch_shardings})
    run.state, device_metrics = compiled(run.state, batch)
    run.step += 1
    for hook in hooks:
      hook.after_step(run, device_metrics)
  for hook in hooks:
    hook.on_end(run)


def train(cfg: Config, *, verbose: bool = True) -> dict:
  """Runs (or resumes) the configured training; returns a summary with per-step losses."""
  from maxlm import data_pipelines  # pylint: disable=import-outside-toplevel
  from maxlm.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from maxlm.metrics_log import MetricsLogger  # pylint: disable=import-outside-toplevel
  from maxlm.rundir import RunDirLock  # pylint: disable=import-outside-toplevel

  say = print if verbose else (lambda *a, **k: None)
  primary = jax.process_index() == 0
  with RunDirLock(cfg.run.dir):
    info, lay = _prepare(cfg, say)
    say(f"maxlm: {lay.param_count:,} parameters on mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} "
        f"tensor={cfg.mesh.tensor} ({jax.device_count()} {jax.devices()[0].platform} devices)")
    data_it = data_pipelines.build_train_iterator(
        cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.global_batch // jax.process_count(),
        seed=cfg.train.seed, process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.inject.interval > 0:  # knowledge injection: a transform on this process's rows, its state in data_it's
      from maxlm.data_pipelines import knowledge_injection  # pylint: disable=import-outside-toplevel
      data_it = knowledge_injection.wrap_train_iterator(cfg, data_it, sharding.batch_sharding(lay.mesh))
    checkpointer = Checkpointer(cfg.run.dir, cfg.checkpoint) if cfg.checkpoint.enabled else None
    logger = None
    try:
      state, start = _initial_state(cfg, lay, checkpointer, data_it, say)
      compiled, batch_shardings, compile_s = _compile(cfg, lay, say)
      logger = MetricsLogger(cfg.run.dir, tensorboard=cfg.run.tensorboard, is_primary=primary,
                             wandb_project=cfg.run.wandb_project, config=cfg.to_dict())
      logger.truncate_after(start)
      run = hooks_lib.Run(cfg, lay, state, start, start, data_it, checkpointer, logger, say, primary)
      signals = hooks_lib.StopSignals().install()
      try:
        run_loop(run, compiled, batch_shardings, _hooks(cfg, lay, run, batch_shardings, verbose), signals)
      finally:
        signals.uninstall()
    finally:
      if checkpointer is not None:
        checkpointer.close()
      if logger is not None:
        logger.close()
      data_it.close()
  summary = _summary(run, lay, info, compile_s)
  if verbose and cfg.run.summary and primary:
    say(format_summary(summary))
  return summary


def _summary(run: hooks_lib.Run, lay, info, compile_s: float) -> dict:
  return {"steps": run.step, "start_step": run.start_step, "preempted": run.stop_signal is not None,
          "stop_signal": run.stop_signal, "losses": run.losses, "evals": run.evals, "param_count": lay.param_count,
          "compile_seconds": compile_s, "tokens_per_sec": run.last_logged.get("tokens_per_sec"),
          "mfu": run.last_logged.get("mfu"), "peak_flops_source": plan.peak_flops_per_device()[1],
          "true_entropy_per_token": info.true_entropy_per_token, "state": run.state}


def format_summary(summary: dict) -> str:
  losses = summary["losses"]
  if not losses:
    return "maxlm: no steps run"
  steps = sorted(losses)
  head, tail = steps[:5], steps[-5:]
  lines = ["", "=== maxlm summary ==="]
  if summary["preempted"]:
    lines.append(f"preempted ({summary['stop_signal']}) at step {summary['steps']}: checkpoint saved; rerun the "
                 "same command to resume")
  lines.append(f"loss (train objective): {np.mean([losses[s] for s in head]):.4f} (mean of the first {len(head)} "
               f"steps, {head[0]}-{head[-1]}) -> {np.mean([losses[s] for s in tail]):.4f} (mean of the last "
               f"{len(tail)} steps, {tail[0]}-{tail[-1]})")
  if summary["evals"]:
    last_eval = summary["evals"][max(summary["evals"])]
    lines.append("validation CE: " + ", ".join(f"{k[5:]}={v:.4f}" for k, v in last_eval.items()))
  if summary["true_entropy_per_token"] is not None:
    floor = summary["true_entropy_per_token"]
    lines.append(f"true entropy of the data (the floor CE can reach): {floor:.4f} nats/token")
    if summary["evals"]:
      lines.append(f"gap to the floor: {last_eval.get('eval/uniform_avg') - floor:.4f} nats/token")
  if summary["tokens_per_sec"]:
    lines.append(f"throughput: {summary['tokens_per_sec']:,.0f} tokens/s, MFU {100 * summary['mfu']:.1f}% "
                 f"(peak from {summary['peak_flops_source']}); compile {summary['compile_seconds']:.1f}s")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m maxlm.train", description=cli_description(__doc__),
      epilog=f"presets: {', '.join(preset_names())}. Every config key, with its default and choices, is listed in "
             "configs/base.yaml (installed as maxlm/configs/base.yaml); override any with section.key=value.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="demo", help="preset name (see the list below) or a path to a YAML file "
                                                        "(which may `inherit:` a preset)")
  parser.add_argument("--dry-run", action="store_true",
                      help="build the model abstractly, print parameter count and per-device memory, exit")
  parser.add_argument("--devices", type=int, default=None,
                      help="with --dry-run: the device count to plan for (default: the devices present)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host; see launch/); on SLURM, TPU pods and "
                           "Kubernetes the cluster is detected, elsewhere pass the three flags below")
  parser.add_argument("--coordinator-address", default=None, help="with --distributed: host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=None, help="with --distributed: number of processes")
  parser.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
  parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100 optim.lr=1e-3")
  return parser.parse_args(argv)


def check_flags(args) -> None:
  """ConfigErrors for command lines that would silently ignore what they say: a key given twice, --devices without
  --dry-run, the distributed flags without --distributed."""
  check_command_line_overrides(args.overrides)
  if args.devices is not None and not args.dry_run:
    raise ConfigError("--devices plans a --dry-run for that many devices; a run uses the devices present (for "
                      "simulated CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  given = [f for f, v in (("--coordinator-address", args.coordinator_address), ("--num-processes",
                          args.num_processes), ("--process-id", args.process_id)) if v is not None]
  if given and not args.distributed:
    raise ConfigError(f"{', '.join(given)} take effect with --distributed: add it (or drop them)")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  outcome = {}

  def body():
    check_flags(args)
    if argv is None:  # the process is this CLI: tune its allocator before jax creates the CPU client's threads
      host.tune_cpu_malloc()
    if args.distributed:
      jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                 process_id=args.process_id)
    if args.dry_run:
      n = args.devices or jax.device_count()
      print(plan.dry_run_report(load_config(args.config, args.overrides, num_devices=n), n))
      return
    outcome.update(train(load_config(args.config, args.overrides, num_devices=jax.device_count())))

  code = cli_exit_code(body)
  return 130 if code == 0 and outcome.get("stop_signal") == "SIGINT" else code


if __name__ == "__main__":
  sys.exit(main())
