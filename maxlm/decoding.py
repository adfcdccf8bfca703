"""Decoding: batched prompts, left-padded, through maxlm.model's KV cache (one prefill, then one jitted decode step per
token), greedy or sampled (temperature, top-k, top-p, seed), stopping at EOS per row; a Generator for any checkpoint.
`python -m maxlm.generate` is its CLI; evaluation (MAUVE) decodes here too."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxlm import model_text
from maxlm import model as model_lib
from maxlm import pretrained
from maxlm.checkpoint.spec import spec_path
from maxlm.core import sharding
from maxlm.core.compile_cache import CompileCache
from maxlm.core.config import Config
from maxlm.core.errors import ConfigError, DataError

# Prompts are left-padded, and the new-token budget rounded up, to multiples of this (batches to a power of two),
# so nearby lengths share one compiled prefill and decode step.
SHAPE_BUCKET = 16
DONE_CHECK_EVERY = 4  # decode steps between host checks of "every row finished" (each check waits on the device)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: temperature 0 = greedy (argmax); otherwise softmax(logits / temperature) after
  top-k (0 = off) and then top-p (1 = off), in transformers' order. `seed` fixes every row's draws."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ConfigError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ConfigError(f"--top-k {self.top_k} must be >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"--top-p {self.top_p} must be in (0, 1] (1 = off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


# ----------------------------------------------------------------------------- choosing tokens


def filter_logits(logits_BxV: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """fp32 logits / temperature with what top-k and then top-p exclude set to -inf (transformers' order and rules):
  top-k (0 = off) keeps every token at least as large as the k-th largest; top-p (1 = off) keeps the most probable
  tokens until their mass first reaches p (at least one). The knobs may be traced scalars: one compile serves all."""
  logits = logits_BxV.astype(jnp.float32) / temperature
  V = logits.shape[-1]
  sorted_BxV = -jnp.sort(-logits, axis=-1)
  k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
  kth_Bx1 = jnp.take_along_axis(sorted_BxV, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
  sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  n_keep_Bx1 = jnp.maximum(jnp.sum(mass_before_BxV < top_p, axis=-1, keepdims=True), 1)
  nucleus_Bx1 = jnp.where(top_p < 1, jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1), -jnp.inf)
  return jnp.where(logits >= jnp.maximum(kth_Bx1, nucleus_Bx1), logits, -jnp.inf)


def choose_tokens(logits_BxV: jax.Array, greedy: bool, knobs: dict, row_keys_Bx2: jax.Array, step) -> jax.Array:
  """The next token of each row: argmax, or a draw from the filtered distribution with fold_in(row_keys[b], step),
  so a row's sample does not depend on which other prompts share its batch. knobs: temperature, top_k, top_p."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  filtered_BxV = filter_logits(logits_BxV, knobs["temperature"], knobs["top_k"], knobs["top_p"])
  keys_Bx2 = jax.vmap(jax.random.fold_in, (0, None))(row_keys_Bx2, step)
  return jax.vmap(jax.random.categorical)(keys_Bx2, filtered_BxV).astype(jnp.int32)


# ----------------------------------------------------------------------------- the decode loop


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class DecodeFunctions:
  """jit(start): prefill and the first token; jit(advance): one decode step and its token; both over a state dict."""
  start: Callable
  advance: Callable
  advance_traces: int = 0  # how often `advance` was traced: once per shape


def decode_functions(cfg: Config, dtype, greedy: bool) -> DecodeFunctions:
  """The jitted functions of a model, shared by all its Generators (a run's steps and its HF export compile once).
  Only greedy-or-not is static: the sampling knobs, EOS id and min_new_tokens are scalars of the state."""
  return DECODE_FUNCTIONS(cfg.model, jnp.dtype(dtype).name, greedy)


def _build(model_cfg, dtype_name: str, greedy: bool) -> DecodeFunctions:
  dtype = jnp.dtype(dtype_name)
  graphdef = model_lib.abstract_model(model_cfg)[0]

  def next_token(params, hidden_BxD, state):
    logits_BxV = jnp.einsum("bd,dv->bv", hidden_BxD, model_lib.head_weights(model_cfg, params).astype(dtype),
                            preferred_element_type=jnp.float32)
    # As transformers' min_new_tokens: no EOS before a row has that many new tokens.
    too_early_Bx1 = (state["n_B"] < state["knobs"]["min_new"])[:, None]
    is_eos_V = jnp.arange(logits_BxV.shape[-1]) == state["knobs"]["eos"]
    logits_BxV = jnp.where(too_early_Bx1 & is_eos_V, -jnp.inf, logits_BxV)
    return choose_tokens(logits_BxV, greedy, state["knobs"], state["row_keys_Bx2"], state["step"])

  def record(state, token_B):
    writing_B = ~state["done_B"]
    out = jax.lax.dynamic_update_slice(state["out_BxN"], jnp.where(writing_B, token_B, -1)[:, None],
                                       (0, state["step"]))
    n_B = state["n_B"] + writing_B.astype(jnp.int32)
    done_B = state["done_B"] | (n_B >= state["limit_B"]) | (writing_B & (token_B == state["knobs"]["eos"]))
    return dict(state, out_BxN=out, n_B=n_B, done_B=done_B, token_B=token_B, step=state["step"] + 1)

  def start(params, tokens_BxP, start_B, limit_B, row_keys_Bx2, knobs, *, cache_len: int, width: int):
    model = model_lib.bind(graphdef, params)
    hidden_BxD, cache = model_lib.prefill(model, tokens_BxP, start_B, cache_len=cache_len, compute_dtype=dtype)
    B = tokens_BxP.shape[0]
    state = {"cache": cache, "out_BxN": jnp.full((B, width), -1, jnp.int32), "n_B": jnp.zeros((B,), jnp.int32),
             "done_B": limit_B <= 0, "limit_B": limit_B, "row_keys_Bx2": row_keys_Bx2, "knobs": knobs,
             "step": jnp.zeros((), jnp.int32), "token_B": jnp.zeros((B,), jnp.int32)}
    return record(state, next_token(params, hidden_BxD, state))

  def advance(params, state):
    fns.advance_traces += 1
    model = model_lib.bind(graphdef, params)
    hidden_BxD, cache = model_lib.decode_step(model, state["token_B"], state["cache"], compute_dtype=dtype)
    state = dict(state, cache=cache)
    return record(state, next_token(params, hidden_BxD, state))

  fns = DecodeFunctions(jax.jit(start, static_argnames=("cache_len", "width")), jax.jit(advance, donate_argnums=(1,)))
  return fns


# Per (model, compute dtype, greedy).
DECODE_FUNCTIONS = CompileCache(_build)


class Generator:
  """Generation from one model's weights through the shared jitted prefill and decode step, which compile once per
  shape (batch, padded prompt length, cache length): the compile cost does not depend on how many tokens are made.

  mesh: params sharded by their logical axes (maxlm.core.sharding.param_shardings) and the cache like activations
  (batch over data/fsdp, kv heads over tensor); None = one device. Params already placed (their tree need not be the
  plain decoder's: LoRA's composed view) pass through where no mesh is given."""

  def __init__(self, cfg: Config, params: dict, *, mesh: Optional[jax.sharding.Mesh] = None,
               compute_dtype: Optional[str] = None, batch_size: int = 16):
    model_lib.check_decodable(cfg.model)  # before any placement or compile: a masked LM is refused at once
    self.cfg = cfg
    self.mesh = mesh
    self.dtype = jnp.dtype(compute_dtype or cfg.model.compute_dtype)
    self.graphdef, abstract, specs = model_lib.abstract_model(cfg.model)
    self.batch_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_size = _round_up(max(1, batch_size), self.batch_shards)
    if mesh is None:
      self.params = jax.device_put(params)
    else:
      placed = jax.tree.map(lambda a, x: jax.ShapeDtypeStruct(a.shape, x.dtype), abstract, params)
      self.params = sharding.put_host_tree(params, sharding.with_shardings(
          placed, sharding.param_shardings(abstract, specs, mesh)))

  @property
  def decode_traces(self) -> int:
    """How often this architecture's decode step has been traced (greedy and sampled): once per shape."""
    return sum(decode_functions(self.cfg, self.dtype, g).advance_traces for g in (True, False))

  def put_batch(self, x: np.ndarray) -> jax.Array:
    """A host array of batch rows placed as the decode step reads it (one device, or over data/fsdp)."""
    if self.mesh is None:
      return jnp.asarray(x)
    return sharding.put_batch(x, self.mesh)

  def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
               eos_id: Optional[int] = None, min_new_tokens: int = 0, row_ids: Optional[Sequence[int]] = None
               ) -> list[list[int]]:
    """The new tokens of each prompt (EOS excluded), at most max_new_tokens and never past max_positions.
    row_ids (default 0..n-1) seed each row's draws: the same id and seed give the same sample in any batch."""
    if max_new_tokens < 1:
      raise ConfigError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    check_prompts(prompts, self.cfg.model.max_positions)
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    # Longest first, so each batch pads little; results go back in the given order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    batch = min(self.batch_size, _round_up(1 << (len(prompts) - 1).bit_length(), self.batch_shards))
    for first in range(0, len(order), batch):
      chosen = order[first:first + batch]
      outs = self._batch([prompts[i] for i in chosen], [row_ids[i] for i in chosen], batch, max_new_tokens,
                         sampling, eos_id, min_new_tokens)
      for i, out in zip(chosen, outs):
        results[i] = out
    return results

  def _batch(self, prompts, row_ids, batch, max_new, sampling, eos_id, min_new):
    max_positions = self.cfg.model.max_positions
    P = _round_up(max(len(p) for p in prompts), SHAPE_BUCKET)
    width = _round_up(max_new, SHAPE_BUCKET)  # of the output buffer and the cache's new slots
    tokens = np.zeros((batch, P), np.int32)
    start = np.full((batch,), P - 1, np.int32)
    limit = np.zeros((batch,), np.int32)  # rows beyond the prompts fill the batch and generate nothing
    ids = np.zeros((batch,), np.uint32)
    for b, (p, row) in enumerate(zip(prompts, row_ids)):
      tokens[b, P - len(p):] = p
      start[b] = P - len(p)
      limit[b] = min(max_new, max_positions - len(p))  # a row stops where its positions run out
      ids[b] = row
    row_keys = np.asarray(jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(sampling.seed), ids))
    knobs = {"temperature": np.float32(sampling.temperature or 1.0), "top_k": np.int32(sampling.top_k),
             "top_p": np.float32(sampling.top_p), "eos": np.int32(-1 if eos_id is None else eos_id),
             "min_new": np.int32(min_new)}
    fns = decode_functions(self.cfg, self.dtype, sampling.greedy)
    with sharding.activate(self.mesh):
      state = fns.start(self.params, self.put_batch(tokens), self.put_batch(start), self.put_batch(limit),
                        self.put_batch(row_keys), knobs, cache_len=P + width - 1, width=width)
      for step in range(1, max_new):
        if step % DONE_CHECK_EVERY == 0 and bool(jax.device_get(state["done_B"]).all()):
          break
        state = fns.advance(self.params, state)
    out, n = jax.device_get((state["out_BxN"], state["n_B"]))
    results = []
    for b in range(len(prompts)):
      row = [int(t) for t in out[b, :n[b]]]
      if row and row[-1] == eos_id:
        row = row[:-1]
      results.append(row)
    return results


def check_prompts(prompts: Sequence[Sequence[int]], max_positions: int) -> None:
  """Every prompt needs at least one token and room for one new token below max_positions."""
  if not prompts:
    raise DataError("no prompts given: pass --prompt TEXT or a --prompts FILE.jsonl with at least one record")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise DataError(f"prompt {i} is empty (0 tokens): give at least one token of text")
    if len(p) >= max_positions:
      raise DataError(f"prompt {i} has {len(p)} tokens but the model's max_positions is {max_positions}, which "
                      f"leaves no room for new tokens: shorten it to at most {max_positions - 1} tokens")


def default_mesh(cfg: Config) -> jax.sharding.Mesh:
  """All local devices: the checkpoint's tensor-parallel size where it divides them and the kv heads, fsdp (batch
  and weights) over the rest."""
  n = jax.device_count()
  tensor = cfg.mesh.tensor if cfg.mesh.tensor > 0 and n % cfg.mesh.tensor == 0 \
      and cfg.kv_heads % cfg.mesh.tensor == 0 else 1
  return sharding.make_mesh((1, n // tensor, tensor))


# ----------------------------------------------------------------------------- text in, text out


def completion_text(codec, prompt_ids: list[int], new_ids: list[int]) -> str:
  """The text the new tokens add to the prompt: decode(prompt + new) minus decode(prompt), so a word-piece that
  starts a word keeps its space; decode(new) alone where the two do not line up."""
  head, full = decode_ids(codec, prompt_ids), decode_ids(codec, list(prompt_ids) + list(new_ids))
  return full[len(head):] if full.startswith(head) else decode_ids(codec, new_ids)


def decode_ids(codec, ids: list[int]) -> str:
  # A model's vocabulary may be padded past its tokenizer's: ids that no tokenizer entry holds are left out.
  try:
    return codec.decode(ids)
  except (IndexError, KeyError, ValueError, TypeError):
    return codec.decode([i for i in ids if _decodable(codec, i)])


def _decodable(codec, token_id: int) -> bool:
  try:
    codec.decode([token_id])
  except (IndexError, KeyError, ValueError, TypeError):
    return False
  return True


def _compute_dtype(pre) -> str:
  """A run computes in its model.compute_dtype; an HF directory in the dtype its weights are stored in, as
  transformers would."""
  if pre.kind != "hf":
    return pre.cfg.model.compute_dtype
  try:
    with open(os.path.join(spec_path(pre.spec), "config.json")) as f:
      hf = json.load(f)
  except (OSError, ValueError):
    return pre.cfg.model.compute_dtype
  stored = hf.get("dtype") or hf.get("torch_dtype")
  return stored if stored in ("float32", "bfloat16", "float16") else pre.cfg.model.compute_dtype


def load_generator(checkpoint_path: str, *, mesh: Optional[jax.sharding.Mesh] = None, batch_size: int = 16,
                   compute_dtype: Optional[str] = None, need_tokenizer: bool = True):
  """(Generator, text codec or None, the loaded maxlm.pretrained.Pretrained) of a run directory, RUN@STEP or HF
  directory; compute_dtype defaults to the checkpoint's (_compute_dtype)."""
  pre = pretrained.load(checkpoint_path)  # a LoRA checkpoint comes merged (base + scaled B A): a plain decoder
  try:
    codec = model_text.text_codec(pre.cfg)
  except DataError:
    if need_tokenizer:
      raise
    codec = None
  gen = Generator(pre.cfg, pre.params, mesh=mesh or default_mesh(pre.cfg),
                  compute_dtype=compute_dtype or _compute_dtype(pre), batch_size=batch_size)
  return gen, codec, pre


def check_vocabulary(prompt_ids: list[list[int]], vocab_size: int) -> None:
  """A DataError for an id the model's embedding has no row for (a tokenizer or ids that are not the model's)."""
  top = max((max(ids) for ids in prompt_ids if ids), default=0)
  low = min((min(ids) for ids in prompt_ids if ids), default=0)
  if top >= vocab_size or low < 0:
    raise DataError(f"a prompt holds token id {top if top >= vocab_size else low}, outside the model's vocabulary "
                    f"[0, {vocab_size}): the tokenizer (or the ids given) does not belong to this model")


