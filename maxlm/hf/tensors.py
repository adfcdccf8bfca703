"""Tensors in Hugging Face files: safetensors shards written one tensor at a time (the safetensors library), and the
tensors of an HF directory (safetensors or torch .bin) read by name."""

from __future__ import annotations

import json
import os
import numpy as np

from maxlm.core.errors import ConversionError

DTYPES = ("float32", "bfloat16", "float16")
INDEX = "model.safetensors.index.json"
# A shard is held in host memory until it is written: 256 MiB keeps export near one large tensor (a 7B embedding
# is 262 MB in bf16, so it gets a shard of its own) while a 7B export has ~55 files.
DEFAULT_SHARD_BYTES = 256 * 1024 ** 2


def np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (ships with jax)
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


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
