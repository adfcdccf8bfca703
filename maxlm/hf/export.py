"""`to-hf`: a maxlm checkpoint as a Hugging Face directory (config.json, safetensors shards of bounded size, tokenizer
files), streamed one tensor at a time; a LoRA checkpoint merged, or as a PEFT adapter directory (maxlm.hf.peft)."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from tqdm import tqdm

from maxlm import model as model_lib
from maxlm.checkpoint.spec import one_checkpoint, split_spec
from maxlm.checkpoint.tensors import CheckpointTensors
from maxlm.core import files
from maxlm.core.config import Config
from maxlm.core.errors import ConversionError
from maxlm.core.outputs import HF_EXPORT, atomic_output
from maxlm.core.trees import describe_mismatch, flat_tree
from maxlm.data_pipelines.tokenization import export_tokenizer
from maxlm.hf import names as hf_names
from maxlm.hf import peft
from maxlm.hf.config_map import hf_config
from maxlm.hf.tensors import DEFAULT_SHARD_BYTES, DTYPES, SafetensorsShards, np_dtype
from maxlm.state import lora


class MergedTensors:
  """A LoRA checkpoint's decoder tensors for `to-hf`, one at a time: the base's tensor (read as any checkpoint's)
  plus scale * A[l] @ B[l] on adapted projections. Host memory holds the adapters (megabytes) and one tensor."""

  def __init__(self, adapter_source, base_source, adapters: dict):
    self.config, self.step = adapter_source.config, adapter_source.step
    self.shapes = base_source.shapes
    self.base, self.adapters = base_source, adapters["layers"]

  def read(self, t) -> np.ndarray:
    w = np.asarray(self.base.read(t))
    if t.key[0] == "layers" and t.key[1] in self.adapters:
      ab = self.adapters[t.key[1]]
      w = lora.merged_weight(w, ab["a"][t.layer], ab["b"][t.layer], lora.scale(self.config))
    return w


def tensor_source(checkpoint_path: str, step: Optional[int] = None):
  """The decoder tensors of a checkpoint, read one at a time (CheckpointTensors); a LoRA checkpoint's are its base's
  with the adapters merged in (W + alpha/r * A @ B in maxlm's layout, i.e. W + alpha/r * B A in torch's)."""
  source = CheckpointTensors(checkpoint_path, step)
  if source.config.lora.rank <= 0:
    return source
  _, _, adapters, base = lora.read_adapters(checkpoint_path, source.step)
  base_path, base_step = split_spec(base)  # the step the adapters were trained on, when the run pinned it
  return MergedTensors(source, tensor_source(base_path, int(base_step) if base_step else None), adapters)


def to_hf(checkpoint_path: str, output: str, *, step: Optional[int] = None, dtype: Optional[str] = None,
          overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, adapter: bool = False,
          progress: bool = True, log=print) -> str:
  """Exports a run's checkpoint (`RUN` for its latest step, `RUN@STEP`, or `step`) as an HF directory; returns its
  path. dtype: of the written weights, default the checkpoint's parameter dtype (float32: transformers then gives
  maxlm's logits exactly). A LoRA run exports merged; with `adapter`, as a PEFT adapter directory instead
  (maxlm.hf.peft.export_peft).

  --overwrite replaces only an earlier export (never a run, an import or foreign files: maxlm.core.outputs)."""
  if dtype is not None and dtype not in DTYPES:
    raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
  checkpoint_path, step = one_checkpoint(checkpoint_path, step, error=ConversionError, what="export one step")
  if adapter:
    return peft.export_peft(checkpoint_path, output, step=step, dtype=dtype or "float32", overwrite=overwrite,
                            log=log)
  source = tensor_source(checkpoint_path, step)
  cfg = source.config
  if not cfg.model.causal:
    raise ConversionError(f"{checkpoint_path} is a bidirectional masked LM (model.causal=false); transformers' "
                          f"{cfg.model.family} classes are causal decoders and would run it with a causal mask, so "
                          "the export would not be the same function. Nothing was written")
  dtype = dtype or cfg.model.param_dtype
  out_dtype = np_dtype(dtype)
  problems = describe_mismatch(flat_tree(expected_shapes(cfg)),
                               flat_tree(source.shapes))
  if problems:
    raise ConversionError(f"checkpoint step {source.step} of {checkpoint_path} does not match its saved config: "
                          + "; ".join(problems))
  plan = hf_names.tensors(source.shapes, cfg.model.family)
  with atomic_output(output, HF_EXPORT, overwrite=overwrite) as tmp:
    bos, eos, note = export_tokenizer(cfg.data, tmp, vocab_size=cfg.model.vocab_size,
                                      max_positions=cfg.model.max_positions)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config(cfg, dtype=dtype, bos_id=bos, eos_id=eos), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}, f, indent=2)
    writer = SafetensorsShards(tmp, [(t.hf_name, t.shape) for t in plan], out_dtype.itemsize, max_shard_bytes)
    with tqdm(total=len(plan), desc="to-hf", unit="tensor", disable=not progress, dynamic_ncols=True) as bar:
      for t, array in hf_names.unstack(source.shapes, cfg.model.family, cfg.model.heads, source.read):
        writer.write(t.hf_name, np.asarray(array).astype(out_dtype, copy=False))
        bar.update(1)
    writer.close()
    with open(os.path.join(tmp, HF_EXPORT.marker), "w") as f:
      json.dump({"checkpoint": files.absolute(checkpoint_path), "step": source.step, "dtype": dtype,
                 "tokenizer": note}, f, indent=2)
  log(f"wrote {output}: {hf_names.ARCHITECTURES[cfg.model.family]}, step {source.step}, {dtype}, "
      f"{len(writer.files)} shard(s), {writer.total_bytes / 1e6:.1f} MB; {note}")
  return os.path.abspath(output)


def expected_shapes(cfg: Config) -> dict:
  """The decoder's parameter shapes (ShapeDtypeStructs) for a config's model section."""
  return model_lib.abstract_model(cfg.model)[1]
