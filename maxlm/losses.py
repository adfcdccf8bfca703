"""Reference loss math (docs/LOSSES.md): the spec that every fused kernel is tested against.

Owns the per-token statistics (`token_stats`), every objective formula (`combine`) and the public losses.

Contract (the seam the fused kernels in maxlm.kernels build on):

  token_stats(logits, labels, *, cost_embedding=None, ignore_index=IGNORE_INDEX, entropy_floor=0.0)
      -> {"ce", "entropy", "p_y", "mask"} (+ "emo" when cost_embedding is given),
      each an fp32 array with the leading shape of `labels`.
  combine(objective, stats, *, psum_axes=None, **combine_kwargs) -> (loss, metrics)

Every public loss is exactly `combine(objective, token_stats(...))`; nothing else computes a formula.
`combine` is a pure, jittable jnp function of the stats dict (any leading shape, reduced over all
elements, no Python branching on values). Only "ce" and "emo" carry gradient: "entropy" and "p_y"
enter every formula under stop_gradient, so a kernel that computes the stats tile by tile gets the
per-token coefficients dL/dce and dL/demo from `jax.vjp` of `combine` in those two stats, and then
dL/dz = dL/dce * (p - onehot(y)) + dL/demo * (-p * (s - sum_v p_v s_v)).
With `psum_axes` set, every global sum (token sums, M, the MiLe/focal alpha mean) is a
`jax.lax.psum` over those mesh axes, so `combine` runs inside shard_map on token-sharded stats.
`split_objective_kwargs` splits user kwargs into the token_stats part and the combine part.
MiLe reduction="reference" counts every stats element as a position: callers that pad tokens must
slice the padding off before `combine`, and must supply "entropy" at ignored positions too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.core.config import IGNORE_INDEX
from maxlm.core.errors import ConfigError

# MiLe's reference code clamps the softmax to [1e-8, 1] before taking the entropy.
REFERENCE_ENTROPY_FLOOR = 1e-8
# The EMO package's guard against 0/0 in its detached ratios.
EMO_RATIO_EPS = 1e-10

# Keyword arguments of each objective beyond (logits, labels), with defaults: the single table the
# public signatures, the dispatcher and the kernels' kwarg split all agree on.
OBJECTIVE_KWARGS: dict[str, dict[str, Any]] = {
  "ce": {"ignore_index": IGNORE_INDEX},
  "mile": {"gamma": 1.0, "ignore_index": IGNORE_INDEX, "reduction": "valid", "entropy_floor": 0.0},
  "focal": {"gamma": 1.0, "ignore_index": IGNORE_INDEX},
  "emo": {"mode": 1, "clamp": 3.0, "gt_trick": False, "ignore_index": IGNORE_INDEX},
  "mixce": {"ratio": 0.5, "ignore_index": IGNORE_INDEX},
  "tvd": {"ratio": 0.5, "ignore_index": IGNORE_INDEX},
}
# Kwargs consumed by token_stats; all others go to combine.
_STATS_KWARGS = ("ignore_index", "entropy_floor")
_COMBINE_KWARGS = {
  name: {k: v for k, v in kw.items() if k not in _STATS_KWARGS} for name, kw in OBJECTIVE_KWARGS.items()
}
STAT_KEYS = ("ce", "entropy", "p_y", "mask")


def token_stats(logits, labels, *, cost_embedding=None, ignore_index=IGNORE_INDEX, entropy_floor=0.0):
  """Per-token statistics of logits (..., V) against labels (...), all fp32 of shape (...).

  "ce": logsumexp(z) - z_y, 0 where ignored. "entropy": -sum p log p (natural log) at EVERY
  position, ignored ones included (reference MiLe averages its weights over all positions).
  "entropy_floored" (only with entropy_floor > 0): the same from the softmax clamped to [entropy_floor, 1], not
  renormalised, as MiLe's reference code takes it; it replaces "entropy" in the MiLe weight only, so the logged
  entropy is the same H whatever the objective and implementation.
  Concrete labels (not traced) must be ignore_index or in [0, V): torch raises on others, jnp would wrap or NaN.
  "p_y": exp(-ce), so 1 where ignored. "mask": 1.0 where labels != ignore_index.
  "emo" (only with cost_embedding (V, dE)): 1 - sum_v p_v s_v with s_v = e_v . e_y and e the rows of
  sg(cost_embedding) L2-normalised; 0 where ignored.
  """
  logits_NxV = jnp.asarray(logits).astype(jnp.float32)
  labels = jnp.asarray(labels)
  if logits_NxV.ndim == 0:
    raise ConfigError("logits must have a vocabulary axis (..., V), got a scalar")
  vocab = logits_NxV.shape[-1]
  if labels.shape != logits_NxV.shape[:-1]:
    raise ConfigError(
      f"labels shape {labels.shape} must be logits shape {logits_NxV.shape} without the vocab axis")
  check_labels(labels, vocab, ignore_index)
  valid = labels != ignore_index
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)

  # log_softmax shifts by the max first, so 1e4-scale logits neither overflow nor cancel.
  logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
  p_NxV = jnp.exp(logp_NxV)
  logp_y = jnp.take_along_axis(logp_NxV, safe_labels[..., None], axis=-1)[..., 0]
  ce = jnp.where(valid, -logp_y, 0.0)
  stats = {
    "ce": ce,
    "entropy": -jnp.sum(p_NxV * logp_NxV, axis=-1),
    "p_y": jnp.exp(-ce),
    "mask": valid.astype(jnp.float32),
  }
  if entropy_floor > 0.0:
    floor = jnp.float32(entropy_floor)
    stats["entropy_floored"] = -jnp.sum(jnp.where(p_NxV < floor, floor * jnp.log(floor), p_NxV * logp_NxV), axis=-1)
  if cost_embedding is not None:
    emb_VxE = jax.lax.stop_gradient(jnp.asarray(cost_embedding).astype(jnp.float32))
    if emb_VxE.ndim != 2 or emb_VxE.shape[0] != vocab:
      raise ConfigError(
        f"cost_embedding must be (V={vocab}, dE), got {emb_VxE.shape}:"
        " use the output head of a model with the same vocabulary")
    norm_V = jnp.linalg.norm(emb_VxE, axis=-1, keepdims=True)
    emb_VxE = emb_VxE / jnp.maximum(norm_V, jnp.finfo(jnp.float32).tiny)
    # sum_v p_v (e_v . e_y) = (p @ e) . e_y: a (..., dE) contraction instead of a (..., V) one.
    # HIGHEST: this is the reference, TF32/bf16 passes would blur the cost.
    p_bar_NxE = jnp.matmul(p_NxV, emb_VxE, precision=jax.lax.Precision.HIGHEST)
    e_y_NxE = emb_VxE[safe_labels]
    stats["emo"] = jnp.where(valid, 1.0 - jnp.sum(p_bar_NxE * e_y_NxE, axis=-1), 0.0)
  return stats


def check_labels(labels, vocab: int, ignore_index: int) -> None:
  """ConfigError for integer labels outside [0, vocab) that are not ignore_index, or non-integer labels. A no-op on
  traced labels (inside jit the check would cost a host sync: the data pipeline checks its ids instead) and on
  arrays spread over other processes."""
  if isinstance(labels, jax.core.Tracer) or not getattr(labels, "is_fully_addressable", True):
    return
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ConfigError(f"labels must be integer token ids, got dtype {labels.dtype}")
  bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
  if bad.size:
    raise ConfigError(f"{bad.size} label(s) outside the vocabulary [0, {vocab}) and not ignore_index={ignore_index} "
                      f"(e.g. {int(bad[0])}): the labels come from another tokenizer, or the padding id should be "
                      "ignore_index")


def split_objective_kwargs(objective: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Checks `objective` and its kwargs; returns (token_stats kwargs, combine kwargs).

  Resolves MiLe's reference mode to entropy_floor=1e-8 unless a floor is given. Raises ConfigError
  naming the valid objectives or kwargs.
  """
  if objective not in OBJECTIVE_KWARGS:
    raise ConfigError(f"unknown loss objective {objective!r}; valid objectives: {sorted(OBJECTIVE_KWARGS)}")
  allowed = OBJECTIVE_KWARGS[objective]
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ConfigError(
      f"unknown argument(s) {unknown} for loss objective {objective!r}; valid: {sorted(allowed)}")
  merged = {**allowed, **kwargs}
  stats_kwargs = {k: merged[k] for k in _STATS_KWARGS if k in merged}
  combine_kwargs = {k: merged[k] for k in _COMBINE_KWARGS[objective]}
  if objective == "mile":
    floor = stats_kwargs["entropy_floor"]
    if isinstance(floor, (int, float)) and not 0.0 <= floor < 1.0:
      raise ConfigError(f"mile entropy_floor must be in [0, 1), got {floor}")
    if combine_kwargs["reduction"] == "reference" and not floor:
      stats_kwargs["entropy_floor"] = REFERENCE_ENTROPY_FLOOR
  return stats_kwargs, combine_kwargs


def _check_combine_kwargs(objective: str, kwargs: dict[str, Any]) -> dict[str, Any]:
  if objective not in _COMBINE_KWARGS:
    raise ConfigError(f"unknown loss objective {objective!r}; valid objectives: {sorted(_COMBINE_KWARGS)}")
  allowed = _COMBINE_KWARGS[objective]
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ConfigError(
      f"unknown argument(s) {unknown} for combine({objective!r}); valid: {sorted(allowed)}"
      " (ignore_index and entropy_floor belong to token_stats)")
  opts = {**allowed, **kwargs}
  if objective == "mile" and opts["reduction"] not in ("valid", "reference"):
    raise ConfigError(f"mile reduction must be 'valid' or 'reference', got {opts['reduction']!r}")
  if objective == "focal" and isinstance(opts["gamma"], (int, float)) and opts["gamma"] < 0:
    raise ConfigError(f"focal gamma must be >= 0, got {opts['gamma']}")
  if objective == "emo":
    if opts["mode"] not in (1, 2):
      raise ConfigError(f"emo mode must be 1 or 2, got {opts['mode']!r}")
    if opts["clamp"] is not None and opts["clamp"] <= 0:
      raise ConfigError(f"emo clamp must be > 0 or None, got {opts['clamp']}")
  ratio = opts.get("ratio")
  if objective in ("mixce", "tvd") and isinstance(ratio, (int, float)) and not 0.0 <= ratio <= 1.0:
    raise ConfigError(f"{objective} ratio must be in [0, 1], got {opts['ratio']}")
  return opts


def combine(objective: str, stats: dict[str, jax.Array], *, psum_axes=None, **kwargs):
  """All objective formulas of docs/LOSSES.md, from per-token stats: returns (loss, metrics).

  stats: the dict of `token_stats` ("ce", "entropy", "p_y", "mask", and "emo" for objective "emo"),
  fp32 arrays of one common leading shape; every element is one position. kwargs: the objective's
  formula arguments only (ce: none; mile: gamma, reduction; focal: gamma; emo: mode, clamp,
  gt_trick; mixce/tvd: ratio); ignore_index and entropy_floor are token_stats' business.

  A pure jnp function of `stats`, jittable, no branching on values. Gradient flows only through
  stats["ce"] and stats["emo"]; "entropy" and "p_y" are always under stop_gradient, as are the
  MiLe/focal weights and alpha, the EMO ratios and the mixce/tvd q. `jax.vjp` in ("ce", "emo")
  therefore yields the per-token coefficients dL/dce and dL/demo of the fused kernels.
  psum_axes: None, or mesh axis name(s); then every global sum (token sums, M, the number of
  positions, the alpha mean) is psum'd over them, for token-sharded stats inside shard_map.
  MiLe reduction="reference": alpha and the final mean run over ALL positions with CE = 0 at
  ignored ones (the entropy floor was applied by token_stats).
  Metrics (fp32 scalars, no gradient): ce, entropy (means over valid tokens), n_valid (M), loss_denominator (the
  loss is a sum over tokens divided by this stop-gradient total: M, or sum(w) for mile/focal; parts of one batch
  combine exactly as sum(loss_i * d_i) / sum(d_i)), plus
  weight_mean (the mean of w that alpha divides by) for mile/focal and emo (mean valid emo cost,
  without the gt_trick term) for emo. All labels ignored: loss 0, finite gradients.
  """
  opts = _check_combine_kwargs(objective, kwargs)
  missing = [k for k in STAT_KEYS + (("emo",) if objective == "emo" else ()) if k not in stats]
  if missing:
    raise ConfigError(
      f"combine({objective!r}) needs stats {missing}; emo needs token_stats(..., cost_embedding=...)")
  t = _Tokens.of(stats, psum_axes)
  loss, extra = _FORMULAS[objective](objective, t, stats, opts)
  extra.setdefault("loss_denominator", t.n_valid)
  metrics = {"ce": t.valid_mean(t.ce), "entropy": t.valid_mean(t.entropy), "n_valid": t.n_valid, **extra}
  metrics = jax.lax.stop_gradient({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})
  return loss.astype(jnp.float32), metrics


_TINY = float(jnp.finfo(jnp.float32).tiny)


def _global_sum(x, psum_axes):
  total = jnp.sum(x)
  return total if psum_axes is None else jax.lax.psum(total, psum_axes)


@dataclasses.dataclass(frozen=True)
class _Tokens:
  """What every formula of `combine` reads: masked fp32 per-token CE, entropy and p_y (the last two without
  gradient), the valid mask, M = n_valid, and global sums (psum'd over `psum_axes` when set)."""
  ce: jax.Array
  entropy: jax.Array
  p_y: jax.Array
  mask: jax.Array
  valid: jax.Array
  n_valid: jax.Array  # M, summed once (with psum_axes: one collective, not one per mean)
  psum_axes: Any

  @classmethod
  def of(cls, stats: dict, psum_axes) -> "_Tokens":
    mask = stats["mask"].astype(jnp.float32)
    valid = mask > 0
    # where, not multiply: a kernel may leave inf/NaN garbage at ignored positions.
    n_valid = _global_sum(mask, psum_axes)
    return cls(ce=jnp.where(valid, stats["ce"].astype(jnp.float32), 0.0),
               entropy=jax.lax.stop_gradient(stats["entropy"].astype(jnp.float32)),
               p_y=jax.lax.stop_gradient(stats["p_y"].astype(jnp.float32)), mask=mask, valid=valid,
               n_valid=n_valid, psum_axes=psum_axes)

  def sum(self, x):
    return _global_sum(x, self.psum_axes)

  def valid_mean(self, tok):
    return self.sum(jnp.where(self.valid, tok, 0.0)) / jnp.maximum(self.n_valid, 1.0)

  def normalised(self, w, count, where):
    # alpha * w with alpha = count / sum(w): w is divided before the multiply so neither an
    # all-zero focal weight nor an all-ignored batch makes inf * 0.
    w = jnp.where(where, w, 0.0)
    w_sum = self.sum(w)
    return w / jnp.maximum(w_sum, _TINY) * count, w_sum / jnp.maximum(count, 1.0)


def _ce(objective, t: _Tokens, stats, opts):
  return t.valid_mean(t.ce), {}


def _weighted_ce(objective, t: _Tokens, stats, opts):
  """MiLe ((1 + H)^gamma) and focal ((1 - p_y)^gamma) weights, normalised to mean 1 (alpha)."""
  if objective == "mile":
    # Reference mode: H of the clamped softmax (token_stats' "entropy_floored") where the caller computed it.
    entropy = jax.lax.stop_gradient(stats["entropy_floored"]) if "entropy_floored" in stats else t.entropy
    w = (1.0 + entropy) ** opts["gamma"]
  else:
    # 1 - p_y >= 0 in exact arithmetic; the max keeps a fractional gamma off negative rounding.
    w = jnp.maximum(1.0 - t.p_y, 0.0) ** opts["gamma"]
  w = jax.lax.stop_gradient(w)
  if objective == "mile" and opts["reduction"] == "reference":
    count = t.sum(jnp.ones_like(t.mask))
    alpha_w, w_mean = t.normalised(w, count, jnp.ones_like(t.valid))
  else:
    count = t.n_valid
    alpha_w, w_mean = t.normalised(w, count, t.valid)
  loss = t.sum(alpha_w * t.ce) / jnp.maximum(count, 1.0)
  # loss = sum(w CE) / sum(w): sum(w) is what a batch split into parts weighs each part's loss by.
  return loss, {"weight_mean": w_mean, "loss_denominator": w_mean * count}


def _emo(objective, t: _Tokens, stats, opts):
  emo_cost = jnp.where(t.valid, stats["emo"].astype(jnp.float32), 0.0)
  emo = emo_cost + t.p_y if opts["gt_trick"] else emo_cost
  if opts["mode"] == 1:
    # emo >= 0 in exact arithmetic; the max keeps fp32 rounding below 0 from flipping the ratio.
    ratio = jax.lax.stop_gradient(t.ce / (jnp.maximum(emo, 0.0) + EMO_RATIO_EPS))
    if opts["clamp"] is not None:
      ratio = jnp.minimum(ratio, opts["clamp"])
    tok = 0.5 * (t.ce + ratio * emo)
  else:
    ratio = jax.lax.stop_gradient(emo / (jnp.maximum(t.ce, 0.0) + EMO_RATIO_EPS))
    tok = ratio * t.ce + emo
  return t.valid_mean(tok), {"emo": t.valid_mean(emo_cost)}


def _mixture_ce(objective, t: _Tokens, stats, opts):
  """MixCE and TVD: CE scaled by a coefficient of q = p_y (no gradient)."""
  r, q = opts["ratio"], t.p_y
  if objective == "mixce":
    coef = r + (1.0 - r) * q
  else:
    # ratio=1 with q underflowed to 0 would be 0/0; the term is multiplied by 0 then anyway.
    coef = r + (1.0 - r) * jnp.clip(q / jnp.maximum((1.0 - r) + r * q, _TINY), 0.2, 1.0)
  return t.valid_mean(jax.lax.stop_gradient(coef) * t.ce), {}


_FORMULAS: dict[str, Callable] = {"ce": _ce, "mile": _weighted_ce, "focal": _weighted_ce, "emo": _emo,
                                  "mixce": _mixture_ce, "tvd": _mixture_ce}


def _loss(objective, logits, labels, cost_embedding, kwargs):
  stats_kwargs, combine_kwargs = split_objective_kwargs(objective, kwargs)
  stats = token_stats(logits, labels, cost_embedding=cost_embedding, **stats_kwargs)
  return combine(objective, stats, **combine_kwargs)


def cross_entropy(logits, labels, *, ignore_index=IGNORE_INDEX):
  """Mean cross-entropy over valid tokens: sum(m * CE) / M."""
  return _loss("ce", logits, labels, None, dict(ignore_index=ignore_index))


def mile(logits, labels, *, gamma=1.0, ignore_index=IGNORE_INDEX, reduction="valid", entropy_floor=0.0):
  """MiLe (InfoEntropy) loss: CE weighted by sg((1 + H)^gamma), normalised to mean weight 1.

  reduction="reference" reproduces the authors' code: softmax clamped to [1e-8, 1] for H (or to
  entropy_floor when given), alpha and the mean over all positions with CE = 0 at ignored ones.
  """
  return _loss("mile", logits, labels, None,
               dict(gamma=gamma, ignore_index=ignore_index, reduction=reduction, entropy_floor=entropy_floor))


def focal(logits, labels, *, gamma=1.0, ignore_index=IGNORE_INDEX):
  """Focal loss as the MiLe paper's baseline: CE weighted by sg((1 - p_y)^gamma), normalised."""
  return _loss("focal", logits, labels, None, dict(gamma=gamma, ignore_index=ignore_index))


def emo(logits, labels, cost_embedding, *, mode=1, clamp=3.0, gt_trick=False, ignore_index=IGNORE_INDEX):
  """EMO loss with cost embedding (V, dE), always under stop-gradient; defaults = EMOLoss 0.0.3."""
  if cost_embedding is None:
    raise ConfigError(
      "emo needs a cost_embedding (V, dE): set the cost embedding source (fixed, adaptive or file)")
  return _loss("emo", logits, labels, cost_embedding,
               dict(mode=mode, clamp=clamp, gt_trick=gt_trick, ignore_index=ignore_index))


def mixce(logits, labels, *, ratio=0.5, ignore_index=IGNORE_INDEX):
  """MixCE (EMO paper baseline): r*CE + (1-r)*sg(p_y)*CE."""
  return _loss("mixce", logits, labels, None, dict(ratio=ratio, ignore_index=ignore_index))


def tvd(logits, labels, *, ratio=0.5, ignore_index=IGNORE_INDEX):
  """TVD (EMO paper baseline): r*CE + (1-r)*clip(q / ((1-r) + r*q), 0.2, 1)*CE, q = sg(p_y)."""
  return _loss("tvd", logits, labels, None, dict(ratio=ratio, ignore_index=ignore_index))


LOSSES: dict[str, Callable[..., Any]] = {
  "ce": cross_entropy,
  "mile": mile,
  "focal": focal,
  "emo": emo,
  "mixce": mixce,
  "tvd": tvd,
}


def compute(objective: str, logits, labels, *, cost_embedding=None, **kwargs):
  """Runs loss `objective` by name; cost_embedding is used by emo only and ignored by the others.

  Raises ConfigError naming the valid objectives or arguments when either is unknown.
  """
  split_objective_kwargs(objective, kwargs)  # names the valid objectives / arguments on a mistake
  if objective == "emo":
    return emo(logits, labels, cost_embedding, **kwargs)
  return LOSSES[objective](logits, labels, **kwargs)
