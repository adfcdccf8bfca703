"""Conversion between maxlm checkpoints and Hugging Face directories (LlamaForCausalLM, OlmoForCausalLM).

to-hf streams tensors from the checkpoint into safetensors shards (the safetensors library) of bounded size;
outputs appear only when complete. from-hf reads an HF directory (also in memory, for analysis tools).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np

from maxlm import checkpoint, hf_names
from maxlm.config import Config, check_command_line_overrides, finalize, load_config
from maxlm.data_pipelines.tokenization import carry_tokenizer, export_tokenizer, tokenizer_file_in
from maxlm.errors import CheckpointError, ConversionError, DataError, cli_description, cli_exit_code
from maxlm.outputs import HF_EXPORT, HF_IMPORT, atomic_output

DTYPES = ("float32", "bfloat16", "float16")
INDEX = "model.safetensors.index.json"
# A shard is held in host memory until it is written: 256 MiB keeps export near one large tensor (a 7B embedding
# is 262 MB in bf16, so it gets a shard of its own) while a 7B export has ~55 files.
DEFAULT_SHARD_BYTES = 256 * 1024 ** 2


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (ships with jax)
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


# ----------------------------------------------------------------------------- safetensors


class SafetensorsShards:
  """Writes named tensors in a known order into safetensors shards plus their index; each shard is written by
  `safetensors.numpy.save_file` as soon as its last tensor arrives, so host memory holds at most one shard
  (max_shard_bytes, or a single larger tensor)."""

  def __init__(self, directory: str, plan: list[tuple[str, tuple[int, ...]]], itemsize: int, max_shard_bytes: int):
    self.directory = directory
    self.shards: list[list[str]] = [[]]
    size = 0
    for name, shape in plan:
      nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
      if self.shards[-1] and size + nbytes > max_shard_bytes:
        self.shards.append([])
        size = 0
      self.shards[-1].append(name)
      size += nbytes
    n = len(self.shards)
    self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    self.shapes = dict(plan)
    self.total_bytes = sum(int(np.prod(shape, dtype=np.int64)) * itemsize for _, shape in plan)
    self._shard, self._pending = 0, {}

  def write(self, name: str, array: np.ndarray) -> None:
    expected = self.shards[self._shard][len(self._pending)]
    if name != expected or tuple(array.shape) != tuple(self.shapes[name]):
      raise ValueError(f"tensor {name} {array.shape} written out of plan (expected {expected} {self.shapes[expected]})")
    self._pending[name] = np.ascontiguousarray(array)
    if len(self._pending) == len(self.shards[self._shard]):
      from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
      save_file(self._pending, os.path.join(self.directory, self.files[self._shard]), metadata={"format": "pt"})
      self._shard, self._pending = self._shard + 1, {}

  def close(self) -> None:
    if self._shard != len(self.shards):
      raise ValueError(f"{len(self.shards) - self._shard} planned shard(s) were not completed")
    index = {"metadata": {"total_size": self.total_bytes},
             "weight_map": {name: self.files[i] for i, names in enumerate(self.shards) for name in names}}
    with open(os.path.join(self.directory, INDEX), "w") as f:
      json.dump(index, f, indent=2)


class HFTensors:
  """Lazy reader of an HF model directory's weights: safetensors (safetensors.safe_open) or, with torch, *.bin."""

  def __init__(self, model_dir: str):
    from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel
    self.model_dir = model_dir
    self.where: dict[str, str] = {}
    self._torch_state = None
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    for f in files:
      path = os.path.join(model_dir, f)
      try:
        with safe_open(path, framework="numpy") as handle:
          self.where.update({name: path for name in handle.keys()})
      except (OSError, SafetensorError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable safetensors file: {e}") from None
    if not files:
      self._load_torch_bins(model_dir)

  def _load_torch_bins(self, model_dir: str) -> None:
    bins = sorted(f for f in os.listdir(model_dir) if f.endswith(".bin") and f.startswith("pytorch_model"))
    if not bins:
      raise ConversionError(f"no weights in {model_dir}: expected *.safetensors (or pytorch_model*.bin)")
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConversionError(f"{model_dir} holds pytorch_model*.bin weights, which need torch: pip install "
                            "'maxlm[hf]' (or convert them to safetensors)") from None
    self._torch_state = {}
    for f in bins:
      self._torch_state.update(torch.load(os.path.join(model_dir, f), map_location="cpu", weights_only=True))
    self.where = {k: "" for k in self._torch_state}

  def names(self) -> list[str]:
    return list(self.where)

  def shape(self, name: str) -> tuple[int, ...]:
    if self._torch_state is not None:
      return tuple(self._torch_state[name].shape)
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(self.where[name], framework="numpy") as handle:
      return tuple(handle.get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    if name not in self.where:
      raise ConversionError(f"tensor {name} is missing from {self.model_dir}")
    if self._torch_state is not None:
      return self._torch_state[name].float().numpy()
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(self.where[name], framework="numpy") as handle:
      try:
        return handle.get_tensor(name)
      except (TypeError, ValueError) as e:
        raise ConversionError(f"tensor {name} in {self.where[name]} cannot be read: {e}") from None


# ----------------------------------------------------------------------------- checkpoint, streamed


class CheckpointTensors:
  """Reads params of one checkpoint step slice by slice (one layer of a stacked array) through tensorstore,
  so export holds one tensor in host memory rather than the model."""

  def __init__(self, run_dir: str, step: Optional[int] = None):
    ckpt = checkpoint.open_checkpoints(run_dir)
    try:
      self.step = ckpt.resolve_step(step)
      self.config = ckpt.config(self.step)
      md = ckpt.state_metadata(self.step)  # a CheckpointError on a corrupt or partial step
    finally:
      ckpt.close()
    if "params" not in md.tree:
      raise CheckpointError(f"checkpoint step {self.step} under {run_dir} holds no params")
    self.shapes = md.tree["params"]
    self.state_dir = os.path.join(ckpt.directory, str(self.step), "state")
    self.driver = "zarr3" if getattr(md, "use_zarr3", False) else "zarr"
    self._fallback = None

  def read(self, t: hf_names.Tensor) -> np.ndarray:
    meta = self.shapes
    for k in t.key:
      meta = meta[k]
    try:
      import tensorstore as ts  # pylint: disable=import-outside-toplevel
      store = ts.open({"driver": self.driver, "kvstore": {"driver": "ocdbt", "base": f"file://{self.state_dir}",
                                                          "path": meta.name}}, read=True).result()
      return store[t.layer].read().result() if t.layer is not None else store.read().result()
    except Exception:  # pylint: disable=broad-except
      # A layout tensorstore cannot open directly (a future orbax format): fall back to orbax's own restore of
      # the params, which holds the whole model in memory but reads anything orbax wrote.
      if self._fallback is None:
        self._fallback = checkpoint.load_params(os.path.dirname(os.path.dirname(self.state_dir)), self.step)[1]
      array = self._fallback
      for k in t.key:
        array = array[k]
      return np.asarray(array[t.layer] if t.layer is not None else array)


# ----------------------------------------------------------------------------- configs


def hf_config(cfg: Config, *, dtype: str, bos_id: Optional[int], eos_id: Optional[int]) -> dict:
  m = cfg.model
  if m.family not in hf_names.ARCHITECTURES:
    raise ConversionError(f"model.family {m.family!r} has no HF export; supported: "
                          f"{', '.join(hf_names.ARCHITECTURES)}")
  head_dim = cfg.head_dim
  out = {
      "architectures": [hf_names.ARCHITECTURES[m.family]],
      "model_type": m.family,
      "vocab_size": m.vocab_size,
      "hidden_size": m.hidden,
      "intermediate_size": m.ffn,
      "num_hidden_layers": m.layers,
      "num_attention_heads": m.heads,
      "num_key_value_heads": cfg.kv_heads,
      "max_position_embeddings": m.max_positions,
      # transformers >= 5 reads rope_parameters, 4.x reads rope_theta: write both.
      "rope_theta": m.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
      "rope_scaling": None,
      "hidden_act": "silu",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "tie_word_embeddings": m.tie_embeddings,
      "initializer_range": m.init_std,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": None,
      "use_cache": True,
      "dtype": dtype,
      "torch_dtype": dtype,
  }
  if m.family == "llama":
    out.update(head_dim=head_dim, rms_norm_eps=m.norm_eps, mlp_bias=False, pretraining_tp=1)
  else:
    if head_dim * m.heads != m.hidden:
      raise ConversionError(f"OlmoForCausalLM needs head_dim = hidden / heads; this model has head_dim "
                            f"{head_dim}, hidden {m.hidden}, heads {m.heads}")
    out.update(clip_qkv=m.clip_qkv)
  return out


def model_fields_from_hf(hf: dict, where: str) -> dict:
  """The model.* config values of an HF config.json, refusing features maxlm's model does not implement."""
  archs = hf.get("architectures") or []
  arch = archs[0] if archs else None
  family = hf_names.FAMILIES.get(arch) or (hf.get("model_type") if hf.get("model_type") in hf_names.ARCHITECTURES
                                           and not arch else None)
  if family is None:
    raise ConversionError(f"{where}: architecture {arch or hf.get('model_type')!r} is not supported; supported: "
                          f"{', '.join(hf_names.FAMILIES)}")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  rope_type = rope.get("rope_type") or rope.get("type") or (scaling or {}).get("rope_type") or \
      (scaling or {}).get("type") or "default"
  unsupported = []
  if rope_type != "default":
    unsupported.append(f"rope scaling {rope_type!r}")
  if hf.get("hidden_act", "silu") != "silu":
    unsupported.append(f"hidden_act {hf['hidden_act']!r}")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      unsupported.append(f"{flag} = true")
  if hf.get("sliding_window") and family == "llama":
    unsupported.append("sliding-window attention")
  if unsupported:
    raise ConversionError(f"{where}: {', '.join(unsupported)} is not supported by maxlm's {family} model")
  try:
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    fields = {
        "family": family,
        "vocab_size": int(hf["vocab_size"]),
        "hidden": hidden,
        "layers": int(hf["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(hf.get("num_key_value_heads") or heads),
        "ffn": int(hf["intermediate_size"]),
        "max_positions": int(hf.get("max_position_embeddings", 2048)),
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "clip_qkv": float(hf["clip_qkv"]) if hf.get("clip_qkv") is not None else None,
    }
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"{where}: missing or invalid field {e}") from None
  if hf.get("initializer_range") is not None:
    fields["init_std"] = float(hf["initializer_range"])  # only matters for layers a user adds later
  head_dim = int(hf.get("head_dim") or hidden // heads)
  fields["head_dim"] = 0 if head_dim * heads == hidden else head_dim
  if family == "llama":
    fields["norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
  return fields


# ----------------------------------------------------------------------------- to-hf


def tensor_source(checkpoint_path: str, step: Optional[int] = None):
  """The decoder tensors of a checkpoint, read one at a time (CheckpointTensors); a LoRA checkpoint's are its base's
  with the adapters merged in (W + alpha/r * A @ B in maxlm's layout, i.e. W + alpha/r * B A in torch's)."""
  source = CheckpointTensors(checkpoint_path, step)
  if source.config.lora.rank <= 0:
    return source
  from maxlm import lora  # pylint: disable=import-outside-toplevel
  _, _, adapters, base = lora.read_adapters(checkpoint_path, source.step)
  return lora.MergedTensors(source, tensor_source(base), adapters)


def checkpoint_step(checkpoint_path: str, step: Optional[int]) -> tuple[str, Optional[int]]:
  """(run directory, step) of `RUN` or `RUN@STEP` and an optional --step (the two must agree)."""
  from maxlm.pretrained import split_spec  # pylint: disable=import-outside-toplevel
  path, at = split_spec(checkpoint_path)
  if at == "all":
    raise ConversionError(f"--checkpoint {checkpoint_path!r}: export one step (RUN@STEP or --step), not @all")
  if at is not None:
    if step is not None and step != int(at):
      raise ConversionError(f"--checkpoint {checkpoint_path!r} and --step {step} name different steps: give one")
    step = int(at)
  return path, step


def to_hf(checkpoint_path: str, output: str, *, step: Optional[int] = None, dtype: Optional[str] = None,
          overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, adapter: bool = False,
          log=print) -> str:
  """Exports a run's checkpoint (`RUN` for its latest step, `RUN@STEP`, or `step`) as an HF directory; returns its
  path. dtype: of the written weights, default the checkpoint's parameter dtype (float32: transformers then gives
  maxlm's logits exactly). A LoRA run exports merged; with `adapter`, as a PEFT adapter directory instead
  (maxlm.lora.export_peft).

  --overwrite replaces only an earlier export (never a run, an import or foreign files: maxlm.outputs)."""
  if dtype is not None and dtype not in DTYPES:
    raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
  checkpoint_path, step = checkpoint_step(checkpoint_path, step)
  if adapter:
    from maxlm import lora  # pylint: disable=import-outside-toplevel
    return lora.export_peft(checkpoint_path, output, step=step, dtype=dtype or "float32", overwrite=overwrite,
                            log=log)
  source = tensor_source(checkpoint_path, step)
  cfg = source.config
  dtype = dtype or cfg.model.param_dtype
  out_dtype = _np_dtype(dtype)
  problems = checkpoint.describe_mismatch(checkpoint.flat_tree(_expected_shapes(cfg)),
                                          checkpoint.flat_tree(source.shapes))
  if problems:
    raise ConversionError(f"checkpoint step {source.step} of {checkpoint_path} does not match its saved config: "
                          + "; ".join(problems))
  plan = hf_names.tensors(source.shapes)
  with atomic_output(output, HF_EXPORT, overwrite=overwrite) as tmp:
    bos, eos, note = export_tokenizer(cfg.data, tmp, vocab_size=cfg.model.vocab_size,
                                      max_positions=cfg.model.max_positions)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config(cfg, dtype=dtype, bos_id=bos, eos_id=eos), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}, f, indent=2)
    writer = SafetensorsShards(tmp, [(t.hf_name, t.shape) for t in plan], out_dtype.itemsize, max_shard_bytes)
    for t, array in hf_names.unstack(source.shapes, source.read):
      writer.write(t.hf_name, np.asarray(array).astype(out_dtype, copy=False))
    writer.close()
    with open(os.path.join(tmp, HF_EXPORT.marker), "w") as f:
      json.dump({"checkpoint": os.path.abspath(checkpoint_path), "step": source.step, "dtype": dtype,
                 "tokenizer": note}, f, indent=2)
  log(f"wrote {output}: {hf_names.ARCHITECTURES[cfg.model.family]}, step {source.step}, {dtype}, "
      f"{len(writer.files)} shard(s), {writer.total_bytes / 1e6:.1f} MB; {note}")
  return os.path.abspath(output)


def _expected_shapes(cfg: Config) -> dict:
  from maxlm.model import abstract_model  # pylint: disable=import-outside-toplevel
  return abstract_model(cfg.model)[1]


# ----------------------------------------------------------------------------- from-hf


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


def read_hf(model_dir: str, *, config: Optional[str] = None, overrides: tuple[str, ...] = ()
            ) -> tuple[Config, dict, dict]:
  """(config, params as host numpy arrays, frozen entries) of an HF LLaMA / OLMo v1 directory, checked tensor by
  tensor against its config.json; nothing is written. EMO's fixed cost embedding is the head at import."""
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  cfg = read_hf_config(model_dir, config=config, overrides=overrides)
  shapes = _expected_shapes(cfg)
  source = HFTensors(model_dir)
  plan = hf_names.tensors(shapes)
  wanted, available = {t.hf_name for t in plan}, set(source.names())
  missing = sorted(wanted - available)
  if missing:
    raise ConversionError(f"{model_dir} lacks {len(missing)} tensor(s) its config.json implies: "
                          f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
  tied_head = cfg.model.tie_embeddings and "lm_head.weight" in available
  unexpected = sorted(n for n in available - wanted if not n.endswith(hf_names.IGNORED_SUFFIXES)
                      and not (tied_head and n == "lm_head.weight"))
  if unexpected:
    raise ConversionError(f"{model_dir} has tensors maxlm's {cfg.model.family} model has no place for "
                          f"(biases? another architecture?): {', '.join(unexpected[:6])}")
  for t in plan:
    shape = source.shape(t.hf_name)
    if shape != t.shape:
      what = "vocab mismatch: " if t.key[0] in ("embed", "lm_head") else ""
      raise ConversionError(f"{what}tensor {t.hf_name} has shape {shape} but config.json implies {t.shape} "
                            f"(vocab_size {cfg.model.vocab_size}, hidden {cfg.model.hidden})")
  params = hf_names.stack(shapes, lambda t: source.read(t.hf_name), dtype=_np_dtype(cfg.model.param_dtype))
  extras = {}
  if cfg.loss.objective == "emo" and cfg.loss.cost_embedding == "fixed":
    head = params["embed"] if cfg.model.tie_embeddings else params["lm_head"].T
    extras["cost_embedding"] = np.array(head, dtype=np.float32)  # (V, D): the head at import, never trained
  main_file = tokenizer_file_in(model_dir)
  if main_file and not cfg.data.tokenizer:
    cfg.data.tokenizer = main_file
  _check_tokenizer_fits(cfg, model_dir)
  return cfg, params, extras


def _check_tokenizer_fits(cfg: Config, model_dir: str) -> None:
  """A tokenizer with more entries than the model's embedding is not the model's: its high ids would index past
  the table (transformers raises an IndexError on them; a jnp gather would silently read another row)."""
  if not cfg.data.tokenizer or not os.path.isfile(cfg.data.tokenizer):
    return
  from maxlm.data_pipelines.tokenization import tokenizer_vocab_size  # pylint: disable=import-outside-toplevel
  try:
    size = tokenizer_vocab_size(cfg.data.tokenizer)
  except DataError:
    return  # a tokenizer file maxlm cannot read: text tools say so when they need it
  if size > cfg.model.vocab_size:
    raise ConversionError(f"{model_dir}: its tokenizer ({cfg.data.tokenizer}) has {size} tokens but config.json's "
                          f"vocab_size is {cfg.model.vocab_size}: they do not belong together. Put the model's own "
                          "tokenizer beside it, or name the right one with data.tokenizer=PATH")


def from_hf(model_dir: str, output: str, *, config: Optional[str] = None, overrides: tuple[str, ...] = (),
            overwrite: bool = False, log=print) -> Config:
  """Imports an HF LLaMA / OLMo (v1) directory as a params-only maxlm checkpoint (step 0) under `output`, with its
  tokenizer files copied into output/tokenizer/. --overwrite replaces only an earlier import."""
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  cfg, params, extras = read_hf(model_dir, config=config, overrides=overrides)
  output_abs = os.path.abspath(os.path.expanduser(output))
  with atomic_output(output_abs, HF_IMPORT, overwrite=overwrite) as tmp:
    carry_tokenizer(cfg.data, tmp, output_abs)  # the run keeps its own copy of the tokenizer
    cfg.run.dir = output_abs
    checkpoint.save_params(tmp, cfg, params, extras=extras, step=0)
    with open(os.path.join(tmp, HF_IMPORT.marker), "w") as f:
      json.dump({"source": model_dir, "architecture": hf_names.ARCHITECTURES[cfg.model.family],
                 "extras": sorted(extras)}, f, indent=2)
  log(f"wrote {output_abs}: {hf_names.ARCHITECTURES[cfg.model.family]} from {model_dir}"
      f"{' with the EMO cost embedding' if extras else ''}; continue training with "
      f"checkpoint.init_from={output_abs}")
  return cfg


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m maxlm.convert", description=cli_description(__doc__))
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("to-hf", help="maxlm checkpoint -> Hugging Face directory (config.json, safetensors, tokenizer)")
  p.add_argument("--checkpoint", required=True, help="run directory holding checkpoints/ (a training run, an import "
                                                      "or a derived checkpoint), or RUN@STEP")
  p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest finalised)")
  p.add_argument("--output", required=True, help="new directory for the HF model (written atomically)")
  p.add_argument("--dtype", default=None, choices=list(DTYPES),
                 help="dtype of the exported weights (default: the checkpoint's parameter dtype, float32 for maxlm's "
                      "presets, so transformers reproduces maxlm's logits; bfloat16 halves the files)")
  p.add_argument("--shard-size-mb", type=int, default=DEFAULT_SHARD_BYTES // 2 ** 20,
                 help="largest safetensors shard in MiB; export holds one shard in host memory at a time")
  p.add_argument("--overwrite", action="store_true",
                 help="replace --output if it is an earlier maxlm export (anything else is refused)")
  p.add_argument("--adapter", action="store_true",
                 help="LoRA runs: write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) "
                      "instead of the merged model")
  p = sub.add_parser("from-hf", help="Hugging Face LLaMA / OLMo directory -> maxlm checkpoint")
  p.add_argument("--model", required=True, help="local HF model directory (config.json + safetensors or .bin)")
  p.add_argument("--output", required=True, help="new run directory for the params-only checkpoint")
  p.add_argument("--config", default=None, help="preset or YAML for everything but the model (default: base)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace --output if it is an earlier maxlm import (anything else is refused)")
  p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. loss.objective=emo")
  return parser


def main(argv: Optional[list[str]] = None) -> int:
  args = build_parser().parse_args(argv)

  def body():
    if args.command == "to-hf":
      to_hf(args.checkpoint, args.output, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
            max_shard_bytes=args.shard_size_mb * 2 ** 20, adapter=args.adapter)
    else:
      check_command_line_overrides(args.overrides)
      from_hf(args.model, args.output, config=args.config, overrides=tuple(args.overrides),
              overwrite=args.overwrite)

  return cli_exit_code(body)


if __name__ == "__main__":
  sys.exit(main())
