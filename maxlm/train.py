"""The training entry point: config -> mesh -> sharded init -> data -> jitted step -> metrics and checkpoints.

`python -m maxlm.train --config=NAME [key=value ...] [--dry-run]`; `train(cfg)` is what the CLI and tests call.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxlm import model as model_lib
from maxlm import sharding
from maxlm.config import Config, load_config, mesh_shape, save_config
from maxlm.errors import ConfigError, TrainingDivergedError, cli_exit_code

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (CPUs) use a measured matmul peak instead.
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "gh200": 989e12, "b200": 2250e12, "a100": 312e12,
    "a800": 312e12, "l40s": 362e12, "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5p": 459e12, "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
  o, steps = cfg.optim, cfg.train.steps
  warmup = min(o.warmup_steps, max(steps - 1, 0))
  if o.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warmup, 1)), optax.constant_schedule(o.lr)],
                                [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
                                            end_value=o.lr * o.min_lr_ratio)


def weight_decay_mask(params: dict) -> dict:
  """Decay matrices (embeddings included, as the MiLe/HF recipes do), never norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: not any("norm" in str(getattr(k, "key", k)) for k in path) and len(x.shape) >= 2, params)


def make_optimizer(cfg: Config, abstract_params: dict) -> optax.GradientTransformation:
  o = cfg.optim
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=weight_decay_mask(abstract_params)),
  )


# ----------------------------------------------------------------------------- losses


def loss_kwargs(cfg: Config) -> dict:
  """The objective's keyword arguments for maxlm.kernels.fused_loss, from the `loss` section."""
  l = cfg.loss
  kwargs = {"ignore_index": l.ignore_index}
  if l.objective == "mile":
    kwargs.update(gamma=l.gamma, reduction=l.reduction, entropy_floor=l.entropy_floor)
  elif l.objective == "focal":
    kwargs.update(gamma=l.gamma)
  elif l.objective == "emo":
    kwargs.update(mode=l.emo_mode, clamp=l.emo_clamp, gt_trick=l.emo_gt_trick)
  elif l.objective in ("mixce", "tvd"):
    kwargs.update(ratio=l.ratio)
  return kwargs


def uses_cost_embedding_state(cfg: Config) -> bool:
  return cfg.loss.objective == "emo" and cfg.loss.cost_embedding in ("fixed", "file")


# ----------------------------------------------------------------------------- the trainer


@dataclasses.dataclass
class Setup:
  """Everything the step and the loop need, built once from the config."""
  cfg: Config
  mesh: jax.sharding.Mesh
  graphdef: Any
  abstract_state: dict
  state_shardings: dict
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  param_count: int


def build(cfg: Config, mesh: Optional[jax.sharding.Mesh] = None) -> Setup:
  mesh = mesh or sharding.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
  graphdef, abstract_params, specs = model_lib.abstract_model(cfg.model)
  param_shardings = sharding.named_shardings(specs, mesh)
  tx = make_optimizer(cfg, abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: sharding.replicated(mesh))
  abstract_state = {"params": abstract_params, "opt_state": abstract_opt,
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": sharding.replicated(mesh)}
  if uses_cost_embedding_state(cfg):
    dim = cfg.model.hidden if cfg.loss.cost_embedding == "fixed" else _file_embedding_shape(cfg)[1]
    abstract_state["cost_embedding"] = jax.ShapeDtypeStruct((cfg.model.vocab_size, dim), jnp.float32)
    state_shardings["cost_embedding"] = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("vocab", None)))
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_shardings)
  return Setup(cfg, mesh, graphdef, abstract_state, state_shardings, tx, learning_rate_schedule(cfg),
               model_lib.param_count(abstract_params))


def _file_embedding_shape(cfg: Config) -> tuple[int, int]:
  path = cfg.loss.cost_embedding_file
  if not os.path.exists(path):
    raise ConfigError(f"loss.cost_embedding_file = {path!r} does not exist; point it at a (vocab, dim) .npy array")
  shape = np.load(path, mmap_mode="r").shape
  if len(shape) != 2 or shape[0] != cfg.model.vocab_size:
    raise ConfigError(f"cost embedding {path} has shape {shape}; it must be (model.vocab_size = "
                      f"{cfg.model.vocab_size}, dim): take it from a model with the same tokenizer")
  return shape


def init_state(setup: Setup) -> dict:
  """Materialises the train state shard by shard where it lives (no full copy on any host)."""
  cfg = setup.cfg

  def init():
    params = model_lib.init_params(cfg.model, cfg.train.seed)
    state = {"params": params, "opt_state": setup.tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if uses_cost_embedding_state(cfg) and cfg.loss.cost_embedding == "fixed":
      state["cost_embedding"] = _head(cfg, params).T.astype(jnp.float32)
    return state

  if uses_cost_embedding_state(cfg) and cfg.loss.cost_embedding == "file":
    emb = np.load(cfg.loss.cost_embedding_file).astype(np.float32)
    state = jax.jit(lambda: {k: v for k, v in init().items() if k != "cost_embedding"},
                    out_shardings={k: v for k, v in setup.state_shardings.items() if k != "cost_embedding"})()
    state["cost_embedding"] = jax.device_put(emb, setup.state_shardings["cost_embedding"])
    return state
  return jax.jit(init, out_shardings=setup.state_shardings)()


def _head(cfg: Config, params: dict) -> jax.Array:
  return params["embed"].T if cfg.model.tie_embeddings else params["lm_head"]


def output_loss(cfg: Config, graphdef, params: dict, batch: dict, *, objective: str, mesh=None,
                cost_embedding=None, compute_dtype=None, **objective_kwargs):
  """Decoder forward, then the fused output-head loss: (loss, metrics) of a batch without the (N, V) logits.

  The one place the trainer, its validation and `maxlm.evaluate` turn a batch into a loss.
  """
  from maxlm.kernels import fused_loss

  dtype = jnp.dtype(compute_dtype or cfg.model.compute_dtype)
  model = model_lib.bind(graphdef, params)
  hidden_BxTxD = model(batch["inputs"], segment_ids_BxT=batch.get("segment_ids"), compute_dtype=dtype)
  B, T, D = hidden_BxTxD.shape
  head_DxV = _head(cfg, params).astype(dtype)
  if objective == "emo" and cost_embedding is None:  # adaptive: the current head, never trained by EMO
    cost_embedding = jax.lax.stop_gradient(head_DxV.T)
  return fused_loss(hidden_BxTxD.reshape(B * T, D), head_DxV, batch["targets"].reshape(B * T), objective=objective,
                    impl=cfg.loss.impl, cost_embedding=cost_embedding,
                    mesh=mesh if mesh is not None and mesh.size > 1 else None, **objective_kwargs)


def make_train_step(setup: Setup):
  """The jitted step: microbatched value_and_grad through the fused loss, AdamW, explicit shardings, donation."""
  cfg, mesh = setup.cfg, setup.mesh
  kwargs = loss_kwargs(cfg)

  def loss_fn(params, cost_embedding, batch):
    return output_loss(cfg, setup.graphdef, params, batch, objective=cfg.loss.objective, mesh=mesh,
                       cost_embedding=cost_embedding, **kwargs)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  n_micro = cfg.train.microbatches

  def step(state, batch):
    params, cost_embedding = state["params"], state.get("cost_embedding")
    with sharding.activate(mesh):
      if n_micro == 1:
        (loss, metrics), grads = grad_fn(params, cost_embedding, batch)
      else:
        # Microbatch j takes rows j, j + n, j + 2n, ... so every device keeps an equal share of each microbatch.
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]), 0, 1),
                             batch)

        def accumulate(carry, mb):
          (loss, metrics), grads = grad_fn(params, cost_embedding, mb)
          return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32),
                            jax.eval_shape(grad_fn, params, cost_embedding, jax.tree.map(lambda x: x[0], micro)))
        zero = (zero[0][0], zero[0][1], zero[1])
        (loss, metrics, grads), _ = jax.lax.scan(accumulate, zero, micro)
        loss, metrics, grads = jax.tree.map(lambda x: x / n_micro, (loss, metrics, grads))
      grad_norm = optax.global_norm(grads)
      updates, opt_state = setup.tx.update(grads, state["opt_state"], params)
      params = optax.apply_updates(params, updates)
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    out = {"loss": loss, "ce": metrics["ce"], "entropy": metrics["entropy"], "grad_norm": grad_norm,
           "lr": setup.schedule(state["step"])}
    return new_state, out

  batch_shardings = {"inputs": sharding.batch_sharding(mesh), "targets": sharding.batch_sharding(mesh)}
  if cfg.data.document_masking:
    batch_shardings["segment_ids"] = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(setup.state_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, sharding.replicated(mesh)), donate_argnums=0), batch_shardings


def make_eval_step(setup: Setup, batch_shardings: dict):
  """Sum of token CE and token count over a batch, through the fused loss."""
  cfg, mesh = setup.cfg, setup.mesh

  def step(params, batch):
    with sharding.activate(mesh):
      _, metrics = output_loss(cfg, setup.graphdef, params, batch, objective="ce", mesh=mesh,
                               ignore_index=cfg.loss.ignore_index)
    return metrics["ce"] * metrics["n_valid"], metrics["n_valid"]

  return jax.jit(step, in_shardings=(setup.state_shardings["params"], batch_shardings),
                 out_shardings=sharding.replicated(mesh))


# ----------------------------------------------------------------------------- measurement


@functools.lru_cache(maxsize=None)
def peak_flops_per_device() -> tuple[float, str]:
  """(peak FLOP/s, source): the datasheet dense bf16 peak for known accelerators, else a measured fp32 matmul."""
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return flops, f"{kind} datasheet bf16"
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(5):  # best of five: the machine's capability, not its momentary load
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best, f"{kind} measured fp32 matmul"


def memory_estimate(cfg: Config, num_devices: int) -> dict[str, float]:
  """Analytic per-device bytes: params, optimizer state, gradients and activations under the remat policy."""
  d = model_lib.Dims.of(cfg.model)
  data, fsdp, tensor = mesh_shape(cfg.mesh, num_devices)
  shards = fsdp * tensor  # weights are sharded over fsdp and tensor, replicated over data
  n_params = model_lib.param_count(model_lib.abstract_model(cfg.model)[1])
  p_bytes = jnp.dtype(cfg.model.param_dtype).itemsize
  c_bytes = jnp.dtype(cfg.model.compute_dtype).itemsize
  params = n_params * p_bytes / shards
  opt = 2 * n_params * 4 / shards  # Adam moments in fp32
  grads = n_params * 4 / shards
  tokens = cfg.train.global_batch // cfg.train.microbatches * cfg.train.seq_len / (data * fsdp)
  q, kv = d.heads * d.head_dim / tensor, d.kv_heads * d.head_dim / tensor
  ffn = d.ffn / tensor
  layer_working = (4 * d.hidden + 2 * q + 2 * kv + 3 * ffn) * c_bytes  # everything one layer's backward holds
  saved = {"none": layer_working, "dots": (q + 2 * kv + d.hidden + 2 * ffn + d.hidden) * c_bytes,
           "dots_no_batch": (q + 2 * kv + d.hidden + 2 * ffn + d.hidden) * c_bytes,
           "full": d.hidden * c_bytes}[cfg.model.remat]
  activations = tokens * (d.layers * saved + layer_working)
  if cfg.loss.impl == "reference":
    activations += tokens * d.vocab / tensor * 4 * 3  # fp32 logits, softmax and their gradient
  if uses_cost_embedding_state(cfg):  # EMO's frozen (V, dE) snapshot, sharded over the vocabulary only
    dim = d.hidden if cfg.loss.cost_embedding == "fixed" else _file_embedding_shape(cfg)[1]
    params += d.vocab * dim * 4 / tensor
  total = params + opt + grads + activations
  return {"params": params, "optimizer": opt, "gradients": grads, "activations": activations, "total": total,
          "param_count": n_params, "mesh": (data, fsdp, tensor), "tokens_per_device": tokens}


def dry_run_report(cfg: Config, num_devices: int) -> str:
  est = memory_estimate(cfg, num_devices)
  gib = 2 ** 30
  data, fsdp, tensor = est["mesh"]
  lines = [
      f"model: {cfg.model.family}, {est['param_count']:,} parameters ({est['param_count'] / 1e9:.3f}B)",
      f"mesh: data={data} fsdp={fsdp} tensor={tensor} ({num_devices} devices); "
      f"{est['tokens_per_device']:,.0f} tokens per device per microbatch, remat={cfg.model.remat}",
      "per-device memory estimate:",
      f"  params      {est['params'] / gib:9.2f} GiB ({cfg.model.param_dtype})",
      f"  optimizer   {est['optimizer'] / gib:9.2f} GiB (AdamW moments, fp32)",
      f"  gradients   {est['gradients'] / gib:9.2f} GiB",
      f"  activations {est['activations'] / gib:9.2f} GiB ({cfg.model.compute_dtype})",
      f"  total       {est['total'] / gib:9.2f} GiB",
  ]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- the loop


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps, so the run can save and exit cleanly.

  Under jax.distributed every process must stop after the same step (the save is collective), so JAX's
  preemption service, which catches SIGTERM itself, agrees on that step; a Python handler would hide the signal.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._synced = jax.process_count() > 1 and jax.distributed.is_initialized()

  def stop_after(self, step: int) -> bool:
    if self._synced:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __enter__(self):
    if self._synced:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, nothing to restore
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def _host_metrics(device_metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(device_metrics).items()}


def evaluate(setup: Setup, eval_step, params, eval_batches: dict, keys) -> dict[str, float]:
  """Per-domain mean CE over the validation batches, plus their uniform average and the worst domain."""
  results = {}
  for domain, batches in eval_batches.items():
    total, count = 0.0, 0.0
    for b in batches:
      s, n = eval_step(params, sharding.global_batch(setup.mesh, {k: b[k] for k in keys}))
      total, count = total + float(s), count + float(n)
    results[f"eval/{domain}"] = total / max(count, 1.0)
  if results:
    values = list(results.values())
    results["eval/uniform_avg"] = float(np.mean(values))
    results["eval/worst"] = float(np.max(values))
  return results


def train(cfg: Config, *, verbose: bool = True) -> dict:
  """Runs (or resumes) the configured training; returns a summary with per-step losses."""
  from maxlm import data_pipelines
  from maxlm.checkpoint import Checkpointer, load_params
  from maxlm.metrics_log import MetricsLogger

  say = print if verbose else (lambda *a, **k: None)
  primary = jax.process_index() == 0
  run_dir = cfg.run.dir
  os.makedirs(run_dir, exist_ok=True)
  if primary:
    save_config(cfg, os.path.join(run_dir, "config.yaml"))

  info = data_pipelines.describe(cfg.data)
  if info.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"the tokenizer has {info.vocab_size} tokens but model.vocab_size = {cfg.model.vocab_size}; "
                      f"set model.vocab_size >= {info.vocab_size}")

  setup = build(cfg)
  step_fn, batch_shardings = make_train_step(setup)
  say(f"maxlm: {setup.param_count:,} parameters on mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} "
      f"tensor={cfg.mesh.tensor} ({jax.device_count()} {jax.devices()[0].platform} devices)")

  per_process = cfg.train.global_batch // jax.process_count()
  data_it = data_pipelines.build_train_iterator(
      cfg.data, seq_len=cfg.train.seq_len, batch_size=per_process, seed=cfg.train.seed,
      process_index=jax.process_index(), process_count=jax.process_count())

  checkpointer = Checkpointer(run_dir, cfg.checkpoint) if cfg.checkpoint.enabled else None
  start_step = 0
  if checkpointer is not None and cfg.checkpoint.resume and checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(setup.abstract_state)
    start_step = int(jax.device_get(state["step"]))
    if data_state is not None:
      data_it.set_state(data_state)
    say(f"maxlm: resumed from {run_dir} at step {start_step}")
  else:
    state = init_state(setup)
    if cfg.checkpoint.init_from:
      wanted = {"params": setup.abstract_state["params"]}
      if uses_cost_embedding_state(cfg) and cfg.loss.cost_embedding == "fixed":
        wanted["cost_embedding"] = setup.abstract_state["cost_embedding"]
      _, params, extras = load_params(cfg.checkpoint.init_from, abstract=wanted)
      state["params"] = params
      state["opt_state"] = jax.jit(setup.tx.init, out_shardings=setup.state_shardings["opt_state"])(params)
      if "cost_embedding" in state and cfg.loss.cost_embedding == "fixed":
        # EMO's fixed cost embedding: the imported snapshot, else a snapshot of the imported head.
        snapshot = extras.get("cost_embedding")
        if snapshot is None:
          snapshot = jax.jit(lambda p: _head(cfg, p).T.astype(jnp.float32),
                             out_shardings=setup.state_shardings["cost_embedding"])(params)
        state["cost_embedding"] = snapshot
      say(f"maxlm: initialised from {cfg.checkpoint.init_from}")

  # Compile ahead of time so an out-of-memory configuration fails in seconds, before data starts flowing.
  abstract_batch = {k: jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len), jnp.int32, sharding=s)
                    for k, s in batch_shardings.items()}
  t0 = time.perf_counter()
  compiled = step_fn.lower(setup.abstract_state, abstract_batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  if mem is not None:
    say(f"maxlm: step compiled in {compile_s:.1f}s; per-device memory: arguments "
        f"{mem.argument_size_in_bytes / 2**20:.1f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
        f"outputs {mem.output_size_in_bytes / 2**20:.1f} MiB")

  eval_batches = data_pipelines.build_eval_batches(
      cfg.data, seq_len=cfg.train.seq_len, batch_size=per_process, num_batches=cfg.run.eval_batches,
      process_index=jax.process_index(), process_count=jax.process_count()) if cfg.run.eval_batches > 0 else {}
  eval_step = make_eval_step(setup, batch_shardings) if eval_batches else None

  logger = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard, is_primary=primary)
  logger.truncate_after(start_step)
  tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
  flops_per_step = model_lib.flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_step
  peak, peak_source = peak_flops_per_device()

  losses: dict[int, float] = {}
  evals: dict[int, dict] = {}
  pending = None  # (step, device metrics): read one step late so the host never stalls the device
  window_start, window_tokens = time.perf_counter(), 0
  last_logged: dict[str, float] = {}
  preempted = False
  last_saved = start_step

  progress = None
  if cfg.run.progress and primary and verbose:
    from tqdm import tqdm
    progress = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

  def drain(pending):
    nonlocal window_start, window_tokens, last_logged
    step, device_metrics = pending
    m = _host_metrics(device_metrics)
    if cfg.train.stop_on_nan and not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      raise TrainingDivergedError(
          f"loss or gradient became non-finite at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
          f"the last checkpoint in {run_dir} is intact: lower optim.lr, raise optim.warmup_steps or check the data, "
          f"then rerun to resume from it")
    losses[step] = m["loss"]
    window_tokens += tokens_per_step
    if step % cfg.run.log_every == 0 or step == cfg.train.steps:
      now = time.perf_counter()
      tps = window_tokens / max(now - window_start, 1e-9)
      window_start, window_tokens = now, 0
      m.update(tokens_per_sec=tps, mfu=tps * flops_per_step / tokens_per_step / (peak * jax.device_count()))
      logger.log(step, m)
      last_logged = m
      if progress is not None:
        progress.set_postfix(loss=f"{m['loss']:.4f}", ce=f"{m['ce']:.4f}", tok_s=f"{tps:,.0f}")

  with _Preemption() as preemption:
    step = start_step
    while step < cfg.train.steps:
      if preemption.stop_after(step):
        preempted = True
        break
      local = next(data_it)
      batch = sharding.global_batch(setup.mesh, {k: local[k] for k in batch_shardings})
      state, device_metrics = compiled(state, batch)
      step += 1
      if pending is not None:
        drain(pending)
      pending = (step, device_metrics)
      if progress is not None:
        progress.update(1)
      if eval_step is not None and cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.train.steps:
        evals[step] = evaluate(setup, eval_step, state["params"], eval_batches, batch_shardings)
        logger.log(step, evals[step])
      if checkpointer is not None and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
        checkpointer.save(step, state, data_state=data_it.get_state(), config=cfg)
        last_saved = step
    if pending is not None:
      drain(pending)
    if progress is not None:
      progress.close()
    if checkpointer is not None and step > start_step and step != last_saved:
      checkpointer.save(step, state, data_state=data_it.get_state(), config=cfg, force=True)
  if not preempted and eval_step is not None:
    evals[step] = evaluate(setup, eval_step, state["params"], eval_batches, batch_shardings)
    logger.log(step, evals[step])
  if checkpointer is not None:
    checkpointer.wait()
    checkpointer.close()
  logger.close()

  summary = {"steps": step, "start_step": start_step, "preempted": preempted, "losses": losses,
             "evals": evals, "param_count": setup.param_count, "compile_seconds": compile_s,
             "tokens_per_sec": last_logged.get("tokens_per_sec"), "mfu": last_logged.get("mfu"),
             "peak_flops_source": peak_source, "true_entropy_per_token": info.true_entropy_per_token,
             "state": state}
  if verbose and cfg.run.summary and primary:
    say(format_summary(summary))
  return summary


def format_summary(summary: dict) -> str:
  losses = summary["losses"]
  if not losses:
    return "maxlm: no steps run"
  first_step, last_step = min(losses), max(losses)
  head = [losses[s] for s in sorted(losses)[:5]]
  tail = [losses[s] for s in sorted(losses)[-5:]]
  lines = ["", "=== maxlm summary ==="]
  if summary["preempted"]:
    lines.append(f"preempted (SIGTERM) at step {summary['steps']}: checkpoint saved; rerun the same command to resume")
  lines.append(f"loss (train objective): {np.mean(head):.4f} (steps {first_step}-) -> {np.mean(tail):.4f} "
               f"(-{last_step})")
  if summary["evals"]:
    last_eval = summary["evals"][max(summary["evals"])]
    lines.append("validation CE: " + ", ".join(f"{k[5:]}={v:.4f}" for k, v in last_eval.items()))
  if summary["true_entropy_per_token"] is not None:
    floor = summary["true_entropy_per_token"]
    lines.append(f"true entropy of the data (the floor CE can reach): {floor:.4f} nats/token")
    if summary["evals"]:
      ce = last_eval.get("eval/uniform_avg")
      lines.append(f"gap to the floor: {ce - floor:.4f} nats/token")
  if summary["tokens_per_sec"]:
    lines.append(f"throughput: {summary['tokens_per_sec']:,.0f} tokens/s, MFU {100 * summary['mfu']:.1f}% "
                 f"(peak from {summary['peak_flops_source']}); compile {summary['compile_seconds']:.1f}s")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m maxlm.train", description=__doc__)
  parser.add_argument("--config", default="demo", help="preset name (configs/NAME.yaml) or a YAML path")
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
  parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)

  def body():
    if args.distributed:
      jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                 process_id=args.process_id)
    if args.dry_run:
      n = args.devices or jax.device_count()
      print(dry_run_report(load_config(args.config, args.overrides, num_devices=n), n))
      return
    train(load_config(args.config, args.overrides, num_devices=jax.device_count()))

  return cli_exit_code(body)

if __name__ == "__main__":
  sys.exit(main())
