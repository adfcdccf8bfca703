"""The optimizer: AdamW with warmup then cosine (or constant, or linear) learning rate, global-norm clipping, no decay
on norms and biases.

Built from the `optim` and `train` sections; applied only to the trainable entries of the train state.
"""

from __future__ import annotations

import jax
import optax

from maxlm.core.config import Config


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
  o, steps = cfg.optim, cfg.train.steps
  warmup = min(o.warmup_steps, max(steps - 1, 0))
  if o.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warmup, 1)), optax.constant_schedule(o.lr)],
                                [warmup])
  if o.schedule == "linear":  # transformers' get_linear_schedule_with_warmup (EMO's run_lm.py) at min_lr_ratio 0
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warmup, 1)),
                                 optax.linear_schedule(o.lr, o.lr * o.min_lr_ratio, max(steps - warmup, 1))], [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
                                            end_value=o.lr * o.min_lr_ratio)


def weight_decay_mask(params: dict) -> dict:
  """Decay matrices (embeddings included, as the MiLe/HF recipes do), never norm scales or biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: not any(w in str(getattr(k, "key", k)) for k in path for w in ("norm", "bias"))
      and len(x.shape) >= 2, params)


def make_optimizer(cfg: Config, abstract_params: dict) -> optax.GradientTransformation:
  o = cfg.optim
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=weight_decay_mask(abstract_params)),
  )
