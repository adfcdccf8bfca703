"""The typed config schema, its loading (base.yaml -> preset -> key=value overrides) and validation.

Every key has one declared type; unknown keys, wrong types and impossible combinations are ConfigErrors.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import json
import math
import os
import types
import typing
from typing import Any, Literal, Optional

import yaml

from maxlm.core import files
from maxlm.core.errors import ConfigError
from maxlm.core.families import FAMILIES
from maxlm.core.paths import resolve_tokenizer_path

# The target of a position that trains nothing (padding, a masked prompt, a probe's prompt): every loss ignores it.
IGNORE_INDEX = -100


@dataclasses.dataclass
class RunConfig:
  dir: str = "runs/default"
  log_every: int = 10
  eval_every: int = 0  # 0 = only at the end
  eval_batches: int = 4
  progress: bool = True
  tensorboard: bool = True
  summary: bool = True  # print the start-to-end summary when the run ends
  wandb_project: str = ""  # "" = no Weights & Biases; WANDB_MODE=offline is honoured
  profile_steps: str = ""  # "START:STOP" (e.g. "10:15"): a jax.profiler trace of those steps in run.dir/profile


@dataclasses.dataclass
class ModelConfig:
  family: Literal["llama", "olmo", "olmo2", "qwen2", "gpt2", "gpt_neox"] = "llama"  # rows of maxlm.core.families
  vocab_size: int = 32000
  hidden: int = 1024
  layers: int = 24
  heads: int = 16
  kv_heads: int = 0  # 0 = heads (no grouping)
  head_dim: int = 0  # 0 = hidden // heads
  ffn: int = 4096
  max_positions: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: Literal["none", "linear", "dynamic", "llama3"] = "none"  # as transformers' rope_type
  rope_factor: float = 1.0  # linear / dynamic / llama3 scaling factor
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_original_max_positions: int = 8192  # llama3: original_max_position_embeddings
  rotary_fraction: float = 1.0  # share of each head RoPE rotates (GPT-NeoX / Pythia: 0.25)
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.01
  clip_qkv: Optional[float] = None  # OLMo v1 option
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
  attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
  causal: bool = True  # false: bidirectional attention (a masked-LM encoder, with data.mlm); no KV-cache decoding
  remat: Literal["none", "full", "dots", "dots_no_batch"] = "full"
  scan_layers: bool = True
  scan_unroll: int = 1  # layers per iteration of the layer scan; >= layers unrolls it (small models on CPU)


@dataclasses.dataclass
class MeshConfig:
  data: int = 1
  fsdp: int = -1  # -1 = fill with the remaining devices
  tensor: int = 1
  slices: int = 1  # TPU slices / GPU nodes joined by DCN along the data axis (a hybrid mesh); must divide data


@dataclasses.dataclass
class LossConfig:
  objective: Literal["ce", "mile", "focal", "emo", "mixce", "tvd"] = "ce"
  impl: Literal["auto", "reference", "blockwise", "pallas"] = "auto"
  gamma: float = 1.0  # mile, focal
  reduction: Literal["valid", "reference"] = "valid"  # mile only
  entropy_floor: float = 0.0  # mile reference mode uses 1e-8
  ratio: float = 0.5  # mixce, tvd
  emo_mode: Literal[1, 2] = 1
  emo_clamp: Optional[float] = 3.0
  emo_gt_trick: bool = False
  cost_embedding: Literal["fixed", "adaptive", "file"] = "fixed"
  cost_embedding_file: str = ""
  ignore_index: int = IGNORE_INDEX


@dataclasses.dataclass
class OptimConfig:
  lr: float = 3e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  warmup_steps: int = 2000
  schedule: Literal["cosine", "constant", "linear"] = "cosine"
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
  source: Literal["store", "pcfg", "replay", "seqio", "sft"] = "store"
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
  sft_template: Literal["auto", "alpaca", "chat"] = "auto"  # auto: Alpaca records -> alpaca, messages -> chat
  sft_packing: bool = True  # pack examples with document masking (False: one padded example per row)
  validation_fraction: float = 0.0  # sft: share of records held out (by content hash) for validation
  # Masked-LM batches (data_pipelines/masking.py; IB's generate_samples.py settings): per row, min(mlm_max_predictions,
  # max(1, round(mlm_prob * maskable tokens))) positions are chosen; of those mlm_mask_share become the mask token,
  # mlm_random_share a random token, the rest are kept. Targets: the original token there, ignored elsewhere.
  mlm: bool = False
  mlm_prob: float = 0.15
  mlm_max_predictions: int = 5
  mlm_mask_share: float = 0.8
  mlm_random_share: float = 0.1


@dataclasses.dataclass
class CheckpointConfig:
  enabled: bool = True
  every: int = 1000
  keep_last: int = 3
  keep_every: int = 0  # 0 = keep none beyond the last N
  async_save: bool = True
  resume: bool = True
  resume_step: int = -1  # -1 = the newest readable step; N = resume from step N exactly
  allow_data_restart: bool = False  # resume a checkpoint without (usable) data state, data order from the seed
  init_from: str = ""  # a maxlm checkpoint (e.g. from `convert from-hf`) to start from when run.dir is empty


@dataclasses.dataclass
class InjectConfig:
  """Knowledge injection (docs/KNOWLEDGE.md): fictional-knowledge paragraphs inserted into training batches, plus
  probes."""
  paraphrase_file: str = ""  # JSON list of items injected at every injection step (paraphrase k-1 the k-th time)
  once_file: str = ""  # JSON list of items each injected at exactly one injection step
  interval: int = 0  # inject at steps s with s % interval == 0; 0 = never (probes are still scored)
  probe_every: int = 0  # 0 = probes only before the first and after the last step
  probe_mode: Literal["exact", "reference"] = "exact"
  probe_batch_size: int = 16


@dataclasses.dataclass
class LoraConfig:
  rank: int = 0  # 0 = off
  alpha: float = 16.0
  dropout: float = 0.0
  targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])  # from q, k, v, o, gate, up, down


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
  inject: InjectConfig = dataclasses.field(default_factory=InjectConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

  # Derived values, never read from YAML.
  @property
  def head_dim(self) -> int:
    return self.model.head_dim or self.model.hidden // self.model.heads

  @property
  def kv_heads(self) -> int:
    return self.model.kv_heads or self.model.heads

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def origin(self, key: str) -> str:
    """Which file or override last set `key` ("section.name"), for error messages."""
    return self.__dict__.get("_origins", {}).get(key, "the defaults")

  def said(self, key: str) -> str:
    """'section.name = value (from where)', for error messages."""
    section, name = key.split(".")
    return f"{key} = {getattr(getattr(self, section), name)!r} (from {self.origin(key)})"


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@functools.lru_cache(maxsize=None)
def field_types(section_cls: type) -> dict[str, Any]:
  """{field name: resolved type hint} of a config section (the schema's one source of types and choices)."""
  return typing.get_type_hints(section_cls)


def choices(key: str) -> tuple:
  """The allowed values of a `Literal` field, e.g. choices("loss.objective")."""
  section, name = key.split(".")
  section_cls = field_types(Config)[section]
  return typing.get_args(field_types(section_cls)[name])


OBJECTIVES = choices("loss.objective")


# ----------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
  """safe_load that rejects a key given twice in one mapping (YAML would silently keep the last one)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
  seen = {}
  for key_node, _ in node.value:
    key = loader.construct_object(key_node, deep=deep)
    if key in seen:
      raise yaml.constructor.ConstructorError(
          None, None, f"the key {key!r} appears twice in one mapping (first on line {seen[key] + 1}); merge them",
          key_node.start_mark)
    seen[key] = key_node.start_mark.line
  return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def preset_names() -> list[str]:
  root = importlib.resources.files("maxlm.configs")
  return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml") and p.name != "base.yaml")


def _read_yaml(name_or_path: str) -> tuple[dict, str]:
  """Returns the YAML mapping of a preset name or a file path, and where it came from."""
  if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
    if not os.path.exists(name_or_path):
      raise ConfigError(f"config file {name_or_path!r} does not exist; pass a preset name "
                        f"({', '.join(preset_names())}) or an existing YAML path")
    if os.path.isdir(name_or_path):
      raise ConfigError(f"--config {name_or_path!r} is a directory; pass a YAML file in it or a preset name "
                        f"({', '.join(preset_names())})")
    try:
      with open(name_or_path, encoding="utf-8-sig") as f:
        text, origin = f.read(), name_or_path
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"config file {name_or_path!r} cannot be read: {e}") from None
  else:
    res = importlib.resources.files("maxlm.configs") / f"{name_or_path}.yaml"
    if not res.is_file():
      close = difflib.get_close_matches(name_or_path, preset_names(), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"unknown preset {name_or_path!r}.{hint} Presets: {', '.join(preset_names())}")
    text, origin = res.read_text(), f"configs/{name_or_path}.yaml"
  try:
    data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
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


def _type_name(hint: Any) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
  """Checks `value` against a field's declared type; ints widen to floats, nothing else is converted."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = typing.get_args(hint)
    if value is None and type(None) in args:
      return None
    hint = next(a for a in args if a is not type(None))
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and hint is not str:
      raise ConfigError(f"{key} = {value!r} (from {origin}): to unset it write null (YAML's None), e.g. {key}=null")
  if typing.get_origin(hint) is Literal:
    allowed = typing.get_args(hint)
    if value in allowed and type(value) in {type(a) for a in allowed}:
      return value
    close = difflib.get_close_matches(str(value), [str(c) for c in allowed], n=1)
    hint_text = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key} = {value!r} (from {origin}) is not one of {', '.join(map(str, allowed))}.{hint_text}")
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
  if expected is list:
    (item,) = typing.get_args(hint) or (Any,)
    if isinstance(value, str) and item is str:  # lora.targets=q,v on the command line
      value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(item is Any or type(v) is item for v in value):
      return list(value)
  if expected in (int, float, str, bool) and type(value) is expected:
    return value
  raise ConfigError(f"{key} = {value!r} (from {origin}) must be of type {_type_name(hint)}, "
                    f"got {type(value).__name__}: set it to a value of that type")


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
      set_value(cfg, f"{section}.{key}", value, origin)


def set_value(cfg: Config, dotted: str, value: Any, origin: str) -> None:
  """Sets `dotted` ("section.name", or deeper into a dict field) as a file or override would, checking its type and
  recording `origin` for error messages."""
  parts = dotted.split(".")
  section_name = parts[0]
  sections = {f.name: f for f in dataclasses.fields(Config)}
  if section_name not in sections:
    close = difflib.get_close_matches(section_name, list(sections), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown config key {dotted!r} (from {origin}){hint}")
  section = getattr(cfg, section_name)
  hints = field_types(type(section))
  if len(parts) < 2 or parts[1] not in hints:
    valid = [f"{section_name}.{k}" for k in hints]
    close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    raise ConfigError(f"unknown config key {dotted!r} (from {origin}){hint}")
  cfg.__dict__.setdefault("_origins", {})[".".join(parts[:2])] = origin
  hint = hints[parts[1]]
  if len(parts) > 2:  # a key inside a dict field, e.g. data.weights.ArXiv=0.2
    if (typing.get_origin(hint) or hint) is not dict:
      raise ConfigError(f"config key {dotted!r} (from {origin}): {section_name}.{parts[1]} has no sub-keys")
    target = getattr(section, parts[1])
    for p in parts[2:-1]:
      target = target.setdefault(p, {})
    target[parts[-1]] = value
    return
  setattr(section, parts[1], _coerce(value, hint, dotted, origin))


# Config values that name local files or directories (the grammar: a path unless builtin:NAME, ib:PATH, maxlm:PATH).
PATH_KEYS = ("data.path", "data.tokenizer", "data.index_file", "data.mixture", "data.grammar",
             "loss.cost_embedding_file", "checkpoint.init_from", "inject.paraphrase_file", "inject.once_file")


def absolute_paths(cfg: Config) -> None:
  """Makes every existing local path of PATH_KEYS absolute, so the config a run saves reads the same files from any
  working directory (evaluation, conversion and analysis of the run start elsewhere)."""
  for key in PATH_KEYS:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value and "://" not in value and os.path.exists(value):
      setattr(getattr(cfg, section), name, os.path.abspath(value))


def parse_override(text: str) -> tuple[str, Any]:
  if "=" not in text:
    raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.steps=100)")
  key, raw = text.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw != "" else ""
  except yaml.YAMLError:
    value = raw
  return key.strip(), value


def check_command_line_overrides(overrides) -> None:
  """A ConfigError when a command line sets one key twice (which would silently keep the last): the CLIs call it;
  programs that build override lists may layer them."""
  seen = {}
  for text in overrides:
    key = parse_override(text)[0]
    if key in seen:
      raise ConfigError(f"{key} is set twice on the command line ({seen[key]!r} and {text!r}): keep one")
    seen[key] = text


def load_config(name_or_path: str = "demo", overrides: tuple[str, ...] | list[str] = (),
                *, num_devices: Optional[int] = None) -> Config:
  """The schema's defaults, then the preset chain, then `key=value` overrides; validated and finalized.

  configs/base.yaml documents every key with its default (a test keeps it equal to the schema); it is not read.
  """
  cfg = Config()
  for data, origin in _layers(name_or_path):
    _apply(cfg, data, origin)
  for text in overrides:
    key, value = parse_override(text)
    if _is_text_field(key) and not isinstance(value, str) and value is not None:
      value = text.split("=", 1)[1]  # a string field takes the text as typed (YAML would read 10:15 as 615)
    set_value(cfg, key, value, f"override {text!r}")
  finalize(cfg, num_devices=num_devices)
  _check_new_run(cfg)
  return cfg


def _is_text_field(dotted: str) -> bool:
  parts = dotted.split(".")
  section = field_types(Config).get(parts[0])
  if section is None or len(parts) != 2:
    return False
  hint = field_types(section).get(parts[1])
  return hint is str or hint == Optional[str]


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


def _check_ranges(cfg: Config) -> None:
  """Single values out of range: (key, ok, requirement) rows, each error naming who set the value."""
  m, t, o, c, r = cfg.model, cfg.train, cfg.optim, cfg.checkpoint, cfg.run
  rows = [
      ("model.vocab_size", m.vocab_size > 0, "positive"), ("model.hidden", m.hidden > 0, "positive"),
      ("model.layers", m.layers > 0, "positive"), ("model.heads", m.heads > 0, "positive"),
      ("model.ffn", m.ffn > 0, "positive"), ("model.kv_heads", m.kv_heads >= 0, ">= 0 (0 = model.heads)"),
      ("model.head_dim", m.head_dim >= 0, ">= 0 (0 = hidden / heads)"),
      ("model.max_positions", m.max_positions > 0, "positive"), ("model.norm_eps", m.norm_eps > 0, "positive"),
      ("model.scan_unroll", m.scan_unroll >= 1, "a positive number of layers per scan iteration"),
      ("model.init_std", m.init_std > 0, "positive"), ("model.rope_theta", m.rope_theta > 0, "positive"),
      ("train.steps", t.steps > 0, "positive"), ("train.global_batch", t.global_batch > 0, "positive"),
      ("train.seq_len", t.seq_len > 0, "positive"), ("train.microbatches", t.microbatches > 0, "positive"),
      ("run.log_every", r.log_every > 0, "positive"), ("run.eval_every", r.eval_every >= 0, ">= 0 (0 = at the end)"),
      ("run.eval_batches", r.eval_batches >= 0, ">= 0"),
      ("mesh.slices", cfg.mesh.slices >= 1, "a positive number of TPU slices / nodes (1 = one slice)"),
      ("optim.lr", o.lr > 0 and math.isfinite(o.lr), "a positive finite learning rate"),
      ("optim.b1", 0 <= o.b1 < 1, "in [0, 1)"), ("optim.b2", 0 <= o.b2 < 1, "in [0, 1)"),
      ("optim.eps", o.eps > 0, "positive"), ("optim.weight_decay", o.weight_decay >= 0, ">= 0"),
      ("optim.grad_clip", o.grad_clip >= 0, ">= 0 (0 = no clipping)"),
      ("optim.warmup_steps", o.warmup_steps >= 0, ">= 0"), ("optim.min_lr_ratio", 0 <= o.min_lr_ratio <= 1,
                                                              "in [0, 1]"),
      ("checkpoint.every", c.every >= 1, "a positive number of steps (disable saves with checkpoint.enabled=false)"),
      ("checkpoint.keep_last", c.keep_last >= 0, ">= 0 (0 = keep all)"),
      ("checkpoint.keep_every", c.keep_every >= 0, ">= 0 (0 = none)"),
      ("checkpoint.resume_step", c.resume_step >= -1, "-1 (the newest readable step) or a step number"),
      ("loss.gamma", cfg.loss.gamma >= 0, ">= 0"), ("loss.ratio", 0 <= cfg.loss.ratio <= 1, "in [0, 1]"),
      ("data.prefetch", cfg.data.prefetch >= 0, ">= 0"), ("data.num_workers", cfg.data.num_workers >= 0, ">= 0"),
      ("data.pcfg_tokens", cfg.data.pcfg_tokens >= 0, ">= 0 (0 = unbounded)"),
      ("data.validation_fraction", 0 <= cfg.data.validation_fraction < 1, "in [0, 1)"),
      ("data.mlm_prob", 0 < cfg.data.mlm_prob <= 1, "in (0, 1]"),
      ("data.mlm_max_predictions", cfg.data.mlm_max_predictions >= 1, "a positive number of positions per row"),
      ("data.mlm_mask_share", 0 <= cfg.data.mlm_mask_share <= 1, "in [0, 1]"),
      ("data.mlm_random_share", 0 <= cfg.data.mlm_random_share <= 1 - cfg.data.mlm_mask_share,
       "in [0, 1 - data.mlm_mask_share]"),
      ("inject.interval", cfg.inject.interval >= 0, ">= 0 (0 = no injection)"),
      ("inject.probe_every", cfg.inject.probe_every >= 0, ">= 0 (0 = before and after training only)"),
      ("inject.probe_batch_size", cfg.inject.probe_batch_size > 0, "positive"),
      ("lora.rank", cfg.lora.rank >= 0, ">= 0 (0 = off)"), ("lora.alpha", cfg.lora.alpha > 0, "positive"),
      ("lora.dropout", 0 <= cfg.lora.dropout < 1, "in [0, 1)"),
  ]
  for key, ok, requirement in rows:
    if not ok:
      section, name = key.split(".")
      value = getattr(getattr(cfg, section), name)
      raise ConfigError(f"{key} = {value} (from {cfg.origin(key)}) must be {requirement}")


def _check_model(cfg: Config) -> None:
  m, t = cfg.model, cfg.train
  if m.head_dim == 0 and m.hidden % m.heads:
    raise ConfigError(f"{cfg.said('model.hidden')} is not divisible by {cfg.said('model.heads')}; "
                      f"change one of them or set model.head_dim explicitly")
  if cfg.kv_heads <= 0 or m.heads % cfg.kv_heads:
    raise ConfigError(f"{cfg.said('model.heads')} must be a multiple of {cfg.said('model.kv_heads')}")
  if t.seq_len > m.max_positions:
    fixed = cfg.origin("model.max_positions").startswith("checkpoint.init_from")
    raise ConfigError(f"{cfg.said('train.seq_len')} exceeds {cfg.said('model.max_positions')}; lower "
                      + (f"train.seq_len to at most {m.max_positions} (the source model's context is fixed)" if fixed
                         else "train.seq_len or raise model.max_positions"))
  if t.global_batch % t.microbatches:
    raise ConfigError(f"{cfg.said('train.global_batch')} is not divisible by {cfg.said('train.microbatches')}")
  _check_family(cfg)


def _check_family(cfg: Config) -> None:
  """What a family row (maxlm.core.families) allows: RoPE settings only where there is RoPE, clip_qkv only for OLMo."""
  m = cfg.model
  fam = FAMILIES[m.family]
  if m.clip_qkv is not None and not fam.clip_qkv:
    raise ConfigError(f"{cfg.said('model.clip_qkv')}: clipping q, k, v is OLMo v1's option; the {m.family} family "
                      "has none (set model.clip_qkv=null)")
  if fam.positions == "learned" and (m.rope_scaling != "none" or m.rotary_fraction != 1.0):
    raise ConfigError(f"{cfg.said('model.rope_scaling')}, {cfg.said('model.rotary_fraction')}: the {m.family} family "
                      "has learned absolute positions, not RoPE; leave them at none and 1.0")
  if not 0 < m.rotary_fraction <= 1:
    raise ConfigError(f"{cfg.said('model.rotary_fraction')} must be in (0, 1]")
  rotary = int(cfg.head_dim * m.rotary_fraction)
  if fam.positions == "rope" and (rotary < 2 or rotary % 2):
    raise ConfigError(f"{cfg.said('model.rotary_fraction')} rotates {rotary} of head_dim {cfg.head_dim} dimensions; "
                      "RoPE needs an even number, at least 2")
  if m.rope_scaling != "none" and not m.rope_factor > 0:
    raise ConfigError(f"{cfg.said('model.rope_factor')} must be positive with {cfg.said('model.rope_scaling')}")
  if m.rope_scaling == "llama3" and not (m.rope_high_freq_factor > m.rope_low_freq_factor > 0
                                         and m.rope_original_max_positions > 0):
    raise ConfigError(f"rope scaling llama3 needs model.rope_high_freq_factor > model.rope_low_freq_factor > 0 and "
                      f"a positive model.rope_original_max_positions ({cfg.said('model.rope_low_freq_factor')}, "
                      f"{cfg.said('model.rope_high_freq_factor')})")


def _check_features(cfg: Config) -> None:
  """Combinations of the loss, run, LoRA and injection sections."""
  if cfg.loss.objective == "emo" and cfg.loss.cost_embedding == "file" and not cfg.loss.cost_embedding_file:
    raise ConfigError("loss.cost_embedding = 'file' needs loss.cost_embedding_file = path/to/embedding.npy (V x dE)")
  if cfg.loss.cost_embedding_file and (cfg.loss.objective != "emo" or cfg.loss.cost_embedding != "file"):
    raise ConfigError(f"{cfg.said('loss.cost_embedding_file')} is used only with loss.objective=emo and "
                      f"loss.cost_embedding=file ({cfg.said('loss.objective')}, {cfg.said('loss.cost_embedding')}): "
                      "set those, or drop the file")
  if cfg.loss.emo_clamp is not None and not cfg.loss.emo_clamp > 0:
    raise ConfigError(f"{cfg.said('loss.emo_clamp')} must be > 0, or null for no clamp (EMOLoss 0.0.1)")
  if cfg.loss.ignore_index != IGNORE_INDEX:
    raise ConfigError(f"loss.ignore_index = {cfg.loss.ignore_index}: maxlm's data pipelines mark positions without a "
                      f"target with {IGNORE_INDEX}, so the loss must ignore {IGNORE_INDEX}; remove the override")
  if cfg.loss.reduction == "reference" and cfg.loss.objective != "mile":
    raise ConfigError("loss.reduction = 'reference' applies to loss.objective = 'mile' only")
  if cfg.run.profile_steps:
    profile_range(cfg.run.profile_steps)
  files.check_url_support(cfg.run.dir, cfg.said("run.dir"))
  if files.is_url(cfg.run.dir) and cfg.run.profile_steps:
    raise ConfigError(f"{cfg.said('run.profile_steps')}: profiler traces are written to a local folder, and "
                      f"{cfg.said('run.dir')} is an object store; profile with a local run.dir")
  if cfg.model.attention == "splash" and cfg.train.seq_len % 128:
    raise ConfigError(f"model.attention = 'splash' (TPU splash attention) needs train.seq_len divisible by 128, got "
                      f"{cfg.train.seq_len}; change train.seq_len or use model.attention=auto")
  _check_masked_lm(cfg)
  unknown = [t for t in cfg.lora.targets if t not in LORA_TARGETS]
  if unknown:
    raise ConfigError(f"lora.targets {unknown} (from {cfg.origin('lora.targets')}): no such projection; choose from "
                      f"{', '.join(LORA_TARGETS)}")
  if cfg.lora.rank > 0 and not cfg.lora.targets:
    raise ConfigError("lora.rank > 0 needs at least one lora.targets entry (e.g. lora.targets=q,v)")
  if cfg.lora.rank > 0 and not cfg.checkpoint.init_from:
    raise ConfigError(f"lora.rank = {cfg.lora.rank} adapts a trained base model, but checkpoint.init_from is empty: "
                      "point it at a maxlm run or a `maxlm.convert from-hf` import (or set lora.rank=0)")


def _check_masked_lm(cfg: Config) -> None:
  """data.mlm and model.causal go together: a causal model cannot read the right context a masked token needs, and a
  bidirectional one trained on next-token targets would read its own targets."""
  if cfg.data.mlm and cfg.model.causal:
    raise ConfigError(f"{cfg.said('data.mlm')} trains a masked LM, which reads both sides of a masked token, but "
                      f"{cfg.said('model.causal')}: set model.causal=false")
  if not cfg.model.causal and not cfg.data.mlm:
    raise ConfigError(f"{cfg.said('model.causal')} (bidirectional attention) with next-token targets lets every "
                      "position read the token it predicts; set data.mlm=true (masked-LM batches) or model.causal=true")
  if cfg.data.mlm and cfg.data.source not in ("store", "replay", "pcfg"):
    raise ConfigError(f"{cfg.said('data.mlm')}: masked-LM batches are cut from token windows (data.source store, "
                      f"replay or pcfg), not from {cfg.said('data.source')}")
  if cfg.data.mlm and cfg.inject.interval > 0:
    raise ConfigError(f"{cfg.said('data.mlm')} with {cfg.said('inject.interval')}: knowledge injection writes "
                      "next-token targets into the rows; set inject.interval=0 for a masked LM")


def _check_new_run(cfg: Config) -> None:
  """What a config written now must not say (a saved config of an older run is still read as it is): a warmup that
  outlasts the run, a run.dir that cannot be a directory, a run.dir inside the token store it reads."""
  if cfg.optim.warmup_steps > cfg.train.steps:
    raise ConfigError(f"{cfg.said('optim.warmup_steps')} is above {cfg.said('train.steps')}: the learning rate "
                      f"would never reach optim.lr; set optim.warmup_steps <= {cfg.train.steps} (e.g. "
                      f"optim.warmup_steps={min(cfg.train.steps, max(cfg.train.steps // 10, 1))})")
  run_dir = os.path.abspath(os.path.expanduser(cfg.run.dir)) if "://" not in cfg.run.dir else ""
  if not run_dir:
    return
  path = run_dir
  while path and not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if os.path.exists(path) and not os.path.isdir(path):
    where = "is a file" if path == run_dir else f"is below {path}, which is a file"
    raise ConfigError(f"{cfg.said('run.dir')} {where}; a run directory must be a directory: choose another run.dir")
  if cfg.data.path and "://" not in cfg.data.path and cfg.data.source in ("store", "replay"):
    store = os.path.abspath(os.path.expanduser(cfg.data.path))
    if run_dir == store or run_dir.startswith(store.rstrip(os.sep) + os.sep):
      raise ConfigError(f"{cfg.said('run.dir')} is inside the token store {cfg.said('data.path')}: checkpoints and "
                        "logs would be written into the data; choose a run.dir outside it")


def profile_range(text: str) -> tuple[int, int]:
  """run.profile_steps "START:STOP" -> (START, STOP): the trace covers steps START+1 .. STOP."""
  try:
    start, stop = (int(x) for x in text.split(":"))
  except ValueError:
    raise ConfigError(f"run.profile_steps = {text!r} must look like START:STOP, e.g. 10:15") from None
  if not 0 <= start < stop:
    raise ConfigError(f"run.profile_steps = {text!r} needs 0 <= START < STOP")
  return start, stop


def finalize(cfg: Config, *, num_devices: Optional[int] = None) -> Config:
  """Checks values and combinations; `num_devices` (None = don't check the mesh) validates mesh sizes.

  Choices (Literal fields) and types were checked when each value was set.
  """
  if cfg.data.tokenizer and os.path.isdir(cfg.data.tokenizer):  # an HF model directory -> its tokenizer file
    cfg.data.tokenizer = resolve_tokenizer_path(cfg.data.tokenizer)
  _check_ranges(cfg)
  _check_model(cfg)
  _check_features(cfg)
  if num_devices is not None:
    m, t = cfg.model, cfg.train
    try:
      data, fsdp, tensor = mesh_shape(cfg.mesh, num_devices)
    except ConfigError as e:
      set_by = "; ".join(cfg.said(k) for k in ("mesh.data", "mesh.fsdp", "mesh.tensor"))
      raise ConfigError(f"{e} [{set_by}]") from None
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
    if data % cfg.mesh.slices:
      raise ConfigError(f"{cfg.said('mesh.slices')}, which must divide mesh.data = {data} (slices are joined along the "
                        f"data axis): set mesh.data to a multiple of it [{cfg.said('mesh.data')}]")
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


def save_config(cfg: Config, path: str, header: str = "") -> None:
  """Writes the resolved config as YAML (readable, after `header`) next to a JSON twin (exact), each replaced
  atomically (a local path or an object-store URL)."""
  files.write_atomic(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
  files.write_atomic(os.path.splitext(path)[0] + ".json", json.dumps(cfg.to_dict(), indent=1))
