"""The decoder of every family in maxlm.core.families (LLaMA, OLMo v1 and 2, Qwen2, GPT-2, GPT-NeoX) in Flax NNX,
numerically identical to Hugging Face's implementations; a family is a row of data that the one forward reads.

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

import numpy as np

from maxlm.core.config import ModelConfig
from maxlm.core.errors import ConfigError
from maxlm.core.families import FAMILIES, Family
from maxlm.core.sharding import constrain

# The params entry holding low-rank adapters per projection (maxlm.state.lora), beside the decoder's own weights.
ADAPTERS = "lora"

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


def _zeros(shape, axes, dtype):
  return nnx.Param(nnx.with_partitioning(jax.nn.initializers.zeros, axes)(None, shape, dtype))


def family_of(cfg: ModelConfig) -> Family:
  return FAMILIES[cfg.family]


# Logical axes of each projection's output (its bias) and input.
_OUT_AXIS = {"q_proj": "heads", "k_proj": "kv_heads", "v_proj": "kv_heads", "o_proj": "embed", "gate_proj": "mlp",
             "up_proj": "mlp", "down_proj": "embed"}
_IN_AXIS = {"q_proj": "embed", "k_proj": "embed", "v_proj": "embed", "o_proj": "heads", "gate_proj": "embed",
            "up_proj": "embed", "down_proj": "mlp"}


def bias_name(projection: str) -> str:
  """The bias of a projection: q_proj -> q_bias."""
  return projection[:-len("_proj")] + "_bias"


def layer_weights(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
  """name -> (shape of one layer, logical axes, init: normal / ones / zeros) of a block's weights, by family row.
  A bias along the hidden dimension is replicated ("norm"), as the norm scales are: it is tiny and every shard adds
  it."""
  fam, d = family_of(cfg), Dims.of(cfg)
  sizes = {"q_proj": d.heads * d.head_dim, "k_proj": d.kv_heads * d.head_dim, "v_proj": d.kv_heads * d.head_dim,
           "o_proj": d.hidden, "gate_proj": d.ffn, "up_proj": d.ffn, "down_proj": d.hidden}
  fan_in = {"q_proj": d.hidden, "k_proj": d.hidden, "v_proj": d.hidden, "o_proj": d.heads * d.head_dim,
            "gate_proj": d.hidden, "up_proj": d.hidden, "down_proj": d.ffn}
  out = {}
  for name in fam.projections:
    out[name] = ((fan_in[name], sizes[name]), (_IN_AXIS[name], _OUT_AXIS[name]), "normal")
  for name in fam.projections:
    if name[:-len("_proj")] in fam.biases:
      axis = _OUT_AXIS[name]
      out[bias_name(name)] = ((sizes[name],), ("norm" if axis == "embed" else axis,), "zeros")
  for norm_name in ("attn_norm", "mlp_norm"):
    for suffix in fam.norm_params:
      out[norm_name + suffix] = ((d.hidden,), ("norm",), "zeros" if suffix else "ones")
  if fam.qk_norm:
    out["q_norm"] = ((d.heads * d.head_dim,), ("norm",), "ones")
    out["k_norm"] = ((d.kv_heads * d.head_dim,), ("norm",), "ones")
  return out


def _init(rngs, kind, shape, axes, std, dtype):
  if kind == "normal":
    return _param(rngs, shape, axes, std, dtype)
  return (_ones if kind == "ones" else _zeros)(shape, axes, dtype)


class DecoderLayers(nnx.Module):
  """All transformer blocks, each weight stacked over a leading `layers` axis; which weights, the family row says."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt, std, L = jnp.dtype(cfg.param_dtype), cfg.init_std, cfg.layers
    self.names = tuple(layer_weights(cfg))
    # Projections draw in the order LLaMA's always did (q, k, v, o, gate, up, down): the same init for the same seed.
    for name, (shape, axes, kind) in layer_weights(cfg).items():
      setattr(self, name, _init(rngs, kind, (L, *shape), ("layers", *axes), std, dt))

  def weights(self) -> dict[str, jax.Array]:
    out = {n: getattr(self, n)[...] for n in self.names}
    adapters = getattr(self, "adapters", None)  # set by `bind` when the params carry LoRA adapters
    if adapters is not None:
      out[ADAPTERS] = adapters
    return out


def top_weights(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
  """name -> (shape, logical axes, init) of the weights outside the blocks: embedding, position table, final norm,
  untied head."""
  fam, d = family_of(cfg), Dims.of(cfg)
  out = {"embed": ((d.vocab, d.hidden), ("vocab", "embed"), "normal")}
  if fam.positions == "learned":
    out["positions"] = ((cfg.max_positions, d.hidden), ("positions", "embed"), "normal")
  for suffix in fam.norm_params:
    out["final_norm" + suffix] = ((d.hidden,), ("norm",), "zeros" if suffix else "ones")
  if not cfg.tie_embeddings:
    out["lm_head"] = ((d.hidden, d.vocab), ("embed", "vocab"), "normal")
  return out


class Decoder(nnx.Module):
  """Token (and position) embedding -> scanned blocks -> final norm. `__call__` returns hidden states, not logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = jnp.dtype(cfg.param_dtype)
    top = top_weights(cfg)
    shape, axes, kind = top.pop("embed")
    self.embed = _init(rngs, kind, shape, axes, cfg.init_std, dt)
    self.layers = DecoderLayers(cfg, rngs=rngs)  # drawn after the embedding, before the head, as always
    for name, (shape, axes, kind) in top.items():
      setattr(self, name, _init(rngs, kind, shape, axes, cfg.init_std, dt))

  def top(self) -> dict[str, jax.Array]:
    return {n: getattr(self, n)[...] for n in top_weights(self.cfg)}

  def head(self) -> jax.Array:
    """The output projection as (hidden, vocab), whether tied or not."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

  def __call__(self, tokens_BxT: jax.Array, *, segment_ids_BxT: Optional[jax.Array] = None,
               positions_BxT: Optional[jax.Array] = None, compute_dtype=None,
               return_ffn_coefficients: bool = False, ffn_abs_sums_weights_BxT: Optional[jax.Array] = None):
    """Hidden states (B, T, D); with `return_ffn_coefficients`, also the stacked coefficients (L, B, T, F); with
    `ffn_abs_sums_weights_BxT`, also per-layer sums over tokens of |coefficient| x weight, (L, F) fp32."""
    cfg = self.cfg
    dtype = jnp.dtype(compute_dtype or cfg.compute_dtype)
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    top = self.top()
    x = constrain(embed_tokens(cfg, top, tokens_BxT, positions_BxT, dtype), ("batch", "length", "act_embed"))
    cos, sin = rope(cfg, positions_BxT)
    mask = None
    if segment_ids_BxT is not None:
      mask = (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])

    def block(x, w):
      x, coeff = decoder_block(cfg, w, x, cos, sin, mask, dtype)
      if ffn_abs_sums_weights_BxT is not None:  # knowledge entropy: per-layer sums, never an (L, B, T, F) stack
        weights_BxTx1 = ffn_abs_sums_weights_BxT.astype(jnp.float32)[..., None]
        return x, (jnp.abs(coeff.astype(jnp.float32)) * weights_BxTx1).sum(axis=(0, 1))
      return x, (coeff if return_ffn_coefficients else None)

    if cfg.remat != "none":
      block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    weights = self.layers.weights()
    if cfg.scan_layers:
      x, coeffs = jax.lax.scan(block, x, weights, unroll=min(cfg.scan_unroll, cfg.layers))
    else:
      outs = []
      for i in range(cfg.layers):
        x, c = block(x, jax.tree.map(lambda w: w[i], weights))
        outs.append(c)
      coeffs = jnp.stack(outs) if outs[0] is not None else None
    x = norm(cfg, top, "final_norm", x)
    return (x, coeffs) if return_ffn_coefficients or ffn_abs_sums_weights_BxT is not None else x

  def logits(self, tokens_BxT: jax.Array, **kwargs) -> jax.Array:
    """fp32 logits (B, T, V): for evaluation, conversion checks and small models, not for training."""
    hidden = self(tokens_BxT, **kwargs)
    return jnp.einsum("btd,dv->btv", hidden, self.head().astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def head_weights(cfg: ModelConfig, params: dict) -> jax.Array:
  """The output projection (hidden, vocab) of a params dict, whether tied or not (as `Decoder.head`)."""
  return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def embed_tokens(cfg: ModelConfig, top: dict, tokens_BxT, positions_BxT, dtype) -> jax.Array:
  """The token embedding, plus the learned position embedding where the family has one (GPT-2)."""
  x = jnp.take(top["embed"], tokens_BxT, axis=0)
  if "positions" in top:
    x = x + jnp.take(top["positions"], positions_BxT, axis=0)
  return x.astype(dtype)


def norm(cfg: ModelConfig, w: dict, name: str, x: jax.Array) -> jax.Array:
  """The family's norm `name` (attn_norm, mlp_norm, final_norm, q_norm, k_norm) of x, computed in fp32 as transformers
  does: RMSNorm (scale `w[name]`), LayerNorm (scale and `w[name + "_bias"]`) or OLMo v1's non-parametric LayerNorm."""
  fam = family_of(cfg)
  x32 = x.astype(jnp.float32)
  kind = "rms" if name in ("q_norm", "k_norm") else fam.norm
  if kind == "rms":
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps)
    return w[name].astype(x.dtype) * y.astype(x.dtype)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + (fam.fixed_norm_eps or cfg.norm_eps))
  if kind == "nonparametric":
    return y.astype(x.dtype)
  return (y * w[name].astype(jnp.float32) + w[name + "_bias"].astype(jnp.float32)).astype(x.dtype)


def rotary_dims(cfg: ModelConfig) -> int:
  """How many dimensions of each head RoPE rotates (all but GPT-NeoX's partial rotary)."""
  return int(Dims.of(cfg).head_dim * cfg.rotary_fraction)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """RoPE's inverse frequencies (R/2,) float32 with the config's static scaling, computed as transformers' rope init
  functions do (float32 powers); dynamic NTK scaling depends on the positions and is `rope`'s."""
  dim = rotary_dims(cfg)
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (1.0 / np.power(np.float32(cfg.rope_theta), exponents)).astype(np.float32)
  if cfg.rope_scaling == "linear":
    inv_freq = (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
  elif cfg.rope_scaling == "llama3":  # transformers' _compute_llama3_parameters
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_positions
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def rope(cfg: ModelConfig, positions_BxT: jax.Array):
  """The (cos, signed sin) tables of `rope_tables` for a config: scaling and rotary fraction applied; (None, None)
  where the family has learned positions."""
  if family_of(cfg).positions != "rope":
    return None, None
  if cfg.rope_scaling != "dynamic":
    return rope_tables(positions_BxT, rotary_dims(cfg), cfg.rope_theta, inv_freq=rope_inv_freq(cfg))
  # Dynamic NTK (transformers' _compute_dynamic_ntk_parameters): past max_positions the base grows with the longest
  # position of the call, as transformers recomputes it on every forward.
  dim = rotary_dims(cfg)
  seq_len = jnp.maximum(jnp.max(positions_BxT) + 1, cfg.max_positions).astype(jnp.float32)
  base = cfg.rope_theta * ((cfg.rope_factor * seq_len / cfg.max_positions) - (cfg.rope_factor - 1)) ** (
      dim / (dim - 2))
  inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  return rope_tables(positions_BxT, dim, cfg.rope_theta, inv_freq=inv_freq)


def rope_tables(positions_BxT: jax.Array, head_dim: int, theta: float, inv_freq=None):
  """cos and signed sin (B, T, H) of RoPE's rotate-half layout (as transformers), sin's first half negated so that
  `apply_rope` is x * cos + roll(x, H/2) * sin. `inv_freq` (H/2,) replaces theta's plain frequencies (scaled RoPE).
  Computed once per forward: the barrier keeps XLA from recomputing the transcendentals inside every fusion that
  reads them (8 per layer forward and backward on a CPU)."""
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos, sin = jnp.cos(freqs), jnp.sin(freqs)
  return jax.lax.optimization_barrier((jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1)))


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxR: jax.Array, signed_sin_BxTxR: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] written as roll(x) = [x2, x1] times the signed
  sin: the same products bit for bit, and a backward that is a roll, not slices, negations and pads. Tables narrower
  than the head (R < H, GPT-NeoX's partial rotary) rotate the first R dimensions and pass the rest through."""
  rotary = cos_BxTxR.shape[-1]
  if rotary < x_BxTxNxH.shape[-1]:
    rotated = apply_rope(x_BxTxNxH[..., :rotary], cos_BxTxR, signed_sin_BxTxR)
    return jnp.concatenate([rotated, x_BxTxNxH[..., rotary:]], axis=-1)
  rolled = jnp.roll(x_BxTxNxH, x_BxTxNxH.shape[-1] // 2, axis=-1)
  cos = cos_BxTxR[:, :, None, :].astype(x_BxTxNxH.dtype)
  sin = signed_sin_BxTxR[:, :, None, :].astype(x_BxTxNxH.dtype)
  return x_BxTxNxH * cos + rolled * sin


def attention(cfg: ModelConfig, q, k, v, mask, segment_ids=None):
  """Attention (B, T, N, H) with grouped KV heads through the backend cfg.attention names (kernels.attention: XLA,
  cuDNN flash on GPU, splash on TPU), causal unless cfg.causal is false (bidirectional: a masked-LM encoder); `mask`
  (B, 1, T, T) or `segment_ids` (B, T) masks documents either way."""
  from maxlm.kernels import attention as attention_backends  # kernels/ owns the attention backends
  from maxlm.core.sharding import active_mesh
  return attention_backends.attention(q, k, v, backend=cfg.attention, mask_Bx1xTxT=mask, segment_ids_BxT=segment_ids,
                                      mesh=active_mesh(), causal=cfg.causal)


def check_decodable(cfg: ModelConfig) -> None:
  """A ConfigError for a model the KV cache cannot run: a bidirectional encoder's earlier states change with every
  token appended, so cached keys and values would be wrong."""
  if not cfg.causal:
    raise ConfigError("this model has bidirectional attention (model.causal=false, a masked LM): every position reads "
                      "the tokens after it, so it cannot decode token by token with a KV cache (generate, MAUVE "
                      "continuations). Use a causal model, or score it with masked-token CE (maxlm.analyze tools)")


def project(w: dict, name: str, x_BxTxI: jax.Array, dtype) -> jax.Array:
  """x @ w[name] (+ its bias where the family has one) in `dtype`, plus the projection's low-rank adapter when `w`
  carries one (maxlm.state.lora): dropout(x) @ A @ B with B already scaled by alpha / rank, dropout only when the
  adapter holds a key (training).
  The one projection of every block, for training, evaluation and cached decoding alike."""
  y_BxTxO = matmul(x_BxTxI, w[name].astype(dtype))
  bias = w.get(bias_name(name))
  if bias is not None:
    y_BxTxO = y_BxTxO + bias.astype(dtype)
  adapter = w.get(ADAPTERS, {}).get(name)
  if adapter is None:
    return y_BxTxO
  if "dropout_key" in adapter:  # inverted dropout on the adapter's input only, as peft
    keep = adapter["keep"]
    kept = jax.random.bernoulli(adapter["dropout_key"], keep, x_BxTxI.shape)
    x_BxTxI = jnp.where(kept, x_BxTxI / keep.astype(x_BxTxI.dtype), 0).astype(x_BxTxI.dtype)
  low_BxTxR = matmul(x_BxTxI, adapter["a"].astype(dtype))
  return y_BxTxO + matmul(low_BxTxR, adapter["b"].astype(dtype))


def matmul(x_NxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """x (..., I) @ w (I, O) as one 2-D matmul over the flattened leading axes. The weight's gradient then contracts
  one axis, not (batch, length): XLA's CPU backend hands that to its fast matmul and runs the two-axis
  contraction of a (B, T, I) einsum about 1.5x slower (benchmarks/torch_step_compare.py); GPU and TPU alike."""
  lead = x_NxI.shape[:-1]
  return (x_NxI.reshape(-1, x_NxI.shape[-1]) @ w_IxO).reshape(*lead, w_IxO.shape[-1])


def attention_inputs(cfg: ModelConfig, w: dict, x_BxTxD, cos, sin, dtype):
  """A block up to its attention: pre-norm (unless the family norms outputs), q/k/v projections (biases, OLMo-2's
  QK-norm, OLMo's clip), RoPE where the family has it -> q (B, T, N, H), k, v (B, T, K, H). The training forward
  and the cached decode path both call it, so they share one set of projections."""
  d, fam = Dims.of(cfg), family_of(cfg)
  B, T, _ = x_BxTxD.shape
  h = norm(cfg, w, "attn_norm", x_BxTxD) if fam.norm_place == "pre" else x_BxTxD
  q, k, v = (project(w, name, h, dtype) for name in ("q_proj", "k_proj", "v_proj"))
  if fam.qk_norm:
    q, k = norm(cfg, w, "q_norm", q), norm(cfg, w, "k_norm", k)
  if cfg.clip_qkv is not None:
    q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
  q = constrain(q.reshape(B, T, d.heads, d.head_dim), ("batch", "length", "act_heads", None))
  k = constrain(k.reshape(B, T, d.kv_heads, d.head_dim), ("batch", "length", "act_heads", None))
  v = constrain(v.reshape(B, T, d.kv_heads, d.head_dim), ("batch", "length", "act_heads", None))
  if cos is None:
    return q, k, v
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def mlp(cfg: ModelConfig, w: dict, h_BxTxD, dtype):
  """The family's MLP -> (output (B, T, D), FFN coefficients (B, T, F): the input of the down projection,
  silu(gate) * up or GELU(up) (GELU-tanh for GPT-2))."""
  kind = family_of(cfg).mlp
  up = project(w, "up_proj", h_BxTxD, dtype)
  if kind == "swiglu":
    coeff = jax.nn.silu(project(w, "gate_proj", h_BxTxD, dtype)) * up
  else:
    coeff = jax.nn.gelu(up, approximate=kind == "gelu_tanh")
  coeff_BxTxF = constrain(coeff, ("batch", "length", "act_mlp"))
  return project(w, "down_proj", coeff_BxTxF, dtype), coeff_BxTxF


def block_output(cfg: ModelConfig, w: dict, x_BxTxD, o_BxTxNxH, dtype):
  """A block after its attention: output projection, the family's norms and residual layout (sequential pre-norm,
  OLMo-2's post-norm, GPT-NeoX's parallel attention + MLP) -> (x, FFN coefficients (B, T, F))."""
  fam = family_of(cfg)
  B, T, _ = x_BxTxD.shape
  attn = project(w, "o_proj", o_BxTxNxH.reshape(B, T, -1), dtype)
  if fam.residual == "parallel":  # x + attn(ln1(x)) + mlp(ln2(x)), summed in transformers' order
    out, coeff_BxTxF = mlp(cfg, w, norm(cfg, w, "mlp_norm", x_BxTxD), dtype)
    return constrain(out + attn + x_BxTxD, ("batch", "length", "act_embed")), coeff_BxTxF
  if fam.norm_place == "post":
    attn = norm(cfg, w, "attn_norm", attn)
  x_BxTxD = constrain(x_BxTxD + attn, ("batch", "length", "act_embed"))
  if fam.norm_place == "post":
    out, coeff_BxTxF = mlp(cfg, w, x_BxTxD, dtype)
    out = norm(cfg, w, "mlp_norm", out)
  else:
    out, coeff_BxTxF = mlp(cfg, w, norm(cfg, w, "mlp_norm", x_BxTxD), dtype)
  return constrain(x_BxTxD + out, ("batch", "length", "act_embed")), coeff_BxTxF


def decoder_block(cfg: ModelConfig, w: dict, x_BxTxD, cos, sin, mask, dtype):
  q, k, v = attention_inputs(cfg, w, x_BxTxD, cos, sin, dtype)
  return block_output(cfg, w, x_BxTxD, attention(cfg, q, k, v, mask), dtype)


# ----------------------------------------------------------------------------- decoding with a KV cache

# The cache is an activation: batch over (data, fsdp), kv heads over tensor (maxlm.core.sharding.RULES).
KV_CACHE_AXES = ("layers", "batch", "length", "act_heads", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer for a batch of left-padded rows. Slot s of row b holds position s - start_B[b];
  slots below start_B[b] are padding, slots from `length` on are not written yet (`length` is shared by all rows)."""
  k_LxBxSxKxH: jax.Array
  v_LxBxSxKxH: jax.Array
  start_B: jax.Array  # int32
  length: jax.Array  # int32 scalar


def cached_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, visible_BxTxS):
  """Attention of T new queries over S cached slots (grouped KV heads, scaled by 1/sqrt(H)); `visible` says which
  slots each query may read. XLA's path: a decode step is one query row, which no flash kernel speeds up."""
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=visible_BxTxS[:, None],
                                      implementation="xla", scale=1.0 / math.sqrt(q_BxTxNxH.shape[-1]))


def prefill(model: Decoder, tokens_BxP: jax.Array, start_B: jax.Array, *, cache_len: int, compute_dtype=None):
  """Runs left-padded prompts (row b's real tokens in slots start_B[b]..P-1) through the model; returns the final
  hidden state of slot P-1 (B, D) and a cache of `cache_len` slots holding the prompts' keys and values."""
  cfg = model.cfg
  check_decodable(cfg)
  dtype = jnp.dtype(compute_dtype or cfg.compute_dtype)
  B, P = tokens_BxP.shape
  slots_P = jnp.arange(P, dtype=jnp.int32)
  real_BxP = slots_P[None, :] >= start_B[:, None]
  positions_BxP = jnp.where(real_BxP, slots_P[None, :] - start_B[:, None], 0)
  # Padding is its own document: real tokens never attend to it, and no query row is fully masked.
  mask = real_BxP[:, None, :, None] == real_BxP[:, None, None, :]
  x = constrain(embed_tokens(cfg, model.top(), tokens_BxP, positions_BxP, dtype), ("batch", "length", "act_embed"))
  cos, sin = rope(cfg, positions_BxP)

  def block(x, w):
    q, k, v = attention_inputs(cfg, w, x, cos, sin, dtype)
    x, _ = block_output(cfg, w, x, attention(cfg, q, k, v, mask), dtype)
    return x, (k, v)

  x, (k_LxBxPxKxH, v_LxBxPxKxH) = jax.lax.scan(block, x, model.layers.weights())
  widen = ((0, 0), (0, 0), (0, cache_len - P), (0, 0), (0, 0))
  cache = KVCache(constrain(jnp.pad(k_LxBxPxKxH, widen), KV_CACHE_AXES),
                  constrain(jnp.pad(v_LxBxPxKxH, widen), KV_CACHE_AXES), start_B.astype(jnp.int32), jnp.int32(P))
  return _final_norm(model, x[:, -1]), cache


def decode_step(model: Decoder, tokens_B: jax.Array, cache: KVCache, *, compute_dtype=None):
  """One new token per row at slot `cache.length` (position length - start_B): its final hidden state (B, D) and the
  cache with its keys and values written in place."""
  cfg, d = model.cfg, Dims.of(model.cfg)
  check_decodable(cfg)
  dtype = jnp.dtype(compute_dtype or cfg.compute_dtype)
  positions_Bx1 = (cache.length - cache.start_B)[:, None]
  slots_S = jnp.arange(cache.k_LxBxSxKxH.shape[2], dtype=jnp.int32)
  visible_Bx1xS = ((slots_S[None, :] >= cache.start_B[:, None]) & (slots_S[None, :] <= cache.length))[:, None, :]
  x = constrain(embed_tokens(cfg, model.top(), tokens_B[:, None], positions_Bx1, dtype),
                ("batch", "length", "act_embed"))
  cos, sin = rope(cfg, positions_Bx1)

  def block(carry, w_and_layer):
    x, k_all, v_all = carry
    w, layer = w_and_layer
    q, k, v = attention_inputs(cfg, w, x, cos, sin, dtype)
    at = (layer, 0, cache.length, 0, 0)
    k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
    v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
    x, _ = block_output(cfg, w, x, cached_attention(q, k_all[layer], v_all[layer], visible_Bx1xS), dtype)
    return (x, k_all, v_all), None

  # The whole cache rides in the carry so each layer's write is an in-place update, not a new stacked output.
  (x, k_all, v_all), _ = jax.lax.scan(block, (x, cache.k_LxBxSxKxH, cache.v_LxBxSxKxH),
                                      (model.layers.weights(), jnp.arange(d.layers, dtype=jnp.int32)))
  cache = KVCache(constrain(k_all, KV_CACHE_AXES), constrain(v_all, KV_CACHE_AXES), cache.start_B, cache.length + 1)
  return _final_norm(model, x[:, 0]), cache


def _final_norm(model: Decoder, x_BxD: jax.Array) -> jax.Array:
  return norm(model.cfg, model.top(), "final_norm", x_BxD)


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
  """A Decoder whose weights are the arrays of `params` (a pure dict); usable inside jit and grad. An ADAPTERS entry
  (LoRA adapters, maxlm.state.lora) rides along in `layers.weights()`, so every projection applies it."""
  model = nnx.merge(graphdef, {k: v for k, v in params.items() if k != ADAPTERS})
  if ADAPTERS in params:
    model.layers.adapters = nnx.data(params[ADAPTERS])
  return model


def param_count(abstract_params: dict) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul parameters + attention (PaLM appendix B convention; half the score
  matrix when causal, all of it when bidirectional)."""
  d = Dims.of(cfg)
  mlp_matrices = 3 if family_of(cfg).mlp == "swiglu" else 2
  per_layer = d.hidden * (d.heads + 2 * d.kv_heads) * d.head_dim + d.heads * d.head_dim * d.hidden \
      + mlp_matrices * d.hidden * d.ffn
  matmul_params = d.layers * per_layer + d.hidden * d.vocab  # the embedding lookup costs no FLOPs
  attention = d.layers * 2 * 2 * d.heads * d.head_dim * seq_len / (2 if cfg.causal else 1)  # QK^T and PV
  return 6 * matmul_params + 3 * attention
