"""Knowledge entropy (kaistAI/Knowledge-Entropy analysis/entropy.py, "KE" below; docs/KNOWLEDGE.md): per-layer FFN
coefficient magnitudes A over a document set, their entropies, over a series of checkpoints;
`python -m maxlm.analyze knowledge-entropy` writes JSON, .npy and PNG.

A[l, i] = (sum over sequences and positions of |a|_i in layer l) / number of sequences, a the input of the layer's down
projection (maxlm.model.mlp: silu(gate) * up for LLaMA-like families, GELU(fc_in x) for GPT-2 and GPT-NeoX), accumulated
inside the layer scan (per-layer sums, never an (L, B, T, F) stack). Mode `valid` (default) masks pads out of
attention and of A; mode `reference` reproduces KE: no attention mask, pad positions counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from maxlm import model_text
from maxlm.analysis.common import check_output_dir, load_on_mesh, savefig, write_json
from maxlm.core.outputs import atomic_file
from maxlm.core import sharding
from maxlm.core.compile_cache import CompileCache
from maxlm.core.errors import DataError, cli_description

COMMAND = "maxlm.analyze knowledge-entropy"
OUTPUT_FILES = ("knowledge_entropy.json", "knowledge_entropy.png")
MODES = ("valid", "reference")
ENTROPY_EPS = 1e-9  # KE's turn_into_entropy: log(p + 1e-9)


# ----------------------------------------------------------------------------- the math


def ffn_coefficient_sums(cfg, graphdef, params: dict, ids_BxT: jax.Array, mask_BxT: jax.Array, mode: str, *,
                         real_rows_B: Optional[jax.Array] = None) -> jax.Array:
  """(L, F) fp32: per layer, the sum over the batch's counted tokens of |a|, a the down projection's input
  (silu(gate(x)) * up(x), or GELU(up(x)) for GPT-2 / GPT-NeoX).

  `mask_BxT` is 1 on real tokens. `valid`: pads cannot be attended to (segment ids) and are not counted.
  `reference`: no attention mask and every position counted, pads included (KE). `real_rows_B` (default all 1)
  zeroes filler rows that only round a batch up to the device count. Jittable; `cfg` is the model section.
  """
  from maxlm import model as model_lib  # pylint: disable=import-outside-toplevel
  if mode not in MODES:
    raise ValueError(f"mode {mode!r} is not one of {MODES}")
  rows_B = jnp.ones(ids_BxT.shape[:1], jnp.float32) if real_rows_B is None else real_rows_B.astype(jnp.float32)
  if mode == "valid":
    segment_ids_BxT = mask_BxT.astype(jnp.int32)  # real tokens 1, pads 0: no real token attends to a pad
    weights_BxT = mask_BxT.astype(jnp.float32) * rows_B[:, None]
  else:
    segment_ids_BxT = None
    weights_BxT = jnp.broadcast_to(rows_B[:, None], ids_BxT.shape)
  model = model_lib.bind(graphdef, params)
  _, sums_LxF = model(ids_BxT, segment_ids_BxT=segment_ids_BxT, compute_dtype=jnp.float32,
                      ffn_abs_sums_weights_BxT=weights_BxT)
  return sums_LxF


def layer_entropies(coefficients_LxF: np.ndarray) -> np.ndarray:
  """(L,) H_l = -sum_i p_i ln(p_i + 1e-9), p = A_l / sum(A_l), in float64 (KE's turn_into_entropy)."""
  a = np.asarray(coefficients_LxF, np.float64)
  p = a / a.sum(axis=-1, keepdims=True)
  return -(p * np.log(p + ENTROPY_EPS)).sum(axis=-1)


def knowledge_entropy(coefficients_LxF: np.ndarray) -> float:
  """Knowledge entropy = sum over layers of H_l (at most L ln m, reached when every unit is used alike)."""
  return float(layer_entropies(coefficients_LxF).sum())


# ----------------------------------------------------------------------------- the mesh


def analysis_mesh():
  """Every device on the fsdp axis: weights sharded along their model dimension, documents along the batch."""
  return sharding.make_mesh((1, jax.device_count(), 1))


# ----------------------------------------------------------------------------- batches


def make_coefficients_step(model_cfg, mesh, mode: str):
  """jit(params, ids, mask, real_rows) -> (L, F) sums, batch sharded over the mesh, result replicated."""
  from maxlm import model as model_lib  # pylint: disable=import-outside-toplevel
  graphdef = model_lib.abstract_model(model_cfg)[0]

  def step(params, ids_BxT, mask_BxT, rows_B):
    # fp32 throughout: GPUs would otherwise run fp32 matmuls in TF32 (10-bit mantissa).
    with sharding.activate(mesh), jax.default_matmul_precision("highest"):
      return ffn_coefficient_sums(model_cfg, graphdef, params, ids_BxT, mask_BxT, mode, real_rows_B=rows_B)

  batch = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(None, batch, batch, sharding.batch_sharding(mesh, 1)),
                 out_shardings=sharding.replicated(mesh))


# One compiled step per (model, mesh, mode): a series, or repeated calls, compile once.
COEFFICIENT_STEPS = CompileCache(make_coefficients_step)


def batch_size_for(mesh, requested: int) -> int:
  """The batch rounded up to a multiple of the batch-sharding devices (filler rows count for nothing)."""
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  return -(-max(requested, 1) // devices) * devices


def mean_coefficients(step_fn, params: dict, rows, *, batch_size: int, mesh, progress=None) -> np.ndarray:
  """A (L, F) float32: the sums over every batch of `rows` (model_text.Rows), divided by the number of sequences."""
  n, seq_len = rows.ids.shape
  total = None
  for start in range(0, n, batch_size):
    ids = np.full((batch_size, seq_len), rows.ids[0, 0], np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    real = np.zeros((batch_size,), np.float32)
    stop = min(start + batch_size, n)
    ids[:stop - start], mask[:stop - start], real[:stop - start] = rows.ids[start:stop], rows.mask[start:stop], 1.0
    # Every process holds the whole batch; each places only the rows its devices own.
    put = lambda x: sharding.put_batch(x, mesh)  # noqa: E731
    sums = np.asarray(jax.device_get(step_fn(params, put(ids), put(mask), put(real))), np.float64)
    total = sums if total is None else total + sums  # host float64: no drift over many batches
    if progress is not None:
      progress(1)
  return (total / n).astype(np.float32)


# ----------------------------------------------------------------------------- a series of checkpoints


@dataclasses.dataclass
class Result:
  checkpoint: str
  step: Optional[int]
  coefficients: np.ndarray  # (L, F) float32
  per_layer: np.ndarray  # (L,)

  @property
  def knowledge_entropy(self) -> float:
    return float(self.per_layer.sum())


def _tokenizer_key(cfg) -> str:
  d = cfg.data
  return json.dumps([d.tokenizer, d.source, d.path, d.grammar, cfg.model.vocab_size])


def knowledge_entropy_series(checkpoints: list[str], data: str, *, seq_len: int = 2048, batch_size: int = 8,
                             max_docs: int = 0, mode: str = "valid", progress: bool = True,
                             log: Callable = print) -> list[Result]:
  """A and knowledge entropy of every checkpoint the specs name (RUN, RUN@STEP, RUN@all, HF dirs), in order."""
  from maxlm import pretrained  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  if mode not in MODES:
    raise DataError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
  specs = [s for spec in checkpoints for s in pretrained.expand(spec)]
  mesh = analysis_mesh()
  batch_size = batch_size_for(mesh, batch_size)
  rows_cache, results = {}, []
  outer = tqdm(specs, desc="checkpoints", unit="ckpt", disable=not progress, dynamic_ncols=True)
  for spec in outer:
    loaded, _ = load_on_mesh(spec, lambda _: mesh)
    cfg = loaded.cfg
    if seq_len > cfg.model.max_positions:  # KE pads to 2048 whatever the model; RoPE has no table to run out of
      log(f"maxlm: warning: --seq-len {seq_len} is past {spec}'s model.max_positions = {cfg.model.max_positions}: "
          "rows run to that length as transformers runs them (RoPE positions the model was not trained at; in "
          f"mode reference the pads count in A); pass --seq-len {cfg.model.max_positions} to stay inside")
    key = _tokenizer_key(cfg)
    if key not in rows_cache:
      rows_cache[key] = model_text.model_rows(cfg, data, seq_len=seq_len, max_docs=max_docs, log=log)
    rows = rows_cache[key]
    step_fn = COEFFICIENT_STEPS(cfg.model, mesh, mode)
    n_batches = -(-rows.ids.shape[0] // batch_size)
    with tqdm(total=n_batches, desc=f"{spec}", unit="batch", leave=False, disable=not progress,
              dynamic_ncols=True) as inner:
      coefficients = mean_coefficients(step_fn, loaded.params, rows, batch_size=batch_size, mesh=mesh,
                                       progress=inner.update)
    result = Result(spec, loaded.step, coefficients, layer_entropies(coefficients))
    outer.set_postfix(ke=f"{result.knowledge_entropy:.4f}")
    results.append(result)
  return results


# ----------------------------------------------------------------------------- outputs


def _coefficients_name(index: int, result: Result) -> str:
  from maxlm import pretrained  # pylint: disable=import-outside-toplevel
  path, _ = pretrained.split_spec(result.checkpoint)
  label = os.path.basename(os.path.normpath(path)) or "model"
  label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
  step = f"_step{result.step}" if result.step is not None else ""
  return f"coefficients_{index:03d}_{label}{step}.npy"


def write_outputs(results: list[Result], mode: str, output: str, *, overwrite: bool = False) -> dict:
  """DIR/knowledge_entropy.json, one (L, F) float32 .npy per checkpoint, DIR/knowledge_entropy.png: new files, or
  with `overwrite` earlier outputs of knowledge-entropy (all checked before the first is written)."""
  names = [_coefficients_name(i, r) for i, r in enumerate(results)]
  output = check_output_dir(output, COMMAND, (*OUTPUT_FILES, *names), overwrite=overwrite)
  entries = []
  for name, r in zip(names, results):
    with atomic_file(os.path.join(output, name), COMMAND, overwrite=overwrite) as tmp:
      with open(tmp, "wb") as f:
        np.save(f, r.coefficients.astype(np.float32))
    entries.append({"checkpoint": r.checkpoint, "step": r.step, "knowledge_entropy": r.knowledge_entropy,
                    "per_layer": [float(h) for h in r.per_layer], "coefficients": name})
  report = {"mode": mode, "results": entries}
  write_json(os.path.join(output, "knowledge_entropy.json"), report, COMMAND, overwrite=overwrite)
  plot(results, os.path.join(output, "knowledge_entropy.png"), overwrite=overwrite)
  return report


def plot(results: list[Result], path: str, *, overwrite: bool = False) -> None:
  """KE against step over the series (checkpoint index where steps are unknown); per-layer H of the last one."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  by_step = all(r.step is not None for r in results)
  xs = [r.step if by_step else i for i, r in enumerate(results)]
  left.plot(xs, [r.knowledge_entropy for r in results], marker="o")
  left.set_xlabel("step" if by_step else "checkpoint")
  if not by_step:
    left.set_xticks(xs, [os.path.basename(os.path.normpath(r.checkpoint)) for r in results], rotation=30,
                    ha="right", fontsize=7)
  left.set_ylabel("knowledge entropy (nats)")
  left.set_title("knowledge entropy over checkpoints")
  last = results[-1]
  right.plot(range(len(last.per_layer)), last.per_layer, marker="o")
  right.axhline(np.log(last.coefficients.shape[1]), color="gray", linestyle=":", label="ln m (uniform)")
  right.set_xlabel("layer")
  right.set_ylabel("H_l (nats)")
  right.set_title(f"per-layer entropy: {last.checkpoint}", fontsize=8)
  right.legend(fontsize=7)
  fig.tight_layout()
  try:
    savefig(fig, path, COMMAND, overwrite=overwrite, dpi=110)
  finally:
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def _cli(args) -> None:
  check_output_dir(args.output, COMMAND, OUTPUT_FILES, overwrite=args.overwrite)  # before the work
  results = knowledge_entropy_series(args.checkpoint, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                     max_docs=args.max_docs, mode=args.mode)
  if jax.process_index() == 0:  # every process computed the same replicated A
    write_outputs(results, args.mode, args.output, overwrite=args.overwrite)
  for r in results:
    print(f"{r.checkpoint}: knowledge entropy {r.knowledge_entropy:.6f} (step {r.step})")
  print(f"wrote {os.path.join(args.output, 'knowledge_entropy.json')}")


def add_parser(subparsers) -> None:
  p = subparsers.add_parser("knowledge-entropy", help="knowledge entropy of FFN coefficients over checkpoints (KE)",
                            description=cli_description(__doc__))
  p.add_argument("--checkpoint", action="append", required=True,
                 help="run dir (latest step), RUN@STEP, RUN@all or an HF model directory; repeatable")
  p.add_argument("--data", required=True, help="JSONL with 'text' or 'ids', or plain text with one document a line")
  p.add_argument("--seq-len", type=int, default=2048, help="each document truncated or right-padded to this")
  p.add_argument("--batch-size", type=int, default=8, help="documents per batch (rounded up to the device count)")
  p.add_argument("--max-docs", type=int, default=0, help="use the first N documents (0 = all)")
  p.add_argument("--mode", choices=MODES, default="valid",
                 help="valid: pads masked out of attention and A; reference: as KE, no mask, pads counted")
  p.add_argument("--output", required=True, help="directory for knowledge_entropy.json, .npy and .png")
  p.add_argument("--overwrite", action="store_true",
                 help="replace those files if they are earlier outputs of knowledge-entropy")
  p.set_defaults(func=_cli)
