"""maxlm.kernels.fused_loss against the reference maxlm.losses on hidden @ lm_head: values, metrics, gradients.

Shapes are deliberately not multiples of any tile; the sharded test runs 8 simulated devices in a subprocess.
"""

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
from maxlm.kernels import blockwise, fused_loss, tiling
from helpers import require_compiler

N, D, V, D_EMB = 37, 16, 53, 11
TILES = dict(block_tokens=8, block_vocab=16)  # N, V, dE are multiples of neither

OBJECTIVES = [
  ("ce", {}),
  ("mile", {}),
  ("mile", {"gamma": 2.0}),
  ("mile", {"reduction": "reference"}),
  ("focal", {}),
  ("focal", {"gamma": 0.5}),
  ("emo", {}),  # mode 1, clamp 3.0 (EMOLoss 0.0.3)
  ("emo", {"clamp": None}),
  ("emo", {"mode": 2}),
  ("emo", {"gt_trick": True}),
  ("emo", {"mode": 2, "clamp": None, "gt_trick": True}),
  ("mixce", {}),
  ("tvd", {"ratio": 0.3}),
]
IDS = [o + "".join(f"-{k}={v}" for k, v in kw.items()) for o, kw in OBJECTIVES]


def make_inputs(dtype=jnp.float32, *, scale=1.0, n=N, v=V, seed=0, n_ignored=4):
  rng = np.random.default_rng(seed)
  hidden_NxD = jnp.asarray(rng.standard_normal((n, D)) * scale, dtype)
  w_DxV = jnp.asarray(rng.standard_normal((D, v)) / np.sqrt(D), dtype)
  labels = rng.integers(0, v, n)
  labels[rng.choice(n, n_ignored, replace=False)] = -100
  cost_VxE = jnp.asarray(rng.standard_normal((v, D_EMB)), jnp.float32)
  return hidden_NxD, w_DxV, jnp.asarray(labels, jnp.int32), cost_VxE


def reference(objective, kwargs, hidden_NxD, w_DxV, labels_N, cost_VxE):
  """The spec: maxlm.losses on materialised logits, differentiated by plain autodiff."""
  def f(h, w):
    cost = cost_VxE if objective == "emo" else None
    return losses.compute(objective, h @ w, labels_N, cost_embedding=cost, **kwargs)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden_NxD, w_DxV)


def fused(impl, objective, kwargs, hidden_NxD, w_DxV, labels_N, cost_VxE, **opts):
  def f(h, w):
    return fused_loss(h, w, labels_N, objective=objective, impl=impl, cost_embedding=cost_VxE, **opts, **kwargs)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden_NxD, w_DxV)


def assert_close(got, want, rtol, what=""):
  (loss_g, metrics_g), grads_g = got
  (loss_w, metrics_w), grads_w = want
  np.testing.assert_allclose(float(loss_g), float(loss_w), rtol=rtol, atol=rtol, err_msg=f"{what} loss")
  assert set(metrics_g) == set(metrics_w)
  for k in metrics_w:
    np.testing.assert_allclose(float(metrics_g[k]), float(metrics_w[k]), rtol=rtol, atol=rtol, err_msg=f"{what} {k}")
  for name, g, w in zip(("d hidden", "d lm_head"), grads_g, grads_w):
    assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype)
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.isfinite(g).all(), f"{what} {name} not finite"
    # Relative to the largest entry: per-element relative error is meaningless where a grad is ~0.
    scale = max(np.abs(w).max(), 1e-30)
    np.testing.assert_allclose(g / scale, w / scale, rtol=0, atol=rtol, err_msg=f"{what} {name}")


# impl="reference" is a thin wrapper over maxlm.losses: its full matrix is slow-marked.
@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.slow), "blockwise"])
@pytest.mark.parametrize("objective,kwargs", OBJECTIVES, ids=IDS)
def test_matches_reference_fp32(impl, objective, kwargs):
  inputs = make_inputs()
  opts = {} if impl == "reference" else TILES
  # MiLe reference mode: the fused path takes H without the 1e-8 softmax floor (DESIGN.md section 4),
  # a difference bounded by V * 1e-8 * ln(1e8) ~ 1e-5 in H here.
  rtol = 5e-5 if kwargs.get("reduction") == "reference" and impl != "reference" else 1e-5
  assert_close(fused(impl, objective, kwargs, *inputs, **opts), reference(objective, kwargs, *inputs), rtol, impl)


@pytest.mark.parametrize("objective,kwargs", [("ce", {}), ("mile", {}), ("emo", {}), ("tvd", {})])
def test_matches_reference_bf16(objective, kwargs):
  inputs = make_inputs(jnp.bfloat16)
  # The reference rounds its logits to bf16; the fused path keeps them fp32: loose tolerance.
  assert_close(fused("blockwise", objective, kwargs, *inputs, **TILES), reference(objective, kwargs, *inputs),
               3e-2, "bf16")


@pytest.mark.parametrize("objective,kwargs", [("ce", {}), ("mile", {}), ("mile", {"reduction": "reference"}),
                                              ("focal", {}), ("emo", {}), ("emo", {"mode": 2}), ("tvd", {})])
def test_all_labels_ignored(objective, kwargs):
  hidden_NxD, w_DxV, labels_N, cost_VxE = make_inputs()
  labels_N = jnp.full_like(labels_N, -100)
  (loss, metrics), grads = fused("blockwise", objective, kwargs, hidden_NxD, w_DxV, labels_N, cost_VxE, **TILES)
  assert float(loss) == 0.0 and float(metrics["n_valid"]) == 0.0
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("objective,kwargs", [("ce", {}), ("mile", {}), ("emo", {}), ("focal", {})])
def test_huge_logits_do_not_overflow(objective, kwargs):
  # Logits of order 1e4: exp overflows fp32 unless every sum is taken relative to a running max.
  inputs = make_inputs(scale=3e3)
  got = fused("blockwise", objective, kwargs, *inputs, **TILES)
  want = reference(objective, kwargs, *inputs)
  assert np.isfinite(float(got[0][0])) and all(np.isfinite(np.asarray(g)).all() for g in got[1])
  # Logits near 1e4 carry ~1e-3 absolute fp32 rounding in either implementation.
  assert_close(got, want, 1e-4, "huge")


def test_peaked_and_flat_distributions():
  hidden_NxD, w_DxV, labels_N, cost_VxE = make_inputs()
  # Flat: a zero head gives the uniform softmax, CE = entropy = log V.
  (loss, metrics), _ = fused("blockwise", "mile", {}, hidden_NxD, jnp.zeros_like(w_DxV), labels_N, cost_VxE, **TILES)
  np.testing.assert_allclose(float(metrics["ce"]), np.log(V), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["entropy"]), np.log(V), rtol=1e-6)
  np.testing.assert_allclose(float(loss), np.log(V), rtol=1e-6)
  # Peaked: each token's hidden state points at its label's column; p_y -> 1, entropy -> 0.
  w_DxV = jnp.asarray(np.random.default_rng(1).standard_normal((D, V)), jnp.float32)
  w_DxV = w_DxV / jnp.linalg.norm(w_DxV, axis=0, keepdims=True)
  hidden_NxD = 200.0 * w_DxV[:, jnp.maximum(labels_N, 0)].T
  # The label's logit is 200, where fp32's spacing is 1.5e-5: both sides' logits carry that rounding, and which
  # matmul kernel the CPU picks (its vector width) moves the gradients by up to ~1.3e-5 of their largest entry.
  for objective in ("ce", "mile", "emo", "tvd"):
    got = fused("blockwise", objective, {}, hidden_NxD, w_DxV, labels_N, cost_VxE, **TILES)
    assert_close(got, reference(objective, {}, hidden_NxD, w_DxV, labels_N, cost_VxE), 5e-5, f"peaked {objective}")


@pytest.mark.parametrize("block_tokens,block_vocab", [(1, 1), (37, 53), (64, 128), (5, 52)])
def test_tile_sizes(block_tokens, block_vocab):
  # One-element tiles, whole-array tiles, tiles larger than the array, a tail of one column.
  inputs = make_inputs()
  got = fused("blockwise", "emo", {}, *inputs, block_tokens=block_tokens, block_vocab=block_vocab)
  assert_close(got, reference("emo", {}, *inputs), 1e-5, f"tiles {block_tokens}x{block_vocab}")


def test_token_stats_vjp_is_general():
  # The custom VJP also carries entropy and p_y cotangents, though combine stops their gradient.
  hidden_NxD, w_DxV, labels_N, cost_VxE = make_inputs()
  r = {k: jnp.asarray(np.random.default_rng(2).standard_normal(N), jnp.float32) for k in blockwise.DIFF_STATS}

  def weighted(stats):
    return sum(jnp.sum(stats[k] * r[k]) for k in r)

  want = jax.grad(lambda h, w: weighted(losses.token_stats(h @ w, labels_N, cost_embedding=cost_VxE)),
                  argnums=(0, 1))(hidden_NxD, w_DxV)
  got = jax.grad(lambda h, w: weighted(blockwise.token_stats(h, w, labels_N, cost_VxE, **TILES)),
                 argnums=(0, 1))(hidden_NxD, w_DxV)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


def test_cost_embedding_gets_no_gradient():
  hidden_NxD, w_DxV, labels_N, cost_VxE = make_inputs()
  g = jax.grad(lambda e: fused_loss(hidden_NxD, w_DxV, labels_N, objective="emo", impl="blockwise",
                                    cost_embedding=e, **TILES)[0])(cost_VxE)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_reference_impl_bf16_and_mesh_free():
  inputs = make_inputs(jnp.bfloat16)
  assert_close(fused("reference", "emo", {}, *inputs), reference("emo", {}, *inputs), 3e-2, "reference bf16")


def test_errors_name_the_choices():
  hidden_NxD, w_DxV, labels_N, cost_VxE = make_inputs()
  with pytest.raises(ConfigError, match="valid.*blockwise"):
    fused_loss(hidden_NxD, w_DxV, labels_N, impl="fast")
  with pytest.raises(ConfigError, match="valid objectives"):
    fused_loss(hidden_NxD, w_DxV, labels_N, objective="kl")
  with pytest.raises(ConfigError, match="valid"):
    fused_loss(hidden_NxD, w_DxV, labels_N, objective="mile", gamm=1.0)
  with pytest.raises(ConfigError, match="cost_embedding"):
    fused_loss(hidden_NxD, w_DxV, labels_N, objective="emo", impl="blockwise")
  with pytest.raises(ConfigError, match="block_tokens"):
    fused_loss(hidden_NxD, w_DxV, labels_N, impl="blockwise", block_tokens=0)
  with pytest.raises(ConfigError, match="entropy_floor"):
    fused_loss(hidden_NxD, w_DxV, labels_N, objective="mile", impl="blockwise", entropy_floor=1e-3)


def test_auto_resolution():
  from maxlm.kernels import PALLAS_AUTO_PLATFORMS, resolve_impl
  assert resolve_impl("auto") == ("pallas" if jax.default_backend() in PALLAS_AUTO_PLATFORMS else "blockwise")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU refusal")
def test_pallas_without_kernel_raises():
  hidden_NxD, w_DxV, labels_N, _ = make_inputs()
  with pytest.raises(ConfigError, match="blockwise"):
    fused_loss(hidden_NxD, w_DxV, labels_N, impl="pallas")


PALLAS_CASES = [("ce", {}), ("mile", {}), ("emo", {}), ("emo", {"mode": 2, "gt_trick": True})]


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
@pytest.mark.parametrize("objective,kwargs", PALLAS_CASES, ids=[o + str(k) for o, k in PALLAS_CASES])
def test_pallas_interpret_matches_reference(kernel, objective, kwargs):
  # Interpret mode runs the kernel bodies on CPU: semantics only, not Triton/Mosaic lowering.
  inputs = make_inputs()
  got = fused("pallas", objective, kwargs, *inputs, interpret=kernel, block_tokens=16, block_vocab=16)
  assert_close(got, reference(objective, kwargs, *inputs), 1e-5, f"pallas-{kernel}")


def test_interpret_true_emulates_this_platforms_kernel():
  """DESIGN's `interpret=True` on the CPU: the GPU kernel in interpret mode, equal to interpret="gpu"."""
  inputs = make_inputs()
  got = fused("pallas", "mile", {}, *inputs, interpret=True)
  assert_close(got, fused("pallas", "mile", {}, *inputs, interpret="gpu"), 1e-7, "interpret=True")
  assert_close(got, reference("mile", {}, *inputs), 1e-5, "interpret=True")


def test_labels_outside_the_vocabulary_are_refused():
  """torch's cross_entropy raises on such a label; a gather in jnp would wrap (-5 -> V-5) or give NaN."""
  hidden_NxD, w_DxV, labels_N, _ = make_inputs()
  for bad in (V, -5, -1):
    labels = labels_N.at[3].set(bad)
    for call in (lambda: fused_loss(hidden_NxD, w_DxV, labels, impl="blockwise"),
                 lambda: losses.cross_entropy(hidden_NxD @ w_DxV, labels)):
      with pytest.raises(ConfigError, match=f"outside the vocabulary.*{bad}"):
        call()
  with pytest.raises(ConfigError, match="integer"):
    fused_loss(hidden_NxD, w_DxV, labels_N.astype(jnp.float32))
  # Labels given as a list work; another ignore_index makes -1 a valid "ignored" label.
  loss, _ = fused_loss(hidden_NxD, w_DxV, np.asarray(labels_N).tolist(), impl="blockwise")
  np.testing.assert_allclose(float(loss), float(losses.cross_entropy(hidden_NxD @ w_DxV, labels_N)[0]), rtol=1e-6)
  fused_loss(hidden_NxD, w_DxV, jnp.where(labels_N == -100, -1, labels_N), ignore_index=-1)


def test_logged_entropy_is_h_whatever_the_objective_and_impl():
  """MiLe's reference mode floors the softmax for its weight only: the entropy metric stays H, as CE's run logs it."""
  inputs = make_inputs(scale=4.0)
  want = float(reference("ce", {}, *inputs)[0][1]["entropy"])
  for impl in ("reference", "blockwise"):
    (_, metrics), _ = fused(impl, "mile", {"reduction": "reference"}, *inputs)
    np.testing.assert_allclose(float(metrics["entropy"]), want, rtol=1e-6, err_msg=impl)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_pallas_interpret_edge_cases(kernel):
  hidden_NxD, w_DxV, labels_N, cost_VxE = make_inputs(scale=3e3)
  got = fused("pallas", "mile", {}, hidden_NxD, w_DxV, labels_N, cost_VxE, interpret=kernel)
  assert_close(got, reference("mile", {}, hidden_NxD, w_DxV, labels_N, cost_VxE), 1e-4, "huge")
  (loss, _), grads = fused("pallas", "emo", {}, hidden_NxD, w_DxV, jnp.full_like(labels_N, -100), cost_VxE,
                           interpret=kernel)
  assert float(loss) == 0.0 and all(np.isfinite(np.asarray(g)).all() for g in grads)
  inputs = make_inputs(jnp.bfloat16)
  assert_close(fused("pallas", "ce", {}, *inputs, interpret=kernel), reference("ce", {}, *inputs), 3e-2, "bf16")


def test_blockwise_temp_memory_is_a_tile_not_the_logits():
  # Compile only (cheap on CPU): the fused value_and_grad must not hold anything (N, V)-sized.
  n, d, v = 2048, 128, 8192
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((v, 64), jnp.float32))

  def temp_bytes(impl):
    def f(h, w, y, e):
      return fused_loss(h, w, y, objective="emo", impl=impl, cost_embedding=e, block_tokens=256, block_vocab=256)[0]
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = n * v * 4
  assert temp_bytes("blockwise") < logits_bytes / 8 < temp_bytes("reference")


# ----------------------------------------------------------------------------- tile plans per platform

# Token-major (GPU/TPU) order: split, clamped vocabulary chunks (53 = 3 x 16 + 5) with a static token tail
# (37 = 4 x 8 + 5), for every objective; the whole vocabulary per chunk (the GPU plan's shape), with a tail and
# as one chunk, for the objectives that exercise each backward term (entropy, similarity, p_y).
SPLIT_VOCAB = dict(block_tokens=8, block_vocab=16)
WHOLE_VOCAB_CASES = [(tiles_id, tiles, o, kw) for tiles_id, tiles in (("whole-vocab", dict(block_tokens=8)),
                                                                    ("one-chunk", dict()))
                     for o, kw in (("ce", {}), ("mile", {"reduction": "reference"}),
                                   ("emo", {"mode": 2, "gt_trick": True}), ("tvd", {"ratio": 0.3}))]


def _check_token_major(tiles, objective, kwargs):
  inputs = make_inputs()
  rtol = 5e-5 if kwargs.get("reduction") == "reference" else 1e-5
  assert_close(fused("blockwise", objective, kwargs, *inputs, tile_plan="gpu", **tiles),
               reference(objective, kwargs, *inputs), rtol, f"gpu plan {tiles}")


@pytest.mark.parametrize("objective,kwargs", OBJECTIVES, ids=IDS)
def test_token_major_plan_matches_reference_fp32(objective, kwargs):
  _check_token_major(SPLIT_VOCAB, objective, kwargs)


@pytest.mark.parametrize("tiles_id,tiles,objective,kwargs", WHOLE_VOCAB_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in WHOLE_VOCAB_CASES])
def test_token_major_whole_vocabulary_matches_reference(tiles_id, tiles, objective, kwargs):
  _check_token_major(tiles, objective, kwargs)


def test_plans_per_platform():
  cpu = tiling.make_plan(16384, 32000, platform="cpu")
  assert (cpu.block_tokens, cpu.block_vocab, cpu.order) == (1024, 512, tiling.VOCAB_MAJOR)
  # GPU at the 7B shape: the largest token chunk of 2048-4096 whose fp32 logits fit 1 GiB, the whole vocabulary.
  gpu = tiling.make_plan(16384, 32000, platform="gpu")
  assert (gpu.block_tokens, gpu.block_vocab, gpu.order) == (4096, 32000, tiling.TOKEN_MAJOR)
  for v in (32000, 128256, 256000, 1_000_000):
    plan = tiling.make_plan(65536, v, platform="gpu")
    assert 2048 <= plan.block_tokens <= 4096 and plan.chunk_logits_bytes() <= 1 << 30
    # whole vocabulary unless even 2048 tokens of it exceed the bound; a split chunk is a multiple of 128
    assert (plan.block_vocab == v) == (2048 * v * 4 <= 1 << 30)
    assert plan.block_vocab == v or plan.block_vocab % 128 == 0
  tpu = tiling.make_plan(16384, 32000, platform="tpu")
  assert tpu.order == tiling.TOKEN_MAJOR and tpu.block_tokens >= 1024 and tpu.chunk_logits_bytes() <= 256 << 20
  # Overrides replace sizes, keep the order; blocks never exceed the array.
  over = tiling.make_plan(100, 50, platform="gpu", block_tokens=30)
  assert (over.block_tokens, over.block_vocab, over.full_token_chunks, over.tail_tokens) == (30, 50, 3, 10)
  with pytest.raises(ConfigError, match="tile_plan"):
    tiling.make_plan(10, 10, platform="metal")


def test_default_plan_follows_the_mesh_platform():
  hidden_NxD, w_DxV, labels_N, _ = make_inputs()
  seen = []
  original = blockwise.token_stats

  def spy(*args, **kwargs):
    seen.append(kwargs["platform"])
    return original(*args, **kwargs)

  blockwise.token_stats = spy
  try:
    fused_loss(hidden_NxD, w_DxV, labels_N, impl="blockwise")
    fused_loss(hidden_NxD, w_DxV, labels_N, impl="blockwise", tile_plan="gpu")
  finally:
    blockwise.token_stats = original
  assert seen == [jax.default_backend(), "gpu"]
  with pytest.raises(ConfigError, match="tile_plan"):
    fused_loss(hidden_NxD, w_DxV, labels_N, impl="pallas", interpret="gpu", tile_plan="gpu")


def test_gpu_plan_memory_is_bounded_by_its_chunk():
  # Compile only: temp is a few chunks of logits plus the fp32 head gradient and d hidden, never (N, V).
  n, d, v, bt = 16384, 64, 4096, 2048
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((v, 64), jnp.float32))

  def temp_bytes(objective, impl, **opts):
    def f(h, w, y, e):
      return fused_loss(h, w, y, objective=objective, impl=impl, cost_embedding=e if objective == "emo" else None,
                        **opts)[0]
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

  chunk, logits = bt * v * 4, n * v * 4
  for objective in ("ce", "mile", "emo"):
    bound = 4 * chunk + d * v * 4 + 2 * n * d * 4
    got = temp_bytes(objective, "blockwise", tile_plan="gpu", block_tokens=bt)
    assert got < bound < logits < temp_bytes(objective, "reference"), (objective, got, bound)


# ----------------------------------------------------------------------------- precision: compute dtype, fp32 math


def _dot_generals(jaxpr):
  """Every dot_general of a jaxpr and of the jaxprs nested in it (loops, custom VJPs, pallas kernels)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _dot_generals(inner)


@pytest.mark.parametrize("impl,opts", [("blockwise", {"tile_plan": "cpu"}), ("blockwise", {"tile_plan": "gpu"}),
                                       ("pallas", {"interpret": "gpu"}), ("pallas", {"interpret": "tpu"})],
                         ids=["cpu-plan", "gpu-plan", "triton", "mosaic"])
def test_bf16_matmuls_run_in_bf16_without_highest(impl, opts):
  # DESIGN.md section 4: every matmul of the fused paths, EMO's similarity included, takes the compute dtype's
  # operands with fp32 accumulation; no HIGHEST (which would run bf16 inputs as multi-pass fp32 on GPU).
  hidden_NxD, w_DxV, labels_N, cost_VxE = make_inputs(jnp.bfloat16)

  def f(h, w):
    return fused_loss(h, w, labels_N, objective="emo", impl=impl, cost_embedding=cost_VxE, **opts)[0]

  dots = list(_dot_generals(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(hidden_NxD, w_DxV).jaxpr))
  assert len(dots) >= 6  # logits, similarity (forward and backward), d hidden, d lm_head
  for eqn in dots:
    assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn
    assert eqn.outvars[0].aval.dtype == jnp.float32, eqn
    precision = eqn.params["precision"]
    assert precision is None or jax.lax.Precision.HIGHEST not in tuple(precision), eqn


@pytest.mark.parametrize("tile_plan", ["cpu", "gpu"])
@pytest.mark.parametrize("kwargs", [{}, {"mode": 2, "gt_trick": True}], ids=["mode1", "mode2-gt"])
def test_bf16_emo_matches_the_fp32_reference(tile_plan, kwargs):
  # The same values in bf16 and fp32: the only difference is the compute precision. bf16 products are exact in
  # fp32, so the logits are fp32-exact; the unit cost rows round to bf16 (2^-9 relative) and average out in
  # sum_v p_v s_v, so loss and metrics agree to 1e-4; the gradients pass through dz rounded to bf16: 1e-2 of
  # their largest entry.
  h, w, y, _ = make_inputs(jnp.bfloat16, n=300, v=500)
  cost_VxE = jnp.asarray(np.random.default_rng(5).standard_normal((500, 64)), jnp.float32)
  got = fused("blockwise", "emo", kwargs, h, w, y, cost_VxE, tile_plan=tile_plan, block_tokens=64,
              block_vocab=128 if tile_plan == "cpu" else None)
  (loss_w, metrics_w), grads_w = reference("emo", kwargs, h.astype(jnp.float32), w.astype(jnp.float32), y, cost_VxE)
  (loss_g, metrics_g), grads_g = got
  np.testing.assert_allclose(float(loss_g), float(loss_w), rtol=1e-4)
  for k in metrics_w:
    np.testing.assert_allclose(float(metrics_g[k]), float(metrics_w[k]), rtol=1e-4, atol=1e-6, err_msg=k)
  for name, g, want in zip(("d hidden", "d lm_head"), grads_g, grads_w):
    assert g.dtype == jnp.bfloat16
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(want) / scale, atol=1e-2, err_msg=name)


# ----------------------------------------------------------------------------- Pallas: the three lowering fixes


def _lower(kernel, shapes, objective="emo", **opts):
  """Lowers value_and_grad of the Pallas fused loss for `kernel`'s platform on this CPU (Triton IR / Mosaic)."""
  platform = {"gpu": "cuda", "tpu": "tpu"}[kernel]
  module = sys.modules["maxlm.kernels.fused_loss"]
  saved = module._platform
  module._platform = lambda mesh: kernel  # what a GPU / TPU process would see
  try:
    def f(h, w, y, e):
      return fused_loss(h, w, y, objective=objective, impl="pallas", cost_embedding=e, **opts)[0]
    args = [jax.ShapeDtypeStruct(s, t) for s, t in shapes]
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).trace(*args).lower(lowering_platforms=(platform,))
  finally:
    module._platform = saved


def _shapes(n, d, v, d_emb, hidden_dtype=jnp.bfloat16, head_dtype=jnp.bfloat16):
  return [((n, d), hidden_dtype), ((d, v), head_dtype), ((n,), jnp.int32), ((v, d_emb), jnp.float32)]


@pytest.mark.parametrize("case", ["emo-dE768", "bf16-hidden-fp32-head", "7b-emo-dE4096", "7b-mile"])
def test_triton_kernel_lowers(case):
  # The Pallas -> Triton lowering runs on CPU; it used to fail on a cost width that is no power of two and on
  # mixed hidden / head dtypes. (Compiling the Triton IR to PTX and running it needs a GPU: benchmarks/device_check.)
  shapes, objective = {
    "emo-dE768": (_shapes(300, 200, 1000, 768), "emo"),
    "bf16-hidden-fp32-head": (_shapes(300, 200, 1000, 11, head_dtype=jnp.float32), "emo"),
    "7b-emo-dE4096": (_shapes(16384, 4096, 32000, 4096), "emo"),
    "7b-mile": (_shapes(16384, 4096, 32000, 1), "mile"),
  }[case]
  assert "triton" in _lower("gpu", shapes, objective).as_text().lower()


@pytest.mark.parametrize("case", ["emo-dE768-fp32-head", "7b-emo-dE4096"])
def test_mosaic_kernel_lowers(case):
  shapes = {"emo-dE768-fp32-head": _shapes(2100, 200, 1000, 768, head_dtype=jnp.float32),
            "7b-emo-dE4096": _shapes(16384, 4096, 32000, 4096)}[case]
  assert "tpu_custom_call" in _lower("tpu", shapes).as_text()


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_pallas_interpret_fixed_cases(kernel):
  # The lowering fixes, checked for values: a cost width padded to whole chunks (768 -> 12 x 64 / 6 x 128),
  # a bf16 hidden with an fp32 head (both cast to their promotion, fp32, as hidden @ lm_head does).
  hidden_NxD, w_DxV, labels_N, _ = make_inputs()
  cost_VxE = jnp.asarray(np.random.default_rng(6).standard_normal((V, 768)), jnp.float32)
  got = fused("pallas", "emo", {}, hidden_NxD, w_DxV, labels_N, cost_VxE, interpret=kernel)
  assert_close(got, reference("emo", {}, hidden_NxD, w_DxV, labels_N, cost_VxE), 1e-5, "dE=768")
  hidden_bf16 = hidden_NxD.astype(jnp.bfloat16)
  got = fused("pallas", "mile", {}, hidden_bf16, w_DxV, labels_N, cost_VxE, interpret=kernel)
  want = reference("mile", {}, hidden_bf16, w_DxV, labels_N, cost_VxE)  # its logits: bf16 @ fp32 -> fp32
  assert_close(got, want, 1e-5, "bf16 hidden, fp32 head")


def test_triton_refuses_block_sizes_that_are_no_power_of_two():
  hidden_NxD, w_DxV, labels_N, _ = make_inputs()
  for blocks in (dict(block_tokens=48), dict(block_vocab=100), dict(block_tokens=8)):
    with pytest.raises(ConfigError, match="power of two"):
      fused_loss(hidden_NxD, w_DxV, labels_N, impl="pallas", interpret="gpu", **blocks)
  assert tiling.triton_blocks(37, 16, 53, None, 64, 32)["block_tokens"] == 64  # valid sizes pass unchanged


def test_tpu_kernel_plan_takes_1024_token_blocks():
  # At the 7B shape (d=4096, bf16) the Mosaic plan keeps 1024-token blocks on a 128 MiB-VMEM chip (v5e, v6e) and
  # fits its VMEM budget.
  for kind in ("TPU v5 lite", "TPU v6 lite"):
    blocks = tiling.tpu_kernel_blocks(16384, 4096, 32000, None, 2, device_kind=kind)
    assert blocks["block_tokens"] == 1024 and blocks["block_vocab"] % 128 == 0
    assert tiling.tpu_kernel_vmem_bytes(1024, blocks["block_vocab"], 4096, 0, 2) <= tiling.tpu_vmem_budget(kind)
  # and runs with them: 1100 tokens are two 1024-token blocks (the second mostly padding).
  inputs = make_inputs(n=1100, v=300)
  got = fused("pallas", "emo", {}, *inputs, interpret="tpu")
  assert_close(got, reference("emo", {}, *inputs), 1e-5, "tpu 1024-token blocks")



# Device kinds as jax names them (v5p reports "TPU v5") and the VMEM libtpu's compiler enforces on each.
TPU_CHIPS = {"TPU v4": 16, "TPU v5 lite": 128, "TPU v5": 64, "TPU v6 lite": 128}


def test_tpu_vmem_table():
  for kind, mib in TPU_CHIPS.items():
    assert tiling.tpu_vmem_bytes(kind) == mib << 20
  assert tiling.tpu_vmem_bytes("TPU v5p") == 64 << 20
  # Unknown kinds (a newer chip; a CPU in interpret mode) plan for the smallest VMEM, so the tiles fit anywhere.
  assert tiling.tpu_vmem_bytes("TPU v9 hypothetical") == tiling.tpu_vmem_bytes("cpu") == 16 << 20
  assert tiling.tpu_vmem_budget("TPU v4") == int(tiling.TPU_VMEM_SAFETY * (16 << 20))


@pytest.mark.parametrize("kind", list(TPU_CHIPS))
@pytest.mark.parametrize("itemsize", [2, 4])
def test_tpu_planner_fits_each_chip_and_covers_the_problem(kind, itemsize):
  # The shapes (d 1024 / 2048 / 4096, V=32000, 8192 tokens per chip; ce/mile, emo dE=128 and dE=d) and
  # unaligned ones: the planner's estimate stays under the chip's budget, blocks are aligned and cover N and V.
  shapes = [(8192, d, 32000, e) for d in (1024, 2048, 4096) for e in (None, 128, d)]
  shapes += [(1100, 200, 1000, 768), (37, 16, 53, 11), (16384, 4096, 32000, None), (3000, 2560, 50257, 2560)]
  for n, d, v, d_emb in shapes:
    if itemsize == 4 and kind == "TPU v4" and d_emb == d == 4096:
      # fp32 at d = dE = 4096: the (d, 128) head and (128, dE) cost blocks alone overflow v4; refused, not planned.
      with pytest.raises(ConfigError, match="blockwise"):
        tiling.tpu_kernel_blocks(n, d, v, d_emb, itemsize, device_kind=kind)
      continue
    blocks = tiling.tpu_kernel_blocks(n, d, v, d_emb, itemsize, device_kind=kind)
    bt, bv = blocks["block_tokens"], blocks["block_vocab"]
    assert tiling.tpu_kernel_vmem_bytes(bt, bv, d, d_emb, itemsize) <= tiling.tpu_vmem_budget(kind), (n, d, v, d_emb)
    assert bt % 8 == 0 and bv % 128 == 0 and blocks["block_d"] % 128 == 0 and blocks["block_d"] >= d
    assert bt <= tiling.round_up(n, 8) and bv <= tiling.round_up(v, 128)
    assert tiling.cdiv(n, bt) * bt >= n and tiling.cdiv(v, bv) * bv >= v
    assert blocks["vmem_limit_bytes"] == tiling.tpu_vmem_bytes(kind)


def test_tpu_planner_shrinks_the_tiles_the_compiler_refused():
  # Compiled with libtpu (docs/BENCHMARKS.md): 1024 x 512 blocks at d=1024 need 25.22 MiB in the d-hidden kernel,
  # over v4's 16 MiB; the estimate covers that measurement, and the v4 plan is smaller.
  assert tiling.tpu_kernel_vmem(1024, 512, 1024, None, 2)["dh"] >= 25.22 * tiling.MIB
  v4 = tiling.tpu_kernel_blocks(8192, 1024, 32000, None, 2, device_kind="TPU v4")
  assert v4["block_tokens"] * v4["block_vocab"] < 1024 * 512
  v5p = tiling.tpu_kernel_blocks(8192, 4096, 32000, 4096, 2, device_kind="TPU v5")
  assert tiling.tpu_kernel_vmem_bytes(v5p["block_tokens"], v5p["block_vocab"], 4096, 4096, 2) < 64 * tiling.MIB
  # A head whose (d, 128) block alone overflows the chip: refused with the fix, not a compiler OOM.
  with pytest.raises(ConfigError, match="blockwise"):
    tiling.tpu_kernel_blocks(8192, 65536, 32000, None, 2, device_kind="TPU v4")


@pytest.mark.target_compile
def test_mosaic_fused_loss_compiles_for_a_tpu():
  # The real XLA:TPU compiler (libtpu, from the side folder of `--install-compilers`) on this CPU host: the planned
  # kernel compiles for v4 at a shape whose former 1024 x 512 tiles ran out of v4's VMEM.
  from maxlm.core import compilers  # pylint: disable=import-outside-toplevel
  require_compiler("tpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = compilers.subprocess_env("tpu")
  env["PYTHONPATH"] = os.pathsep.join((root, env["PYTHONPATH"]))
  cmd = [sys.executable, os.path.join(root, "benchmarks", "tpu_kernel_compile.py"), "--targets", "v4", "--d", "1024",
         "--objectives", "mile", "--tokens-per-chip", "2048", "--vocab", "4096"]
  result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and '"compiled": true' in result.stdout, result.stdout + result.stderr[-3000:]

SHARDED_SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import AxisType
  from maxlm.kernels import fused_loss
  from maxlm import losses
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  n, d, v, de = 40, 16, 56, 12   # per shard: 10 tokens, 28 vocabulary entries; tiles 4 x 8 leave tails
  h = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, v)) / 4, jnp.float32)
  e = jnp.asarray(rng.standard_normal((v, de)), jnp.float32)
  y = rng.integers(0, v, n); y[[1, 7, 30]] = -100; y = jnp.asarray(y, jnp.int32)
  cases = [("ce", {}), ("mile", {"reduction": "reference"}), ("emo", {}), ("tvd", {})]
  runs = [(AxisType.Auto, o, kw, "blockwise", {}) for o, kw in cases]
  # The token-major (GPU/TPU) plan, whole local vocabulary and split vocabulary chunks.
  runs += [(AxisType.Auto, o, kw, "blockwise", {"tile_plan": "gpu", "block_vocab": None}) for o, kw in cases]
  runs += [(AxisType.Auto, "emo", {}, "blockwise", {"tile_plan": "tpu", "block_vocab": 8})]
  # Pallas is not run here: its interpret mode's grid scan fails JAX's shard_map vma check (jax 0.10.2).
  runs += [(AxisType.Explicit, "emo", {}, "blockwise", {}), (AxisType.Auto, "mile", {}, "reference", {})]
  for axis_type, objective, kw, impl, extra in runs:
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
    tiles = {} if impl == "reference" else {"block_tokens": 4, "block_vocab": 8}
    tiles.update(extra)
    def run(mesh_arg):
      def f(h, w):
        return fused_loss(h, w, y, objective=objective, impl=impl, cost_embedding=e, mesh=mesh_arg, **tiles, **kw)
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)
    (l1, m1), g1 = run(None)
    (l2, m2), g2 = run(mesh)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for k in m1:
      np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-6)
    for a, b in zip(g2, g1):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  print("SHARDED_OK")
""")


def test_sharded_mesh_matches_single_device():
  # XLA_FLAGS must be set before jax initialises its backends: a fresh interpreter is the safe way.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stdout + result.stderr[-5000:]
