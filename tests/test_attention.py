"""kernels.attention: the splash TPU kernel (run in the TPU interpret mode on CPU) against XLA's attention.

Causal, grouped-query and document-masked (segment ids) attention, values and gradients; the model path with
model.attention=splash against test_model's numpy float64 forward; the TPU (Mosaic) lowering of the kernel.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import model as model_lib
from maxlm.core.errors import ConfigError
from maxlm.kernels import attention as attention_lib

B, T, N, K, H = 2, 256, 4, 2, 32  # GQA: query heads 0, 1 read kv head 0; 2, 3 read kv head 1


def qkv(seed=0, dtype=jnp.float32, t=T):
  rng = np.random.default_rng(seed)
  shapes = ((B, t, N, H), (B, t, K, H), (B, t, K, H))
  return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


def segments(t=T):
  # Row 0: three documents (one boundary inside a 128-block, one on none); row 1: a single document.
  return jnp.asarray(np.stack([np.repeat([0, 1, 2], [100, 56, t - 156]), np.zeros(t, int)]), jnp.int32)


def xla_attention(q, k, v, segment_ids=None):
  return attention_lib.attention(q, k, v, backend="xla", segment_ids_BxT=segment_ids, platform="cpu")


@pytest.mark.parametrize("with_segments", [False, True], ids=["causal", "documents"])
def test_splash_matches_xla_attention(with_segments):
  q, k, v = qkv()
  seg = segments() if with_segments else None
  # block=128: a 2 x 2 grid of q/kv blocks, so fully visible, partly masked and skipped blocks all occur.
  got = jax.jit(lambda q, k, v: attention_lib.splash_attention(q, k, v, segment_ids_BxT=seg, block=128))(q, k, v)
  want = xla_attention(q, k, v, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_splash_gradients_match_xla_attention():
  q, k, v = qkv(1)
  seg = segments()
  r = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, N, H)), jnp.float32)

  def grads(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * r), argnums=(0, 1, 2)))(q, k, v)

  got = grads(lambda q, k, v: attention_lib.splash_attention(q, k, v, segment_ids_BxT=seg, block=128))
  want = grads(lambda q, k, v: xla_attention(q, k, v, seg))
  for name, g, w in zip("qkv", got, want):
    scale = float(jnp.abs(w).max())
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, atol=1e-5, err_msg=f"d{name}")


def test_segment_ids_from_mask_give_the_same_mask():
  seg = jnp.asarray(np.random.default_rng(3).integers(0, 3, (2, 40)).cumsum(axis=1) // 4, jnp.int32)
  mask = seg[:, None, :, None] == seg[:, None, None, :]
  derived = attention_lib.segment_ids_from_mask(mask)
  np.testing.assert_array_equal(np.asarray(derived[:, None, :, None] == derived[:, None, None, :]), np.asarray(mask))


def test_model_with_splash_matches_numpy_forward():
  from helpers import model_config as _cfg, numpy_forward  # the decoder's independent float64 reference
  cfg = _cfg(seq_len=128, attention="splash", max_positions=128)
  graphdef, _, _ = model_lib.abstract_model(cfg)
  params = model_lib.init_params(cfg, seed=1)
  tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(1, 128))
  seg = np.array([[0] * 50 + [1] * 78])
  got = model_lib.bind(graphdef, params).logits(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(seg))
  np.testing.assert_allclose(np.asarray(got), numpy_forward(cfg, params, tokens, seg), rtol=2e-4, atol=2e-4)


def test_splash_lowers_for_tpu():
  # Mosaic lowering at a realistic shape (bf16, 8 heads over 2 kv heads, T=1024, documents), forward and backward:
  # the compiled-for-TPU path (vmap over the batch), which interpret mode does not take.
  q, k, v = (jax.ShapeDtypeStruct((2, 1024, n, 128), jnp.bfloat16) for n in (8, 2, 2))
  seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

  def loss(q, k, v, s):
    return attention_lib.splash_attention(q, k, v, segment_ids_BxT=s, platform="tpu").astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v, seg).lower(lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()


def test_splash_refuses_what_it_cannot_run():
  q, k, v = qkv(t=200)
  with pytest.raises(ConfigError, match="multiple of 128"):
    attention_lib.splash_attention(q, k, v)
  q, k, v = qkv()
  with pytest.raises(ConfigError, match="cudnn"):
    attention_lib.splash_attention(q, k, v, platform="gpu")
  with pytest.raises(ConfigError, match="valid"):
    attention_lib.attention(q, k, v, backend="flash")


def test_splash_backend_falls_back_where_the_kernel_cannot_run():
  # A prefill of any prompt length under model.attention=splash: JAX's attention, same values.
  q, k, v = qkv(t=200)
  seg = segments(t=200)
  got = attention_lib.attention(q, k, v, backend="splash", segment_ids_BxT=seg, platform="cpu")
  np.testing.assert_allclose(np.asarray(got), np.asarray(xla_attention(q, k, v, seg)), rtol=1e-6, atol=1e-6)


MESH_SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np
  from maxlm.core import sharding
  from maxlm.kernels import attention as A
  assert jax.device_count() == 4
  rng = np.random.default_rng(0)
  shapes = ((4, 128, 4, 32), (4, 128, 2, 32), (4, 128, 2, 32))
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
  seg = jnp.asarray(np.stack([np.repeat([0, 1], [50, 78])] * 4), jnp.int32)
  mesh = sharding.make_mesh((2, 1, 2))  # batch over data, heads (and kv heads) over tensor
  got = jax.jit(lambda q, k, v, s: A.attention(q, k, v, backend="splash", segment_ids_BxT=s, mesh=mesh))(q, k, v, seg)
  want = A.attention(q, k, v, backend="xla", segment_ids_BxT=seg, platform="cpu")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  print("MESH_OK")
""")


@pytest.mark.multidevice
def test_splash_under_a_mesh_matches_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and "MESH_OK" in result.stdout, result.stdout + result.stderr[-5000:]


def numpy_attention(q, k, v, segment_ids=None):
  """Causal GQA attention in float64: query head n reads kv head n // (N / K)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  k, v = (np.repeat(a, n // a.shape[2], axis=2) for a in (k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  visible = np.tril(np.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    visible = visible & (seg[:, None, :, None] == seg[:, None, None, :])
  logits = np.where(visible, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("with_segments", [False, True], ids=["causal", "documents"])
def test_cpu_attention_matches_float64_and_jax_gradients(with_segments):
  q, k, v = qkv(3, t=64)
  seg = None
  if with_segments:  # row 0: three documents; row 1: one
    seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [20, 30, 14]), np.zeros(64, int)]), jnp.int32)
  auto = lambda q, k, v: attention_lib.attention(q, k, v, backend="auto", segment_ids_BxT=seg, platform="cpu")
  np.testing.assert_allclose(np.asarray(auto(q, k, v)), numpy_attention(q, k, v, seg), rtol=2e-5, atol=2e-5)
  cot = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
  got = jax.vjp(auto, q, k, v)[1](cot)
  want = jax.vjp(lambda q, k, v: xla_attention(q, k, v, seg), q, k, v)[1](cot)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
