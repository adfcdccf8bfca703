"""The jitted computations on a batch: forward + fused loss (`output_loss`), the train step, the eval step and a
per-token statistics step for analysis tools. Imported by the trainer, evaluation, generation and analysis alike.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from maxlm import losses
from maxlm import model as model_lib
from maxlm.core import sharding
from maxlm.core.config import Config
from maxlm.state.layout import StateLayout

BATCH_KEYS = ("inputs", "targets")
# Objective-specific metrics a training step logs beside loss / ce / entropy: EMO's mean transport cost, the mean
# MiLe / focal weight (what alpha divides by).
LOGGED_OBJECTIVE_METRICS = ("emo", "weight_mean")


# The `loss` config field of each objective keyword (maxlm.losses.OBJECTIVE_KWARGS lists which objective takes which).
LOSS_CONFIG_FIELDS = {"ignore_index": "ignore_index", "gamma": "gamma", "reduction": "reduction",
                      "entropy_floor": "entropy_floor", "mode": "emo_mode", "clamp": "emo_clamp",
                      "gt_trick": "emo_gt_trick", "ratio": "ratio"}


def loss_kwargs(cfg: Config) -> dict:
  """The objective's keyword arguments for maxlm.kernels.fused_loss, from the `loss` section."""
  return {k: getattr(cfg.loss, LOSS_CONFIG_FIELDS[k]) for k in losses.OBJECTIVE_KWARGS[cfg.loss.objective]}


def output_loss(cfg: Config, graphdef, params: dict, batch: dict, *, objective: str, mesh=None,
                cost_embedding=None, compute_dtype=None, **objective_kwargs):
  """Decoder forward, then the fused output-head loss: (loss, metrics) of a batch without the (N, V) logits.

  The one place the trainer, its validation and `maxlm.evaluate` turn a batch into a loss.
  """
  from maxlm.kernels import fused_loss  # local: the kernels import Pallas lazily but are still heavy

  dtype = jnp.dtype(compute_dtype or cfg.model.compute_dtype)
  model = model_lib.bind(graphdef, params)
  hidden_BxTxD = model(batch["inputs"], segment_ids_BxT=batch.get("segment_ids"), compute_dtype=dtype)
  B, T, D = hidden_BxTxD.shape
  head_DxV = model_lib.head_weights(cfg.model, params).astype(dtype)
  if objective == "emo" and cost_embedding is None:  # adaptive: the current head, never trained by EMO
    cost_embedding = jax.lax.stop_gradient(head_DxV.T)
  return fused_loss(hidden_BxTxD.reshape(B * T, D), head_DxV, batch["targets"].reshape(B * T), objective=objective,
                    impl=cfg.loss.impl, cost_embedding=cost_embedding,
                    mesh=mesh, **objective_kwargs)


def batch_shardings(cfg: Config, mesh) -> dict:
  keys = BATCH_KEYS + (("segment_ids",) if cfg.data.document_masking else ())
  return {k: sharding.batch_sharding(mesh) for k in keys}


# Metrics of microbatches that add up; the others are means over valid tokens, combined weighted by n_valid.
_SUMMED_METRICS = ("n_valid", "loss_denominator")


def _microbatched(grad_fn, n_micro: int, params, frozen, batch, rng):
  """Loss, metrics and grads of the whole batch from n_micro microbatches; microbatch j takes rows j, j + n, ... so
  every device keeps an equal share of each, and its own dropout key fold_in(rng, j). Every objective is a token sum
  over a stop-gradient denominator (losses.combine's loss_denominator: M, or MiLe's sum of weights), so the parts
  combine exactly: loss = sum(loss_j d_j) / sum(d_j), the same for the gradients (every objective reduces over the
  global batch, docs/LOSSES.md; EMO's clamped ratios are per token and need nothing more)."""
  if n_micro == 1:
    return grad_fn(params, frozen, batch, rng)
  micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]), 0, 1), batch)

  def accumulate(carry, j_mb):
    j, mb = j_mb
    (loss, metrics), grads = grad_fn(params, frozen, mb, jax.random.fold_in(rng, j))
    d, n = metrics["loss_denominator"], metrics["n_valid"]
    metrics = {k: v if k in _SUMMED_METRICS else v * n for k, v in metrics.items()}
    return jax.tree.map(jnp.add, carry, (loss * d, metrics, jax.tree.map(lambda g: g * d, grads))), None

  shapes = jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], micro), rng)
  zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), (shapes[0][0], shapes[0][1], shapes[1]))
  (loss, metrics, grads), _ = jax.lax.scan(accumulate, zero, (jnp.arange(n_micro), micro))
  d = jnp.maximum(metrics["loss_denominator"], jnp.finfo(jnp.float32).tiny)
  n = jnp.maximum(metrics["n_valid"], 1.0)
  metrics = {k: v if k in _SUMMED_METRICS else v / n for k, v in metrics.items()}
  grads = jax.tree.map(lambda g, like: (g / d).astype(like.dtype), grads, shapes[1])
  return (loss / d, metrics), grads


def make_train_step(lay: StateLayout):
  """The jitted step: (microbatched) value_and_grad through the fused loss, AdamW, explicit shardings, donation.

  Returns (step, batch shardings); step(state, batch) -> (new state, metrics of this step).
  """
  cfg, mesh = lay.cfg, lay.mesh
  kwargs = loss_kwargs(cfg)

  def loss_fn(params, frozen, batch, rng):
    weights = lay.view.model_params(params, frozen, rng=rng)
    return output_loss(cfg, lay.graphdef, weights, batch, objective=cfg.loss.objective, mesh=mesh,
                       cost_embedding=frozen.get("cost_embedding"), **kwargs)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params, frozen = state["params"], {k: state[k] for k in lay.frozen}
    # Dropout (LoRA's) from (seed, step): a resumed run draws the same masks as an uninterrupted one.
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), state["step"])
    with sharding.activate(mesh):
      (loss, metrics), grads = _microbatched(grad_fn, cfg.train.microbatches, params, frozen, batch, rng)
      grad_norm = optax.global_norm(grads)
      updates, opt_state = lay.tx.update(grads, state["opt_state"], params)
      params = optax.apply_updates(params, updates)
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    out = {"loss": loss, "ce": metrics["ce"], "entropy": metrics["entropy"], "grad_norm": grad_norm,
           "lr": lay.schedule(state["step"])}
    out.update({k: metrics[k] for k in LOGGED_OBJECTIVE_METRICS if k in metrics})
    return new_state, out

  shardings = batch_shardings(cfg, mesh)
  return jax.jit(step, in_shardings=(lay.shardings, shardings),
                 out_shardings=(lay.shardings, sharding.replicated(mesh)), donate_argnums=0), shardings


def ce_sum(cfg: Config, graphdef, params: dict, batch: dict, *, mesh=None, compute_dtype=None):
  """(sum of token CE, valid token count) of a batch through the fused loss: what evaluation adds up over batches
  (the trainer's validation and maxlm.evals.loss alike)."""
  _, metrics = output_loss(cfg, graphdef, params, batch, objective="ce", mesh=mesh, compute_dtype=compute_dtype,
                           ignore_index=cfg.loss.ignore_index)
  return metrics["ce"] * metrics["n_valid"], metrics["n_valid"]


def make_eval_step(lay: StateLayout, shardings: Optional[dict] = None):
  """eval(state, batch) -> (sum of token CE, valid token count) through the fused loss (ce_sum)."""
  cfg, mesh = lay.cfg, lay.mesh
  shardings = shardings or batch_shardings(cfg, mesh)

  def step(state, batch):
    with sharding.activate(mesh):
      return ce_sum(cfg, lay.graphdef, lay.model_params(state), batch, mesh=mesh)

  return jax.jit(step, in_shardings=(lay.shardings, shardings), out_shardings=sharding.replicated(mesh))


def make_state_check(lay: StateLayout):
  """finite(state) -> bool: every float array of the state is free of NaN and Inf (one pass, run before saves)."""

  def finite(state):
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))

  return jax.jit(finite, in_shardings=(lay.shardings,), out_shardings=sharding.replicated(lay.mesh))


def token_statistics(cfg: Config, graphdef, params: dict, batch: dict, *, compute_dtype=None) -> dict:
  """Per-token CE, entropy (natural log) and valid mask of a batch, each (B, T) fp32, from the blockwise kernel's
  statistics (the (B*T, V) logits are never built). For analysis tools: no gradient, one device or replicated."""
  from maxlm.kernels import blockwise  # pylint: disable=import-outside-toplevel

  model = model_lib.bind(graphdef, params)
  dtype = jnp.dtype(compute_dtype or cfg.model.compute_dtype)
  hidden_BxTxD = model(batch["inputs"], segment_ids_BxT=batch.get("segment_ids"), compute_dtype=dtype)
  B, T, D = hidden_BxTxD.shape
  stats = blockwise.token_stats(hidden_BxTxD.reshape(B * T, D),
                                model_lib.head_weights(cfg.model, params).astype(dtype),
                                batch["targets"].reshape(B * T), ignore_index=cfg.loss.ignore_index)
  return {k: stats[k].reshape(B, T) for k in ("ce", "entropy", "mask")}


def make_token_stats_step(cfg: Config, graphdef, *, compute_dtype=None):
  """jit(params, batch) -> token_statistics(...)."""
  return jax.jit(lambda params, batch: token_statistics(cfg, graphdef, params, batch, compute_dtype=compute_dtype))
