"""Decode throughput: maxlm.generate (KV cache, jitted decode step) against transformers' generate on the HF export of
the same weights, greedy, fp32, on this machine's CPU.

  python benchmarks/generate_bench.py                       # demo size and a ~134M LLaMA, batch 1 and 8
  python benchmarks/generate_bench.py --sizes demo --batches 1 --new 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from maxlm.checkpoint import params as ckpt_params
from maxlm import convert
from maxlm import decoding
from maxlm import model as model_lib
from maxlm.core.config import load_config
from maxlm.core.errors import cli_description

SIZES = {
    "demo": [],
    # The "mid-size" CPU point of benchmarks/train_throughput.py: hidden 768, 12 layers, vocab 32000 (134M params).
    "mid": ["model.vocab_size=32000", "model.hidden=768", "model.layers=12", "model.heads=12", "model.ffn=2048",
            "model.max_positions=256", "train.seq_len=256"],
}


def build(size: str, root: str):
  """A randomly initialised model of `size` as a maxlm run and its fp32 HF export."""
  cfg = load_config("demo", SIZES[size] + ["model.compute_dtype=float32"])
  params = model_lib.init_params(cfg.model, 0)
  run_dir, hf_dir = os.path.join(root, f"{size}_run"), os.path.join(root, f"{size}_hf")
  ckpt_params.save_params(run_dir, cfg, params)
  convert.to_hf(run_dir, hf_dir, dtype="float32", log=lambda *_: None)
  return cfg, jax.tree.map(np.asarray, params), hf_dir


def best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def measure(size: str, batch: int, prompt_len: int, new: int, repeats: int, root: str, built: dict) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  if size not in built:
    built[size] = build(size, root)
  cfg, params, hf_dir = built[size]
  prompts = np.random.default_rng(0).integers(1, cfg.model.vocab_size, (batch, prompt_len)).tolist()
  gen = decoding.Generator(cfg, params, compute_dtype="float32", batch_size=batch)
  t0 = time.perf_counter()
  ours = gen(prompts, max_new_tokens=new)  # compiles prefill and the decode step
  compile_s = time.perf_counter() - t0
  ours_s = best_of(lambda: gen(prompts, max_new_tokens=new), repeats)
  prefill_s = best_of(lambda: gen(prompts, max_new_tokens=1), repeats)
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  ids = torch.tensor(prompts)

  def hf_generate(n):
    with torch.no_grad():
      return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)

  theirs = hf_generate(new)[:, prompt_len:].tolist()  # warm-up
  hf_s = best_of(lambda: hf_generate(new), repeats)
  hf_prefill_s = best_of(lambda: hf_generate(1), repeats)
  tokens = batch * new
  return {"size": size, "params": model_lib.param_count(model_lib.abstract_model(cfg.model)[1]), "batch": batch,
          "prompt": prompt_len, "new": new, "maxlm_tokens_per_s": tokens / ours_s,
          "maxlm_decode_tokens_per_s": batch * (new - 1) / max(ours_s - prefill_s, 1e-9),
          "hf_tokens_per_s": tokens / hf_s,
          "hf_decode_tokens_per_s": batch * (new - 1) / max(hf_s - hf_prefill_s, 1e-9),
          "maxlm_compile_s": compile_s - ours_s, "same_greedy_ids": ours == theirs, "torch_threads":
          torch.get_num_threads()}


def main():
  p = argparse.ArgumentParser(description=cli_description(__doc__))
  p.add_argument("--sizes", default="demo,mid")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  built: dict = {}
  rows = []
  with tempfile.TemporaryDirectory() as root:
    for size in args.sizes.split(","):
      for batch in (int(b) for b in args.batches.split(",")):
        r = measure(size, batch, args.prompt_len, args.new, args.repeats, root, built)
        print(json.dumps(r), flush=True)
        rows.append(r)
  print("\n| model | params | batch | maxlm tokens/s (decode only) | transformers tokens/s (decode only) | ratio |"
        " maxlm compile s | same greedy ids |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
  for r in rows:
    print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['maxlm_tokens_per_s']:.0f} "
          f"({r['maxlm_decode_tokens_per_s']:.0f}) | {r['hf_tokens_per_s']:.0f} ({r['hf_decode_tokens_per_s']:.0f}) "
          f"| {r['maxlm_tokens_per_s'] / r['hf_tokens_per_s']:.2f}x | {r['maxlm_compile_s']:.1f} | "
          f"{r['same_greedy_ids']} |")


if __name__ == "__main__":
  main()
