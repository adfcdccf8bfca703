"""The analytic memory plan (`--dry-run`, maxlm.state.plan): its parts from the shapes they stand for, how they move
with microbatches, tensor parallelism and LoRA, and the attention it assumes per platform. How close the plan comes
to the compiled peaks is measured by benchmarks/target_presets.py (docs/BENCHMARKS.md) and by the two real-target
compiles in tests/test_target_compile.py."""

import dataclasses
import io
import re
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest

from helpers import tiny_run
from maxlm import train
from maxlm.core.config import load_config
from maxlm.state import plan


def _estimate(preset, devices, platform, *overrides):
  return plan.memory_estimate(load_config(preset, list(overrides), num_devices=devices), devices, platform)


def test_saved_inputs_and_state_are_the_shapes_they_stand_for():
  est = _estimate("mile_7b", 128, "gpu")
  tokens = 2048 * 2048 // 128
  assert est["tokens_per_device"] == tokens == 32768
  assert est["saved"] == 32 * tokens * 4096 * 2  # remat=full: one bf16 (tokens, d) input per layer
  n = 6_738_415_616
  assert est["param_count"] == n
  norms = 32 * 2 * 4096 + 4096  # replicated; every other weight is sharded 128 ways, all fp32
  assert est["params"] == pytest.approx(4 * ((n - norms) / 128 + norms))
  assert est["optimizer"] == pytest.approx(2 * est["params"]) and est["gradients"] == pytest.approx(est["params"])
  assert est["activations"] == pytest.approx(est["saved"] + sum(est["working"].values()))
  assert est["total"] == pytest.approx(est["params"] + est["optimizer"] + est["gradients"] + est["activations"])


def test_microbatches_shrink_what_scales_with_tokens_and_add_a_gradient_sum():
  one, four = _estimate("mile_468m", 16, "tpu"), _estimate("mile_468m", 16, "tpu", "train.microbatches=4")
  assert four["saved"] * 4 == one["saved"]
  assert four["working"]["layer activations"] * 4 == pytest.approx(one["working"]["layer activations"])
  for part in ("gathered weights", "loss chunk"):  # tpu: 4096 tokens fit the chunk whatever the microbatch
    assert four["working"][part] == one["working"][part]
  assert four["gradients"] == 2 * one["gradients"]  # the fp32 sum over microbatches beside one microbatch's


def test_keeps_rows_price_each_buffer_kind_once():
  """Each Keeps field adds its buffer size times its count: a row with one field set is that buffer's size."""
  cfg = load_config("mile_1b", [], num_devices=32)
  saved = plan.KEEPS["gpu"]
  fields = [f.name for f in dataclasses.fields(plan.Keeps)]
  try:
    sizes = {}
    for name in fields:
      plan.KEEPS["gpu"] = plan.Keeps(**{f: float(f == name) for f in fields})
      sizes[name] = sum(plan.memory_estimate(cfg, 32, "gpu")["working"].values())
  finally:
    plan.KEEPS["gpu"] = saved
  tokens, d, ffn, vocab, layer = 32768, 2048, 8192, 32000, 4 * 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048
  assert sizes["hidden"] == tokens * d * 2
  assert sizes["projections"] == tokens * 3 * d * 2  # q, k, v: 8 heads x 256, no GQA
  assert sizes["mlp"] == tokens * ffn * 2
  assert sizes["scores"] == 0 and sizes["splash_lanes"] == 0  # cuDNN attention keeps neither
  assert sizes["head"] == 2 * vocab * d * 2  # embedding and untied head, bf16
  assert sizes["layer"] == layer * 2
  assert sizes["chunk"] == 4096 * vocab * 4  # the GPU blockwise loss's fp32 (4096 tokens, V) tile


@pytest.mark.parametrize("platform, overrides, backend", [
    ("gpu", (), "cudnn"),
    ("gpu", ("model.compute_dtype=float32",), "xla"),  # cuDNN flash attention takes bf16 / fp16 only
    ("tpu", (), "splash"),
    ("tpu", ("train.seq_len=1000",), "xla"),  # splash takes multiples of 128 positions
    ("tpu", ("model.attention=xla",), "xla"),
    ("cpu", (), "cpu"),
])
def test_the_plan_assumes_the_attention_auto_resolves_to(platform, overrides, backend):
  est = _estimate("mile_468m", 16, platform, "model.kv_heads=4", *overrides)
  assert est["attention"] == backend


def test_xla_attention_plans_its_score_matrices():
  cudnn, xla = _estimate("mile_468m", 16, "gpu"), _estimate("mile_468m", 16, "gpu", "model.attention=xla")
  extra = xla["working"]["layer activations"] - cudnn["working"]["layer activations"]
  sequences, heads, length = 64, 16, 1024
  assert extra == pytest.approx(plan.KEEPS["gpu"].scores * sequences * heads * length * length * 4)


def test_dry_run_on_a_cpu_host_plans_a_gpu_and_a_tpu():
  out = io.StringIO()
  with redirect_stdout(out):
    assert train.main(["--config=mile_7b", "--dry-run", "--devices=128"]) == 0
  text = out.getvalue()
  assert re.search(r"^ +H100 \(cudnn\) +tpu \(splash\)$", text, re.M), text
  gpu, tpu = (_estimate("mile_7b", 128, p) for p in ("gpu", "tpu"))
  assert re.search(rf"^  total +{gpu['total'] / 2**30:.2f} GiB +{tpu['total'] / 2**30:.2f} GiB$", text, re.M), text
  assert "H100 (cudnn) activations: saved layer inputs 8.00," in text


def test_dry_run_plans_the_architecture_of_checkpoint_init_from(tmp_path, capsys):
  """A preset that takes its architecture from an import (the EMO LM GPT-2 presets) plans that source where it is
  there, as a run would take it, and says plainly that it plans the config's own when it is not."""
  src_cfg, params = tiny_run(tmp_path / "src")
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert train.main(["--config=emo_lm_gpt2_mle", "--dry-run", "--devices=1", "train.seq_len=64",
                     f"checkpoint.init_from={tmp_path / 'src'}"]) == 0
  out = capsys.readouterr()
  assert f"model: {src_cfg.model.family}, {count:,} parameters" in out.out, out.out
  assert f"architecture from checkpoint.init_from {tmp_path / 'src'}" in out.out and "warning" not in out.err
  assert train.main(["--config=emo_lm_gpt2_mle", "--dry-run", "--devices=1",
                     f"checkpoint.init_from={tmp_path / 'none'}"]) == 0
  out = capsys.readouterr()
  assert "468,239,360 parameters" in out.out  # the config's own (the base LLaMA), with a warning saying so
  assert re.search(r"warning: checkpoint.init_from .*none cannot be read here .* this plans the config's own "
                   r"architecture \(llama, hidden 1024, 24 layers, vocabulary 32000\)", out.err), out.err
