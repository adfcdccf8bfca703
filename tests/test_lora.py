"""LoRA: zero B keeps the base's function, only the adapters train (base frozen, no optimizer state for it), the
merged export and checkpoint.load_params match the adapter forward (transformers), the PEFT export loads in peft,
8 simulated devices equal 1, resume is exact, bad settings fail clearly, and the dry run counts it."""

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.run import start
from maxlm.checkpoint import params as ckpt_params
from maxlm.hf import peft as hf_peft
from maxlm import convert, model, pretrained, train
from maxlm.checkpoint import checkpointer as checkpoint
from maxlm.state import plan
from maxlm.state import layout as state_lib
from maxlm.state import step as step_lib
from maxlm.core.config import finalize, load_config
from maxlm.core.errors import ConfigError

# The base: vocab 384 holds the demo PCFG's word-level tokenizer, so the base and the LoRA run export with it.
BASE = ["model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
        "model.ffn=64", "model.max_positions=32", "model.rope_theta=500.0", "model.init_std=0.1",
        "model.compute_dtype=float32", "model.remat=none", "train.seq_len=16", "train.global_batch=4"]
# A LoRA run on the base through the emo_lora_demo preset: no model keys (they come from the base).
RUN = ["train.seq_len=16", "train.global_batch=4", "optim.warmup_steps=0", "optim.lr=1e-2", "lora.rank=4",
       "lora.alpha=8.0", "lora.targets=q,v,o,down", "run.progress=false", "run.tensorboard=false",
       "run.eval_batches=0", "run.log_every=1", "run.summary=false"]
TOKENS = np.random.default_rng(1).integers(0, 384, (2, 16))


def save_base(run_dir) -> dict:
  cfg = load_config("demo", BASE)
  params = model.init_params(cfg.model, 0)
  rng = np.random.default_rng(0)
  for name in ("attn_norm", "mlp_norm"):  # scales of 1 would hide a misplaced norm
    params["layers"][name] = jnp.asarray(rng.uniform(0.5, 1.5, params["layers"][name].shape), jnp.float32)
  ckpt_params.save_params(str(run_dir), cfg, params)
  return jax.tree.map(np.asarray, params)


def lora_cfg(base_dir, *extra, devices=1):
  """The LoRA run's config with the base's architecture, as the trainer resolves it."""
  cfg = load_config("emo_lora_demo", RUN + [f"checkpoint.init_from={base_dir}", *extra], num_devices=devices)
  with ckpt_params.open_checkpoints(str(base_dir)) as source:
    state_lib.inherit_architecture(cfg, source.config(), str(base_dir))
  return finalize(cfg, num_devices=devices)


def logits(cfg, params, tokens=TOKENS):
  graphdef = model.abstract_model(cfg.model)[0]
  return np.asarray(model.bind(graphdef, jax.tree.map(jnp.asarray, params)).logits(
      jnp.asarray(tokens), compute_dtype="float32"))


def reference_merge(cfg, base, adapters):
  """W + alpha/r * A @ B in float64, written out here independently of maxlm.state.lora."""
  out = jax.tree.map(lambda x: np.asarray(x, np.float64), base)
  for name, ab in adapters["layers"].items():
    out["layers"][name] = out["layers"][name] + cfg.lora.alpha / cfg.lora.rank * np.matmul(
        np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64))
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(root, base params, lora run summary, its config): three LoRA steps on the demo PCFG from a saved base."""
  root = tmp_path_factory.mktemp("lora")
  base = save_base(root / "base")
  cfg = load_config("emo_lora_demo", RUN + [f"checkpoint.init_from={root / 'base'}", f"run.dir={root / 'run'}",
                                            "train.steps=3"])
  summary = train.train(cfg, verbose=False)
  return root, base, summary, load_config(str(root / "run" / "config.yaml"))


def test_zero_b_leaves_the_function_unchanged(tmp_path):
  base = save_base(tmp_path / "base")
  cfg = lora_cfg(tmp_path / "base", "lora.dropout=0.5")
  lay = state_lib.layout(cfg)
  state = start.init_from(lay, str(tmp_path / "base"))
  adapters = jax.device_get(state["params"])
  assert all((ab["b"] == 0).all() and (ab["a"] != 0).all() for ab in adapters["layers"].values())
  bound = 1 / np.sqrt(32)  # peft's kaiming-uniform(a=sqrt(5)) bound 1/sqrt(fan_in) for q, v, o (fan_in 32)
  assert 0.8 * bound < np.abs(adapters["layers"]["q_proj"]["a"]).max() <= bound
  ref = logits(cfg, base)
  np.testing.assert_array_equal(logits(cfg, lay.model_params(state)), ref)
  # Even with dropout active (a training forward), B = 0 adds exactly nothing.
  trainingish = lay.view.model_params(state["params"], {"lora_base": state["lora_base"]}, rng=jax.random.key(3))
  np.testing.assert_array_equal(logits(cfg, trainingish), ref)


def test_only_the_adapters_train(tmp_path, trained):
  root, base, summary, cfg = trained
  lay = state_lib.layout(cfg)
  state = summary["state"]
  flat_abstract = checkpoint.flat_tree(lay.abstract["params"])
  assert sorted(flat_abstract) == sorted(f"layers/{n}_proj/{m}" for n in ("q", "v", "o", "down") for m in "ab")
  # The optimizer holds moments of the adapters only (two per adapter array, plus step counters).
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * lay.trainable_count < 0.2 * lay.param_count
  # The frozen base is bit-identical to what was loaded, and B has moved.
  for a, b in zip(jax.tree.leaves(jax.device_get(state["lora_base"])), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)
  assert all(np.abs(np.asarray(ab["b"])).max() > 1e-3 for ab in state["params"]["layers"].values())
  # Gradients through the adapter forward equal those through explicitly merged weights W + s A B.
  rng = np.random.default_rng(4)
  adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32), state["params"])
  batch = {"inputs": jnp.asarray(TOKENS[:, :-1]), "targets": jnp.asarray(TOKENS[:, 1:])}
  frozen = {"lora_base": jax.tree.map(jnp.asarray, base)}

  def loss(weights):
    return step_lib.output_loss(cfg, lay.graphdef, weights, batch, objective="ce", compute_dtype="float32")[0]

  via_view = jax.grad(lambda t: loss(lay.view.model_params(t, frozen)))(adapters)
  s = cfg.lora.alpha / cfg.lora.rank

  def merged(t):
    layers = dict(frozen["lora_base"]["layers"])
    for name, ab in t["layers"].items():
      layers[name] = layers[name] + s * ab["a"] @ ab["b"]
    return {**frozen["lora_base"], "layers": layers}

  via_merge = jax.grad(lambda t: loss(merged(t)))(adapters)
  for a, b in zip(jax.tree.leaves(via_view), jax.tree.leaves(via_merge)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_dropout_applies_to_the_adapter_input_in_training_only():
  p = 0.3
  x = jnp.ones((4, 64, 8), jnp.float32)
  w = {"proj": jnp.zeros((8, 8)), "lora": {"proj": {"a": jnp.eye(8), "b": jnp.eye(8), "keep": jnp.float32(1 - p),
                                                    "dropout_key": jax.random.key(0)}}}
  y = np.asarray(model.project(w, "proj", x, jnp.float32))
  np.testing.assert_allclose(y[y != 0], 1 / (1 - p), rtol=1e-6)  # inverted dropout: kept inputs scaled up
  assert abs((y == 0).mean() - p) < 0.03
  np.testing.assert_array_equal(y, np.asarray(model.project(w, "proj", x, jnp.float32)))  # same key, same mask
  del w["lora"]["proj"]["dropout_key"]
  np.testing.assert_array_equal(np.asarray(model.project(w, "proj", x, jnp.float32)), np.asarray(x))  # evaluation


def test_merged_export_and_load_params_match_the_adapter_forward(tmp_path, trained):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  root, base, summary, cfg = trained
  lay = state_lib.layout(cfg)
  ours = logits(cfg, lay.model_params(summary["state"]))  # the training forward: base + unmerged adapters
  # The checkpoint holds the adapters and where the base came from, not the base.
  with ckpt_params.open_checkpoints(str(root / "run")) as ckpt:
    saved, meta = ckpt.metadata(3)
    adapters = ckpt.restore_subtree(("params",), 3)["params"]
  assert "lora_base" not in meta["items"] and meta["sources"] == {"lora_base": str(root / "base")}
  assert all(k.startswith(("params/layers/", "opt_state/", "step")) for k in saved)
  # One composition point: load_params (and everything on it) gives the merged decoder.
  reference = reference_merge(cfg, base, adapters)
  _, merged, _ = pretrained.load_params(str(root / "run"))
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  loaded = pretrained.load(str(root / "run"))
  assert loaded.cfg.lora.rank == 0  # what it holds now is a plain decoder
  np.testing.assert_allclose(logits(cfg, loaded.params), ours, atol=1e-5)
  _, sharded, _ = pretrained.load_params(str(root / "run"), abstract={"params": lay.model_abstract})
  for a, b in zip(jax.tree.leaves(jax.device_get(sharded)), jax.tree.leaves(merged)):
    np.testing.assert_allclose(a, b, atol=1e-7)
  assert np.abs(ours - logits(cfg, base)).max() > 1e-3  # the adapters changed the function
  assert convert.main(["to-hf", "--checkpoint", str(root / "run"), "--output", str(tmp_path / "merged"),
                       "--dtype", "float32"]) == 0
  m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32,
                                                        attn_implementation="eager")
  with torch.no_grad():
    ref = m(torch.tensor(TOKENS)).logits.numpy()
  np.testing.assert_array_less(np.abs(ref - ours).max(), 1e-4)


def test_peft_adapter_export_loads_onto_the_base_export(tmp_path, trained):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  root, _, summary, cfg = trained
  lay = state_lib.layout(cfg)
  ours = logits(cfg, lay.model_params(summary["state"]))
  convert.to_hf(str(root / "base"), str(tmp_path / "base_hf"), dtype="float32", log=lambda *a: None)
  assert convert.main(["to-hf", "--checkpoint", str(root / "run"), "--output", str(tmp_path / "adapter"),
                       "--adapter", "--dtype", "float32"]) == 0
  assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "maxlm_export.json"]
  from safetensors.numpy import load_file
  names = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
  assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
  assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in names and len(names) == 2 * 2 * 4
  base_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base_hf"), dtype=torch.float32,
                                                                 attn_implementation="eager")
  adapted = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    ref = adapted(torch.tensor(TOKENS)).logits.numpy()
  np.testing.assert_array_less(np.abs(ref - ours).max(), 1e-4)
  with pytest.raises(Exception, match="not a LoRA run"):
    convert.to_hf(str(root / "base"), str(tmp_path / "nope"), adapter=True)


SHARDED = r"""
import json, sys
import numpy as np
import jax
from maxlm.core.config import finalize, load_config
from maxlm.core import sharding
from maxlm.state import layout as state_lib
from maxlm.state import step as step_lib

base_dir = sys.argv[1]
overrides = ["train.seq_len=16", "train.global_batch=8", "optim.warmup_steps=0", "optim.lr=1e-2", "lora.rank=4",
             "lora.targets=q,k,v,o,gate,up,down", f"checkpoint.init_from={base_dir}", "model.vocab_size=384",
             "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2", "model.ffn=64",
             "model.max_positions=32", "model.rope_theta=500.0", "model.compute_dtype=float32", "model.remat=full"]
rng = np.random.default_rng(0)
tokens = rng.integers(0, 384, size=(8, 17)).astype(np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

def run(shape, devices):
  cfg = load_config("emo_lora_demo", overrides + [f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}",
                                                  f"mesh.tensor={shape[2]}"], num_devices=len(devices))
  lay = state_lib.layout(cfg, sharding.make_mesh(shape, devices))
  step, _ = step_lib.make_train_step(lay)
  state = start.init_from(lay, base_dir)
  losses = []
  for _ in range(3):
    state, m = step(state, sharding.global_batch(lay.mesh, batch))
    losses.append(float(m["loss"]))
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(state["params"]))]
  n_sharded = sum(1 for x in jax.tree.leaves(state) if hasattr(x, "sharding") and len(x.sharding.device_set) > 1
                  and not x.sharding.is_fully_replicated)
  return losses, leaves, n_sharded

l1, p1, _ = run((1, 1, 1), jax.devices()[:1])
l8, p8, n_sharded = run((2, 2, 2), jax.devices())
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p8))
print(json.dumps({"single": l1, "sharded": l8, "param_max_abs_diff": diff, "n_sharded": n_sharded}))
"""


@pytest.mark.multidevice
@pytest.mark.slow  # the sharded step is covered by test_sharded_training; this adds the adapter view on 8 devices
def test_eight_devices_match_one(tmp_path):
  save_base(tmp_path / "base")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "base")], capture_output=True, text=True,
                       env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["n_sharded"] > 0  # adapters and base really are sharded
  for a, b in zip(result["single"], result["sharded"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), result
  assert result["param_max_abs_diff"] < 2e-5, result
  assert result["single"][-1] < result["single"][0]


def test_resume_of_a_lora_run_is_exact(tmp_path):
  save_base(tmp_path / "base")
  common = ["optim.schedule=constant", "lora.dropout=0.1"]

  def run(name, steps, every):
    cfg = lora_cfg(tmp_path / "base", *common, f"run.dir={tmp_path / name}", f"train.steps={steps}",
                   f"checkpoint.every={every}")
    return train.train(cfg, verbose=False)

  straight = run("straight", 4, 100)
  first = run("resumed", 2, 100)
  second = run("resumed", 4, 100)  # resumes at 2: adapters and moments restored, the base rebuilt from init_from
  assert second["start_step"] == 2 and {**first["losses"], **second["losses"]} == straight["losses"]
  for a, b in zip(jax.tree.leaves(jax.device_get(second["state"]["params"])),
                  jax.tree.leaves(jax.device_get(straight["state"]["params"]))):
    np.testing.assert_array_equal(a, b)


def test_bad_lora_settings_fail_with_the_fix(tmp_path):
  with pytest.raises(ConfigError, match=r"lora.targets \['qq'\].*no such projection; choose from q, k, v, o, gate"):
    load_config("emo_lora_demo", ["lora.targets=q,qq"])
  with pytest.raises(ConfigError, match="checkpoint.init_from is empty: point it at a maxlm run or"):
    load_config("demo", ["lora.rank=4"])
  save_base(tmp_path / "base")
  with pytest.raises(ConfigError, match="lora.rank = 40 exceeds the q_proj projection's smaller side"):
    state_lib.layout(lora_cfg(tmp_path / "base", "lora.rank=40"))


def test_dry_run_counts_adapters_as_trainable_and_the_base_as_frozen():
  cfg = load_config("emo_lora_7b", num_devices=1)
  est = plan.memory_estimate(cfg, 1)
  adapters = 32 * 2 * (4096 * 32 + 32 * 4096)  # layers x (q, v) x (A + B): peft's count for r=32 on LLaMA-7B
  assert (est["param_count"], est["trainable_count"]) == (6_738_415_616, adapters) == (6_738_415_616, 16_777_216)
  assert est["params"] == 4 * (6_738_415_616 + adapters)  # fp32 frozen base + fp32 adapters
  assert est["optimizer"] == 2 * 4 * adapters and est["gradients"] == 4 * adapters
  for preset in ("emo_lora_7b", "ce_lora_7b", "emo_sft_7b", "ce_sft_7b"):
    out = io.StringIO()
    with redirect_stdout(out):
      assert train.main([f"--config={preset}", "--dry-run", "--devices", "8"]) == 0
    assert "6,738,415,616 parameters" in out.getvalue()
    assert ("16,777,216 trainable" in out.getvalue()) == ("lora" in preset)


def test_peft_base_of_an_import_is_its_hugging_face_directory(tmp_path):
  """adapter_config.json names the HF directory a from-hf base came from (AutoPeftModelForCausalLM loads it);
  another base stays the maxlm run it is."""
  from maxlm.core.outputs import HF_IMPORT  # pylint: disable=import-outside-toplevel
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  (tmp_path / "imported").mkdir()
  (tmp_path / "imported" / HF_IMPORT.marker).write_text(json.dumps({"source": str(tmp_path / "hf")}))
  assert hf_peft.peft_base_name(str(tmp_path / "imported")) == str(tmp_path / "hf")
  (tmp_path / "trained").mkdir()
  assert hf_peft.peft_base_name(str(tmp_path / "trained")) == str(tmp_path / "trained")
  (tmp_path / "hf" / "config.json").unlink()  # the source moved away: the run, which still loads with maxlm
  assert hf_peft.peft_base_name(str(tmp_path / "imported")) == str(tmp_path / "imported")
