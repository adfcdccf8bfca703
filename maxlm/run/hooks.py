"""What the training loop calls around its steps: metrics (read one step late, NaN stop), evaluation, checkpoints
(never of a non-finite state), signals (SIGTERM / SIGINT save and stop) and the profiler, each a small Hook.

A hook sees the run through `Run`: the state, the step, the checkpointer and the other shared pieces.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from typing import Any, Callable, Optional

import jax
import numpy as np

from maxlm.core import sharding
from maxlm.core.errors import TrainingDivergedError
from maxlm.run import hosts


@dataclasses.dataclass
class Run:
  """The live run that hooks read and update."""
  cfg: Any
  lay: Any  # state.StateLayout
  state: dict
  step: int
  start_step: int
  data_it: Any
  checkpointer: Any  # checkpoint.Checkpointer or None
  logger: Any  # metrics_log.MetricsLogger
  say: Callable[..., None]
  primary: bool
  losses: dict = dataclasses.field(default_factory=dict)
  evals: dict = dataclasses.field(default_factory=dict)
  last_logged: dict = dataclasses.field(default_factory=dict)
  stop_signal: Optional[str] = None  # "SIGTERM" / "SIGINT" once a stop was requested and honoured

  def on_disk(self) -> str:
    """What a user can resume from, in words."""
    steps = []
    if self.checkpointer is not None:
      try:
        steps = self.checkpointer.steps()
      except Exception:  # pylint: disable=broad-except
        steps = []
    if not steps:
      return f"no checkpoint has been written to {self.cfg.run.dir} (a rerun starts from the beginning)"
    return f"the newest checkpoint in {self.cfg.run.dir} is step {steps[-1]} (all finite; a rerun resumes from it)"


class Hook:
  def on_start(self, run: Run) -> None:
    pass

  def after_step(self, run: Run, device_metrics: dict) -> None:
    pass

  def on_end(self, run: Run) -> None:
    pass


# ----------------------------------------------------------------------------- metrics


class MetricsHook(Hook):
  """Reads each step's metrics after the next step is dispatched (the host never stalls the device), stops on
  NaN/Inf, logs every `run.log_every` steps with tokens/s and MFU, and drives the progress bar."""

  def __init__(self, cfg, *, flops_per_step: float, peak_flops: float, show_progress: bool):
    self.cfg = cfg
    self.tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
    self.show_progress = show_progress
    self.pending: Optional[tuple[int, dict]] = None
    self.progress = None
    self._window_start, self._window_tokens = time.perf_counter(), 0

  def on_start(self, run: Run) -> None:
    if self.show_progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.progress = tqdm(total=self.cfg.train.steps, initial=run.step, desc="train", unit="step",
                           dynamic_ncols=True)
    self._window_start = time.perf_counter()

  def after_step(self, run: Run, device_metrics: dict) -> None:
    self.flush(run)
    self.pending = (run.step, device_metrics)
    if self.progress is not None:
      self.progress.update(1)

  def flush(self, run: Run) -> None:
    """Reads and logs the pending step now (before a save, so a diverged step is never checkpointed)."""
    if self.pending is None:
      return
    step, device_metrics = self.pending
    self.pending = None
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if self.cfg.train.stop_on_nan and not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      self.close()
      raise TrainingDivergedError(
          f"loss or gradient became non-finite at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
          f"nothing from that step was saved, {run.on_disk()}: lower optim.lr, raise optim.warmup_steps or check "
          "the data, then rerun")
    run.losses[step] = m["loss"]
    self._window_tokens += self.tokens_per_step
    if step % self.cfg.run.log_every == 0 or step == self.cfg.train.steps:
      now = time.perf_counter()
      tps = self._window_tokens / max(now - self._window_start, 1e-9)
      self._window_start, self._window_tokens = now, 0
      m.update(tokens_per_sec=tps, mfu=tps * self.flops_per_step / self.tokens_per_step / (
          self.peak_flops * jax.device_count()))
      run.logger.log(step, m)
      run.last_logged = m
      if self.progress is not None:
        self.progress.set_postfix(loss=f"{m['loss']:.4f}", ce=f"{m['ce']:.4f}", tok_s=f"{tps:,.0f}")

  def on_end(self, run: Run) -> None:
    self.flush(run)
    self.close()

  def close(self) -> None:
    if self.progress is not None:
      self.progress.close()
      self.progress = None


# ----------------------------------------------------------------------------- evaluation


def evaluate(run: Run, eval_step, eval_batches: dict, keys) -> dict[str, float]:
  """Per-domain mean CE over the validation batches, plus their uniform average and the worst domain."""
  results = {}
  for domain, batches in eval_batches.items():
    total, count = 0.0, 0.0
    for b in batches:
      s, n = eval_step(run.state, sharding.global_batch(run.lay.mesh, {k: b[k] for k in keys},
                                                        run.cfg.train.global_batch))
      total, count = total + float(s), count + float(n)
    results[f"eval/{domain}"] = total / max(count, 1.0)
  if results:
    values = list(results.values())
    results["eval/uniform_avg"] = float(np.mean(values))
    results["eval/worst"] = float(np.max(values))
  return results


class EvalHook(Hook):
  """Validation every `run.eval_every` steps and once at the end (unless the run was stopped early)."""

  def __init__(self, cfg, eval_step, eval_batches: dict, keys):
    self.every, self.steps = cfg.run.eval_every, cfg.train.steps
    self.eval_step, self.batches, self.keys = eval_step, eval_batches, keys

  def _run(self, run: Run) -> None:
    run.evals[run.step] = evaluate(run, self.eval_step, self.batches, self.keys)
    run.logger.log(run.step, run.evals[run.step])

  def after_step(self, run: Run, device_metrics: dict) -> None:
    if self.every and run.step % self.every == 0 and run.step < self.steps:
      self._run(run)

  def on_end(self, run: Run) -> None:
    if run.stop_signal is None and run.step not in run.evals:
      self._run(run)


# ----------------------------------------------------------------------------- checkpoints


class CheckpointHook(Hook):
  """Saves every `checkpoint.every` steps and at the end. Before each save the pending metrics are read (a
  diverged step stops the run first) and the state is checked finite: a checkpoint never holds NaN or Inf; the
  trackers are flushed, so the metrics of every step up to a checkpoint are on disk with it. It runs after the other
  hooks of a step (train.py's order), so what they log at that step is among them."""

  def __init__(self, cfg, metrics: MetricsHook, state_check, sources: Optional[dict] = None):
    self.cfg, self.metrics, self.state_check, self.sources = cfg, metrics, state_check, sources
    self.last_saved: Optional[int] = None

  def on_start(self, run: Run) -> None:
    self.last_saved = run.step

  def save(self, run: Run, *, force: bool) -> None:
    self.metrics.flush(run)
    if not bool(self.state_check(run.state)):
      message = (f"the train state at step {run.step} holds NaN or Inf, so it was not saved; {run.on_disk()}: "
                 "lower optim.lr, raise optim.warmup_steps or check the data")
      if self.cfg.train.stop_on_nan:
        self.metrics.close()
        raise TrainingDivergedError(message)
      warnings.warn(message)
      return
    run.logger.flush()  # the metrics up to this step reach disk before the checkpoint a resume starts from
    run.checkpointer.save(run.step, run.state, data_state=run.data_it.get_state(), config=run.cfg, force=force,
                          sources=self.sources)
    self.last_saved = run.step

  def after_step(self, run: Run, device_metrics: dict) -> None:
    run.checkpointer.poll()
    if run.step % self.cfg.checkpoint.every == 0 and run.step < self.cfg.train.steps:
      self.save(run, force=False)

  def on_end(self, run: Run) -> None:
    if run.step > run.start_step and run.step != self.last_saved:
      self.save(run, force=True)
    run.checkpointer.wait()


# ----------------------------------------------------------------------------- signals


class StopSignals(Hook):
  """SIGTERM (preemption) and SIGINT (Ctrl-C) stop the run after the current step, which is then saved; a second
  SIGINT exits at once. Under jax.distributed every process must stop after the same step (the save is
  collective): JAX's preemption service catches SIGTERM itself and agrees on that step."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: Optional[str] = None
    self._previous: dict = {}
    self._synced = jax.process_count() > 1 and jax.distributed.is_initialized()

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested == "SIGINT" and name == "SIGINT":
      print("\nmaxlm: second Ctrl-C: exiting now without saving", file=sys.stderr, flush=True)
      os._exit(130)
    self.requested = name
    if name == "SIGINT":
      print("\nmaxlm: Ctrl-C: saving after this step, then exiting (Ctrl-C again to exit at once)", file=sys.stderr,
            flush=True)
      if self._synced:
        # Every process must stop after the same step: mark the Ctrl-C for all of them, then raise the preemption
        # notice JAX's preemption service agrees on (it owns SIGTERM).
        hosts.share_sigint()
        os.kill(os.getpid(), signal.SIGTERM)

  def install(self) -> "StopSignals":
    for sig in self.SIGNALS:
      if sig == signal.SIGTERM and self._synced:
        continue  # jax.distributed's preemption notifier owns SIGTERM
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers, nothing to restore
        pass
    return self

  def uninstall(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def stop_after(self, run: Run) -> bool:
    """Whether to stop before the next step (all processes agree under jax.distributed)."""
    if self._synced:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.reached_preemption_sync_point(run.step):
        self.requested = "SIGINT" if hosts.sigint_seen() else (self.requested or "SIGTERM")
        run.stop_signal = self.requested
        return True
      return False
    if self.requested is not None:
      run.stop_signal = self.requested
      return True
    return False

  def on_end(self, run: Run) -> None:
    self.uninstall()


# ----------------------------------------------------------------------------- profiler


class ProfilerHook(Hook):
  """A jax.profiler trace of steps START+1 .. STOP (run.profile_steps) in run.dir/profile (TensorBoard/Perfetto); with
several processes each writes its own, run.dir/profile/process_I (two on one host would share a file name)."""

  def __init__(self, cfg, start: int, stop: int):
    self.logdir = os.path.join(cfg.run.dir, "profile")
    if jax.process_count() > 1:
      self.logdir = os.path.join(self.logdir, f"process_{jax.process_index()}")
    self.start, self.stop = start, stop
    self.active = False

  def _begin(self, run: Run) -> None:
    jax.profiler.start_trace(self.logdir)
    self.active = True
    where = os.path.join(os.path.dirname(self.logdir), "process_*") if jax.process_count() > 1 else self.logdir
    run.say(f"maxlm: profiling steps {self.start + 1}-{self.stop} into {where}")

  def on_start(self, run: Run) -> None:
    if self.start <= run.step < self.stop:
      self._begin(run)

  def after_step(self, run: Run, device_metrics: dict) -> None:
    if run.step == self.start and not self.active:
      self._begin(run)
    elif run.step == self.stop and self.active:
      jax.block_until_ready(device_metrics)
      jax.profiler.stop_trace()
      self.active = False

  def on_end(self, run: Run) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
