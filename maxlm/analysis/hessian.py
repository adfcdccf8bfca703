"""Hessian trace: Hutchinson's estimate of tr(H) of the mean valid-token CE of minibatches, HVPs forward-over-reverse
in fp32 (Liuhong99/implicitbiasmlmcode pcfg/calculate_hessian.py; docs/IMPLICIT_BIAS.md).

Estimator: sample i draws a minibatch of `batch_size` rows with replacement (numpy, seeded) and a Hutchinson vector
v_i over all parameters (Gaussian as the original code, or Rademacher; jax.random.fold_in(key(seed), i)); its value
is v_i^T H_i v_i with H_i the Hessian of that minibatch's loss. trace = mean of the values, stderr = their sample
std (ddof 1) / sqrt(samples): it covers both the vector and the minibatch noise. The expectation is
E_batch[tr H_batch]: for rows of equal length that is the trace of the Hessian of the mean CE over all rows.
Loss: the model's fp32 logits and maxlm.losses.cross_entropy (the reference; the fused kernel's custom VJP has no
second-order rule), labels = input ids as transformers scores them (T-1 predictions, pad targets ignored). Attention
runs on the XLA path, which forward-mode autodiff goes through (cuDNN's fused kernel has a custom VJP only).
The CLI calls the vector distribution `--probe` (and the JSON "probe"), as the original code does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from maxlm import losses
from maxlm import model as model_lib
from maxlm.analysis.common import analysis_config, batch_mesh, lm_batch, load_on_mesh, masking_of, report
from maxlm.analysis.common import scored_rows, scoring_batch
from maxlm.core import sharding
from maxlm.core.compile_cache import CompileCache
from maxlm.core.config import Config
from maxlm.core.errors import ConfigError, cli_description

VECTOR_KINDS = ("gaussian", "rademacher")  # distributions of the Hutchinson vectors


# ----------------------------------------------------------------------------- Hutchinson


def hutchinson_vector(key: jax.Array, params, kind: str):
  """A random tree shaped like `params` (fp32): standard normal entries, or +-1 with equal probability."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  if kind == "gaussian":
    draws = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  elif kind == "rademacher":
    draws = [jax.random.rademacher(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  else:
    raise ConfigError(f"--probe {kind!r} is not one of {', '.join(VECTOR_KINDS)}")
  return jax.tree.unflatten(treedef, draws)


def quadratic_form(loss_fn: Callable, kind: str) -> Callable:
  """(params, batch, key) -> v^T H v for one Hutchinson vector v of `kind`, H the Hessian of loss_fn(params, batch)
  in params; the HVP is jax.jvp of jax.grad (forward over reverse), so no Hessian is ever formed."""

  def value(params, batch, key):
    v = hutchinson_vector(key, params, kind)
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
  """The estimate over `batches` (one vector each, key fold_in(key(seed), i)); value_fn as quadratic_form returns."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  base = jax.random.key(seed)
  values = []
  bar = tqdm(batches, desc="hessian trace", unit="vector", total=total, disable=not progress)
  for i, batch in enumerate(bar):
    values.append(float(value_fn(params, batch, jax.random.fold_in(base, i))))
    bar.set_postfix(trace=f"{np.mean(values):.4g}")
  bar.close()
  return TraceEstimate(values)


def minibatches(batch: dict, *, samples: int, batch_size: int, seed: int, put: Callable = lambda b: b,
                transform: Optional[Callable] = None):
  """`samples` minibatches of `batch_size` rows drawn with replacement (np.random.default_rng(seed)); minibatch i
  passes through transform(rows, i) when given (a masked LM's masking, fixed by the seed and i)."""
  rng = np.random.default_rng(seed)
  n = len(next(iter(batch.values())))
  for i in range(samples):
    rows = rng.choice(n, batch_size, replace=True)
    chosen = {k: v[rows] for k, v in batch.items()}
    yield put(transform(chosen, i) if transform is not None else chosen)


# ----------------------------------------------------------------------------- model and tool


def model_loss(cfg: Config, graphdef) -> Callable:
  """loss(params, batch) = mean valid-token CE of fp32 logits through the reference loss (maxlm.losses); a batch's
  segment ids (a masked LM's: padding apart) mask attention."""

  def loss(params, batch):
    logits_BxTxV = model_lib.bind(graphdef, params).logits(batch["inputs"], segment_ids_BxT=batch.get("segment_ids"),
                                                           compute_dtype=jnp.float32)
    return losses.cross_entropy(logits_BxTxV, batch["targets"], ignore_index=cfg.loss.ignore_index)[0]

  return loss


def _build_value(model_cfg, ignore_index: int, kind: str, mesh):
  """The jitted v^T H v of one model on `mesh`."""
  cfg = Config(model=model_cfg)
  cfg.loss.ignore_index = ignore_index
  loss_fn = model_loss(cfg, model_lib.abstract_model(model_cfg)[0])

  def value(params, batch, key):
    with sharding.activate(mesh):
      return quadratic_form(loss_fn, kind)(params, batch, key)

  return jax.jit(value)


# One compile per (model, ignore index, vector kind, mesh): several checkpoints of a run, or tests, share it.
VALUE_FUNCTIONS = CompileCache(_build_value)


def hessian_trace(checkpoint: str, data: str, *, samples: int, batch_size: int, seq_len: Optional[int] = None,
                  probe: str = "gaussian", seed: int = 0, max_docs: int = 0, progress: bool = True,
                  log=print) -> dict:
  """Hutchinson's estimate of the Hessian trace of a checkpoint's loss on a data file (module docstring); `probe`
  is the distribution of the Hutchinson vectors (VECTOR_KINDS), named as the CLI's --probe."""
  vector_kind = probe
  if vector_kind not in VECTOR_KINDS:
    raise ConfigError(f"--probe {vector_kind!r} is not one of {', '.join(VECTOR_KINDS)}")
  if samples < 1 or batch_size < 1:
    raise ConfigError(f"--samples ({samples}) and --batch-size ({batch_size}) must be positive")
  pre, mesh = load_on_mesh(checkpoint, lambda cfg: batch_mesh(cfg, batch_size, log), dtype=jnp.float32)
  cfg = analysis_config(pre.cfg)
  seq_len = seq_len or cfg.train.seq_len
  rows = scored_rows(pre, data, seq_len=seq_len, max_docs=max_docs, log=log)
  value_fn = VALUE_FUNCTIONS(cfg.model, cfg.loss.ignore_index, vector_kind, mesh)
  put = lambda b: {k: sharding.put_batch(v, mesh) for k, v in b.items()}
  if masking_of(cfg) is None:
    batches = minibatches(lm_batch(rows.ids, rows.mask, cfg.loss.ignore_index), samples=samples,
                          batch_size=batch_size, seed=seed, put=put)
  else:  # a masked LM: masked-token CE, each minibatch masked from (seed, i), as IB's fixed masks per row
    batches = minibatches({"ids": rows.ids, "mask": rows.mask}, samples=samples, batch_size=batch_size, seed=seed,
                          put=put, transform=lambda b, i: scoring_batch(cfg, b["ids"], b["mask"], seed=seed, index=i))
  estimate = hutchinson(value_fn, pre.params, batches, seed=seed, progress=progress, total=samples)
  return {"trace": estimate.trace, "stderr": estimate.stderr, "samples": samples,
          "parameters": model_lib.param_count(model_lib.abstract_model(cfg.model)[1]), "probe": vector_kind,
          "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "documents": int(len(rows.ids)),
          "loss": "next-token CE" if cfg.model.causal else "masked-token CE",
          "checkpoint": checkpoint, "step": pre.step, "devices": int(mesh.size), "values": estimate.values}


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
  p = subparsers.add_parser("hessian-trace", help="Hutchinson estimate of the loss Hessian's trace (implicit bias)",
                            description=cli_description(__doc__))
  p.add_argument("--checkpoint", required=True, help="run dir, RUN@STEP, RUN@all (every kept step: JSON {results: "
                                                      "[...]} and OUTPUT.png of the trace over steps) or HF model dir")
  p.add_argument("--data", required=True, help="JSONL (`text` or `ids`) or plain text, one document per line")
  p.add_argument("--samples", type=int, default=100, help="Hutchinson vectors (= minibatches), default 100")
  p.add_argument("--batch-size", type=int, default=8, help="rows per minibatch, drawn with replacement")
  p.add_argument("--seq-len", type=int, default=None, help="row length (default: the run's train.seq_len)")
  p.add_argument("--probe", default="gaussian", choices=VECTOR_KINDS,
                 help="distribution of the Hutchinson vectors (the original code: gaussian)")
  p.add_argument("--seed", type=int, default=0, help="seeds the minibatch draws and the vectors")
  p.add_argument("--max-docs", type=int, default=0, help="first N documents only (0 = all)")
  p.add_argument("--output", required=True, help="JSON file to write (a new file)")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier output of this tool")
  p.set_defaults(func=_cli)


def _cli(args) -> dict:

  def line(r):
    err = f" +- {r['stderr']:.4g}" if r["stderr"] is not None else ""
    return f"trace {r['trace']:.6g}{err} ({r['samples']} {r['probe']} probes, {r['parameters']:,} parameters)"

  # The line keeps the original output's words: "N gaussian probes".
  return report(args.checkpoint, args.output, lambda spec: hessian_trace(
      spec, args.data, samples=args.samples, batch_size=args.batch_size, seq_len=args.seq_len, probe=args.probe,
      seed=args.seed, max_docs=args.max_docs), line, dict(key="trace", ylabel="Hessian trace", err_key="stderr"),
      command="maxlm.analyze hessian-trace", overwrite=args.overwrite)
