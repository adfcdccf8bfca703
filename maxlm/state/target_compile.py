"""Compile for a target without owning it: the real train and eval steps lowered for a TPU slice's or GPU cluster's
compile-only devices, their compiled per-chip memory beside the analytic plan, and the collectives and kernels the
optimized HLO holds. Runs in the process maxlm.core.compilers prepares (`--dry-run --topology=SLICE`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from maxlm.core import compilers, sharding, targets
from maxlm.core.config import Config, load_config
from maxlm.core.errors import ConfigError
from maxlm.state import plan
from maxlm.state import step as step_lib
from maxlm.state import layout as layout_lib
from maxlm.state.layout import layout

HBM_LIMIT = 0.92  # a compiled peak above this fraction of HBM is refused: the runtime needs the rest
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"(?<![\w%.-])(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_CUSTOM_CALL_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=.*custom_call_target=\"([^\"]+)\"", re.M)
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
LOSS_KERNEL_PREFIX = "fused_loss"  # kernels/pallas_*: the names of the fused loss's pallas_calls


@dataclasses.dataclass
class Compiled:
  """What one compile shows: memory per chip (bytes), seconds, the optimized HLO's collectives and kernels."""
  arguments: int
  outputs: int
  aliased: int
  temp: int
  lower_seconds: float
  compile_seconds: float
  collectives: dict
  kernels: dict  # custom-call kernels: {"cudnn": {...}, "mosaic": {...}, "triton": {...}} name -> count
  xla_peak: int | None = None  # the compiler's own peak_memory_in_bytes (jaxlib >= 0.10), from its buffer schedule

  @property
  def allocated(self) -> int:
    """arguments + outputs - aliased + temp: every buffer the program allocates, as if all were live at once."""
    return self.arguments + self.outputs - self.aliased + self.temp

  @property
  def peak(self) -> int:
    """The compiler's peak where it reports one, else `allocated`. XLA's GPU compiler gives the two within 1%;
    libtpu's temp is larger than its peak (it counts buffers never live at once), and libtpu refuses a program by
    its peak ("Ran out of memory on HBM, the total memory required for HLO temporaries ... exceeds available HBM"),
    not by that sum: programs whose sum passed HBM compiled (docs/BENCHMARKS.md)."""
    return self.xla_peak or self.allocated


def _base_name(instruction: str) -> str:
  return re.sub(r"(\.\d+)+$", "", instruction)


def hlo_kernels(hlo: str) -> dict:
  """Custom-call kernels of an optimized HLO module: cuDNN (`__cudnn$...`, by call target), Mosaic
  (`tpu_custom_call`, by instruction name: splash_mha_*, fused_loss_*) and Triton (Pallas GPU: every one is named
  pallas_call, so by the fused-loss scope of its metadata where it has one)."""
  found = {"cudnn": collections.Counter(), "mosaic": collections.Counter(), "triton": collections.Counter()}
  for match in _CUSTOM_CALL_RE.finditer(hlo):
    name, call_target = match.groups()
    end = hlo.find("\n", match.end())
    op_name = _OP_NAME_RE.search(hlo[match.start():end if end >= 0 else None])
    # Pallas GPU kernels are all named pallas_call: the jax scope in the metadata says whose (fused_loss_bwd, ...)
    scopes = [p for p in (op_name.group(1).split("/") if op_name else []) if p.startswith(LOSS_KERNEL_PREFIX)]
    if scopes and _base_name(name) == "pallas_call":
      name = scopes[-1]
    if call_target.startswith("__cudnn$"):
      found["cudnn"][call_target] += 1
    elif call_target == "tpu_custom_call":
      found["mosaic"][_base_name(name)] += 1
    elif "triton" in call_target:
      found["triton"][_base_name(name)] += 1
  return {k: dict(v) for k, v in found.items()}


def hlo_collectives(hlo: str) -> dict:
  """Collective ops of an optimized HLO module (an async pair counts once, at its start)."""
  counts = collections.Counter(_COLLECTIVE_RE.findall(hlo))
  return {c: counts.get(c, 0) for c in COLLECTIVES}


def attention_kernel(kernels: dict) -> str:
  """The attention the compiled program runs, from its kernels: cuDNN fused attention, splash, or XLA's own."""
  fmha = {k: v for k, v in kernels["cudnn"].items() if "fmha" in k}
  if fmha:
    return "cudnn (" + ", ".join(f"{k} x{v}" for k, v in sorted(fmha.items())) + ")"
  splash = {k: v for k, v in kernels["mosaic"].items() if "splash" in k or "flash" in k}
  if splash:
    return "splash (Mosaic tpu_custom_call: " + ", ".join(f"{k} x{v}" for k, v in sorted(splash.items())) + ")"
  return "xla (no attention kernel in the HLO: dot and softmax fusions)"


def loss_kernel(kernels: dict) -> str:
  for kind, label in (("mosaic", "pallas (Mosaic tpu_custom_call: "), ("triton", "pallas (Triton: ")):
    found = {k: v for k, v in kernels[kind].items() if k.startswith(LOSS_KERNEL_PREFIX)}
    if found:
      return label + ", ".join(f"{k} x{v}" for k, v in sorted(found.items())) + ")"
  return "xla (no loss kernel in the HLO: blockwise or reference fusions)"


def compile_one(jitted, *args) -> tuple[Compiled, str]:
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  return Compiled(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                  mem.temp_size_in_bytes, t1 - t0, t2 - t1, hlo_collectives(hlo), hlo_kernels(hlo),
                  getattr(mem, "peak_memory_in_bytes", None) or None), hlo


@contextlib.contextmanager
def _cudnn_checks_for(device):
  """jax's cuDNN attention checks ask the host's default backend for the GPU's compute capability, so compiling for an
  H100 from a CPU host they judge it pre-Hopper (head dims over 128 refused). Within this context, while the steps
  are traced, they answer for the target `device` (its compute_capability) instead."""
  cap = getattr(device, "compute_capability", None) if device is not None else None
  try:
    from jax._src.cudnn import fused_attention_stablehlo as checks  # pylint: disable=import-outside-toplevel
  except ImportError:
    checks = None
  names = ("check_compute_capability", "is_cuda_compute_capability_equal")
  if not cap or jax.default_backend() == "gpu" or checks is None or not all(hasattr(checks, n) for n in names):
    yield
    return
  parse = lambda c: tuple(int(x) for x in str(c).split(".")[:2])  # pylint: disable=unnecessary-lambda-assignment
  target, saved = parse(cap), [getattr(checks, n) for n in names]
  checks.check_compute_capability = lambda c: target >= parse(c)
  checks.is_cuda_compute_capability_equal = lambda c: target == parse(c)
  try:
    yield
  finally:
    for name, original in zip(names, saved):
      setattr(checks, name, original)


def target_mesh(cfg: Config, target: targets.Target) -> jax.sharding.Mesh:
  """The config's (resolved) mesh over the target's compile-only devices, in topology-aware order."""
  return sharding.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), target.devices(), slices=cfg.mesh.slices)


def compile_for_target(cfg: Config, target: targets.Target) -> dict:
  """Lowers and compiles the train and eval steps of `cfg` (its mesh resolved for target.chips) for `target`."""
  mesh = target_mesh(cfg, target)
  lay = layout(cfg, mesh)
  train_step, batch_shardings = step_lib.make_train_step(lay)
  batch = {k: jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len), jnp.int32, sharding=s)
           for k, s in batch_shardings.items()}
  with _cudnn_checks_for(mesh.devices.flat[0] if targets.mesh_platform(mesh) == "gpu" else None):
    train, _ = compile_one(train_step, lay.abstract, batch)
    evaluate, _ = compile_one(step_lib.make_eval_step(lay, batch_shardings), lay.abstract, batch)
  from maxlm.kernels import resolve_impl  # local: the kernels import Pallas lazily but are still heavy
  device = mesh.devices.flat[0]
  return {"train": train, "eval": evaluate, "plan": plan.memory_estimate(cfg, target.chips, target.platform, device),
          "loss_impl": resolve_impl(cfg.loss.impl, mesh), "platform": targets.mesh_platform(mesh),
          "device_kind": mesh.devices.flat[0].device_kind}


def _peak_source(train: Compiled) -> str:
  if not train.xla_peak:
    return "arguments + outputs - aliased + temp (this compiler reports no peak of its own)"
  if abs(train.xla_peak - train.allocated) <= max(train.allocated // 1000, 2 ** 20):
    return "the compiler's peak_memory_in_bytes, equal to arguments + outputs - aliased + temp here"
  said = f"the compiler's peak_memory_in_bytes (arguments + outputs - aliased + temp = {_size(train.allocated).strip()}"
  if train.allocated > train.xla_peak:
    return said + ": temp counts buffers never live at once; the compiler checks HBM against the peak)"
  return said + ")"


def _size(n: float) -> str:
  return f"{n / 2**30:8.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:8.1f} MiB"


def _compiler_version(platform: str) -> str:
  name = "libtpu" if platform == "tpu" else "jax-cuda12-plugin"
  try:
    dist = importlib.metadata.distribution(name)
  except importlib.metadata.PackageNotFoundError:
    return name
  return f"{name} {dist.version} from {os.path.normpath(str(dist.locate_file('')))}"


def format_report(cfg: Config, target: targets.Target, result: dict) -> str:
  train, evaluate, est = result["train"], result["eval"], result["plan"]
  data, fsdp, tensor = est["mesh"]
  hbm = target.hbm_bytes
  lines = [
      f"target: {target.name}: {target.chips} x {result['device_kind']}, {target.hosts} host"
      f"{'s' if target.hosts > 1 else ''}, topology {target.topology}"
      f"{f' x {target.slices} slices joined by DCN (mesh.slices={cfg.mesh.slices})' if target.slices > 1 else ''}; "
      "compiled on this host by "
      f"{_compiler_version(target.platform)} (jaxlib {importlib.metadata.version('jaxlib')})",
      f"model: {cfg.model.family}, {est['param_count']:,} parameters ({est['param_count'] / 1e9:.3f}B); mesh: "
      f"data={data} fsdp={fsdp} tensor={tensor}; {est['tokens_per_device']:,.0f} tokens per chip per microbatch "
      f"(train.microbatches={cfg.train.microbatches}), remat={cfg.model.remat}, attention={cfg.model.attention}, "
      f"loss.impl={cfg.loss.impl}",
      f"per-chip memory, train step:  analytic plan ({est['platform']} row, attention {est['attention']}) | compiled",
      f"  params       {_size(est['params'])} | arguments {_size(train.arguments)}",
      f"  optimizer    {_size(est['optimizer'])} | outputs   {_size(train.outputs)}",
      f"  gradients    {_size(est['gradients'])} | aliased   {_size(train.aliased)}",
      f"  activations  {_size(est['activations'])} | temp      {_size(train.temp)}",
      f"  total        {_size(est['total'])} | peak      {_size(train.peak)}  (plan / peak = "
      f"{est['total'] / max(train.peak, 1):.2f})",
      f"  HBM          {_size(hbm)} | peak is {100 * train.peak / hbm:.1f}% of HBM, headroom "
      f"{_size(hbm - train.peak).strip()} (limit {100 * HBM_LIMIT:.0f}%)",
      "  plan's activations: " + ", ".join(f"{k} {_size(v).strip()}" for k, v in plan.activation_parts(est).items()),
      f"  peak: {_peak_source(train)}",
      f"eval step: peak {_size(evaluate.peak).strip()} (arguments {_size(evaluate.arguments).strip()}, temp "
      f"{_size(evaluate.temp).strip()})",
      f"compile seconds: train step {train.compile_seconds:.1f} (lowering {train.lower_seconds:.1f}), eval step "
      f"{evaluate.compile_seconds:.1f} (lowering {evaluate.lower_seconds:.1f})",
      "collectives (train step): " + ", ".join(f"{k} {v}" for k, v in train.collectives.items()),
      f"attention kernel: {attention_kernel(train.kernels)}",
      f"loss kernel: {loss_kernel(train.kernels)}; loss.impl={cfg.loss.impl} resolves to {result['loss_impl']} on "
      f"{result['platform']}",
      f"compiled bytes (train step): arguments={train.arguments} outputs={train.outputs} aliased={train.aliased} "
      f"temp={train.temp} allocated={train.allocated} peak={train.peak} plan={int(est['total'])} hbm={hbm}",
  ]
  return "\n".join(lines)


def check_fits(cfg: Config, target: targets.Target, result: dict) -> None:
  """A ConfigError when the compiled peak passes HBM_LIMIT of HBM, naming settings that would bring it under."""
  train = result["train"]
  limit = HBM_LIMIT * target.hbm_bytes
  if train.peak <= limit:
    return
  fixed = train.arguments + train.outputs - train.aliased  # the state and its update: only sharding lowers it
  temporaries = train.peak - fixed
  fixes = []
  if temporaries > 0 and fixed < limit:
    # temporaries are mostly one microbatch's activations: they shrink about in proportion
    m = cfg.train.microbatches
    k = 2
    while fixed + temporaries / k > 0.85 * target.hbm_bytes and k < 64:
      k *= 2
    per_device = cfg.train.global_batch // (cfg.mesh.data * cfg.mesh.fsdp)
    if per_device % (m * k) == 0:
      fixes.append(f"train.microbatches={m * k} (temporaries {_size(temporaries).strip()} shrink about {k}x)")
    if cfg.model.remat != "full":
      fixes.append("model.remat=full (keeps one hidden state per layer)")
    if attention_kernel(train.kernels).startswith("xla"):
      fixes.append(f"model.attention={'cudnn' if target.platform == 'gpu' else 'splash'} (no (T, T) scores in HBM)")
  if cfg.mesh.data > 1 or cfg.mesh.tensor > 1:
    fixes.append(f"mesh.data=1 mesh.tensor=1 mesh.fsdp=-1 (shard the state {target.chips} ways)")
  n = int(target.name.rsplit("-", 1)[1])
  more = f"{target.slices}x" if target.slices > 1 else ""
  fixes.append(f"a larger slice (--topology={more}{target.model}-{2 * n}: the state is sharded over more chips)")
  raise ConfigError(f"the compiled train step needs {_size(train.peak).strip()} per chip on {target.name}, "
                    f"{100 * train.peak / target.hbm_bytes:.0f}% of its {_size(target.hbm_bytes).strip()} HBM (over "
                    f"{100 * HBM_LIMIT:.0f}%); settings that lower it: " + "; ".join(fixes))


def report(cfg: Config, target: targets.Target) -> tuple[str, dict]:
  result = compile_for_target(cfg, target)
  return format_report(cfg, target, result), result


def slice_overrides(config: str, overrides, target: targets.Target) -> list[str]:
  """What a multi-slice target adds to the config: mesh.slices = its slices and, where the config keeps one data
  row, mesh.data = slices (data parallelism across DCN, as MaxText's dcn_data_parallelism=-1). A ConfigError when the
  config's mesh.slices says otherwise."""
  cfg = load_config(config, overrides, num_devices=target.chips)
  if cfg.mesh.slices == target.slices:
    return []
  if cfg.mesh.slices != 1 or target.slices == 1:
    raise ConfigError(f"{cfg.said('mesh.slices')} but --topology={target.name} has {target.slices} slice"
                      f"{'s' if target.slices > 1 else ''}: name the target {cfg.mesh.slices}x"
                      f"{target.name.split('x')[-1]}, or set mesh.slices={target.slices}")
  return [f"mesh.slices={target.slices}", *([f"mesh.data={target.slices}"] if cfg.mesh.data == 1 else [])]


def dry_run(config: str, overrides, slice_name: str, argv) -> int:
  """`--dry-run --topology=SLICE`: the CLI checks the name and runs itself again (argv) in the target compiler's
  environment (maxlm.core.compilers); there, the steps are compiled and the report printed. Returns the exit code."""
  target = targets.parse(slice_name)
  if not os.environ.get(compilers.CHILD_ENV):
    return compilers.run_compile(target.platform, argv)
  handler = logging.StreamHandler(sys.stderr)  # maxlm's warnings (the attention fallback) reach the parent's stderr
  handler.setFormatter(logging.Formatter("maxlm: warning: %(message)s"))
  handler.setLevel(logging.WARNING)
  logging.getLogger("maxlm").addHandler(handler)
  cfg = load_config(config, [*overrides, *slice_overrides(config, overrides, target)], num_devices=target.chips)
  taken, note = layout_lib.planned_architecture(cfg, target.chips)
  if note and not taken:
    logging.getLogger("maxlm").warning(note)
  text, result = report(cfg, target)
  print(text + (f"\n{note}" if taken else ""), flush=True)
  check_fits(cfg, target, result)
  return 0
