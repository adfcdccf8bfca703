"""The training loop: next batch, step, then each hook, until train.steps or a stop signal; `train(cfg)` runs
setup (maxlm.run.start), the loop and the end-of-run summary."""

from __future__ import annotations

import jax
import numpy as np

from maxlm import data_pipelines
from maxlm.checkpoint.checkpointer import Checkpointer
from maxlm.core import sharding
from maxlm.core.config import Config
from maxlm.run import hooks as hooks_lib
from maxlm.run import hosts
from maxlm.run import resume as resume_lib
from maxlm.run import shared_dir
from maxlm.run import start as start_lib
from maxlm.run.lock import RunDirLock
from maxlm.run.trackers import MetricsLogger
from maxlm.state import plan


def run_loop(run: hooks_lib.Run, compiled, batch_shardings, hooks: list, signals: hooks_lib.StopSignals) -> None:
  """Next batch, step, then each hook; until train.steps or a stop signal."""
  for hook in hooks:
    hook.on_start(run)
  while run.step < run.cfg.train.steps and not signals.stop_after(run):
    local = next(run.data_it)
    batch = sharding.global_batch(run.lay.mesh, {k: local[k] for k in batch_shardings}, run.cfg.train.global_batch)
    run.state, device_metrics = compiled(run.state, batch)
    run.step += 1
    for hook in hooks:
      hook.after_step(run, device_metrics)
  for hook in hooks:
    hook.on_end(run)


def train(cfg: Config, *, verbose: bool = True) -> dict:
  """Runs (or resumes) the configured training; returns a summary with per-step losses."""

  primary = jax.process_index() == 0
  say = print if verbose and primary else (lambda *a, **k: None)  # one log of progress per job: process 0's
  hosts.check_equal_devices()  # before the lock: a job that cannot lay out its mesh leaves nothing in run.dir
  with RunDirLock(cfg.run.dir):
    shared_dir.check_same_run_dir(cfg.run.dir)  # under --distributed: one run.dir for every process, or all stop
    info, lay = start_lib.prepare(cfg, say)
    where = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    where += f", {cfg.mesh.slices} slices along data" if cfg.mesh.slices > 1 else ""
    say(f"maxlm: {lay.param_count:,} parameters on mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} "
        f"tensor={cfg.mesh.tensor} ({jax.device_count()} {jax.devices()[0].platform} devices){where}")
    rows = sharding.process_rows(lay.mesh, cfg.train.global_batch)  # the rows this process's devices hold
    data_it = data_pipelines.build_train_iterator(cfg.data, seq_len=cfg.train.seq_len,
                                                  batch_size=cfg.train.global_batch, seed=cfg.train.seed, rows=rows)
    if cfg.inject.interval > 0:  # knowledge injection: a transform on this process's rows, its state in data_it's
      from maxlm.data_pipelines import knowledge_injection  # pylint: disable=import-outside-toplevel
      data_it = knowledge_injection.wrap_train_iterator(cfg, data_it, rows)
    checkpointer = Checkpointer(cfg.run.dir, cfg.checkpoint) if cfg.checkpoint.enabled else None
    logger = None
    try:
      state, start = start_lib.initial_state(cfg, lay, checkpointer, data_it, say)
      compiled, batch_shardings, compile_s = start_lib.compile_step(cfg, lay, say)
      resume_lib.save_run_config(cfg, checkpointer, start)  # every check passed: nothing was written before
      logger = MetricsLogger(cfg.run.dir, tensorboard=cfg.run.tensorboard, is_primary=primary,
                             wandb_project=cfg.run.wandb_project, config=cfg.to_dict())
      logger.truncate_after(start)
      run = hooks_lib.Run(cfg, lay, state, start, start, data_it, checkpointer, logger, say, primary)
      signals = hooks_lib.StopSignals().install()
      try:
        hooks = start_lib.build_hooks(cfg, lay, run, batch_shardings, verbose)
        run_loop(run, compiled, batch_shardings, hooks, signals)
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
