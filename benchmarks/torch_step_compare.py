"""maxlm's training step against transformers + torch eager: same LLaMA, same weights, same batch, same AdamW.

Owns nothing the library uses; prints one JSON line per shape with both sides' step times (interleaved runs).

  python benchmarks/torch_step_compare.py                       # demo and 134M shapes, 2 threads, 15 rounds
  python benchmarks/torch_step_compare.py --shapes demo --rounds 30 --objectives ce,mile

Every side runs in its own process, as a user runs it: a maxlm side tunes its allocator as `python -m maxlm.train`
does (maxlm/host.py; `--untuned` adds a side without), the torch side keeps glibc's defaults. All run fp32 on the
CPU with one thread budget: the parent is pinned to `--threads` cores and the sides inherit it, which bounds XLA's
intra-op pool (sized from the schedulable cores) and torch.set_num_threads(threads) alike. XLA_FLAGS is left as the
caller set it; the JSON records it. Each round visits every side in a rotating order, so load from other jobs on a
shared machine hits all sides alike: `--settle` untimed steps, then one timed step (a side's step right after
another's pays for the memory that one just released; a training run never alternates). Medians and quartiles of
wall time, medians of the step's user and system CPU seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pickle
import statistics
import sys
import time


def pin_threads(threads: int) -> list[int]:
  """Pins this process to `threads` of its cores (before jax/torch create their pools); returns them."""
  cores = sorted(os.sched_getaffinity(0))
  if threads > len(cores):
    raise SystemExit(f"--threads {threads}: only {len(cores)} cores are schedulable here")
  os.sched_setaffinity(0, cores[:threads])
  return cores[:threads]


# Shapes: (preset, overrides). "mid" is train_throughput.py --mid: a 134M LLaMA, 4 x 256 tokens.
def shape_overrides(name: str) -> list[str]:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from train_throughput import MID_100M  # pylint: disable=import-outside-toplevel
  base = ["checkpoint.enabled=false", "model.compute_dtype=float32", "model.param_dtype=float32"]
  return base + {"demo": [], "mid": MID_100M}[name]


def maxlm_side(preset: str, overrides: list[str], objective: str, local_batch: dict):
  """(compiled step, state, batch, cfg) of maxlm's train step for `objective`."""
  import jax  # pylint: disable=import-outside-toplevel
  from maxlm.core import sharding  # pylint: disable=import-outside-toplevel
  from maxlm.state import layout as state_lib  # pylint: disable=import-outside-toplevel
  from maxlm.state import step as step_lib  # pylint: disable=import-outside-toplevel
  from maxlm.core.config import load_config  # pylint: disable=import-outside-toplevel

  cfg = load_config(preset, overrides + [f"loss.objective={objective}"], num_devices=jax.device_count())
  lay = state_lib.layout(cfg)
  step_fn, _ = step_lib.make_train_step(lay)
  state = state_lib.init_state(lay)
  batch = sharding.global_batch(lay.mesh, local_batch)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}
  compiled = step_fn.lower(lay.abstract, abstract_batch).compile()

  def run(state):
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return state, float(metrics["loss"])

  return run, state, cfg, lay


def torch_side(cfg, params: dict, local_batch: dict, attention: str):
  """A step function of LlamaForCausalLM with maxlm's initial weights, CE loss, clipping and AdamW as maxlm's."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from maxlm.hf import config_map  # pylint: disable=import-outside-toplevel
  from maxlm.hf import names as hf_names  # pylint: disable=import-outside-toplevel
  from maxlm.state import optim  # pylint: disable=import-outside-toplevel

  hf = config_map.hf_config(cfg, dtype="float32", bos_id=None, eos_id=None)
  config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
  config._attn_implementation = attention  # pylint: disable=protected-access
  model = transformers.LlamaForCausalLM(config).float().train()

  def read(t):
    array = params
    for k in t.key:
      array = array[k]
    return np.asarray(array[t.layer] if t.layer is not None else array)

  state_dict = {t.hf_name: torch.from_numpy(np.array(a, np.float32)) for t, a in hf_names.unstack(params, read)}
  missing, unexpected = model.load_state_dict(state_dict, strict=False)
  if unexpected or [m for m in missing if "rotary" not in m]:
    raise SystemExit(f"weight mismatch: missing {missing}, unexpected {unexpected}")
  o = cfg.optim
  named = list(model.named_parameters())
  # maxlm.state.optim.weight_decay_mask: matrices (embedding included) decay, norm scales do not.
  decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n]
  no_decay = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  schedule = optim.learning_rate_schedule(cfg)
  lrs = [float(schedule(i)) for i in range(cfg.train.steps)]
  inputs = torch.from_numpy(local_batch["inputs"]).long()
  targets = torch.from_numpy(local_batch["targets"]).long().reshape(-1)
  params_list = [p for _, p in named]
  counter = {"step": 0}

  def run(_):
    for group in opt.param_groups:  # optax applies the schedule of step t to update t: the same here
      group["lr"] = lrs[min(counter["step"], len(lrs) - 1)]
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params_list, o.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    counter["step"] += 1
    return None, float(loss.detach())

  return run


def summarise(times: list[float], tokens: int) -> dict:
  q1, med, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
  med = statistics.median(times)
  return {"median_s": round(med, 4), "q1_s": round(q1, 4), "q3_s": round(q3, 4), "min_s": round(min(times), 4),
          "max_s": round(max(times), 4), "tokens_per_sec": round(tokens / med, 1)}


def side_worker(conn, side: dict, shape: str, local: dict, params_file: str, attention: str, threads: int):
  """One side in its own process, as a user would run it: builds its step, then answers ("run", n) with the
  wall, user and system seconds of the last of n steps and its loss, until ("stop", 0)."""
  os.environ.update(side.get("env", {}))  # before jax loads: XLA_FLAGS and the like
  if side["kind"] == "maxlm":
    from maxlm.core import host  # pylint: disable=import-outside-toplevel
    host.tune_cpu_malloc(side["malloc"])  # what `python -m maxlm.train` does before jax starts
    import jax  # pylint: disable=import-outside-toplevel
    run, state, _, lay = maxlm_side("demo", shape_overrides(shape) + side["overrides"], side["objective"], local)
    if params_file and not os.path.exists(params_file):
      with open(params_file, "wb") as f:
        pickle.dump(jax.device_get(lay.model_params(state)), f)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    from maxlm.core.config import load_config  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)
    with open(params_file, "rb") as f:
      params = pickle.load(f)
    run, state = torch_side(load_config("demo", shape_overrides(shape), num_devices=1), params, local, attention), None
  conn.send("ready")
  while True:
    command, n = conn.recv()
    if command == "stop":
      return
    for _ in range(n):
      t0, c0 = time.perf_counter(), os.times()
      state, loss = run(state)
      wall, c1 = time.perf_counter() - t0, os.times()
    conn.send((wall, c1.user - c0.user, c1.system - c0.system, loss))


def compare(shape: str, objectives: list[str], rounds: int, warmup: int, attention: str,
            variants: dict[str, list[str]] | None = None, settle: int = 1, threads: int = 2,
            untuned: bool = False) -> dict:
  import multiprocessing  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from maxlm.core.config import load_config  # pylint: disable=import-outside-toplevel

  cfg0 = load_config("demo", shape_overrides(shape), num_devices=1)
  B, T, V = cfg0.train.global_batch, cfg0.train.seq_len, cfg0.model.vocab_size
  rng = np.random.default_rng(0)
  local = {"inputs": rng.integers(0, V, (B, T), dtype=np.int32),
           "targets": rng.integers(0, V, (B, T), dtype=np.int32)}
  sides = {}  # name -> spec; the first maxlm side writes the initial weights torch starts from (same seed on all)
  for objective in objectives:
    for variant, extra in {"": [], **(variants or {})}.items():
      env = dict(o.split("=", 1) for o in extra if o.split("=", 1)[0].isupper())  # XLA_FLAGS=...: the side's env
      sides[f"maxlm_{objective}" + (f"_{variant}" if variant else "")] = {
          "kind": "maxlm", "objective": objective, "overrides": [o for o in extra if o.split("=", 1)[0] not in env],
          "malloc": "auto", "env": env}
  if untuned:
    sides[f"maxlm_{objectives[0]}_untuned"] = {"kind": "maxlm", "objective": objectives[0], "overrides": [],
                                               "malloc": "off"}
  sides["torch"] = {"kind": "torch", "malloc": "glibc default"}
  ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no allocator or thread state shared
  conns, procs = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    params_file = os.path.join(tmp, "params.pkl")
    for name, side in sides.items():  # one at a time: the torch side needs the weights file
      parent, child = ctx.Pipe()
      proc = ctx.Process(target=side_worker, args=(child, side, shape, local, params_file, attention, threads),
                         daemon=True)
      proc.start()
      procs.append(proc)
      try:
        parent.recv()  # "ready"
      except EOFError:
        raise SystemExit(f"side {name} failed to start (its traceback is above)") from None
      conns[name] = parent

    def step(name, n):
      conns[name].send(("run", n))
      return conns[name].recv()

    try:
      first_loss = {name: round(step(name, 1)[3], 5) for name in sides}
      for name in sides:
        if warmup > 1:
          step(name, warmup - 1)
      times = {name: [] for name in sides}
      cpu = {name: [] for name in sides}
      names = list(sides)
      for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
          wall, user, system, _ = step(name, settle + 1)  # settle untimed steps: see the module docstring
          times[name].append(wall)
          cpu[name].append((user, system))
    finally:
      for name, conn in conns.items():
        conn.send(("stop", 0))
      for proc in procs:
        proc.join(timeout=60)
  tokens = B * T
  out = {"shape": shape, "tokens_per_step": tokens, "B": B, "T": T, "vocab": V, "hidden": cfg0.model.hidden,
         "layers": cfg0.model.layers, "rounds": rounds, "settle_steps": settle, "first_step_loss": first_loss,
         "torch_attention": attention, "torch_threads": threads, "processes": "one per side",
         "malloc": {name: side["malloc"] for name, side in sides.items()}, "variants": variants or {},
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
         "jax_version": importlib.metadata.version("jax"), "torch_version": importlib.metadata.version("torch")}
  for name, ts in times.items():
    out[name] = summarise(ts, tokens)
    out[name]["cpu_user_s"] = round(statistics.median(u for u, _ in cpu[name]), 3)
    out[name]["cpu_system_s"] = round(statistics.median(s for _, s in cpu[name]), 3)
  for name in names:
    if name != "torch":
      out[f"{name}_vs_torch_tokens_per_sec"] = round(out[name]["tokens_per_sec"] / out["torch"]["tokens_per_sec"], 3)
  if "maxlm_mile" in out and "maxlm_ce" in out:
    out["mile_over_ce_step_time"] = round(out["maxlm_mile"]["median_s"] / out["maxlm_ce"]["median_s"], 3)
  return out


def cpu_identity() -> dict:
  """The CPU's model name, family/model numbers and widest vector extension, from /proc/cpuinfo (Linux).

  Ratios between the two sides move with the CPU (vector width, cache sizes), so every row names the one it ran on.
  """
  fields = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    return {}
  flags = set(fields.get("flags", "").split())
  widest = next((isa for isa in ("avx512f", "avx2", "avx", "sse4_2") if isa in flags), "other")
  return {"model_name": fields.get("model name", "unknown"), "family": fields.get("cpu family"),
          "model": fields.get("model"), "widest_vector_isa": widest}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="demo,mid", help="comma list of demo (4M, 16 x 128) and mid (134M, 4 x 256)")
  p.add_argument("--objectives", default="ce,mile", help="maxlm objectives (torch runs CE)")
  p.add_argument("--rounds", type=int, default=15, help="timed steps per side")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--settle", type=int, default=1,
                 help="untimed steps of a side before its timed step in every round (0: strict alternation)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--torch-attention", default="sdpa", choices=["sdpa", "eager"])
  p.add_argument("--untuned", action="store_true",
                 help="add a maxlm side with MAXLM_CPU_MALLOC=off (glibc's default allocator, see maxlm/host.py)")
  p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
                 help="an extra maxlm side per objective with these config overrides, e.g. "
                      "noscan=model.scan_layers=false; an upper-case KEY sets that side's environment, e.g. "
                      "ynn=XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= (repeatable)")
  args = p.parse_args()
  variants = {}
  for spec in args.variant:
    name, _, overrides = spec.partition("=")
    if not name or not overrides:
      p.error(f"--variant {spec!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    variants[name] = overrides.split(",")
  cores = pin_threads(args.threads)  # the side processes inherit the affinity
  for shape in args.shapes.split(","):
    row = compare(shape, args.objectives.split(","), args.rounds, args.warmup, args.torch_attention, variants,
                  args.settle, args.threads, args.untuned)
    row["cores"] = cores
    row["cpu"] = cpu_identity()
    row["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
