"""HF conversion: exported LLaMA checkpoints give transformers' logits, imports round-trip bit-exactly, OLMo v1
imports match OlmoForCausalLM, and bad input fails cleanly without leaving partial outputs (the other families:
test_families.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import pretrained
from maxlm.hf import tensors as hf_tensors
from maxlm import convert, model
import helpers
from helpers import tiny_run
from maxlm.core.errors import CheckpointError, ConversionError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = helpers.HF_TINY


def maxlm_logits(cfg, params, tokens):
  graphdef = model.abstract_model(cfg.model)[0]
  return np.asarray(model.bind(graphdef, jax.tree.map(jnp.asarray, params)).logits(
      jnp.asarray(tokens), compute_dtype="float32"))


def hf_logits(hf_dir, tokens, dtype=None):
  m = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype or torch.float32,
                                                        attn_implementation="eager")
  with torch.no_grad():
    return m, m(torch.tensor(tokens)).logits.float().numpy()


TOKENS = np.random.default_rng(1).integers(0, 384, (2, 24))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """An untied GQA LLaMA checkpoint exported to HF in fp32."""
  root = tmp_path_factory.mktemp("llama")
  cfg, params = tiny_run(root / "run")
  convert.to_hf(str(root / "run"), str(root / "hf"), dtype="float32")
  return root, cfg, params


@pytest.mark.parametrize("tied", [False, True])
def test_to_hf_logits_match_transformers(tmp_path, exported, tied):
  if tied:
    cfg, params = tiny_run(tmp_path / "run", ["model.tie_embeddings=true"])
    convert.to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), dtype="float32", max_shard_bytes=40_000)
    hf_dir = tmp_path / "hf"
    index = json.loads((hf_dir / hf_tensors.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert "lm_head.weight" not in index["weight_map"]
  else:
    root, cfg, params = exported
    hf_dir = root / "hf"
  m, ref = hf_logits(str(hf_dir), TOKENS)
  assert type(m).__name__ == "LlamaForCausalLM"
  assert m.config.tie_word_embeddings == tied and m.config.num_key_value_heads == 2
  ours = maxlm_logits(cfg, params, TOKENS)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_array_less(np.abs(ref - ours).max(), 1e-4)
  for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    assert (hf_dir / f).exists()
  tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  assert tok.eos_token == "<eos>" and tok.convert_tokens_to_ids("<eos>") == 0


def test_bfloat16_export(tmp_path, exported):
  root, cfg, params = exported
  convert.to_hf(str(root / "run"), str(tmp_path / "hf16"))  # bfloat16 is the default
  m, ref = hf_logits(str(tmp_path / "hf16"), TOKENS, dtype=torch.bfloat16)
  assert m.dtype == torch.bfloat16
  np.testing.assert_array_less(np.abs(ref - maxlm_logits(cfg, params, TOKENS)).max(), 0.1)


def test_from_hf_then_to_hf_round_trips_bit_exactly(tmp_path, exported):
  root, cfg, params = exported
  convert.from_hf(str(root / "hf"), str(tmp_path / "imported"))
  loaded_cfg, loaded, extras = pretrained.load_params(str(tmp_path / "imported"))
  assert extras == {}
  for key in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "ffn", "rope_theta", "norm_eps",
              "tie_embeddings", "max_positions"):
    assert getattr(loaded_cfg.model, key) == getattr(cfg.model, key), key
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  convert.to_hf(str(tmp_path / "imported"), str(tmp_path / "hf2"), dtype="float32")
  first, second = hf_tensors.HFTensors(str(root / "hf")), hf_tensors.HFTensors(str(tmp_path / "hf2"))
  assert sorted(first.names()) == sorted(second.names())
  for name in first.names():
    assert first.read(name).tobytes() == second.read(name).tobytes(), name
  c1, c2 = (json.loads((d / "config.json").read_text()) for d in (root / "hf", tmp_path / "hf2"))
  assert c1 == c2
  # The imported tokenizer travels with the run, so a second export writes it again.
  assert (tmp_path / "hf2" / "tokenizer.json").read_bytes() == (root / "hf" / "tokenizer.json").read_bytes()


def test_olmo_import_matches_olmo_for_causal_lm(tmp_path):
  hf_cfg = transformers.OlmoConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   clip_qkv=0.8, tie_word_embeddings=True, initializer_range=0.2,
                                   pad_token_id=1, eos_token_id=2, bos_token_id=None)
  torch.manual_seed(0)
  ref_model = transformers.OlmoForCausalLM(hf_cfg).eval()
  ref_model.save_pretrained(str(tmp_path / "olmo_hf"))
  tokens = np.random.default_rng(2).integers(0, 96, (2, 20))
  with torch.no_grad():
    ref = ref_model(torch.tensor(tokens)).logits.numpy()
  cfg = convert.from_hf(str(tmp_path / "olmo_hf"), str(tmp_path / "olmo_run"),
                        overrides=("loss.objective=emo",))
  assert cfg.model.family == "olmo" and cfg.model.clip_qkv == 0.8 and cfg.model.tie_embeddings
  loaded_cfg, params, extras = pretrained.load_params(str(tmp_path / "olmo_run"))
  assert "attn_norm" not in params["layers"] and "final_norm" not in params
  ours = maxlm_logits(loaded_cfg, params, tokens)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_array_less(np.abs(ref - ours).max(), 1e-4)
  # EMO's fixed cost embedding is the output head at import, (V, D).
  np.testing.assert_array_equal(extras["cost_embedding"], ref_model.lm_head.weight.detach().numpy())
  # And back to transformers, as OlmoForCausalLM.
  convert.to_hf(str(tmp_path / "olmo_run"), str(tmp_path / "olmo_hf2"), dtype="float32")
  m, again = hf_logits(str(tmp_path / "olmo_hf2"), tokens)
  assert type(m).__name__ == "OlmoForCausalLM"
  np.testing.assert_array_less(np.abs(again - ref).max(), 1e-5)


def _no_leftovers(parent):
  return [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n]


def test_import_errors(tmp_path, exported):
  root = exported[0]
  with pytest.raises(ConversionError, match="has no config.json"):
    convert.from_hf(str(tmp_path / "nothing"), str(tmp_path / "out"))
  bad = tmp_path / "mistral"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
  with pytest.raises(ConversionError, match="'MistralForCausalLM' is not supported; supported: LlamaForCausalLM, "
                                            "OlmoForCausalLM, Olmo2ForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel, "
                                            "GPTNeoXForCausalLM"):
    convert.from_hf(str(bad), str(tmp_path / "out"))
  # A config.json whose vocab disagrees with the weights.
  wrong = tmp_path / "wrong_vocab"
  wrong.mkdir()
  for f in os.listdir(root / "hf"):
    (wrong / f).write_bytes((root / "hf" / f).read_bytes())
  hf = json.loads((wrong / "config.json").read_text())
  (wrong / "config.json").write_text(json.dumps(dict(hf, vocab_size=400)))
  with pytest.raises(ConversionError, match=r"vocab mismatch: tensor model.embed_tokens.weight has shape "
                                            r"\(384, 32\) but config.json implies \(400, 32\)"):
    convert.from_hf(str(wrong), str(tmp_path / "out"))
  (wrong / "config.json").write_text(json.dumps(dict(hf, rope_parameters={"rope_type": "yarn",
                                                                          "rope_theta": 5e5})))
  with pytest.raises(ConversionError, match="rope scaling 'yarn' is not supported"):
    convert.from_hf(str(wrong), str(tmp_path / "out"))
  (wrong / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=3)))
  with pytest.raises(ConversionError, match="lacks 9 tensor.*model.layers.2.input_layernorm.weight"):
    convert.from_hf(str(wrong), str(tmp_path / "out"))
  # A tokenizer with more entries than the embedding has rows (its high ids would read past the table).
  (wrong / "config.json").write_text(json.dumps(hf))
  from tokenizers import Tokenizer, models  # pylint: disable=import-outside-toplevel
  Tokenizer(models.WordLevel({f"w{i}": i for i in range(500)}, unk_token="w0")).save(str(wrong / "tokenizer.json"))
  with pytest.raises(ConversionError, match="has 500 tokens but config.json's vocab_size is 384"):
    convert.from_hf(str(wrong), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)


def test_export_errors_leave_nothing(tmp_path, exported):
  root = exported[0]
  with pytest.raises(CheckpointError, match="does not exist"):
    convert.to_hf(str(tmp_path / "missing_run"), str(tmp_path / "out"))
  with pytest.raises(CheckpointError, match="step 7 has no checkpoint.*available steps: 0"):
    convert.to_hf(str(root / "run"), str(tmp_path / "out"), step=7)
  with pytest.raises(ConversionError, match="already exists"):
    convert.to_hf(str(root / "run"), str(root / "hf"))
  # A failure midway (here: a tokenizer too large for the model) removes the partial output.
  cfg, _ = tiny_run(tmp_path / "small_vocab", ["model.vocab_size=64"])
  with pytest.raises(ConversionError, match="tokenizer has 375 tokens but the model's vocab_size is 64"):
    convert.to_hf(str(tmp_path / "small_vocab"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)
  # A corrupt checkpoint (a data file deleted) is a CheckpointError, not a half-written export.
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(root / "run", tmp_path / "corrupt")
  state = tmp_path / "corrupt" / "checkpoints" / "0" / "state"
  for r, _, files in os.walk(state):
    for f in files:
      if os.path.basename(r) == "d":
        os.remove(os.path.join(r, f))
  with pytest.raises(CheckpointError, match="unreadable"):
    convert.to_hf(str(tmp_path / "corrupt"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)


def test_default_export_is_the_parameters_dtype_and_run_at_step_names_the_step(tmp_path, exported):
  """`--checkpoint RUN@STEP` as every other command takes it; without --dtype the fp32 parameters are written as
  they are, so transformers gives maxlm's logits."""
  root, cfg, params = exported
  assert convert.main(["to-hf", "--checkpoint", f"{root / 'run'}@0", "--output", str(tmp_path / "o")]) == 0
  assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "float32"
  _, ref = hf_logits(str(tmp_path / "o"), TOKENS)
  np.testing.assert_allclose(ref, maxlm_logits(cfg, params, TOKENS), atol=1e-4)
  with pytest.raises(ConversionError, match="different steps"):
    convert.to_hf(f"{root / 'run'}@0", str(tmp_path / "p"), step=3)
  with pytest.raises(CheckpointError, match="step 7 has no checkpoint"):
    convert.to_hf(f"{root / 'run'}@7", str(tmp_path / "p"))


def test_cli_prints_error_and_exits_2(tmp_path, capsys, exported):
  assert convert.main(["to-hf", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
  assert "error: checkpoint path" in capsys.readouterr().err
  root = exported[0]
  assert convert.main(["to-hf", "--checkpoint", str(root / "run"), "--output", str(tmp_path / "o"),
                       "--dtype", "float32"]) == 0
  assert (tmp_path / "o" / "config.json").exists()
