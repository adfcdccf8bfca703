"""maxlm.losses against an independent float64 numpy transcription of DESIGN.md section 4.

Values and gradients (analytic in numpy, themselves checked by finite differences), edge cases,
dtypes, the token_stats/combine seam the fused kernels rely on, and the dispatcher's errors.
"""

import inspect
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import losses
from maxlm.core.errors import ConfigError

IGNORE = -100
SHAPE = (3, 5, 37)  # batch, length, vocab
DE = 7  # cost-embedding width, deliberately unrelated to any hidden size


# ---------------------------------------------------------------- numpy float64 reference

def np_parts(z, y, emb=None, floor=0.0):
  """Per-token quantities in float64, written from the formulas (not from maxlm.losses)."""
  z = np.asarray(z, np.float64)
  vocab = z.shape[-1]
  mask = y != IGNORE
  ys = np.where(mask, y, 0)
  zs = z - z.max(-1, keepdims=True)
  logp = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
  p = np.exp(logp)
  onehot = np.eye(vocab)[ys]
  ce = np.where(mask, -(logp * onehot).sum(-1), 0.0)
  if floor > 0:
    pc = np.clip(p, floor, 1.0)
    ent = -(pc * np.log(pc)).sum(-1)
  else:
    ent = -(p * logp).sum(-1)
  out = dict(p=p, onehot=onehot, ce=ce, ent=ent, mask=mask.astype(np.float64), p_y=np.exp(-ce))
  if emb is not None:
    e = np.asarray(emb, np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    s = e[ys] @ e.T  # (..., V): s_v = e_v . e_y
    out["s"] = s
    out["emo"] = np.where(mask, 1.0 - (p * s).sum(-1), 0.0)
  return out


def np_loss(objective, z, y, emb=None, z_sg=None, **kw):
  """Loss with every stop-gradient quantity computed from z_sg (default z).

  Freezing z_sg makes finite differences in z reproduce the stop-gradient gradient.
  """
  z_sg = z if z_sg is None else z_sg
  floor = kw.get("entropy_floor", 0.0)
  if objective == "mile" and kw.get("reduction") == "reference" and not floor:
    floor = 1e-8
  a = np_parts(z, y, emb)
  b = np_parts(z_sg, y, emb, floor=floor)
  m, ce = a["mask"], a["ce"]
  n_valid = max(m.sum(), 1.0)
  # The logged entropy is H itself whatever the objective; the floored H enters MiLe's reference weight only.
  exact = np_parts(z_sg, y)["ent"]
  metrics = dict(ce=(m * ce).sum() / n_valid, entropy=(m * exact).sum() / n_valid, n_valid=m.sum())
  if objective == "ce":
    loss = (m * ce).sum() / n_valid
  elif objective == "mile" and kw.get("reduction") == "reference":
    # The authors' recipe: clamped-softmax entropy, weight / weight.mean() and .mean() over ALL
    # positions, CE = 0 where ignored (torch's reduction='none' with ignore_index).
    w = (1.0 + b["ent"]) ** kw.get("gamma", 1.0)
    metrics["weight_mean"] = w.mean()
    loss = (w / w.mean() * ce).mean()
  elif objective in ("mile", "focal"):
    gamma = kw.get("gamma", 1.0)
    w = (1.0 + b["ent"]) ** gamma if objective == "mile" else (1.0 - b["p_y"]) ** gamma
    alpha = m.sum() / (m * w).sum() if m.sum() else 0.0
    metrics["weight_mean"] = (m * w).sum() / n_valid
    loss = (m * alpha * w * ce).sum() / n_valid
  elif objective == "emo":
    mode, clamp, gt = kw.get("mode", 1), kw.get("clamp", 3.0), kw.get("gt_trick", False)
    emo_a, emo_b = a["emo"], b["emo"]
    if gt:
      emo_a, emo_b = emo_a + b["p_y"], emo_b + b["p_y"]
    if mode == 1:
      ratio = b["ce"] / (emo_b + 1e-10)
      if clamp is not None:
        ratio = np.minimum(ratio, clamp)
      tok = 0.5 * (ce + ratio * emo_a)
    else:
      tok = emo_b / (b["ce"] + 1e-10) * ce + emo_a
    loss = (m * tok).sum() / n_valid
    metrics["emo"] = (m * a["emo"]).sum() / n_valid
  elif objective in ("mixce", "tvd"):
    r, q = kw.get("ratio", 0.5), b["p_y"]
    if objective == "mixce":
      tok = r * ce + (1 - r) * q * ce
    else:
      with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(q / ((1 - r) + r * q))
      tok = r * ce + (1 - r) * np.clip(frac, 0.2, 1.0) * ce
    loss = (m * tok).sum() / n_valid
  else:
    raise AssertionError(objective)
  return loss, metrics


def np_coefficients(objective, z, y, emb=None, **kw):
  """Per-token dL/dCE and dL/demo with the stop-gradient factors held fixed."""
  floor = kw.get("entropy_floor", 0.0)
  if objective == "mile" and kw.get("reduction") == "reference" and not floor:
    floor = 1e-8
  t = np_parts(z, y, emb, floor=floor)
  m, ce = t["mask"], t["ce"]
  n_valid = max(m.sum(), 1.0)
  c_emo = np.zeros_like(ce)
  if objective == "ce":
    c_ce = m / n_valid
  elif objective == "mile" and kw.get("reduction") == "reference":
    w = (1.0 + t["ent"]) ** kw.get("gamma", 1.0)
    c_ce = m * (w / w.mean()) / ce.size
  elif objective in ("mile", "focal"):
    gamma = kw.get("gamma", 1.0)
    w = (1.0 + t["ent"]) ** gamma if objective == "mile" else (1.0 - t["p_y"]) ** gamma
    alpha = m.sum() / (m * w).sum() if m.sum() else 0.0
    c_ce = m * alpha * w / n_valid
  elif objective == "emo":
    mode, clamp, gt = kw.get("mode", 1), kw.get("clamp", 3.0), kw.get("gt_trick", False)
    emo = t["emo"] + (t["p_y"] if gt else 0.0)
    if mode == 1:
      ratio = ce / (emo + 1e-10)
      if clamp is not None:
        ratio = np.minimum(ratio, clamp)
      c_ce, c_emo = 0.5 * m / n_valid, 0.5 * ratio * m / n_valid
    else:
      c_ce, c_emo = emo / (ce + 1e-10) * m / n_valid, m / n_valid
  else:
    r, q = kw.get("ratio", 0.5), t["p_y"]
    if objective == "mixce":
      coef = r + (1 - r) * q
    else:
      with np.errstate(invalid="ignore", divide="ignore"):
        coef = r + (1 - r) * np.clip(np.nan_to_num(q / ((1 - r) + r * q)), 0.2, 1.0)
    c_ce = m * coef / n_valid
  return c_ce, c_emo


def np_grad(objective, z, y, emb=None, **kw):
  """dL/dz: CE' = p - onehot; emo' = -p (s - sum_v p_v s_v)."""
  t = np_parts(z, y, emb)
  c_ce, c_emo = np_coefficients(objective, z, y, emb, **kw)
  grad = c_ce[..., None] * (t["p"] - t["onehot"])
  if emb is not None:
    d_emo = -t["p"] * (t["s"] - (t["p"] * t["s"]).sum(-1, keepdims=True))
    grad = grad + c_emo[..., None] * d_emo
  return grad


# ---------------------------------------------------------------- fixtures and helpers

CONFIGS = [
  ("ce", {}),
  *[("mile", {"gamma": g}) for g in (0.0, 1.0, 2.0)],
  *[("mile", {"gamma": g, "reduction": "reference"}) for g in (0.0, 1.0, 2.0)],
  *[("focal", {"gamma": g}) for g in (0.0, 1.0, 2.0)],
  *[("emo", {"mode": 1, "clamp": c, "gt_trick": gt}) for c in (3.0, None) for gt in (False, True)],
  *[("emo", {"mode": 2, "clamp": c, "gt_trick": gt}) for c, gt in ((3.0, False), (None, True))],
  *[("mixce", {"ratio": r}) for r in (0.0, 0.5, 1.0)],
  *[("tvd", {"ratio": r}) for r in (0.0, 0.3, 1.0)],
]
ONE_PER_OBJECTIVE = [
  ("ce", {}), ("mile", {"gamma": 1.0}), ("mile", {"reduction": "reference"}), ("focal", {"gamma": 2.0}),
  ("emo", {}), ("emo", {"mode": 2, "gt_trick": True}), ("mixce", {}), ("tvd", {}),
]


def config_id(cfg):
  objective, kw = cfg
  return objective + "".join(f"-{k}={v}" for k, v in kw.items())


def make_batch(kind, shape=SHAPE, seed=0):
  """fp32 logits of one flavour, labels with every fourth position ignored, a (V, DE) embedding."""
  rng = np.random.default_rng(seed)
  vocab = shape[-1]
  scale = {"normal": 1.0, "peaked": 6.0, "flat": 1e-3, "large": 1e4}[kind]
  z = (rng.normal(size=shape) * scale).astype(np.float32)
  y = rng.integers(0, vocab, size=shape[:-1])
  if kind == "peaked":  # half the targets are the argmax: p_y near 1, CE and emo near 0
    y = np.where(rng.random(shape[:-1]) < 0.5, z.argmax(-1), y)
  y = y.reshape(-1)
  y[::4] = IGNORE
  y = y.reshape(shape[:-1])
  emb = rng.normal(size=(vocab, DE)).astype(np.float32) * rng.uniform(0.1, 10.0, size=(vocab, 1)).astype(np.float32)
  return z, y, emb


def run(objective, z, y, emb, kw):
  """JAX loss, metrics and dL/dlogits through the public function."""
  fn = losses.LOSSES[objective]

  def loss_fn(logits):
    if objective == "emo":
      return fn(logits, y, emb, **kw)
    return fn(logits, y, **kw)

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(z))
  return loss, metrics, grad


def assert_close(actual, expected, rtol=2e-5, scale_atol=1e-5, extra_atol=0.0):
  expected = np.asarray(expected, np.float64)
  atol = scale_atol * (np.abs(expected).max() + 1e-2) + extra_atol
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("kind", ["normal", "peaked", "flat", "large"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_loss_and_grad_match_numpy(cfg, kind):
  objective, kw = cfg
  z, y, emb = make_batch(kind)
  np_emb = emb if objective == "emo" else None
  loss, metrics, grad = run(objective, z, y, emb, kw)
  ref_loss, ref_metrics = np_loss(objective, z, y, np_emb, **kw)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert_close(loss, ref_loss)
  for name, value in ref_metrics.items():
    assert metrics[name].dtype == jnp.float32 and metrics[name].shape == ()
    assert_close(metrics[name], value, scale_atol=1e-5)
  # Autodiff sums the CE and emo cotangents before the softmax backward, so in fp32 the gradient is
  # exact only to a few ulps of the larger coefficient (unclamped EMO ratios reach 1e4 at 1e4 logits).
  _, c_emo = np_coefficients(objective, z, y, np_emb, **kw)
  ulps = 4e-7 * np.abs(c_emo).max()
  assert_close(grad, np_grad(objective, z, y, np_emb, **kw), rtol=1e-4, scale_atol=2e-5, extra_atol=ulps)


@pytest.mark.parametrize("cfg", ONE_PER_OBJECTIVE, ids=config_id)
def test_numpy_gradient_matches_finite_differences(cfg):
  """The analytic numpy gradient (what JAX is checked against) is itself right, in float64."""
  objective, kw = cfg
  z, y, emb = make_batch("normal", shape=(2, 3, 11), seed=1)
  z = z.astype(np.float64)
  np_emb = emb if objective == "emo" else None
  analytic = np_grad(objective, z, y, np_emb, **kw)
  eps = 1e-6
  fd = np.zeros_like(z)
  for idx in np.ndindex(z.shape):
    zp, zm = z.copy(), z.copy()
    zp[idx] += eps
    zm[idx] -= eps
    fd[idx] = (np_loss(objective, zp, y, np_emb, z_sg=z, **kw)[0]
               - np_loss(objective, zm, y, np_emb, z_sg=z, **kw)[0]) / (2 * eps)
  np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8)


def test_mile_reference_matches_authors_recipe_with_ignored_positions():
  """Reference MiLe differs from the valid mode exactly by alpha and the mean over all positions."""
  z, y, _ = make_batch("normal", seed=3)
  p = np.exp(z - z.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  probs = np.clip(p.astype(np.float64), 1e-8, 1.0)  # the authors' clamp, no renormalisation
  ent = -(probs * np.log(probs)).sum(-1)
  w = (1.0 + ent) ** 2.0
  mask = y != IGNORE
  logp = np.log(p.astype(np.float64))
  ce = np.where(mask, -np.take_along_axis(logp, np.where(mask, y, 0)[..., None], -1)[..., 0], 0.0)
  expected = ((w / w.mean()) * ce).mean()
  ref, _ = losses.mile(z, y, gamma=2.0, reduction="reference")
  valid, _ = losses.mile(z, y, gamma=2.0)
  assert_close(ref, expected)
  assert abs(float(ref) - float(valid)) > 1e-3  # ignored positions really enter the reference mean


def test_mile_entropy_floor_in_valid_mode():
  z, y, _ = make_batch("peaked", seed=4)
  kw = {"gamma": 1.0, "entropy_floor": 1e-4}
  loss, metrics, grad = run("mile", z, y, None, kw)
  ref_loss, ref_metrics = np_loss("mile", z, y, **kw)
  assert_close(loss, ref_loss)
  assert_close(metrics["entropy"], ref_metrics["entropy"])
  assert_close(grad, np_grad("mile", z, y, **kw), rtol=1e-4, scale_atol=2e-5)


@pytest.mark.parametrize("cfg", [("mile", {"gamma": 0.0}), ("focal", {"gamma": 0.0}),
                                 ("mixce", {"ratio": 1.0}), ("tvd", {"ratio": 1.0})], ids=config_id)
def test_degenerate_settings_equal_cross_entropy(cfg):
  objective, kw = cfg
  z, y, _ = make_batch("normal", seed=5)
  loss, _, grad = run(objective, z, y, None, kw)
  ce_loss, _, ce_grad = run("ce", z, y, None, {})
  np.testing.assert_allclose(loss, ce_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, ce_grad, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- edge cases and dtypes

@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_all_ignored_gives_zero_loss_and_finite_grads(cfg):
  objective, kw = cfg
  z, y, emb = make_batch("normal", shape=(2, 3, 11))
  y = np.full_like(y, IGNORE)
  loss, metrics, grad = run(objective, z, y, emb, kw)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  assert all(np.isfinite(np.asarray(v)) for v in metrics.values())
  assert float(metrics["n_valid"]) == 0.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["normal", "large"])
@pytest.mark.parametrize("cfg", ONE_PER_OBJECTIVE, ids=config_id)
def test_low_precision_inputs_compute_in_fp32(cfg, kind, dtype):
  objective, kw = cfg
  z, y, emb = make_batch(kind, seed=6)
  z_low = jnp.asarray(z).astype(dtype)
  loss, metrics, grad = run(objective, z_low, y, jnp.asarray(emb).astype(dtype), kw)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert all(v.dtype == jnp.float32 and np.isfinite(np.asarray(v)) for v in metrics.values())
  assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))
  # Same answer as fp32 math on the rounded inputs: the rounding is the only difference.
  z_rounded = np.asarray(z_low.astype(jnp.float32))
  emb_rounded = np.asarray(jnp.asarray(emb).astype(dtype).astype(jnp.float32))
  ref_loss, _ = np_loss(objective, z_rounded, y, emb_rounded if objective == "emo" else None, **kw)
  assert_close(loss, ref_loss, rtol=1e-4)


def test_token_stats_contract():
  z, y, emb = make_batch("normal")
  stats = losses.token_stats(z, y, cost_embedding=emb)
  assert set(stats) == {"ce", "entropy", "p_y", "mask", "emo"}
  assert set(losses.token_stats(z, y)) == {"ce", "entropy", "p_y", "mask"}
  for value in stats.values():
    assert value.shape == y.shape and value.dtype == jnp.float32
  ref = np_parts(z, y, emb)
  ignored = y == IGNORE
  assert np.all(np.asarray(stats["ce"])[ignored] == 0) and np.all(np.asarray(stats["emo"])[ignored] == 0)
  np.testing.assert_array_equal(stats["mask"], ref["mask"])
  np.testing.assert_allclose(stats["p_y"], np.exp(-np.asarray(stats["ce"])), rtol=1e-6)
  # Entropy at every position, ignored ones included: the reference MiLe mean needs them.
  for key, ref_key in (("ce", "ce"), ("entropy", "ent"), ("emo", "emo")):
    assert_close(stats[key], ref[ref_key])


def test_cost_embedding_is_normalised_and_never_differentiated():
  z, y, emb = make_batch("normal", seed=7)
  loss, _ = losses.emo(z, y, emb)
  scaled, _ = losses.emo(z, y, emb * np.float32(123.0))
  np.testing.assert_allclose(loss, scaled, rtol=1e-6)
  grad_emb = jax.grad(lambda e: losses.emo(z, y, e)[0])(jnp.asarray(emb))
  assert np.all(np.asarray(grad_emb) == 0.0)


@pytest.mark.parametrize("width", [1, 64])
def test_emo_any_cost_embedding_width(width):
  z, y, _ = make_batch("normal", seed=8)
  emb = np.random.default_rng(8).normal(size=(SHAPE[-1], width)).astype(np.float32)
  loss, _, grad = run("emo", z, y, emb, {})
  assert_close(loss, np_loss("emo", z, y, emb)[0])
  assert_close(grad, np_grad("emo", z, y, emb), rtol=1e-4, scale_atol=2e-5)


# ---------------------------------------------------------------- the token_stats / combine seam

@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_combine_gives_kernel_coefficients(cfg):
  """d combine / d stats: the per-token dL/dce and dL/demo, zero for entropy and p_y."""
  objective, kw = cfg
  z, y, emb = make_batch("normal", seed=9)
  stats_kw, combine_kw = losses.split_objective_kwargs(objective, kw)
  stats = losses.token_stats(z, y, cost_embedding=emb if objective == "emo" else None, **stats_kw)
  grads = jax.grad(lambda s: losses.combine(objective, s, **combine_kw)[0])(stats)
  c_ce, c_emo = np_coefficients(objective, z, y, emb if objective == "emo" else None, **kw)
  assert_close(grads["ce"], c_ce, rtol=1e-4)
  if objective == "emo":
    assert_close(grads["emo"], c_emo, rtol=1e-4)
  assert np.all(np.asarray(grads["entropy"]) == 0.0) and np.all(np.asarray(grads["p_y"]) == 0.0)


@pytest.mark.parametrize("cfg", [("mile", {"reduction": "reference"}), ("emo", {"clamp": None})], ids=config_id)
def test_combine_is_jittable_and_shape_agnostic(cfg):
  objective, kw = cfg
  z, y, emb = make_batch("normal", seed=10)
  stats_kw, combine_kw = losses.split_objective_kwargs(objective, kw)
  stats = losses.token_stats(z, y, cost_embedding=emb, **stats_kw)
  eager = losses.combine(objective, stats, **combine_kw)
  flat = {k: v.reshape(-1) for k, v in stats.items()}
  jitted = jax.jit(lambda s: losses.combine(objective, s, **combine_kw))(flat)
  np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6)
  for name in eager[1]:
    np.testing.assert_allclose(eager[1][name], jitted[1][name], rtol=1e-6)


@pytest.mark.multidevice
def test_combine_psum_under_shard_map():
  """Token-sharded stats on a 4-device CPU mesh give the unsharded loss and coefficients."""
  script = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from maxlm import losses
    rng = np.random.default_rng(0)
    z = rng.normal(size=(16, 13)).astype(np.float32)
    y = rng.integers(0, 13, size=16); y[::3] = -100
    emb = rng.normal(size=(13, 4)).astype(np.float32)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    for objective, kw in [("mile", {"reduction": "reference"}), ("focal", {"gamma": 2.0}), ("emo", {})]:
      stats_kw, combine_kw = losses.split_objective_kwargs(objective, kw)
      stats = losses.token_stats(z, y, cost_embedding=emb, **stats_kw)
      loss_ref, metrics_ref = losses.combine(objective, stats, **combine_kw)
      grad_ref = jax.grad(lambda s: losses.combine(objective, s, **combine_kw)[0])(stats)
      sharded = jax.shard_map(lambda s: losses.combine(objective, s, psum_axes="data", **combine_kw),
                              mesh=mesh, in_specs=(P("data"),), out_specs=P())
      stats_sh = jax.device_put(stats, NamedSharding(mesh, P("data")))
      loss, metrics = jax.jit(sharded)(stats_sh)
      grad = jax.jit(jax.grad(lambda s: sharded(s)[0]))(stats_sh)
      np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
      for name in metrics_ref:
        np.testing.assert_allclose(metrics[name], metrics_ref[name], rtol=1e-6)
      for name in ("ce", "emo"):
        np.testing.assert_allclose(grad[name], grad_ref[name], rtol=1e-5, atol=1e-8)
    print("ok")
  """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---------------------------------------------------------------- dispatcher and config errors

@pytest.mark.parametrize("cfg", ONE_PER_OBJECTIVE, ids=config_id)
def test_compute_dispatches_to_the_public_function(cfg):
  objective, kw = cfg
  z, y, emb = make_batch("normal", seed=11)
  loss, _ = losses.compute(objective, z, y, cost_embedding=emb, **kw)
  direct, _ = (losses.emo(z, y, emb, **kw) if objective == "emo" else losses.LOSSES[objective](z, y, **kw))
  assert float(loss) == float(direct)


def test_unknown_objective_names_the_valid_ones():
  z, y, _ = make_batch("normal")
  with pytest.raises(ConfigError) as err:
    losses.compute("infoentropy", z, y)
  for name in losses.LOSSES:
    assert repr(name) in str(err.value)
  with pytest.raises(ConfigError):
    losses.combine("infoentropy", losses.token_stats(z, y))


@pytest.mark.parametrize("objective, kw", [
  ("mile", {"gama": 1.0}), ("ce", {"gamma": 1.0}), ("emo", {"ratio": 0.5}),
  ("mile", {"reduction": "sum"}), ("emo", {"mode": 3}), ("tvd", {"ratio": 1.5}),
])
def test_bad_arguments_raise_config_error(objective, kw):
  z, y, emb = make_batch("normal")
  with pytest.raises(ConfigError):
    losses.compute(objective, z, y, cost_embedding=emb, **kw)


def test_emo_needs_matching_cost_embedding():
  z, y, emb = make_batch("normal")
  with pytest.raises(ConfigError):
    losses.compute("emo", z, y)
  with pytest.raises(ConfigError):
    losses.emo(z, y, emb[:-1])


def test_kwarg_table_matches_public_signatures():
  assert set(losses.LOSSES) == set(losses.OBJECTIVE_KWARGS)
  for name, fn in losses.LOSSES.items():
    params = inspect.signature(fn).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    assert defaults == losses.OBJECTIVE_KWARGS[name], name
