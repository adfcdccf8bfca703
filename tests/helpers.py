"""What several test modules share (test modules never import each other): tiny model settings and builders, and the
decoder's independent float64 numpy forward."""

import jax
import jax.numpy as jnp
import numpy as np

from maxlm import model as model_lib
from maxlm.checkpoint import params as ckpt_params
from maxlm.core.config import load_config

# vocab 384 holds the demo PCFG's word-level tokenizer (375 tokens with <unk>), which to-hf exports with the model.
HF_TINY = ["model.layers=2", "model.hidden=32", "model.heads=4", "model.kv_heads=2", "model.ffn=64",
           "model.vocab_size=384", "model.max_positions=64", "model.rope_theta=500.0", "model.init_std=0.1",
           "train.seq_len=16", "train.global_batch=4"]


def tiny_run(run_dir, extra=(), seed=0):
  """A params-only checkpoint of a tiny GQA LLaMA (random norm scales) under run_dir: (config, params)."""
  cfg = load_config("demo", HF_TINY + list(extra))
  params = model_lib.init_params(cfg.model, seed)
  rng = np.random.default_rng(seed)
  # Norm scales of 1 would hide a swapped or missing norm mapping.
  for name in ("attn_norm", "mlp_norm"):
    if name in params["layers"]:
      params["layers"][name] = jnp.asarray(rng.uniform(0.5, 1.5, params["layers"][name].shape), jnp.float32)
  if "final_norm" in params:
    params["final_norm"] = jnp.asarray(rng.uniform(0.5, 1.5, params["final_norm"].shape), jnp.float32)
  ckpt_params.save_params(str(run_dir), cfg, params)
  return cfg, params


def model_config(seq_len=16, **extra):
  """The model section of a tiny decoder (vocab 50), with `extra` model keys set."""
  overrides = ["model.vocab_size=50", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
               "model.ffn=48", "model.max_positions=64", "model.compute_dtype=float32", "model.remat=none",
               "model.rope_theta=500.0", "model.init_std=0.2", f"train.seq_len={seq_len}"]
  overrides += [f"model.{k}={v}" for k, v in extra.items()]
  return load_config("demo", overrides).model


def numpy_forward(cfg, params, tokens, segment_ids=None, coefficients=None):
  """LLaMA / OLMo forward in float64, written from the papers' equations, one layer at a time."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  d = model_lib.Dims.of(cfg)
  B, T = tokens.shape

  def norm(x, scale):
    if cfg.family == "olmo":
      mu = x.mean(-1, keepdims=True)
      return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    return scale * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps)

  inv = 1.0 / cfg.rope_theta ** (np.arange(0, d.head_dim, 2) / d.head_dim)
  ang = np.arange(T)[:, None] * inv[None, :]
  cos, sin = np.cos(ang), np.sin(ang)

  def rope(x):  # x (B, T, N, H): rotate pairs (i, i + H/2)
    x1, x2 = x[..., : d.head_dim // 2], x[..., d.head_dim // 2:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

  x = p["embed"][tokens]
  allowed = (np.tril(np.ones((T, T), bool)) if cfg.causal else np.ones((T, T), bool))[None]  # causal=false: encoder
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
  for i in range(d.layers):
    w = {k: v[i] for k, v in p["layers"].items()}
    h = norm(x, w.get("attn_norm"))
    q = (h @ w["q_proj"]).reshape(B, T, d.heads, d.head_dim)
    k = (h @ w["k_proj"]).reshape(B, T, d.kv_heads, d.head_dim)
    v = (h @ w["v_proj"]).reshape(B, T, d.kv_heads, d.head_dim)
    if cfg.clip_qkv is not None:
      q, k, v = (np.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q, k = rope(q), rope(k)
    group = d.heads // d.kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(d.head_dim)
    scores = np.where(allowed[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bnqk,bknh->bqnh", probs, v).reshape(B, T, -1)
    x = x + o @ w["o_proj"]
    h = norm(x, w.get("mlp_norm"))
    g = h @ w["gate_proj"]
    coeff = (g / (1 + np.exp(-g))) * (h @ w["up_proj"])
    if coefficients is not None:
      coefficients.append(coeff)
    x = x + coeff @ w["down_proj"]
  x = norm(x, p.get("final_norm"))
  head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
  return x @ head


# Tiny transformers models of each family maxlm imports (docs/FAMILIES.md); `hf_tiny(name)` builds one.
HF_FAMILY_CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=384, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=10000)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM",
              dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})),
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    "llama_dynamic": ("LlamaConfig", "LlamaForCausalLM",
                      dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                           rope_parameters={"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
}


def hf_tiny(name, directory=None, seed=0):
  """A tiny random transformers model of a family row (HF_FAMILY_CONFIGS), in eval mode, every norm scale and bias
  perturbed (HF initialises them to 1 and 0, which would hide a missing or swapped mapping); saved to `directory`
  when given."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  config_class, model_class, kwargs = HF_FAMILY_CONFIGS[name]
  config = getattr(transformers, config_class)(initializer_range=0.2, pad_token_id=1, bos_token_id=None,
                                               eos_token_id=2, **kwargs)
  torch.manual_seed(seed)
  model = getattr(transformers, model_class)(config).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1:
        if pname.endswith("bias"):
          p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        else:
          p.copy_(0.5 + torch.rand(p.shape, generator=gen))
  if directory is not None:
    model.save_pretrained(str(directory))
  return model


def require_compiler(kind: str) -> None:
  """Skips the calling test in one line when the side folder has no `kind` ("tpu" / "gpu") compiler."""
  import pytest  # pylint: disable=import-outside-toplevel
  from maxlm.core import compilers  # pylint: disable=import-outside-toplevel
  from maxlm.core.errors import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    compilers.check_installed(kind)
  except ConfigError as e:
    pytest.skip(f"the XLA {kind.upper()} compiler is not installed ({compilers.INSTALL_COMMAND}): {e}")
