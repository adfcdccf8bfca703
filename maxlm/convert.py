"""Conversion between maxlm checkpoints and Hugging Face directories (LlamaForCausalLM, OlmoForCausalLM).

to-hf streams one tensor at a time from the checkpoint into sharded safetensors; outputs appear only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
from typing import Any, Iterator, Optional

import numpy as np

from maxlm import checkpoint, hf_names
from maxlm.config import Config, finalize, load_config
from maxlm.errors import CheckpointError, ConversionError, MaxlmError, cli_exit_code

DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", "bfloat16"), "float16": ("F16", np.float16)}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16", "F64": np.float64,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _np_dtype(name):
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (ships with jax)
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


# ----------------------------------------------------------------------------- atomic output


@contextlib.contextmanager
def atomic_output(output: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `output` that is renamed to `output` only if the block succeeds, so a
  failed or killed conversion never leaves a directory that looks complete."""
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)) and not overwrite:
    raise ConversionError(f"output {output} already exists and is not empty; choose a new directory or pass "
                          "--overwrite")
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick to the final directory
  try:
    yield tmp
    old = None
    if os.path.exists(output):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=parent)
      os.rename(output, os.path.join(old, "x"))
    os.rename(tmp, output)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ----------------------------------------------------------------------------- safetensors, streamed


class SafetensorsShards:
  """Writes named tensors into size-bounded safetensors shards plus their index, one tensor in memory at a time.

  All names, shapes and dtypes are known up front, so each shard's header is written first and tensors are then
  appended in order.
  """

  def __init__(self, directory: str, plan: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int):
    self.directory = directory
    self.shards: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
    size = 0
    for name, shape, st_dtype in plan:
      nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[st_dtype]
      if self.shards[-1] and size + nbytes > max_shard_bytes:
        self.shards.append([])
        size = 0
      self.shards[-1].append((name, tuple(shape), st_dtype, nbytes))
      size += nbytes
    n = len(self.shards)
    self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    self.total_bytes = sum(e[3] for s in self.shards for e in s)
    self._order = [(i, e) for i, s in enumerate(self.shards) for e in s]
    self._next = 0
    self._file = None

  def _open(self, shard: int):
    if self._file:
      self._file.close()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, st_dtype, nbytes in self.shards[shard]:
      header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data 8-byte aligned, as the reference writer does
    self._file = open(os.path.join(self.directory, self.files[shard]), "wb")
    self._file.write(struct.pack("<Q", len(blob)) + blob)

  def write(self, name: str, array: np.ndarray) -> None:
    shard, (expected, shape, _, nbytes) = self._order[self._next]
    if name != expected or tuple(array.shape) != shape or array.nbytes != nbytes:
      raise ConversionError(f"internal: tensor {name} {array.shape} written out of plan (expected {expected} "
                            f"{shape})")
    if self._next == 0 or self._order[self._next - 1][0] != shard:
      self._open(shard)
    self._file.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    self._next += 1

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._next != len(self._order):
      raise ConversionError(f"internal: {len(self._order) - self._next} planned tensors were not written")
    index = {"metadata": {"total_size": self.total_bytes},
             "weight_map": {name: self.files[i] for i, (name, *_rest) in self._order}}
    with open(os.path.join(self.directory, INDEX), "w") as f:
      json.dump(index, f, indent=2)


class HFTensors:
  """Lazy reader of an HF model directory's weights: safetensors (memory-mapped) or, with torch, *.bin."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.where: dict[str, tuple[str, dict, int]] = {}
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    self._torch_state = None
    if files:
      for f in files:
        path = os.path.join(model_dir, f)
        try:
          with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
          raise ConversionError(f"{path} is not a readable safetensors file: {e}") from None
        for name, info in header.items():
          if name != "__metadata__":
            self.where[name] = (path, info, 8 + n)
    else:
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
      self.where = {k: ("", {}, 0) for k in self._torch_state}

  def names(self) -> list[str]:
    return list(self.where)

  def read(self, name: str) -> np.ndarray:
    if name not in self.where:
      raise ConversionError(f"tensor {name} is missing from {self.model_dir}")
    if self._torch_state is not None:
      return self._torch_state[name].float().numpy()
    path, info, start = self.where[name]
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise ConversionError(f"tensor {name} in {path} has unsupported dtype {info['dtype']}")
    dtype = _np_dtype(SAFETENSORS_DTYPES[info["dtype"]]) if isinstance(SAFETENSORS_DTYPES[info["dtype"]], str) \
        else np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    count = (end - begin) // dtype.itemsize
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=start + begin,
                     shape=(count,)).reshape(info["shape"])


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


# ----------------------------------------------------------------------------- tokenizer


def _run_tokenizer(cfg: Config) -> tuple[Optional[str], Any]:
  """('file', path) | ('tokenizer', tokenizers.Tokenizer) | (None, reason): the tokenizer a run trained with."""
  if cfg.data.tokenizer:
    if not os.path.isfile(cfg.data.tokenizer):
      return None, f"data.tokenizer {cfg.data.tokenizer} does not exist here"
    return "file", cfg.data.tokenizer
  if cfg.data.source == "store" and cfg.data.path:
    try:
      from maxlm.data_pipelines.token_store import TokenStore  # pylint: disable=import-outside-toplevel
      path = TokenStore(cfg.data.path).tokenizer_path()
      if path:
        return "file", path
    except (ImportError, MaxlmError, OSError) as e:
      return None, f"cannot read the token store's tokenizer: {e}"
  if cfg.data.source == "pcfg":
    try:
      from maxlm.data_pipelines.pcfg import load_grammar  # pylint: disable=import-outside-toplevel
      return "tokenizer", load_grammar(cfg.data.grammar).to_hf_tokenizer()
    except (ImportError, MaxlmError) as e:
      return None, f"cannot build the PCFG tokenizer: {e}"
  return None, "the run names no tokenizer (data.tokenizer is empty)"


def write_tokenizer(cfg: Config, out_dir: str) -> tuple[Optional[int], Optional[int], str]:
  """Writes the run's tokenizer files; returns (bos id, eos id, note). Vocab larger than the model's is an error."""
  kind, what = _run_tokenizer(cfg)
  if kind is None:
    return None, None, f"no tokenizer files written: {what}"
  if kind == "file" and not what.endswith(".json"):
    shutil.copy(what, os.path.join(out_dir, "tokenizer.model"))
    config = {"tokenizer_class": "LlamaTokenizer", "model_max_length": cfg.model.max_positions}
    src_cfg = os.path.join(os.path.dirname(what), "tokenizer_config.json")
    if os.path.isfile(src_cfg):
      shutil.copy(src_cfg, os.path.join(out_dir, "tokenizer_config.json"))
    else:
      with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return 1, 2, f"tokenizer.model copied from {what}"
  import tokenizers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.Tokenizer.from_file(what) if kind == "file" else what
  size = tok.get_vocab_size(with_added_tokens=True)
  if size > cfg.model.vocab_size:
    raise ConversionError(f"the run's tokenizer has {size} tokens but the model's vocab_size is "
                          f"{cfg.model.vocab_size}: the tokenizer does not belong to this checkpoint")
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  from maxlm.data_pipelines.tokenization import SEPARATOR_CANDIDATES  # pylint: disable=import-outside-toplevel
  names = ("<eos>",) + SEPARATOR_CANDIDATES
  eos = next((n for n in names if tok.token_to_id(n) is not None), None)
  bos = next((n for n in ("<s>", "<|begin_of_text|>", "<bos>") if tok.token_to_id(n) is not None), None)
  src_dir = os.path.dirname(what) if kind == "file" else None
  copied = False
  for extra in ("tokenizer_config.json", "special_tokens_map.json"):
    if src_dir and os.path.isfile(os.path.join(src_dir, extra)):
      shutil.copy(os.path.join(src_dir, extra), os.path.join(out_dir, extra))
      copied = copied or extra == "tokenizer_config.json"
  if not copied:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.max_positions,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    if eos:
      config["eos_token"] = eos
    if bos:
      config["bos_token"] = bos
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
  return (tok.token_to_id(bos) if bos else None), (tok.token_to_id(eos) if eos else None), \
      f"tokenizer.json from {what if kind == 'file' else 'the PCFG grammar ' + cfg.data.grammar}"


# ----------------------------------------------------------------------------- to-hf


def to_hf(checkpoint_path: str, output: str, *, step: Optional[int] = None, dtype: str = "bfloat16",
          overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, log=print) -> str:
  """Exports a run's checkpoint (default: latest step) as an HF directory; returns its path."""
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
  source = CheckpointTensors(checkpoint_path, step)
  cfg = source.config
  st_dtype, np_name = DTYPES[dtype]
  out_dtype = _np_dtype(np_name)
  expected_shapes = _expected_shapes(cfg)
  problems = checkpoint.describe_mismatch(checkpoint.flat_tree(expected_shapes),
                                          checkpoint.flat_tree(source.shapes))
  if problems:
    raise ConversionError(f"checkpoint step {source.step} of {checkpoint_path} does not match its saved config: "
                          + "; ".join(problems))
  plan = hf_names.tensors(source.shapes)
  with atomic_output(output, overwrite=overwrite) as tmp:
    bos, eos, note = write_tokenizer(cfg, tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config(cfg, dtype=dtype, bos_id=bos, eos_id=eos), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}, f, indent=2)
    writer = SafetensorsShards(tmp, [(t.hf_name, t.shape, st_dtype) for t in plan], max_shard_bytes)
    for t, array in hf_names.unstack(source.shapes, source.read):
      writer.write(t.hf_name, np.asarray(array).astype(out_dtype, copy=False))
    writer.close()
    with open(os.path.join(tmp, "maxlm_export.json"), "w") as f:
      json.dump({"checkpoint": os.path.abspath(checkpoint_path), "step": source.step, "dtype": dtype,
                 "tokenizer": note}, f, indent=2)
  log(f"wrote {output}: {hf_names.ARCHITECTURES[cfg.model.family]}, step {source.step}, {dtype}, "
      f"{len(writer.files)} shard(s), {writer.total_bytes / 1e6:.1f} MB; {note}")
  return os.path.abspath(output)


def _expected_shapes(cfg: Config) -> dict:
  from maxlm.model import abstract_model  # pylint: disable=import-outside-toplevel
  return abstract_model(cfg.model)[1]


# ----------------------------------------------------------------------------- from-hf


def from_hf(model_dir: str, output: str, *, config: Optional[str] = None, overrides: tuple[str, ...] = (),
            overwrite: bool = False, log=print) -> Config:
  """Imports an HF LLaMA / OLMo (v1) directory as a params-only maxlm checkpoint (step 0) under `output`.

  The model section comes from the HF config.json; everything else from `config` (a preset or YAML, default
  base settings) and `overrides`. For EMO runs with a fixed cost embedding, the output head is saved with it.
  """
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
  cfg = finalize(cfg)
  from maxlm.model import abstract_model  # pylint: disable=import-outside-toplevel
  shapes = abstract_model(cfg.model)[1]
  source = HFTensors(model_dir)
  plan = hf_names.tensors(shapes)
  wanted = {t.hf_name for t in plan}
  available = set(source.names())
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
    shape = tuple(source.read(t.hf_name).shape)
    if shape != t.shape:
      what = "vocab mismatch: " if t.key[0] in ("embed", "lm_head") else ""
      raise ConversionError(f"{what}tensor {t.hf_name} has shape {shape} but config.json implies {t.shape} "
                            f"(vocab_size {cfg.model.vocab_size}, hidden {cfg.model.hidden})")
  params = hf_names.stack(shapes, lambda t: source.read(t.hf_name), dtype=_np_dtype(cfg.model.param_dtype))
  extras = {}
  if cfg.loss.objective == "emo" and cfg.loss.cost_embedding == "fixed":
    head = params["embed"] if cfg.model.tie_embeddings else params["lm_head"].T
    extras["cost_embedding"] = np.array(head, dtype=np.float32)  # (V, D): the head at import, never trained
  output_abs = os.path.abspath(os.path.expanduser(output))
  with atomic_output(output_abs, overwrite=overwrite) as tmp:
    tok_dir = os.path.join(tmp, "tokenizer")
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, f))]
    if copied:
      os.makedirs(tok_dir)
      for f in copied:
        shutil.copy(os.path.join(model_dir, f), os.path.join(tok_dir, f))
      if not cfg.data.tokenizer:
        main_file = "tokenizer.json" if "tokenizer.json" in copied else "tokenizer.model"
        if main_file in copied:
          cfg.data.tokenizer = os.path.join(output_abs, "tokenizer", main_file)
    cfg.run.dir = output_abs
    checkpoint.save_params(tmp, cfg, params, extras=extras, step=0)
    with open(os.path.join(tmp, "maxlm_import.json"), "w") as f:
      json.dump({"source": model_dir, "architecture": hf_names.ARCHITECTURES[cfg.model.family],
                 "extras": sorted(extras)}, f, indent=2)
  log(f"wrote {output_abs}: {hf_names.ARCHITECTURES[cfg.model.family]} from {model_dir}"
      f"{' with the EMO cost embedding' if extras else ''}; continue training with "
      f"checkpoint.init_from={output_abs}")
  return cfg


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m maxlm.convert", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("to-hf", help="maxlm checkpoint -> Hugging Face directory")
  p.add_argument("--checkpoint", required=True, help="run directory holding checkpoints/")
  p.add_argument("--step", type=int, default=None, help="default: the latest finalised step")
  p.add_argument("--output", required=True)
  p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
  p.add_argument("--shard-size-mb", type=int, default=DEFAULT_SHARD_BYTES // 2 ** 20)
  p.add_argument("--overwrite", action="store_true")
  p = sub.add_parser("from-hf", help="Hugging Face LLaMA / OLMo directory -> maxlm checkpoint")
  p.add_argument("--model", required=True, help="local HF model directory")
  p.add_argument("--output", required=True, help="new run directory")
  p.add_argument("--config", default=None, help="preset or YAML for everything but the model (default: base)")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. loss.objective=emo")
  args = parser.parse_args(argv)

  def body():
    if args.command == "to-hf":
      to_hf(args.checkpoint, args.output, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
            max_shard_bytes=args.shard_size_mb * 2 ** 20)
    else:
      from_hf(args.model, args.output, config=args.config, overrides=tuple(args.overrides),
              overwrite=args.overwrite)

  return cli_exit_code(body)

if __name__ == "__main__":
  sys.exit(main())
