"""Resuscitation (kaistAI/Knowledge-Entropy analysis/change_parameters.py; docs/KNOWLEDGE.md): scale up the FFN units
a checkpoint barely uses, into a new params-only checkpoint that `checkpoint.init_from` starts from (step 0, fresh
optimizer).

Per layer l: thr = quantile(A_l, p) (linear interpolation); units with A_l,i <= thr (ties included) get their UP
projection output column (and its bias, in families with one: GELU's whole pre-activation) multiplied by
u_i = q * mean(A_l) / A_l,i (mean over all m units); nothing else changes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import numpy as np

from maxlm.checkpoint import params as ckpt_params
from maxlm.data_pipelines.tokenization import carry_tokenizer
from maxlm.core.errors import ConfigError, DataError, cli_description

def check_ratio_factor(ratio: float, factor: float) -> None:
  if not 0.0 < ratio < 1.0:
    raise ConfigError(f"--ratio {ratio} must lie strictly between 0 and 1 (the share of units to resuscitate; "
                      "the paper uses 0.5)")
  if not (math.isfinite(factor) and factor > 0):
    raise ConfigError(f"--factor {factor} must be a positive number (the paper uses 1, 2 or 3)")


def resuscitation_scales(coefficients_LxF: np.ndarray, ratio: float, factor: float) -> tuple[np.ndarray, np.ndarray]:
  """(scales (L, F) float64, 1 where a unit is not selected; selected (L, F) bool) for A, p = ratio, q = factor."""
  check_ratio_factor(ratio, factor)
  a = np.asarray(coefficients_LxF, np.float64)
  threshold_L = np.quantile(a, ratio, axis=1, method="linear")
  selected = a <= threshold_L[:, None]
  zero = np.argwhere(selected & (a == 0))
  if zero.size:
    layer, unit = (int(v) for v in zero[0])
    raise DataError(f"coefficient A[{layer}, {unit}] is 0 among the selected units ({len(zero)} such), so its scale "
                    "q * mean / A is infinite: that unit never fired on the data. Recompute the coefficients on "
                    "more or longer documents (knowledge-entropy --max-docs / --seq-len) or lower --ratio")
  scales = np.ones_like(a)
  mean_L = a.mean(axis=1, keepdims=True)
  scales[selected] = (factor * np.broadcast_to(mean_L, a.shape) / np.where(a == 0, 1.0, a))[selected]
  return scales, selected


def check_coefficients(coefficients: np.ndarray, model_cfg, where: str) -> None:
  expected = (model_cfg.layers, model_cfg.ffn)
  if coefficients.shape != expected:
    raise DataError(f"{where} has shape {coefficients.shape} but the model has (layers, ffn) = {expected}: compute "
                    "the coefficients of this checkpoint with `python -m maxlm.analyze knowledge-entropy`")
  if not np.all(np.isfinite(coefficients)) or np.any(coefficients < 0):
    raise DataError(f"{where} holds negative or non-finite values; coefficients are means of |a| (>= 0): recompute "
                    "them with `python -m maxlm.analyze knowledge-entropy`")


def resuscitate_params(model_cfg, params: dict, coefficients_LxF: np.ndarray, ratio: float, factor: float
                       ) -> tuple[dict, np.ndarray]:
  """(new params with layers.up_proj (L, D, F) columns scaled, selected mask (L, F)); the input is not modified."""
  check_coefficients(np.asarray(coefficients_LxF), model_cfg, "the coefficients")
  scales, selected = resuscitation_scales(coefficients_LxF, ratio, factor)
  up_LxDxF = np.asarray(params["layers"]["up_proj"])
  scaled = (up_LxDxF.astype(np.float64) * scales[:, None, :]).astype(up_LxDxF.dtype)
  layers = dict(params["layers"], up_proj=scaled)
  if "up_bias" in layers:  # GPT-2 / GPT-NeoX: the unit's whole pre-activation (fc_in x + b) is scaled
    bias_LxF = np.asarray(layers["up_bias"])
    layers["up_bias"] = (bias_LxF.astype(np.float64) * scales).astype(bias_LxF.dtype)
  return dict(params, layers=layers), selected


# ----------------------------------------------------------------------------- the derived checkpoint


def resuscitate(checkpoint: str, coefficients: str, *, ratio: float, factor: float, output: str,
                overwrite: bool = False, log: Callable = print) -> dict:
  """Writes OUTPUT: the checkpoint's params with resuscitated units, its config and tokenizer (so `to-hf`,
  `evaluate` and `checkpoint.init_from` work on it). Returns what the marker file records."""
  from maxlm import pretrained  # pylint: disable=import-outside-toplevel
  from maxlm.core.outputs import DERIVED_RUN, atomic_output  # pylint: disable=import-outside-toplevel
  check_ratio_factor(ratio, factor)  # argument errors before anything is read
  if not os.path.isfile(coefficients):
    raise DataError(f"--coefficients {coefficients!r} does not exist: pass an (L, m) .npy written by "
                    "`python -m maxlm.analyze knowledge-entropy`")
  try:
    a = np.load(coefficients)
  except (OSError, ValueError) as e:
    raise DataError(f"--coefficients {coefficients} is not a readable .npy array: {e}") from None
  loaded = pretrained.load(checkpoint)
  check_coefficients(a, loaded.cfg.model, coefficients)
  params, selected = resuscitate_params(loaded.cfg.model, loaded.params, a, ratio, factor)
  cfg = loaded.cfg
  output = os.path.abspath(os.path.expanduser(output))
  record = {"source": os.path.abspath(os.path.expanduser(pretrained.split_spec(checkpoint)[0])),
            "step": loaded.step, "coefficients": os.path.abspath(coefficients), "ratio": ratio, "factor": factor,
            "selected_per_layer": [int(s) for s in selected.sum(axis=1)]}
  with atomic_output(output, DERIVED_RUN, overwrite=overwrite) as tmp:
    source = carry_tokenizer(cfg.data, tmp, output)
    record["tokenizer"] = f"copied from {source}" if source else "travels with the data spec (PCFG or token store)"
    cfg.run.dir = output
    cfg.checkpoint.init_from = ""  # the derived checkpoint is itself the starting point
    ckpt_params.save_params(tmp, cfg, params, extras=loaded.frozen, step=0)
    with open(os.path.join(tmp, DERIVED_RUN.marker), "w") as f:
      json.dump(dict(record, tool="resuscitate"), f, indent=2)
  log(f"wrote {output}: {sum(record['selected_per_layer'])} units resuscitated over {len(selected)} layers "
      f"(p={ratio}, q={factor}); continue training with checkpoint.init_from={output}")
  return record


def _cli(args) -> None:
  resuscitate(args.checkpoint, args.coefficients, ratio=args.ratio, factor=args.factor, output=args.output,
              overwrite=args.overwrite)


def add_parser(subparsers) -> None:
  p = subparsers.add_parser("resuscitate", help="scale up rarely used FFN units into a new checkpoint (KE)",
                            description=cli_description(__doc__))
  p.add_argument("--checkpoint", required=True, help="run dir, RUN@STEP or HF model directory")
  p.add_argument("--coefficients", required=True, help="(layers, ffn) .npy from `knowledge-entropy` for that model")
  p.add_argument("--ratio", type=float, required=True, help="p: share of units per layer to resuscitate, in (0, 1)")
  p.add_argument("--factor", type=float, required=True, help="q: selected units get q * mean(A_l) / A_l,i")
  p.add_argument("--output", required=True, help="new run directory for the params-only checkpoint")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier derived checkpoint")
  p.set_defaults(func=_cli)
