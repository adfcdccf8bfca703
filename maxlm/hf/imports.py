"""`from-hf`: a Hugging Face directory read into maxlm's config and weights (in memory for analysis tools, or written
as a params-only checkpoint that checkpoint.init_from starts from), checked tensor by tensor against config.json."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from tqdm import tqdm

from maxlm import model as model_lib
from maxlm.checkpoint.params import save_params
from maxlm.core.config import Config, finalize, load_config
from maxlm.core.errors import ConversionError, DataError
from maxlm.core.outputs import HF_IMPORT, atomic_output, check_target
from maxlm.core.paths import tokenizer_file_in
from maxlm.data_pipelines.text_tokenizer import tokenizer_vocab_size
from maxlm.data_pipelines.tokenization import carry_tokenizer
from maxlm.hf import names as hf_names
from maxlm.hf.config_map import model_fields_from_hf
from maxlm.hf.tensors import HFTensors, np_dtype
from maxlm.state import registry


def read_hf_config(model_dir: str, *, config: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
  """The maxlm config of an HF directory: the model section from its config.json, the rest from `config` (a preset
  or YAML, default: base settings) and `overrides`."""
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  config_path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ConversionError(f"{model_dir} has no config.json: pass a local Hugging Face model directory "
                          "(nothing is downloaded)")
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except ValueError as e:
    raise ConversionError(f"{config_path} is not valid JSON: {e}") from None
  fields = model_fields_from_hf(hf, config_path)
  cfg = load_config(config or "base", list(overrides))
  for key, value in fields.items():
    setattr(cfg.model, key, value)
  if cfg.train.seq_len > cfg.model.max_positions:
    cfg.train.seq_len = cfg.model.max_positions  # the preset's context cannot exceed the imported model's
  return finalize(cfg)


def read_hf(model_dir: str, *, config: Optional[str] = None, overrides: tuple[str, ...] = (), progress: bool = False
            ) -> tuple[Config, dict, dict]:
  """(config, params as host numpy arrays, frozen entries) of an HF directory of a supported family (maxlm.hf.names),
  checked tensor by tensor against its config.json; nothing is written. EMO's fixed cost embedding is the head at
  import. `progress`: a bar on stderr over the tensors read."""
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  cfg = read_hf_config(model_dir, config=config, overrides=overrides)
  shapes = model_lib.abstract_model(cfg.model)[1]
  source = HFTensors(model_dir)
  names = hf_names.names_of(cfg.model.family)
  plan = hf_names.tensors(shapes, cfg.model.family)
  wanted, available = {t.hf_name for t in plan}, set(source.names())
  missing = sorted(wanted - available)
  if missing:
    raise ConversionError(f"{model_dir} lacks {len(missing)} tensor(s) its config.json implies: "
                          f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
  head = names.top["lm_head"]
  tied_head = cfg.model.tie_embeddings and head in available
  unexpected = sorted(n for n in available - wanted if not n.endswith(names.ignored_suffixes)
                      and not (tied_head and n == head))
  if unexpected:
    raise ConversionError(f"{model_dir} has tensors maxlm's {cfg.model.family} model has no place for "
                          f"(biases? another architecture?): {', '.join(unexpected[:6])}")
  for t in plan:
    shape = source.shape(t.hf_name)
    if shape != t.shape:
      what = "vocab mismatch: " if t.key[0] in ("embed", "lm_head") else ""
      raise ConversionError(f"{what}tensor {t.hf_name} has shape {shape} but config.json implies {t.shape} "
                            f"(vocab_size {cfg.model.vocab_size}, hidden {cfg.model.hidden})")
  with tqdm(total=len(plan), desc="from-hf", unit="tensor", disable=not progress, dynamic_ncols=True) as bar:

    def read(t):
      array = source.read(t.hf_name)
      bar.update(1)
      return array

    params = hf_names.stack(shapes, cfg.model.family, cfg.model.heads, read, dtype=np_dtype(cfg.model.param_dtype))
  # Saved frozen entries derived from the weights (EMO's fixed cost embedding: the head at import, never trained).
  extras = {name: np.asarray(entry.from_params(params)) for name, entry in registry.frozen_entries(cfg).items()
            if entry.from_params is not None and entry.saved}
  main_file = tokenizer_file_in(model_dir)
  if main_file and not cfg.data.tokenizer:
    cfg.data.tokenizer = main_file
  check_tokenizer_fits(cfg, model_dir)
  return cfg, params, extras


def check_tokenizer_fits(cfg: Config, model_dir: str) -> None:
  """A tokenizer with more entries than the model's embedding is not the model's: its high ids would index past
  the table (transformers raises an IndexError on them; a jnp gather would silently read another row)."""
  if not cfg.data.tokenizer or not os.path.isfile(cfg.data.tokenizer):
    return
  try:
    size = tokenizer_vocab_size(cfg.data.tokenizer)
  except DataError:
    return  # a tokenizer file maxlm cannot read: text tools say so when they need it
  if size > cfg.model.vocab_size:
    raise ConversionError(f"{model_dir}: its tokenizer ({cfg.data.tokenizer}) has {size} tokens but config.json's "
                          f"vocab_size is {cfg.model.vocab_size}: they do not belong together. Put the model's own "
                          "tokenizer beside it, or name the right one with data.tokenizer=PATH")


def from_hf(model_dir: str, output: str, *, config: Optional[str] = None, overrides: tuple[str, ...] = (),
            overwrite: bool = False, progress: bool = True, log=print) -> Config:
  """Imports an HF directory of a supported family (docs/FAMILIES.md) as a params-only maxlm checkpoint (step 0)
  under `output`, with its tokenizer files copied into output/tokenizer/. --overwrite replaces only an earlier
  import."""
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  output_abs = os.path.abspath(os.path.expanduser(output))
  check_target(output_abs, HF_IMPORT, overwrite)  # before reading gigabytes
  cfg, params, extras = read_hf(model_dir, config=config, overrides=overrides, progress=progress)
  with atomic_output(output_abs, HF_IMPORT, overwrite=overwrite) as tmp:
    carry_tokenizer(cfg.data, tmp, output_abs)  # the run keeps its own copy of the tokenizer
    cfg.run.dir = output_abs
    save_params(tmp, cfg, params, extras=extras, step=0)
    with open(os.path.join(tmp, HF_IMPORT.marker), "w") as f:
      json.dump({"source": model_dir, "architecture": hf_names.ARCHITECTURES[cfg.model.family],
                 "extras": sorted(extras)}, f, indent=2)
  log(f"wrote {output_abs}: {hf_names.ARCHITECTURES[cfg.model.family]} from {model_dir}"
      f"{' with the EMO cost embedding' if extras else ''}; continue training with "
      f"checkpoint.init_from={output_abs}")
  return cfg
