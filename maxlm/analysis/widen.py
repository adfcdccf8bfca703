"""Widening (Liuhong99/implicitbiasmlmcode enlarge.py, rewritten for every family of maxlm.core.families;
docs/IMPLICIT_BIAS.md): embed a
model in one K times wider (and optionally deeper) that computes the same function, written as a derived checkpoint
that to-hf, evaluate and init_from accept.

The construction keeps every activation of the wide model a K-fold tiling of the narrow one's, [x, x, ..., x]:
  hidden, heads, kv_heads, ffn times K, head_dim unchanged: wide head k*N + n is a copy of head n and reads kv head
    k*KV + n // (N / KV), a copy of its kv head, so RoPE (scaled or partial), the 1/sqrt(head_dim) scale and GQA
    groups line up;
  embedding (untied), learned position table, norm scales and biases, and projection biases tiled: RMSNorm's mean of
    squares (LayerNorm's mean and variance) of a tiled vector are those of the vector, so every family's norms (pre,
    post, OLMo-2's QK-norm over the whole q and k) commute with tiling, eps included; a bias is added after the
    K equal input blocks have summed back, so it is tiled, not divided;
  every projection tiled K x K along (in, out) and divided by K along its input: K equal input blocks sum back;
  the output head repeated along its input and divided by K; extra layers (a deeper target) all zero, which in a
    residual block adds exactly nothing (pre-, post-norm or parallel: its norms, biases and outputs are 0).
A tied embedding would need to be tiled as the input and tiled / K as the head at once, which no single matrix is:
widen refuses it, and --untie first unties the head (lm_head = embed^T, the same function) and widens exactly.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

import numpy as np

from maxlm.checkpoint import params as ckpt_params
from maxlm.data_pipelines.tokenization import carry_tokenizer
from maxlm import pretrained
from maxlm.core.config import Config, finalize
from maxlm.core.errors import ConversionError, cli_description
from maxlm.core.outputs import DERIVED_RUN, atomic_output

LAYER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def widened_config(cfg: Config, factor: int, layers: Optional[int] = None, untie: bool = False) -> Config:
  """The config of the wide model: hidden, heads, kv_heads and ffn times `factor`, head_dim as it was."""
  m = cfg.model
  if factor < 1:
    raise ConversionError(f"--factor {factor} must be a positive integer")
  if layers is not None and layers < m.layers:
    raise ConversionError(f"--layers {layers} is fewer than the model's {m.layers}: widen only adds layers")
  if m.tie_embeddings and not untie:
    raise ConversionError(
        "widen is exact only with an untied output head: the input embedding must be tiled while the head must be "
        f"tiled and divided by {factor}, and a tied model has one matrix for both (scaling the embedding by 1/K "
        "shrinks the residual stream, which the norms' eps and the blocks' additions do not undo). Pass --untie to "
        "write an untied wide model (lm_head = embed^T: the same function), then widening is exact")
  wide = copy.deepcopy(cfg)
  head_dim = cfg.head_dim
  wide.model.hidden, wide.model.heads, wide.model.ffn = m.hidden * factor, m.heads * factor, m.ffn * factor
  wide.model.kv_heads = cfg.kv_heads * factor
  wide.model.head_dim = 0 if head_dim * wide.model.heads == wide.model.hidden else head_dim
  wide.model.layers = layers or m.layers
  wide.model.tie_embeddings = False
  return finalize(wide)


def widen_params(cfg: Config, params: dict, factor: int, layers: Optional[int] = None) -> dict:
  """The wide model's weights (host fp32 numpy) from the narrow model's, by the construction of the module
  docstring; `cfg` is the narrow model's config (a tied head is untied first)."""
  k = factor
  out = {"embed": np.tile(_np(params["embed"]), (1, k))}
  head = _np(params["embed"]).T if cfg.model.tie_embeddings else _np(params["lm_head"])
  out["lm_head"] = np.tile(head, (k, 1)) / k
  for name in ("final_norm", "final_norm_bias"):
    if name in params:
      out[name] = np.tile(_np(params[name]), k)
  if "positions" in params:  # a learned position table adds to the embedding: tiled like it
    out["positions"] = np.tile(_np(params["positions"]), (1, k))
  extra = (layers or cfg.model.layers) - cfg.model.layers
  stacked = {}
  for name, w in params["layers"].items():
    w = _np(w)
    if name in LAYER_PROJECTIONS:
      wide = np.tile(w, (1, k, k)) / k
    elif w.ndim == 2:  # norm scales and biases, the QK-norm scales: vectors along a tiled dimension
      wide = np.tile(w, (1, k))
    else:
      raise ConversionError(f"widen does not know the layer weight {name!r} {w.shape[1:]}: it widens projections "
                            f"({', '.join(LAYER_PROJECTIONS)}) and per-layer vectors (norms, biases)")
    stacked[name] = np.concatenate([wide, np.zeros((extra,) + wide.shape[1:], wide.dtype)]) if extra else wide
  out["layers"] = stacked
  return out


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def widen_extras(cfg: Config, extras: dict, factor: int) -> dict:
  """Frozen entries for the wide model: EMO's fixed cost embedding (a head snapshot, (V, hidden)) tiled along its
  dimension, which keeps every cosine similarity EMO reads; other entries unchanged."""
  out = dict(extras)
  cost = extras.get("cost_embedding")
  if cost is not None and cfg.loss.cost_embedding == "fixed" and np.shape(cost)[1] == cfg.model.hidden:
    out["cost_embedding"] = np.tile(np.asarray(cost, np.float32), (1, factor))
  return out


def widen(checkpoint_path: str, output: str, *, factor: int, layers: Optional[int] = None, untie: bool = False,
          overwrite: bool = False, log=print) -> Config:
  """Writes the wide model of a checkpoint (run dir, RUN@STEP or HF dir) as a params-only checkpoint at step 0
  under `output` (maxlm_derived.json records the source); returns its config."""
  pre = pretrained.load(checkpoint_path)
  cfg = widened_config(pre.cfg, factor, layers, untie)
  params = widen_params(pre.cfg, pre.params, factor, layers)
  extras = widen_extras(pre.cfg, pre.frozen, factor)
  output_abs = os.path.abspath(os.path.expanduser(output))
  with atomic_output(output_abs, DERIVED_RUN, overwrite=overwrite) as tmp:
    tokenizer = carry_tokenizer(cfg.data, tmp, output_abs)
    cfg.run.dir = output_abs
    ckpt_params.save_params(tmp, cfg, params, extras=extras, step=0)
    with open(os.path.join(tmp, DERIVED_RUN.marker), "w") as f:
      json.dump({"tool": "widen", "source": pre.spec, "source_step": pre.step, "factor": factor,
                 "layers": cfg.model.layers, "source_layers": pre.cfg.model.layers, "untied": bool(
                     pre.cfg.model.tie_embeddings), "tokenizer": tokenizer, "extras": sorted(extras)}, f, indent=2)
  m = cfg.model
  log(f"wrote {output_abs}: hidden {m.hidden}, heads {m.heads}, kv_heads {cfg.kv_heads}, head_dim {cfg.head_dim}, "
      f"ffn {m.ffn}, layers {m.layers} (x{factor} of {pre.spec}); export with `python -m maxlm.convert to-hf` or "
      f"train on with checkpoint.init_from={output_abs}")
  return cfg


def add_parser(subparsers) -> None:
  p = subparsers.add_parser("widen", help="embed a model in a K-times wider one with the same function (implicit bias)",
                            description=cli_description(__doc__))
  p.add_argument("--checkpoint", required=True, help="run dir, RUN@STEP or HF model dir (docs/FAMILIES.md)")
  p.add_argument("--factor", type=int, required=True, help="K: hidden, heads, kv_heads and ffn times K")
  p.add_argument("--layers", type=int, default=None, help="total layers of the wide model (extra ones are zero)")
  p.add_argument("--untie", action="store_true", help="untie a tied head first (lm_head = embed^T), then widen")
  p.add_argument("--output", required=True, help="new run directory for the derived checkpoint")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier derived checkpoint")
  p.set_defaults(func=lambda args: widen(args.checkpoint, args.output, factor=args.factor, layers=args.layers,
                                         untie=args.untie, overwrite=args.overwrite))
