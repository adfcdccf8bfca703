"""Every family of maxlm.core.families against transformers (docs/FAMILIES.md): a tiny random model of each imports with
transformers' logits, exports back bit-exactly, generates greedily as transformers does; then trains with MiLe and
EMO from the import and resumes bit-exactly, and the analysis tools read it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from maxlm import convert, decoding, model, pretrained, train
from maxlm.core.config import load_config
from maxlm.core.errors import ConfigError, ConversionError
from maxlm.core.families import FAMILIES
from maxlm.hf import tensors as hf_tensors
from maxlm.state.layout import ARCHITECTURE_KEYS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# HF_FAMILY_CONFIGS name -> maxlm family
ROWS = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "olmo2": "olmo2", "llama3": "llama", "llama_linear": "llama",
        "llama_dynamic": "llama", "qwen2": "qwen2"}
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """name -> (HF dir, transformers model, maxlm import dir), built once per name."""
  cache = {}

  def get(name):
    if name not in cache:
      root = tmp_path_factory.mktemp(name)
      hf = helpers.hf_tiny(name, root / "hf")
      convert.from_hf(str(root / "hf"), str(root / "run"), **QUIET)
      cache[name] = (root, hf)
    return cache[name]
  return get


def hf_logits(hf, tokens):
  with torch.no_grad():
    return hf(torch.tensor(tokens)).logits.float().numpy()


def maxlm_logits(cfg, params, tokens):
  graphdef = model.abstract_model(cfg.model)[0]
  return np.asarray(model.bind(graphdef, jax.tree.map(jnp.asarray, params)).logits(
      jnp.asarray(tokens), compute_dtype="float32"))


@pytest.mark.parametrize("name", list(ROWS))
def test_import_matches_transformers_and_round_trips_bit_exactly(imported, name, tmp_path):
  root, hf = imported(name)
  cfg, params, _ = pretrained.load_params(str(root / "run"))
  assert cfg.model.family == ROWS[name]
  # llama_dynamic runs past max_position_embeddings (16), where dynamic NTK scaling changes the frequencies.
  tokens = np.random.default_rng(1).integers(0, 384, (2, 40 if name == "llama_dynamic" else 24))
  ref = hf_logits(hf, tokens)
  diff = np.abs(maxlm_logits(cfg, params, tokens) - ref).max()
  assert np.abs(ref).max() > 1.0
  assert diff < 1e-4 * max(1.0, np.abs(ref).max()), diff
  convert.to_hf(str(root / "run"), str(tmp_path / "hf2"), dtype="float32", **QUIET)
  first, second = hf_tensors.HFTensors(str(root / "hf")), hf_tensors.HFTensors(str(tmp_path / "hf2"))
  assert sorted(first.names()) == sorted(second.names())
  for n in first.names():
    assert first.read(n).tobytes() == second.read(n).tobytes(), n
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf2"), dtype=torch.float32).eval()
  assert type(again).__name__ == type(hf).__name__
  np.testing.assert_array_equal(hf_logits(again, tokens), ref)


def test_rope_scaling_and_partial_rotary_really_apply(imported):
  """The scaled / partial RoPE settings are read from config.json, and ignoring them would change the logits."""
  for name, want in [("llama3", {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_positions": 64}),
                     ("llama_linear", {"rope_scaling": "linear", "rope_factor": 2.0}),
                     ("llama_dynamic", {"rope_scaling": "dynamic", "rope_factor": 2.0}),
                     ("gpt_neox", {"rotary_fraction": 0.25})]:
    root, hf = imported(name)
    cfg, params, _ = pretrained.load_params(str(root / "run"))
    for key, value in want.items():
      assert getattr(cfg.model, key) == value, (name, key)
    tokens = np.random.default_rng(2).integers(0, 384, (1, 40 if name == "llama_dynamic" else 24))
    plain = load_config("base", [f"model.{k}={v}" for k, v in _architecture(cfg).items()]
                        + ["model.rope_scaling=none", "model.rotary_fraction=1.0", "train.seq_len=16"])
    assert np.abs(maxlm_logits(plain, params, tokens) - hf_logits(hf, tokens)).max() > 1e-3, name


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "olmo2", "llama3", "qwen2"])
def test_greedy_generation_matches_transformers(imported, name):
  root, hf = imported(name)
  pre = pretrained.load(str(root / "run"))
  generator = decoding.Generator(pre.cfg, pre.params, compute_dtype="float32")
  rng = np.random.default_rng(3)
  prompts = [[int(t) for t in rng.integers(3, 384, n)] for n in (5, 9, 3)]
  ours = generator(prompts, max_new_tokens=12)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- downstream


def _architecture(cfg) -> dict:
  out = {}
  for key in ARCHITECTURE_KEYS:
    value = getattr(cfg.model, key)
    out[key] = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
  return out


def _run(run_dir, steps, cfg_source, *extra):
  overrides = [f"model.{k}={v}" for k, v in _architecture(cfg_source).items()] + [
      "model.compute_dtype=float32", "model.remat=none", "train.seq_len=16", "train.global_batch=4",
      "optim.schedule=constant", "optim.warmup_steps=0", "run.progress=false", "run.tensorboard=false",
      "run.eval_batches=0", "run.log_every=1", f"run.dir={run_dir}", f"train.steps={steps}", *extra]
  return train.train(load_config("demo", overrides), verbose=False)


@pytest.mark.parametrize("name", [
    "gpt2", pytest.param("gpt_neox", marks=pytest.mark.slow), pytest.param("olmo2", marks=pytest.mark.slow),
    pytest.param("llama3", marks=pytest.mark.slow), pytest.param("qwen2", marks=pytest.mark.slow)])
def test_train_mile_and_emo_from_an_import_and_resume_bit_exactly(imported, name, tmp_path):
  root, _ = imported(name)
  cfg, _, _ = pretrained.load_params(str(root / "run"))
  init = f"checkpoint.init_from={root / 'run'}"
  mile = _run(tmp_path / "mile", 5, cfg, init, "loss.objective=mile", "checkpoint.every=100")
  assert len(mile["losses"]) == 5 and all(np.isfinite(v) for v in mile["losses"].values())
  straight = _run(tmp_path / "emo_straight", 5, cfg, init, "loss.objective=emo", "checkpoint.enabled=false")
  first = _run(tmp_path / "emo", 3, cfg, init, "loss.objective=emo", "checkpoint.every=100")
  second = _run(tmp_path / "emo", 5, cfg, init, "loss.objective=emo", "checkpoint.every=100")
  assert second["start_step"] == 3
  assert {**first["losses"], **second["losses"]} == straight["losses"]
  # The trained run exports to transformers with maxlm's logits.
  convert.to_hf(str(tmp_path / "emo"), str(tmp_path / "hf"), dtype="float32", **QUIET)
  trained_cfg, params, _ = pretrained.load_params(str(tmp_path / "emo"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
  tokens = np.random.default_rng(4).integers(0, 384, (2, 16))
  ref = hf_logits(hf, tokens)
  assert np.abs(maxlm_logits(trained_cfg, params, tokens) - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox"])
def test_knowledge_entropy_reads_gelu_ffn_coefficients(imported, name):
  """The coefficients are the input of the down projection: GELU(fc_in x) (tanh form for GPT-2), hooked in torch."""
  from maxlm.analysis import knowledge_entropy as ke  # pylint: disable=import-outside-toplevel
  root, hf = imported(name)
  cfg, params, _ = pretrained.load_params(str(root / "run"))
  tokens = np.random.default_rng(5).integers(0, 384, (2, 12))
  graphdef = model.abstract_model(cfg.model)[0]
  sums = ke.ffn_coefficient_sums(cfg.model, graphdef, jax.tree.map(jnp.asarray, params), jnp.asarray(tokens),
                                 jnp.ones(tokens.shape, jnp.int32), "valid")
  down = [m for n, m in hf.named_modules() if n.endswith(("mlp.c_proj", "mlp.dense_4h_to_h"))]
  seen = []
  hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].abs().sum((0, 1)).numpy())) for m in down]
  hf_logits(hf, tokens)
  for h in hooks:
    h.remove()
  np.testing.assert_allclose(np.asarray(sums), np.stack(seen), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "olmo2"])
def test_analysis_tools_run_on_each_family(imported, name, tmp_path):
  from maxlm.analysis import knowledge_entropy as ke, token_difficulty  # pylint: disable=import-outside-toplevel
  root, _ = imported(name)
  data = tmp_path / "docs.jsonl"
  rng = np.random.default_rng(6)
  data.write_text("".join(json.dumps({"ids": [int(t) for t in rng.integers(3, 384, 14)]}) + "\n" for _ in range(5)))
  results = ke.knowledge_entropy_series([str(root / "hf"), str(root / "run")], str(data), seq_len=16, batch_size=2,
                                        progress=False, **QUIET)
  assert len(results) == 2 and np.isclose(results[0].knowledge_entropy, results[1].knowledge_entropy, rtol=1e-5)
  np.save(tmp_path / "counts.npy", rng.integers(0, 1000, 384))
  report = token_difficulty.token_difficulty([str(root / "hf"), str(root / "run")], str(data),
                                             str(tmp_path / "counts.npy"), seq_len=15, batch_size=2, **QUIET)
  ces = [c["buckets"]["overall"]["ce"] for c in report["checkpoints"]]
  assert len(ces) == 2 and np.isfinite(ces[0]) and abs(ces[0] - ces[1]) < 1e-5


# ----------------------------------------------------------------------------- refusals


def test_family_rows_refuse_what_they_do_not_have():
  with pytest.raises(ConfigError, match="learned absolute positions, not RoPE"):
    load_config("demo", ["model.family=gpt2", "model.rope_scaling=linear", "model.rope_factor=2"])
  with pytest.raises(ConfigError, match="clipping q, k, v is OLMo v1's option"):
    load_config("demo", ["model.family=qwen2", "model.clip_qkv=1.0"])
  with pytest.raises(ConfigError, match="RoPE needs an even number"):
    load_config("demo", ["model.family=gpt_neox", "model.rotary_fraction=0.01"])
  assert set(FAMILIES) == {"llama", "olmo", "olmo2", "qwen2", "gpt2", "gpt_neox"}


def test_fused_families_refuse_grouped_kv_heads_on_export(tmp_path):
  cfg, _ = helpers.tiny_run(tmp_path / "run", ["model.family=gpt2"])  # HF_TINY has kv_heads 2 of 4 heads
  assert "positions" in pretrained.load_params(str(tmp_path / "run"))[1]
  with pytest.raises(ConversionError, match="GPT2LMHeadModel has no grouped kv heads"):
    convert.to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), **QUIET)
  assert cfg.model.family == "gpt2"


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "olmo2", "qwen2"])
def test_widen_is_exact_for_every_family(imported, name, tmp_path):
  """Biases, LayerNorm / post-norm / QK-norm parameters and the position table tile; the function is unchanged."""
  from maxlm.analysis import widen  # pylint: disable=import-outside-toplevel
  root, hf = imported(name)
  tied = pretrained.load_params(str(root / "run"))[0].model.tie_embeddings
  if tied:
    with pytest.raises(ConversionError, match="widen is exact only with an untied output head"):
      widen.widen(str(root / "run"), str(tmp_path / "refused"), factor=2, **QUIET)
  cfg = widen.widen(str(root / "run"), str(tmp_path / "wide"), factor=2, layers=3, untie=tied, **QUIET)
  wide_cfg, params, _ = pretrained.load_params(str(tmp_path / "wide"))
  assert wide_cfg.model.hidden == 2 * hf.config.hidden_size and cfg.model.layers == 3
  tokens = np.random.default_rng(7).integers(0, 384, (2, 16))
  ref = hf_logits(hf, tokens)
  np.testing.assert_allclose(maxlm_logits(wide_cfg, params, tokens), ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_lora_targets_per_family(imported, tmp_path):
  """GELU families have no gate projection; their fused q/k/v cannot be a PEFT adapter (o, up, down can)."""
  from maxlm.hf import peft  # pylint: disable=import-outside-toplevel
  from maxlm.state import lora  # pylint: disable=import-outside-toplevel
  root, _ = imported("gpt2")
  cfg, _, _ = pretrained.load_params(str(root / "run"))
  overrides = [f"model.{k}={v}" for k, v in _architecture(cfg).items()] + [
      "train.seq_len=16", "lora.rank=2", f"checkpoint.init_from={root / 'run'}"]
  _, abstract, specs = model.abstract_model(cfg.model)
  with pytest.raises(ConfigError, match=r"lora.targets \['gate_proj'\].*not projections of this gpt2 model; it has "
                                        "q, k, v, o, up, down"):
    lora.adapter_shapes(load_config("demo", overrides + ["lora.targets=gate,up"]), abstract, specs)
  ok = load_config("demo", overrides + ["lora.targets=o,up,down"])
  assert peft.peft_modules(ok) == ["attn.c_proj", "c_fc", "mlp.c_proj"]
  assert peft.peft_config(ok, "base")["fan_in_fan_out"] is True
  with pytest.raises(ConversionError, match="one fused module \\(attn.c_attn\\)"):
    peft.peft_modules(load_config("demo", overrides + ["lora.targets=q,v"]))
  llama = load_config("demo", ["lora.rank=2", "lora.targets=q,v,down", "checkpoint.init_from=x"])
  assert peft.peft_modules(llama) == ["q_proj", "v_proj", "down_proj"]
