"""Hessian trace (seed 003; IB pcfg/calculate_hessian.py): Hutchinson's estimate of tr(H) of the mean valid-token CE
of minibatches, HVPs forward-over-reverse in fp32; also the document rows -> LM batch scoring token-difficulty shares.

Estimator: sample i draws a minibatch of `batch_size` rows with replacement (numpy, seeded) and a probe v_i over all
parameters (Gaussian as IB, or Rademacher; jax.random.fold_in(key(seed), i)); its value is v_i^T H_i v_i with H_i the
Hessian of that minibatch's loss. trace = mean of the values, stderr = their sample std (ddof 1) / sqrt(samples): it
covers both the probe and the minibatch noise. The expectation is E_batch[tr H_batch]: for rows of equal length that
is the trace of the Hessian of the mean CE over all rows.
Loss: the model's fp32 logits and maxlm.losses.cross_entropy (the reference; the fused kernel's custom VJP has no
second-order rule), labels = input ids as transformers scores them (T-1 predictions, pad targets ignored). Attention
runs on the XLA path, which forward-mode autodiff goes through (cuDNN's fused kernel has a custom VJP only).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from maxlm import losses
from maxlm import model as model_lib
from maxlm import pretrained, sharding
from maxlm.config import Config, mesh_shape
from maxlm.errors import ConfigError, DataError, cli_description

PROBES = ("gaussian", "rademacher")
IGNORE = -100


# ----------------------------------------------------------------------------- data shared with token-difficulty


def lm_batch(ids_NxT: np.ndarray, mask_NxT: np.ndarray, ignore_index: int = IGNORE) -> dict:
  """{"inputs": ids, "targets": next token where it is a real token, else ignore_index} (N, T): what transformers
  computes with labels = input ids (it shifts inside: T-1 predictions per row, the last position has none)."""
  targets = np.full(ids_NxT.shape, ignore_index, np.int32)
  targets[:, :-1] = np.where(mask_NxT[:, 1:] > 0, ids_NxT[:, 1:], ignore_index)
  return {"inputs": np.asarray(ids_NxT, np.int32), "targets": targets}


def scored_rows(pre: pretrained.Pretrained, data: str, *, seq_len: int, max_docs: int = 0,
                log=print) -> pretrained.Rows:
  """Rows of `seq_len` tokens of a data file for a loaded model (DESIGN section 7 data rules), checked against its
  context length and vocabulary; a row needs 2 real tokens to hold one target."""
  if seq_len < 2:
    raise DataError(f"--seq-len {seq_len}: a row needs at least 2 tokens to hold one prediction")
  if seq_len > pre.cfg.model.max_positions:
    raise DataError(f"--seq-len {seq_len} exceeds the model's max_positions {pre.cfg.model.max_positions}")
  rows = pretrained.model_rows(pre.cfg, data, seq_len=seq_len, max_docs=max_docs, log=log)
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


# ----------------------------------------------------------------------------- Hutchinson


def probe_vector(key: jax.Array, params, kind: str):
  """A random tree shaped like `params` (fp32): standard normal entries, or +-1 with equal probability."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  if kind == "gaussian":
    draws = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  elif kind == "rademacher":
    draws = [jax.random.rademacher(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  else:
    raise ConfigError(f"--probe {kind!r} is not one of {', '.join(PROBES)}")
  return jax.tree.unflatten(treedef, draws)


def quadratic_form(loss_fn: Callable, kind: str) -> Callable:
  """(params, batch, key) -> v^T H v for one probe v, H the Hessian of loss_fn(params, batch) in params; the HVP is
  jax.jvp of jax.grad (forward over reverse), so no Hessian is ever formed."""

  def value(params, batch, key):
    v = probe_vector(key, params, kind)
    _, hv = jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (v,))
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv)))

  return value


@dataclasses.dataclass
class TraceEstimate:
  values: list

  @property
  def trace(self) -> float:
    return float(np.mean(self.values))

  @property
  def stderr(self) -> Optional[float]:
    """None with one sample: a single draw says nothing about its own spread."""
    n = len(self.values)
    return float(np.std(self.values, ddof=1) / math.sqrt(n)) if n > 1 else None


def hutchinson(value_fn: Callable, params, batches: Iterable, *, seed: int, progress: bool = True,
               total: Optional[int] = None) -> TraceEstimate:
  """The estimate over `batches` (one probe each, key fold_in(key(seed), i)); value_fn as quadratic_form returns."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  base = jax.random.key(seed)
  values = []
  bar = tqdm(batches, desc="hessian trace", unit="probe", total=total, disable=not progress)
  for i, batch in enumerate(bar):
    values.append(float(value_fn(params, batch, jax.random.fold_in(base, i))))
    bar.set_postfix(trace=f"{np.mean(values):.4g}")
  bar.close()
  return TraceEstimate(values)


def minibatches(batch: dict, *, samples: int, batch_size: int, seed: int, put: Callable = lambda b: b):
  """`samples` minibatches of `batch_size` rows drawn with replacement (np.random.default_rng(seed))."""
  rng = np.random.default_rng(seed)
  n = len(batch["inputs"])
  for _ in range(samples):
    rows = rng.choice(n, batch_size, replace=True)
    yield put({k: v[rows] for k, v in batch.items()})


# ----------------------------------------------------------------------------- model, placement, tool


def model_loss(cfg: Config, graphdef) -> Callable:
  """loss(params, batch) = mean valid-token CE of fp32 logits through the reference loss (maxlm.losses)."""

  def loss(params, batch):
    logits_BxTxV = model_lib.bind(graphdef, params).logits(batch["inputs"], compute_dtype=jnp.float32)
    return losses.cross_entropy(logits_BxTxV, batch["targets"], ignore_index=cfg.loss.ignore_index)[0]

  return loss


@functools.lru_cache(maxsize=8)
def _jitted_value(model_json: str, ignore_index: int, probe: str, mesh):
  """The jitted v^T H v of one model config, kept so that repeated calls (several checkpoints of a run, tests) compile
  once per shape."""
  from maxlm.config import ModelConfig  # pylint: disable=import-outside-toplevel
  model_cfg = ModelConfig(**json.loads(model_json))
  cfg = Config(model=model_cfg)
  cfg.loss.ignore_index = ignore_index
  loss_fn = model_loss(cfg, model_lib.abstract_model(model_cfg)[0])

  def value(params, batch, key):
    with sharding.activate(mesh):
      return quadratic_form(loss_fn, probe)(params, batch, key)

  return jax.jit(value)


def _fits(shape, spec, mesh) -> bool:
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if dim % math.prod(mesh.shape[a] for a in names):
      return False
  return True


def placement(cfg: Config, batch_size: int, log=print):
  """(mesh or None, param shardings or None, batch sharding or None): the checkpoint's mesh over this host's devices
  (its fsdp fill, else all devices on fsdp), params by their logical axes (a leaf that does not divide stays
  replicated), the batch over (data, fsdp). One device, or a batch the mesh does not divide: one device."""
  devices = jax.devices()
  if len(devices) == 1:
    return None, None, None
  try:
    shape = mesh_shape(copy.deepcopy(cfg.mesh), len(devices))
  except ConfigError:
    shape = (1, len(devices), 1)
  if batch_size % (shape[0] * shape[1]):
    log(f"maxlm: note: --batch-size {batch_size} does not divide over the {shape[0] * shape[1]} batch-sharding "
        "devices; running on one device")
    return None, None, None
  mesh = sharding.make_mesh(shape, devices)
  _, abstract, specs = model_lib.abstract_model(cfg.model)
  shardings = jax.tree.map(lambda a, spec: _leaf_sharding(a.shape, spec, mesh), abstract, specs,
                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return mesh, shardings, sharding.batch_sharding(mesh)


def _leaf_sharding(shape, logical_spec, mesh) -> jax.sharding.NamedSharding:
  """A weight's sharding by its logical axes, or replicated when a mesh axis does not divide its dimension."""
  spec = sharding.logical_to_spec(tuple(logical_spec))
  return jax.sharding.NamedSharding(mesh, spec if _fits(shape, spec, mesh) else jax.sharding.PartitionSpec())


def hessian_trace(checkpoint: str, data: str, *, samples: int, batch_size: int, seq_len: Optional[int] = None,
                  probe: str = "gaussian", seed: int = 0, max_docs: int = 0, progress: bool = True,
                  log=print) -> dict:
  """Hutchinson's estimate of the Hessian trace of a checkpoint's loss on a data file (module docstring)."""
  if probe not in PROBES:
    raise ConfigError(f"--probe {probe!r} is not one of {', '.join(PROBES)}")
  if samples < 1 or batch_size < 1:
    raise ConfigError(f"--samples ({samples}) and --batch-size ({batch_size}) must be positive")
  pre = pretrained.load(checkpoint)
  cfg = analysis_config(pre.cfg)
  seq_len = seq_len or cfg.train.seq_len
  rows = scored_rows(pre, data, seq_len=seq_len, max_docs=max_docs, log=log)
  abstract = model_lib.abstract_model(cfg.model)[1]
  mesh, param_shardings, batch_sharding = placement(cfg, batch_size, log)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), pre.params)
  params = jax.device_put(params, param_shardings) if mesh is not None else jax.device_put(params)
  value_fn = _jitted_value(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True), cfg.loss.ignore_index, probe,
                           mesh)
  put = (lambda b: jax.device_put(b, batch_sharding)) if mesh is not None else jax.device_put
  batches = minibatches(lm_batch(rows.ids, rows.mask, cfg.loss.ignore_index), samples=samples,
                        batch_size=batch_size, seed=seed, put=put)
  estimate = hutchinson(value_fn, params, batches, seed=seed, progress=progress, total=samples)
  return {"trace": estimate.trace, "stderr": estimate.stderr, "samples": samples,
          "parameters": model_lib.param_count(abstract), "probe": probe, "batch_size": batch_size,
          "seq_len": seq_len, "seed": seed, "documents": int(len(rows.ids)), "checkpoint": checkpoint,
          "step": pre.step, "devices": 1 if mesh is None else int(mesh.size), "values": estimate.values}


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
  p = subparsers.add_parser("hessian-trace", help="Hutchinson estimate of the loss Hessian's trace (seed 003)",
                            description=cli_description(__doc__))
  p.add_argument("--checkpoint", required=True, help="run dir, RUN@STEP, RUN@all (every kept step: JSON {results: "
                                                      "[...]} and OUTPUT.png of the trace over steps) or HF model dir")
  p.add_argument("--data", required=True, help="JSONL (`text` or `ids`) or plain text, one document per line")
  p.add_argument("--samples", type=int, default=100, help="probes (= minibatches), default 100")
  p.add_argument("--batch-size", type=int, default=8, help="rows per minibatch, drawn with replacement")
  p.add_argument("--seq-len", type=int, default=None, help="row length (default: the run's train.seq_len)")
  p.add_argument("--probe", default="gaussian", choices=PROBES, help="probe distribution (IB: gaussian)")
  p.add_argument("--seed", type=int, default=0, help="seeds the minibatch draws and the probes")
  p.add_argument("--max-docs", type=int, default=0, help="first N documents only (0 = all)")
  p.add_argument("--output", required=True, help="JSON file to write")
  p.set_defaults(func=_cli)


def _cli(args) -> dict:
  from maxlm.analysis import series  # pylint: disable=import-outside-toplevel

  def line(r):
    err = f" +- {r['stderr']:.4g}" if r["stderr"] is not None else ""
    return f"trace {r['trace']:.6g}{err} ({r['samples']} {r['probe']} probes, {r['parameters']:,} parameters)"

  return series.report(args.checkpoint, args.output, lambda spec: hessian_trace(
      spec, args.data, samples=args.samples, batch_size=args.batch_size, seq_len=args.seq_len, probe=args.probe,
      seed=args.seed, max_docs=args.max_docs), line, dict(key="trace", ylabel="Hessian trace", err_key="stderr"))


def write_json(path: str, obj: dict) -> None:
  """The tools' JSON output, its directory created; a directory path is a DataError."""
  if os.path.isdir(path):
    raise DataError(f"--output {path} is a directory; give a JSON file name")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
