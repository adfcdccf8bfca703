"""What the analysis tools share: documents as scored rows and LM batches, the exact-analysis config, a checkpoint
placed on a mesh, and one checkpoint or a series of them (`RUN@all`) reported as JSON and a plot over steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Callable, Optional

import jax
import numpy as np

from maxlm import model as model_lib
from maxlm import model_text
from maxlm import pretrained
from maxlm.checkpoint.params import open_checkpoints
from maxlm.checkpoint.spec import is_hf_dir, split_spec
from maxlm.core import sharding
from maxlm.core.config import IGNORE_INDEX, Config, mesh_shape
from maxlm.core.errors import ConfigError, DataError
from maxlm.core.outputs import atomic_file, check_file, protected, write_text


# ----------------------------------------------------------------------------- documents


def lm_batch(ids_NxT: np.ndarray, mask_NxT: np.ndarray, ignore_index: int = IGNORE_INDEX) -> dict:
  """{"inputs": ids, "targets": next token where it is a real token, else ignore_index} (N, T): what transformers
  computes with labels = input ids (it shifts inside: T-1 predictions per row, the last position has none)."""
  targets = np.full(ids_NxT.shape, ignore_index, np.int32)
  targets[:, :-1] = np.where(mask_NxT[:, 1:] > 0, ids_NxT[:, 1:], ignore_index)
  return {"inputs": np.asarray(ids_NxT, np.int32), "targets": targets}


def masking_of(cfg: Config):
  """The masked-LM settings (data_pipelines.masking.MaskingSpec) of a bidirectional checkpoint, None for a causal
  one; read from the run's data section (its tokenizer decides the mask id)."""
  if cfg.model.causal:
    return None
  from maxlm.data_pipelines import pipeline  # pylint: disable=import-outside-toplevel
  spec = pipeline.masking_spec(cfg.data)
  if spec is None:
    raise DataError("this checkpoint has bidirectional attention (model.causal=false) but its data section has no "
                    "masked-LM settings (data.mlm=false): nothing says which token masks")
  if spec.vocab_size > cfg.model.vocab_size:
    raise DataError(f"the checkpoint's data section masks with token id {spec.mask_id}, outside its vocabulary of "
                    f"{cfg.model.vocab_size}: the data section does not belong to this checkpoint")
  return spec


def mlm_batch(ids_NxT: np.ndarray, mask_NxT: np.ndarray, spec, keys) -> dict:
  """A masked-LM batch of document rows (data_pipelines.masking.mask_rows, row i from SeedSequence(keys[i])): the
  real tokens other than the separator are maskable; targets = the original token at the chosen positions; the
  padding is its own segment, so a bidirectional model's real tokens never read it."""
  from maxlm.data_pipelines import masking  # pylint: disable=import-outside-toplevel
  maskable = (mask_NxT > 0) & (ids_NxT != spec.separator_id)
  inputs, targets = masking.mask_rows(ids_NxT, maskable, keys, spec)
  return {"inputs": inputs, "targets": targets, "segment_ids": (mask_NxT > 0).astype(np.int32)}


def scoring_batch(cfg: Config, ids_NxT: np.ndarray, mask_NxT: np.ndarray, *, seed: int = 0, index: int = 0) -> dict:
  """The batch a tool scores a checkpoint's loss on: next-token targets (lm_batch) for a causal model; for a masked
  LM, mlm_batch with row j masked from (seed, index, j), so a minibatch's masks are fixed by the seed."""
  spec = masking_of(cfg)
  if spec is None:
    return lm_batch(ids_NxT, mask_NxT, cfg.loss.ignore_index)
  return mlm_batch(ids_NxT, mask_NxT, spec, [(seed, index, j) for j in range(len(ids_NxT))])


def scored_rows(pre: pretrained.Pretrained, data: str, *, seq_len: int, max_docs: int = 0,
                log=print) -> model_text.Rows:
  """Rows of `seq_len` tokens of a data file for a loaded model (maxlm.model_text.model_rows), checked against its
  context length and vocabulary; a row needs 2 real tokens to hold one target."""
  if seq_len < 2:
    raise DataError(f"--seq-len {seq_len}: a row needs at least 2 tokens to hold one prediction")
  if seq_len > pre.cfg.model.max_positions:
    raise DataError(f"--seq-len {seq_len} exceeds the model's max_positions {pre.cfg.model.max_positions}")
  rows = model_text.model_rows(pre.cfg, data, seq_len=seq_len, max_docs=max_docs, log=log)
  if int(rows.mask[:, 1:].sum()) == 0:
    raise DataError(f"{data}: no document has 2 tokens, so no row holds a target")
  return rows


def analysis_config(cfg: Config) -> Config:
  """A copy of a checkpoint's config for exact analysis: fp32 compute, XLA attention (differentiable to any order),
  no remat."""
  cfg = copy.deepcopy(cfg)
  cfg.model = dataclasses.replace(cfg.model, compute_dtype="float32", param_dtype="float32", attention="xla",
                                  remat="none")
  return cfg


# ----------------------------------------------------------------------------- a checkpoint on a mesh


def batch_mesh(cfg: Config, batch_size: int, log=print) -> jax.sharding.Mesh:
  """The checkpoint's mesh over this host's devices (its fsdp fill, else all devices on fsdp), for batches of
  `batch_size` rows over (data, fsdp). One device, or a batch the mesh does not divide: a one-device mesh."""
  devices = jax.devices()
  if len(devices) == 1:
    return sharding.single_device_mesh()
  try:
    shape = mesh_shape(copy.deepcopy(cfg.mesh), len(devices))
  except ConfigError:
    shape = (1, len(devices), 1)
  if batch_size % (shape[0] * shape[1]):
    log(f"maxlm: note: --batch-size {batch_size} does not divide over the {shape[0] * shape[1]} batch-sharding "
        "devices; running on one device")
    return sharding.single_device_mesh()
  return sharding.make_mesh(shape, devices)


def params_abstract(model_cfg, mesh: jax.sharding.Mesh, dtype=None) -> dict:
  """The model's weights as ShapeDtypeStructs on `mesh`, sharded by their logical axes (a leaf the mesh does not
  divide replicated), of `dtype` when given."""
  _, abstract, specs = model_lib.abstract_model(model_cfg)
  return sharding.with_shardings(abstract, sharding.param_shardings(abstract, specs, mesh), dtype)


def run_config(spec: str) -> Optional[Config]:
  """The config a run spec's checkpoint (RUN or RUN@STEP) was saved with, read without its weights; None for an HF
  directory or a path that does not exist (maxlm.pretrained.load explains those)."""
  path, step = split_spec(spec)
  path = os.path.expanduser(path)
  if is_hf_dir(path) or not os.path.isdir(path) or step == "all":
    return None
  with open_checkpoints(path) as ckpt:
    return ckpt.config(ckpt.resolve_step(int(step) if step is not None else None))


def load_on_mesh(spec: str, mesh_for: Callable[[Config], jax.sharding.Mesh], *, dtype=None
                 ) -> tuple[pretrained.Pretrained, jax.sharding.Mesh]:
  """(the checkpoint, the mesh mesh_for(its config) gives) with its params placed on that mesh by params_abstract,
  cast to `dtype` when given: a run's shards are read where they live (maxlm.pretrained.load(abstract=...)); an HF
  directory is imported on the host, then placed (maxlm.core.sharding.put_host_tree)."""
  cfg = run_config(spec)
  if cfg is None:
    loaded = pretrained.load(spec)  # HF import, or the error that explains the spec
    mesh = mesh_for(loaded.cfg)
    loaded.params = sharding.put_host_tree(loaded.params, params_abstract(loaded.cfg.model, mesh, dtype))
    return loaded, mesh
  mesh = mesh_for(cfg)
  loaded = pretrained.load(spec, abstract={"params": params_abstract(cfg.model, mesh, dtype)})
  if dtype is not None:  # a run's shards come in their stored dtype
    loaded.params = jax.tree.map(lambda x: x.astype(dtype), loaded.params)
  return loaded, mesh


# ----------------------------------------------------------------------------- outputs, one checkpoint or a series


def write_json(path: str, obj: dict, command: str, *, overwrite: bool = False) -> None:
  """The tools' JSON output, written as core.outputs writes a file: new, or with `overwrite` an earlier output of
  `command`; never a run's file or inside its checkpoints/."""
  write_text(path, command, json.dumps(obj, indent=2), overwrite=overwrite)


def check_output_dir(output: str, command: str, names: tuple[str, ...], *, overwrite: bool = False) -> str:
  """A tool's output directory, checked before the work: not a file, not inside a run's checkpoints/ or a token
  store, and its files `names` new or (with `overwrite`) earlier outputs of `command`."""
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.isfile(output):
    raise DataError(f"--output {output} is a file; give a directory")
  why = protected(output)
  if why:
    raise DataError(f"--output {output} refused: {why}. Nothing was written; choose a directory outside it")
  for name in names:
    check_file(os.path.join(output, name), command, overwrite=overwrite)
  return output


def savefig(fig, path: str, command: str, *, overwrite: bool = False, **kwargs) -> None:
  """fig.savefig to `path` as core.outputs writes a file (the format from its extension)."""
  fmt = os.path.splitext(path)[1].lstrip(".") or None
  with atomic_file(path, command, overwrite=overwrite) as tmp:
    fig.savefig(tmp, format=fmt, **kwargs)


def over_checkpoints(spec: str, score: Callable[[str], dict], log=print) -> dict:
  """score(spec) for one checkpoint; for RUN@all {"checkpoint": spec, "results": [score(RUN@STEP), ...]}."""
  specs = pretrained.expand(spec)
  if len(specs) == 1:
    return score(specs[0])
  results = []
  for i, one in enumerate(specs, 1):
    log(f"maxlm: checkpoint {i} of {len(specs)}: {one}")
    results.append(score(one))
  return {"checkpoint": spec, "results": results}


def report(checkpoint: str, output: str, score: Callable[[str], dict], line: Callable[[dict], str], plot: dict,
           *, command: str, overwrite: bool = False) -> dict:
  """A tool's CLI over one checkpoint or RUN@all: the JSON at `output`, a line per checkpoint, and for a series
  OUTPUT.png of plot["key"] over the steps (plot: plot_over_steps' keyword arguments). `output` (and the PNG) must
  be new, or with `overwrite` earlier outputs of `command`; checked before the work."""
  png = os.path.splitext(output)[0] + ".png"
  series = split_spec(checkpoint)[1] == "all"
  for path in (output, png) if series else (output,):
    check_file(path, command, overwrite=overwrite)
  out = over_checkpoints(checkpoint, score)
  write_json(output, out, command, overwrite=overwrite)
  for r in out.get("results", [out]):
    print(f"{r['checkpoint']}: {line(r)}")
  if "results" in out:
    plot_over_steps(out["results"], path=png, command=command, overwrite=overwrite, **plot)
  print(f"wrote {output}" + (f" and {png}" if "results" in out else ""))
  return out


def plot_over_steps(results: list[dict], *, key: str, path: str, ylabel: str, err_key: Optional[str] = None,
                    baseline_key: Optional[str] = None, command: str = "maxlm.analyze", overwrite: bool = False
                    ) -> str:
  """results[i][key] against results[i]["step"] (error bars from err_key, a dashed baseline from baseline_key)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  steps = [r["step"] for r in results]
  fig, ax = plt.subplots(figsize=(6, 4))
  errors = [r.get(err_key) or 0.0 for r in results] if err_key else None
  ax.errorbar(steps, [r[key] for r in results], yerr=errors, marker="o", capsize=3, label=key)
  if baseline_key:
    ax.plot(steps, [r[baseline_key] for r in results], linestyle="--", color="gray", label=baseline_key)
    ax.legend(fontsize=8)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(f"{ylabel} over checkpoints", fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  try:
    savefig(fig, path, command, overwrite=overwrite, dpi=110)
  finally:
    plt.close(fig)
  return path
