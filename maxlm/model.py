"""The decoder: LLaMA (and OLMo v1) in Flax NNX, numerically identical to Hugging Face's implementations.

Layer weights are stacked on a leading `layers` axis and run under `jax.lax.scan` with a remat policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.config import ModelConfig
from maxlm.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Dims:
  """Resolved shapes of a model config."""
  vocab: int
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  ffn: int

  @classmethod
  def of(cls, cfg: ModelConfig) -> "Dims":
    return cls(cfg.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads or cfg.heads,
               cfg.head_dim or cfg.hidden // cfg.heads, cfg.ffn)


def _param(rngs: nnx.Rngs, shape, axes, std, dtype):
  init = nnx.with_partitioning(jax.nn.initializers.normal(std), axes)
  return nnx.Param(init(rngs.params(), shape, dtype))


def _ones(shape, axes, dtype):
  return nnx.Param(nnx.with_partitioning(jax.nn.initializers.ones, axes)(None, shape, dtype))


class DecoderLayers(nnx.Module):
  """All transformer blocks, each weight stacked over a leading `layers` axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, dt, std = Dims.of(cfg), jnp.dtype(cfg.param_dtype), cfg.init_std
    L, D, F = d.layers, d.hidden, d.ffn
    self.parametric_norm = cfg.family == "llama"
    if self.parametric_norm:
      self.attn_norm = _ones((L, D), ("layers", "norm"), dt)
      self.mlp_norm = _ones((L, D), ("layers", "norm"), dt)
    self.q_proj = _param(rngs, (L, D, d.heads * d.head_dim), ("layers", "embed", "heads"), std, dt)
    self.k_proj = _param(rngs, (L, D, d.kv_heads * d.head_dim), ("layers", "embed", "kv_heads"), std, dt)
    self.v_proj = _param(rngs, (L, D, d.kv_heads * d.head_dim), ("layers", "embed", "kv_heads"), std, dt)
    self.o_proj = _param(rngs, (L, d.heads * d.head_dim, D), ("layers", "heads", "embed"), std, dt)
    self.gate_proj = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), std, dt)
    self.up_proj = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), std, dt)
    self.down_proj = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), std, dt)

  def weights(self) -> dict[str, jax.Array]:
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if self.parametric_norm:
      names += ["attn_norm", "mlp_norm"]
    return {n: getattr(self, n)[...] for n in names}


class Decoder(nnx.Module):
  """Token embedding -> scanned blocks -> final norm. `__call__` returns hidden states, not logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt = Dims.of(cfg), jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (d.vocab, d.hidden), ("vocab", "embed"), cfg.init_std, dt)
    self.layers = DecoderLayers(cfg, rngs=rngs)
    if cfg.family == "llama":
      self.final_norm = _ones((d.hidden,), ("norm",), dt)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (d.hidden, d.vocab), ("embed", "vocab"), cfg.init_std, dt)

  def head(self) -> jax.Array:
    """The output projection as (hidden, vocab), whether tied or not."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

  def __call__(self, tokens_BxT: jax.Array, *, segment_ids_BxT: Optional[jax.Array] = None,
               positions_BxT: Optional[jax.Array] = None, compute_dtype=None,
               return_ffn_coefficients: bool = False):
    cfg = self.cfg
    dtype = jnp.dtype(compute_dtype or cfg.compute_dtype)
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    cos, sin = rope_tables(positions_BxT, Dims.of(cfg).head_dim, cfg.rope_theta)
    mask = None
    if segment_ids_BxT is not None:
      mask = (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])

    def block(x, w):
      x, coeff = decoder_block(cfg, w, x, cos, sin, mask, dtype)
      return x, (coeff if return_ffn_coefficients else None)

    if cfg.remat != "none":
      block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    weights = self.layers.weights()
    if cfg.scan_layers:
      x, coeffs = jax.lax.scan(block, x, weights)
    else:
      outs = []
      for i in range(cfg.layers):
        x, c = block(x, jax.tree.map(lambda w: w[i], weights))
        outs.append(c)
      coeffs = jnp.stack(outs) if return_ffn_coefficients else None
    x = norm(cfg, self.final_norm[...] if cfg.family == "llama" else None, x)
    return (x, coeffs) if return_ffn_coefficients else x

  def logits(self, tokens_BxT: jax.Array, **kwargs) -> jax.Array:
    """fp32 logits (B, T, V): for evaluation, conversion checks and small models, not for training."""
    hidden = self(tokens_BxT, **kwargs)
    return jnp.einsum("btd,dv->btv", hidden, self.head().astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def norm(cfg: ModelConfig, scale: Optional[jax.Array], x: jax.Array) -> jax.Array:
  """RMSNorm (LLaMA) or non-parametric LayerNorm (OLMo v1), computed in fp32 as transformers does."""
  x32 = x.astype(jnp.float32)
  if cfg.family == "olmo":
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + 1e-5)).astype(x.dtype)  # OLMo's LayerNorm fixes eps at 1e-5
  y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps)
  return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_tables(positions_BxT: jax.Array, head_dim: int, theta: float):
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([freqs, freqs], axis=-1)  # rotate-half layout, as transformers
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
  half = x_BxTxNxH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
  cos, sin = cos_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype), sin_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
  return x_BxTxNxH * cos + rotated * sin


def attention(cfg: ModelConfig, q, k, v, mask):
  """Causal attention (B, T, N, H) with grouped KV heads; cuDNN flash on GPU when selected."""
  impl = {"auto": None, "xla": "xla", "cudnn": "cudnn"}[cfg.attention]
  if impl is None and jax.default_backend() == "cpu":
    impl = "xla"
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl,
                                      scale=1.0 / math.sqrt(q.shape[-1]))


def decoder_block(cfg: ModelConfig, w: dict, x_BxTxD, cos, sin, mask, dtype):
  d = Dims.of(cfg)
  B, T, _ = x_BxTxD.shape
  h = norm(cfg, w.get("attn_norm"), x_BxTxD)
  q = jnp.einsum("btd,dk->btk", h, w["q_proj"].astype(dtype))
  k = jnp.einsum("btd,dk->btk", h, w["k_proj"].astype(dtype))
  v = jnp.einsum("btd,dk->btk", h, w["v_proj"].astype(dtype))
  if cfg.clip_qkv is not None:
    q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
  q = constrain(q.reshape(B, T, d.heads, d.head_dim), ("batch", "length", "act_heads", None))
  k = constrain(k.reshape(B, T, d.kv_heads, d.head_dim), ("batch", "length", "act_heads", None))
  v = constrain(v.reshape(B, T, d.kv_heads, d.head_dim), ("batch", "length", "act_heads", None))
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  o = attention(cfg, q, k, v, mask).reshape(B, T, d.heads * d.head_dim)
  x_BxTxD = x_BxTxD + jnp.einsum("btk,kd->btd", o, w["o_proj"].astype(dtype))
  x_BxTxD = constrain(x_BxTxD, ("batch", "length", "act_embed"))
  h = norm(cfg, w.get("mlp_norm"), x_BxTxD)
  gate = jnp.einsum("btd,df->btf", h, w["gate_proj"].astype(dtype))
  up = jnp.einsum("btd,df->btf", h, w["up_proj"].astype(dtype))
  coeff_BxTxF = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
  x_BxTxD = x_BxTxD + jnp.einsum("btf,fd->btd", coeff_BxTxF, w["down_proj"].astype(dtype))
  return constrain(x_BxTxD, ("batch", "length", "act_embed")), coeff_BxTxF


# ----------------------------------------------------------------------------- construction


def _without_eager_sharding():
  # Flax >= 0.12 shards variables at creation when they carry partitioning metadata; maxlm places shards
  # itself (abstract init, then jit with out_shardings), so creation must not need a mesh.
  use = getattr(nnx, "use_eager_sharding", None)
  return use(False) if use is not None else contextlib.nullcontext()


def create(cfg: ModelConfig, seed: int = 0) -> Decoder:
  with _without_eager_sharding():
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract params as a pure dict of ShapeDtypeStruct, logical PartitionSpecs as a pure dict)."""
  with _without_eager_sharding():
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(model)
  specs = nnx.get_partition_spec(state)
  return graphdef, _pure(state), _pure(specs)


def _pure(state) -> dict:
  return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def init_params(cfg: ModelConfig, seed: int) -> dict:
  """Materialised parameters as a pure dict (call under jax.jit with out_shardings for sharded init)."""
  model = create(cfg, seed)
  return _pure(nnx.split(model)[1])


def bind(graphdef, params: dict) -> Decoder:
  """A Decoder whose weights are the arrays of `params` (a pure dict); usable inside jit and grad."""
  return nnx.merge(graphdef, params)


def param_count(abstract_params: dict) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul parameters + causal attention (PaLM appendix B convention)."""
  d = Dims.of(cfg)
  per_layer = d.hidden * (d.heads + 2 * d.kv_heads) * d.head_dim + d.heads * d.head_dim * d.hidden \
      + 3 * d.hidden * d.ffn
  matmul_params = d.layers * per_layer + d.hidden * d.vocab  # the embedding lookup costs no FLOPs
  attention = d.layers * 2 * 2 * d.heads * d.head_dim * seq_len / 2  # QK^T and PV, causal half
  return 6 * matmul_params + 3 * attention
