"""The typed config schema, its loading (base.yaml -> preset -> key=value overrides) and validation.

Every key has one declared type; unknown keys, wrong types and impossible combinations are ConfigErrors.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import os
import types
import typing
from typing import Any, Optional

import yaml

from maxlm.errors import ConfigError


@dataclasses.dataclass
class RunConfig:
  dir: str = "runs/default"
  log_every: int = 10
  eval_every: int = 0  # 0 = only at the end
  eval_batches: int = 4
  progress: bool = True
  tensorboard: bool = True
  summary: bool = True  # print the start-to-end summary when the run ends


@dataclasses.dataclass
class ModelConfig:
  family: str = "llama"  # llama | olmo
  vocab_size: int = 32000
  hidden: int = 1024
  layers: int = 24
  heads: int = 16
  kv_heads: int = 0  # 0 = heads (no grouping)
  head_dim: int = 0  # 0 = hidden // heads
  ffn: int = 4096
  max_positions: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.01
  clip_qkv: Optional[float] = None  # OLMo v1 option
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  attention: str = "auto"  # auto | xla | cudnn
  remat: str = "full"  # none | full | dots | dots_no_batch
  scan_layers: bool = True


@dataclasses.dataclass
class MeshConfig:
  data: int = 1
  fsdp: int = -1  # -1 = fill with the remaining devices
  tensor: int = 1


@dataclasses.dataclass
class LossConfig:
  objective: str = "ce"  # ce | mile | focal | emo | mixce | tvd
  impl: str = "auto"  # auto | reference | blockwise | pallas
  gamma: float = 1.0  # mile, focal
  reduction: str = "valid"  # mile: valid | reference
  entropy_floor: float = 0.0  # mile reference mode uses 1e-8
  ratio: float = 0.5  # mixce, tvd
  emo_mode: int = 1
  emo_clamp: Optional[float] = 3.0
  emo_gt_trick: bool = False
  cost_embedding: str = "fixed"  # fixed | adaptive | file
  cost_embedding_file: str = ""
  ignore_index: int = -100


@dataclasses.dataclass
class OptimConfig:
  lr: float = 3e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  warmup_steps: int = 2000
  schedule: str = "cosine"  # cosine | constant
  min_lr_ratio: float = 0.1


@dataclasses.dataclass
class TrainConfig:
  steps: int = 100000
  seed: int = 0
  global_batch: int = 1024  # sequences per optimizer step, over all devices and microbatches
  seq_len: int = 1024
  microbatches: int = 1  # gradient accumulation
  stop_on_nan: bool = True


@dataclasses.dataclass
class DataConfig:
  source: str = "store"  # store | pcfg | replay | seqio
  path: str = ""
  mixture: str = ""  # "" = proportional to tokens; "pile" = configs/data/pile.yaml; or a YAML path
  weights: dict = dataclasses.field(default_factory=dict)
  index_file: str = ""
  grammar: str = "builtin:demo"
  pcfg_tokens: int = 0  # 0 = an unbounded stream sampled on demand; N = a finite corpus of N tokens
  shuffle: bool = True
  document_masking: bool = False
  prefetch: int = 4
  num_workers: int = 0
  seqio_task: str = ""
  tokenizer: str = ""


@dataclasses.dataclass
class CheckpointConfig:
  enabled: bool = True
  every: int = 1000
  keep_last: int = 3
  keep_every: int = 0  # 0 = keep none beyond the last N
  async_save: bool = True
  resume: bool = True
  init_from: str = ""  # a maxlm checkpoint (e.g. from `convert from-hf`) to start from when run.dir is empty


@dataclasses.dataclass
class Config:
  run: RunConfig = dataclasses.field(default_factory=RunConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

  # Derived values (filled by `finalize`), never read from YAML.
  @property
  def head_dim(self) -> int:
    return self.model.head_dim or self.model.hidden // self.model.heads

  @property
  def kv_heads(self) -> int:
    return self.model.kv_heads or self.model.heads

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


OBJECTIVES = ("ce", "mile", "focal", "emo", "mixce", "tvd")
CHOICES = {
    "model.family": ("llama", "olmo"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.attention": ("auto", "xla", "cudnn"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "loss.objective": OBJECTIVES,
    "loss.impl": ("auto", "reference", "blockwise", "pallas"),
    "loss.reduction": ("valid", "reference"),
    "loss.emo_mode": (1, 2),
    "loss.cost_embedding": ("fixed", "adaptive", "file"),
    "optim.schedule": ("cosine", "constant"),
    "data.source": ("store", "pcfg", "replay", "seqio"),
}


# ----------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
  root = importlib.resources.files("maxlm.configs")
  return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml") and p.name != "base.yaml")


def _read_yaml(name_or_path: str) -> tuple[dict, str]:
  """Returns the YAML mapping of a preset name or a file path, and where it came from."""
  if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
    if not os.path.exists(name_or_path):
      raise ConfigError(f"config file {name_or_path!r} does not exist; pass a preset name "
                        f"({', '.join(preset_names())}) or an existing YAML path")
    with open(name_or_path) as f:
      text, origin = f.read(), name_or_path
  else:
    res = importlib.resources.files("maxlm.configs") / f"{name_or_path}.yaml"
    if not res.is_file():
      close = difflib.get_close_matches(name_or_path, preset_names(), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"unknown preset {name_or_path!r}.{hint} Presets: {', '.join(preset_names())}")
    text, origin = res.read_text(), f"configs/{name_or_path}.yaml"
  try:
    data = yaml.safe_load(text) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{origin} is not valid YAML: {e}") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{origin} must hold a mapping of sections, got {type(data).__name__}")
  return data, origin


def _layers(name_or_path: str, seen: tuple = ()) -> list[tuple[dict, str]]:
  """The preset and the presets it inherits from, oldest first (`inherit: NAME` at the top)."""
  if name_or_path in seen:
    raise ConfigError(f"presets inherit in a cycle: {' -> '.join(seen + (name_or_path,))}")
  data, origin = _read_yaml(name_or_path)
  parent = data.pop("inherit", None)
  layers = _layers(parent, seen + (name_or_path,)) if parent else []
  return layers + [(data, origin)]


def _coerce(value: Any, annotation: Any, key: str, origin: str) -> Any:
  """Checks `value` against a field's declared type; ints widen to floats, nothing else is converted."""
  hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing), {"Optional": Optional})
  origin_t = typing.get_origin(hint)
  if origin_t in (typing.Union, types.UnionType):
    args = typing.get_args(hint)
    if value is None and type(None) in args:
      return None
    hint = next(a for a in args if a is not type(None))
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint is float and isinstance(value, str):
    try:
      return float(value)  # YAML reads "3e-4" (no dot) as a string
    except ValueError:
      pass
  expected = typing.get_origin(hint) or hint
  if expected is dict and isinstance(value, dict):
    return value
  if expected in (int, float, str, bool) and type(value) is expected:
    return value
  raise ConfigError(f"{key} = {value!r} (from {origin}) must be of type "
                    f"{getattr(hint, '__name__', hint)}, got {type(value).__name__}")


def _apply(cfg: Config, data: dict, origin: str) -> None:
  sections = {f.name: f for f in dataclasses.fields(Config)}
  for section, values in data.items():
    if section not in sections:
      close = difflib.get_close_matches(str(section), list(sections), n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"unknown config section {section!r} in {origin}{hint} "
                        f"Sections: {', '.join(sections)}")
    if not isinstance(values, dict):
      raise ConfigError(f"section {section!r} in {origin} must be a mapping of keys")
    for key, value in values.items():
      _set(cfg, f"{section}.{key}", value, origin)


def _set(cfg: Config, dotted: str, value: Any, origin: str) -> None:
  parts = dotted.split(".")
  section_name = parts[0]
  sections = {f.name: f for f in dataclasses.fields(Config)}
  if section_name not in sections:
    close = difflib.get_close_matches(section_name, list(sections), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown config key {dotted!r} (from {origin}){hint}")
  section = getattr(cfg, section_name)
  fields = {f.name: f for f in dataclasses.fields(section)}
  if len(parts) < 2 or parts[1] not in fields:
    valid = [f"{section_name}.{k}" for k in fields]
    close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    raise ConfigError(f"unknown config key {dotted!r} (from {origin}){hint}")
  field = fields[parts[1]]
  if len(parts) > 2:  # a key inside a dict field, e.g. data.weights.ArXiv=0.2
    if typing.get_origin(field.type) is not dict and field.type not in (dict, "dict"):
      raise ConfigError(f"config key {dotted!r} (from {origin}): {section_name}.{parts[1]} has no sub-keys")
    target = getattr(section, parts[1])
    for p in parts[2:-1]:
      target = target.setdefault(p, {})
    target[parts[-1]] = value
    return
  setattr(section, parts[1], _coerce(value, field.type, dotted, origin))


def parse_override(text: str) -> tuple[str, Any]:
  if "=" not in text:
    raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.steps=100)")
  key, raw = text.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw != "" else ""
  except yaml.YAMLError:
    value = raw
  return key.strip(), value


def load_config(name_or_path: str = "demo", overrides: tuple[str, ...] | list[str] = (),
                *, num_devices: Optional[int] = None) -> Config:
  """base.yaml, then the preset chain, then `key=value` overrides; validated and finalized."""
  cfg = Config()
  base, origin = _read_yaml("base")
  _apply(cfg, base, origin)
  for data, origin in _layers(name_or_path):
    _apply(cfg, data, origin)
  for text in overrides:
    key, value = parse_override(text)
    _set(cfg, key, value, f"override {text!r}")
  return finalize(cfg, num_devices=num_devices)


def config_from_dict(data: dict, *, num_devices: Optional[int] = None) -> Config:
  """Rebuilds a Config from its saved `to_dict()` form (checkpoints, conversion)."""
  cfg = Config()
  _apply(cfg, data, "saved config")
  return finalize(cfg, num_devices=num_devices)


# ----------------------------------------------------------------------------- validation


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 (fill) and checks that data * fsdp * tensor equals the device count."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  names = ["mesh.data", "mesh.fsdp", "mesh.tensor"]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise ConfigError(f"only one of {', '.join(names)} may be -1 (fill); got {sizes}")
  for n, s in zip(names, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f"{n} = {s} must be a positive size or -1 (fill)")
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ConfigError(f"cannot fill the mesh: {num_devices} devices are not divisible by the fixed axes "
                        f"({known}); change {', '.join(n for n, s in zip(names, sizes) if s != -1)}")
    sizes[fills[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} but "
                      f"{num_devices} devices are present; set the sizes so their product is {num_devices} "
                      f"(or set one of them to -1)")
  return tuple(sizes)


def finalize(cfg: Config, *, num_devices: Optional[int] = None) -> Config:
  """Checks choices and combinations; `num_devices` (None = don't check the mesh) validates mesh sizes."""
  for key, choices in CHOICES.items():
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value not in choices:
      close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(str, choices))}.{hint}")
  m, t = cfg.model, cfg.train
  positive = {"model.vocab_size": m.vocab_size, "model.hidden": m.hidden, "model.layers": m.layers,
              "model.heads": m.heads, "model.ffn": m.ffn, "train.steps": t.steps,
              "train.global_batch": t.global_batch, "train.seq_len": t.seq_len,
              "train.microbatches": t.microbatches, "run.log_every": cfg.run.log_every}
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f"{key} = {value} must be positive")
  if m.head_dim == 0 and m.hidden % m.heads:
    raise ConfigError(f"model.hidden = {m.hidden} is not divisible by model.heads = {m.heads}; "
                      f"change one of them or set model.head_dim explicitly")
  if cfg.kv_heads <= 0 or m.heads % cfg.kv_heads:
    raise ConfigError(f"model.heads = {m.heads} must be a multiple of model.kv_heads = {m.kv_heads}")
  if t.seq_len > m.max_positions:
    raise ConfigError(f"train.seq_len = {t.seq_len} exceeds model.max_positions = {m.max_positions}; "
                      f"lower train.seq_len or raise model.max_positions")
  if t.global_batch % t.microbatches:
    raise ConfigError(f"train.global_batch = {t.global_batch} is not divisible by train.microbatches = "
                      f"{t.microbatches}")
  if cfg.optim.warmup_steps < 0 or not 0 <= cfg.optim.min_lr_ratio <= 1:
    raise ConfigError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
  if cfg.loss.objective == "emo" and cfg.loss.cost_embedding == "file" and not cfg.loss.cost_embedding_file:
    raise ConfigError("loss.cost_embedding = 'file' needs loss.cost_embedding_file = path/to/embedding.npy (V x dE)")
  if cfg.loss.ignore_index != -100:
    raise ConfigError(f"loss.ignore_index = {cfg.loss.ignore_index}: maxlm's data pipelines mark positions without a "
                      f"target with -100, so the loss must ignore -100; remove the override")
  if cfg.loss.reduction == "reference" and cfg.loss.objective != "mile":
    raise ConfigError("loss.reduction = 'reference' applies to loss.objective = 'mile' only")
  if num_devices is not None:
    data, fsdp, tensor = mesh_shape(cfg.mesh, num_devices)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
    per_step = t.global_batch // t.microbatches
    if per_step % (data * fsdp):
      raise ConfigError(f"the microbatch of {per_step} sequences (train.global_batch / train.microbatches) is "
                        f"not divisible by the batch-sharding devices mesh.data*mesh.fsdp = {data * fsdp}; "
                        f"make train.global_batch a multiple of {data * fsdp * t.microbatches}")
    for key, size in (("model.heads", m.heads), ("model.kv_heads", cfg.kv_heads), ("model.ffn", m.ffn),
                      ("model.vocab_size", m.vocab_size)):
      if size % tensor:
        raise ConfigError(f"{key} = {size} is not divisible by mesh.tensor = {tensor}; "
                          f"choose a tensor-parallel size that divides it")
  return cfg


def save_config(cfg: Config, path: str) -> None:
  """Writes the resolved config as YAML (readable) next to a JSON twin (exact)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    json.dump(cfg.to_dict(), f, indent=1)
