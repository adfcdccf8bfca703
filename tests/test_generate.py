"""Generation: greedy ids equal transformers' greedy generate on the HF export (LLaMA with GQA, OLMo), the KV cache
equals the full forward, sampling is reproducible and never leaves top-k / top-p, EOS stops a row, the CLI's output
and its errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import model_text
from maxlm import convert, model, pretrained
from maxlm import decoding
from maxlm import generate as gen_lib
from maxlm.core.errors import DataError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import tiny_run  # noqa: E402  (the tiny GQA LLaMA of the conversion tests)

# Prompt lengths in one batch; with NEW tokens they stay inside max_positions 64 and one compiled shape.
LENGTHS = (3, 11, 7, 20)
NEW = 14


def prompts_of(lengths, vocab, seed=0):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(1, vocab, n)] for n in lengths]


def hf_greedy(hf_model, prompt, new, eos=None):
  """transformers' greedy generate on one unpadded prompt: the reference, independent of maxlm's padding."""
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
  ids = out[0, len(prompt):].tolist()
  return ids[:ids.index(eos)] if eos is not None and eos in ids else ids


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen_llama")
  cfg, params = tiny_run(root / "run", ["model.compute_dtype=float32"])
  convert.to_hf(str(root / "run"), str(root / "hf"), dtype="float32")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
  generator = decoding.Generator(cfg, params, compute_dtype="float32")
  return root, cfg, params, hf_model, generator


def full_logits(cfg, params, rows):
  """fp32 logits of each row by the plain forward (no cache): rows right-padded to max_positions in one batch, which
  causal attention makes exact for every real position (one compile serves every test)."""
  T = cfg.model.max_positions
  tokens = np.zeros((len(rows), T), np.int32)
  for b, r in enumerate(rows):
    tokens[b, :len(r)] = r
  logits = np.asarray(_forward(cfg)(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens)), np.float64)
  return [logits[b, :len(r)] for b, r in enumerate(rows)]


_FORWARDS = {}


def _forward(cfg):
  if id(cfg) not in _FORWARDS:
    graphdef = model.abstract_model(cfg.model)[0]
    _FORWARDS[id(cfg)] = jax.jit(lambda p, t: model.bind(graphdef, p).logits(t, compute_dtype="float32"))
  return _FORWARDS[id(cfg)]


def test_greedy_matches_transformers_llama_gqa(llama):
  _, cfg, _, hf_model, generator = llama
  assert hf_model.config.num_key_value_heads == 2 < hf_model.config.num_attention_heads
  prompts = prompts_of(LENGTHS, cfg.model.vocab_size)
  ours = generator(prompts, max_new_tokens=NEW)
  for prompt, got in zip(prompts, ours):
    assert got == hf_greedy(hf_model, prompt, NEW)
  assert len(set(map(tuple, ours))) == len(ours)  # the rows really differ


def test_greedy_matches_transformers_olmo(tmp_path):
  hf_cfg = transformers.OlmoConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   clip_qkv=0.8, tie_word_embeddings=True, initializer_range=0.2,
                                   pad_token_id=1, eos_token_id=2, bos_token_id=None)
  torch.manual_seed(0)
  hf_model = transformers.OlmoForCausalLM(hf_cfg).eval()
  hf_model.save_pretrained(str(tmp_path / "olmo"))
  pre = pretrained.load(str(tmp_path / "olmo"))
  assert pre.cfg.model.family == "olmo" and pre.cfg.model.clip_qkv == 0.8
  generator = decoding.Generator(pre.cfg, pre.params, compute_dtype="float32")
  prompts = prompts_of(LENGTHS, 96, seed=3)
  for prompt, got in zip(prompts, generator(prompts, max_new_tokens=NEW)):
    assert got == hf_greedy(hf_model, prompt, NEW)


def test_cached_decoding_equals_full_forward(llama):
  """Prefill + decode steps (teacher-forced on a ragged, left-padded batch) give the logits of the plain forward
  over each whole unpadded row, and greedy generation is the argmax of those logits step after step."""
  _, cfg, params, _, generator = llama
  prompts = prompts_of(LENGTHS, cfg.model.vocab_size, seed=1)
  new = generator(prompts, max_new_tokens=NEW)
  rows = [p + n for p, n in zip(prompts, new)]
  refs = full_logits(cfg, params, rows)
  for prompt, n, ref in zip(prompts, new, refs):
    assert n == [int(t) for t in ref[len(prompt) - 1:-1].argmax(-1)]
  graphdef = model.abstract_model(cfg.model)[0]
  P = 24
  tokens = np.zeros((len(rows), P), np.int32)
  start = np.array([P - len(p) for p in prompts], np.int32)
  for b, p in enumerate(prompts):
    tokens[b, P - len(p):] = p
  head = model.head_weights(cfg.model, params)
  prefill = jax.jit(lambda w, t, s: model.prefill(model.bind(graphdef, w), t, s, cache_len=P + 5,
                                                   compute_dtype="float32"))
  step = jax.jit(lambda w, t, c: model.decode_step(model.bind(graphdef, w), t, c, compute_dtype="float32"))
  hidden, cache = prefill(params, jnp.asarray(tokens), jnp.asarray(start))
  got = [np.asarray(hidden @ head)]
  for s in range(5):
    hidden, cache = step(params, jnp.asarray([n[s] for n in new], jnp.int32), cache)
    got.append(np.asarray(hidden @ head))
  assert int(cache.length) == P + 5
  for b, (prompt, ref) in enumerate(zip(prompts, refs)):
    np.testing.assert_allclose(np.stack([g[b] for g in got]), ref[len(prompt) - 1:len(prompt) + 5], atol=2e-5)


def test_lora_adapters_apply_to_generation(llama):
  """Params carrying LoRA adapters (the training view: base + A, B) generate what their merged weights generate,
  and not what the base alone does: prefill and decode go through the same projections as training."""
  import copy  # pylint: disable=import-outside-toplevel
  from maxlm.state import lora  # pylint: disable=import-outside-toplevel
  _, cfg, params, _, generator = llama
  lora_cfg = copy.deepcopy(cfg)
  lora_cfg.lora.rank, lora_cfg.lora.alpha, lora_cfg.lora.targets = 4, 8.0, ["q", "v", "down"]
  adapters = lora.init_adapters(lora_cfg, params, seed=0)
  rng = np.random.default_rng(10)
  for ab in adapters["layers"].values():  # B = 0 would hide a missing adapter term
    ab["b"] = jnp.asarray(rng.normal(0, 0.5, ab["b"].shape), jnp.float32)
  prompts = prompts_of(LENGTHS, cfg.model.vocab_size, seed=11)
  with_adapters = decoding.Generator(cfg, lora.compose(lora_cfg, adapters, jax.tree.map(jnp.asarray, params)),
                                    compute_dtype="float32")(prompts, max_new_tokens=NEW)
  merged = jax.tree.map(np.asarray, lora.merge(lora_cfg, jax.tree.map(np.asarray, params),
                                               jax.tree.map(np.asarray, adapters)))
  assert with_adapters == decoding.Generator(cfg, merged, compute_dtype="float32")(prompts, max_new_tokens=NEW)
  assert with_adapters != generator(prompts, max_new_tokens=NEW)


def test_decode_step_compiles_once_per_shape(llama):
  _, cfg, _, _, generator = llama
  prompts = prompts_of(LENGTHS, cfg.model.vocab_size, seed=2)
  before = generator.decode_traces
  long = generator(prompts, max_new_tokens=NEW)
  short = generator(prompts, max_new_tokens=5)  # the same bucket of new-token slots: no new trace
  assert generator.decode_traces - before <= 1
  assert all(s == g[:5] for s, g in zip(short, long))


def test_eos_stops_each_row(llama):
  _, cfg, _, _, generator = llama
  prompts = prompts_of(LENGTHS, cfg.model.vocab_size, seed=4)
  free = generator(prompts, max_new_tokens=NEW)
  eos = free[0][3]  # a token row 0 emits at step 3 (and maybe elsewhere)
  stopped = generator(prompts, max_new_tokens=NEW, eos_id=eos)
  for f, s in zip(free, stopped):
    assert s == (f[:f.index(eos)] if eos in f else f)
  assert len(stopped[0]) <= 3 and any(len(s) == NEW for s in stopped)  # one row stopped, another ran on


def test_rows_stop_at_max_positions(llama):
  _, cfg, _, hf_model, generator = llama
  prompt = prompts_of([cfg.model.max_positions - 4], cfg.model.vocab_size, seed=5)[0]
  out = generator([prompt], max_new_tokens=NEW)[0]
  assert out == hf_greedy(hf_model, prompt, 4)


def test_sampling_is_reproducible_and_batch_independent(llama):
  _, cfg, _, _, generator = llama
  prompts = prompts_of(LENGTHS, cfg.model.vocab_size, seed=6)
  s1 = decoding.Sampling(temperature=1.0, seed=11)
  a = generator(prompts, max_new_tokens=NEW, sampling=s1)
  assert a == generator(prompts, max_new_tokens=NEW, sampling=s1)
  assert a != generator(prompts, max_new_tokens=NEW, sampling=decoding.Sampling(temperature=1.0, seed=12))
  assert a != generator(prompts, max_new_tokens=NEW)  # it does sample
  # Row 2 in another batch (same row id, other neighbours, another slot) draws what it drew before.
  others = prompts_of(LENGTHS, cfg.model.vocab_size, seed=9)
  b = generator([others[0], others[1], prompts[2], others[3]], max_new_tokens=NEW, sampling=s1, row_ids=[7, 8, 2, 9])
  assert b[2] == a[2] and b[0] != a[0]


def allowed_set(logits, temperature, top_k, top_p):
  """Reference in float64 numpy: transformers' TopK then TopP warpers on logits / temperature."""
  z = np.asarray(logits, np.float64) / temperature
  keep = np.ones_like(z, bool)
  if 0 < top_k < z.size:
    keep &= z >= np.sort(z)[-top_k]
  if top_p < 1:
    order = np.argsort(-np.where(keep, z, -np.inf), kind="stable")
    p = np.exp(z[order] - z[order][0]) * keep[order]
    p /= p.sum()
    mass_before = np.cumsum(p) - p
    nucleus = np.zeros_like(keep)
    nucleus[order[mass_before < top_p]] = True
    keep &= nucleus
  return keep


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.6), (1.3, 8, 0.8), (1.0, 0, 1.0)])
def test_top_k_top_p_filter_and_draws(temperature, top_k, top_p):
  V, draws = 40, 4000
  rng = np.random.default_rng(7)
  logits = (rng.normal(size=(3, V)) * 2).astype(np.float32)
  filtered = np.asarray(jax.jit(decoding.filter_logits)(jnp.asarray(logits), temperature, top_k, top_p))
  for row in range(3):
    keep = allowed_set(logits[row], temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(filtered[row]), keep)
    assert keep.sum() < V or (top_k == 0 and top_p == 1)
  # Many draws of row 0: only allowed tokens, at the frequencies of the renormalised distribution.
  knobs = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(0), jnp.arange(draws))
  draw = jax.jit(decoding.choose_tokens, static_argnums=1)
  tokens = np.asarray(draw(jnp.asarray(np.repeat(logits[:1], draws, 0)), False, knobs, keys, 0))
  keep = allowed_set(logits[0], temperature, top_k, top_p)
  assert keep[tokens].all()
  z = np.where(keep, logits[0] / temperature, -np.inf)
  expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  observed = np.bincount(tokens, minlength=V) / draws
  assert 0.5 * np.abs(observed - expected).sum() < 0.05


@pytest.mark.parametrize("sampling", [decoding.Sampling(temperature=1.0, top_k=3, seed=1),
                                      decoding.Sampling(temperature=0.8, top_p=0.5, seed=2)])
def test_generated_tokens_stay_inside_top_k_top_p(llama, sampling):
  """Each sampled token lies in the set the full forward's distribution at that step allows."""
  _, cfg, params, _, generator = llama
  prompts = prompts_of(LENGTHS, cfg.model.vocab_size, seed=8)
  new = generator(prompts, max_new_tokens=NEW, sampling=sampling)
  refs = full_logits(cfg, params, [p + n for p, n in zip(prompts, new)])
  for prompt, n, ref in zip(prompts, new, refs):
    for s, token in enumerate(n):
      keep = allowed_set(ref[len(prompt) - 1 + s], sampling.temperature, sampling.top_k, sampling.top_p)
      assert keep[token] and keep.sum() < cfg.model.vocab_size


def test_too_long_prompt_is_a_clear_error(llama):
  _, cfg, _, _, generator = llama
  too_long = prompts_of([cfg.model.max_positions], cfg.model.vocab_size)[0]
  with pytest.raises(DataError, match=r"prompt 1 has 64 tokens but the model's max_positions is 64.*shorten it to "
                                      r"at most 63 tokens"):
    generator([[1, 2], too_long], max_new_tokens=4)
  with pytest.raises(DataError, match="prompt 0 is empty"):
    generator([[]], max_new_tokens=4)


# ----------------------------------------------------------------------------- CLI


def grammar_words() -> list[str]:
  from maxlm.data_pipelines import pcfg  # pylint: disable=import-outside-toplevel
  grammar = pcfg.load_grammar("builtin:demo")
  return [grammar.decode([i]) for i in range(grammar.vocab_size)]


def test_cli_writes_the_named_keys(tmp_path, llama, capsys):
  root = llama[0]
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text(json.dumps({"prompt": "the cat"}) + "\n\n" + json.dumps({"text": "a dog sees"}) + "\n")
  out = tmp_path / "out" / "gen.jsonl"
  rc = gen_lib.main(["--checkpoint", str(root / "run"), "--prompts", str(prompts_file), "--max-new-tokens", "6",
                     "--output", str(out)])
  assert rc == 0
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["prompt"] for r in records] == ["the cat", "a dog sees"]
  codec = model_text.text_codec(pretrained.load(str(root / "run")).cfg)
  for r in records:
    assert set(r) == {"prompt", "completion", "completion_ids"}
    assert 0 < len(r["completion_ids"]) <= 6 and codec.eos_id not in r["completion_ids"]
    # Word-level: a space joins the prompt; ids of the padded vocabulary past the PCFG's words read as <unk>.
    assert r["completion"] == " " + codec.decode(r["completion_ids"])
    words = grammar_words()
    assert r["completion"].split() == [words[i] if i < len(words) else "<unk>" for i in r["completion_ids"]]
  # The same through the HF export, printed to stdout, greedy = transformers.
  assert gen_lib.main(["--checkpoint", str(root / "hf"), "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
  printed = json.loads(capsys.readouterr().out.strip())
  assert printed["completion_ids"] == records[0]["completion_ids"]
  ids = codec.encode_batch(["the cat"])[0]
  assert printed["completion_ids"] == hf_greedy(llama[3], ids, 6, eos=codec.eos_id)


def test_cli_errors(tmp_path, llama, capsys):
  root = llama[0]
  long_text = " ".join(["the"] * 64)
  assert gen_lib.main(["--checkpoint", str(root / "run"), "--prompt", long_text]) == 2
  err = capsys.readouterr().err
  assert "64 tokens but the model's max_positions is 64" in err and "Traceback" not in err
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "the cat"}\n{"question": 1}\n')
  assert gen_lib.main(["--checkpoint", str(root / "run"), "--prompts", str(bad)]) == 2
  assert "bad.jsonl:2 has no string \"prompt\"" in capsys.readouterr().err
  assert gen_lib.main(["--checkpoint", str(root / "run"), "--prompt", "the", "--top-p", "1.5"]) == 2
  assert "--top-p 1.5 must be in (0, 1]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sharded


SHARDED = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from helpers import tiny_run
from maxlm import decoding, model
from maxlm.core import sharding
cfg, params = tiny_run(sys.argv[2], ["model.compute_dtype=float32"])
rng = np.random.default_rng(0)
prompts = [[int(t) for t in rng.integers(1, 384, n)] for n in (3, 11, 7, 20, 5)]
single = decoding.Generator(cfg, params, compute_dtype="float32")(prompts, max_new_tokens=10)
mesh = sharding.make_mesh((2, 2, 2))
g = decoding.Generator(cfg, params, compute_dtype="float32", mesh=mesh, batch_size=8)
with sharding.activate(mesh):
  _, cache = jax.jit(lambda p, t, s: model.prefill(model.bind(g.graphdef, p), t, s, cache_len=20))(
      g.params, g.put_batch(np.ones((8, 16), np.int32)), g.put_batch(np.zeros(8, np.int32)))
  _, stepped = jax.jit(lambda p, t, c: model.decode_step(model.bind(g.graphdef, p), t, c))(
      g.params, g.put_batch(np.ones(8, np.int32)), cache)
sharded = g(prompts, max_new_tokens=10)
spec = lambda a: [list(x) if isinstance(x, tuple) else x for x in a.sharding.spec]
print(json.dumps({"single": single, "sharded": sharded, "prefill_spec": spec(cache.k_LxBxSxKxH),
                  "decode_spec": spec(stepped.v_LxBxSxKxH),
                  "params_sharded": sum(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(g.params))}))
"""


@pytest.mark.multidevice
@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
  """Greedy ids on a (data 2, fsdp 2, tensor 2) mesh equal one device's; the cache is batch- and kv-head-sharded."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SHARDED, os.path.dirname(os.path.abspath(__file__)),
                        str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["sharded"] == result["single"]
  for spec in (result["prefill_spec"], result["decode_spec"]):
    assert spec[:4] == [None, ["data", "fsdp"], None, "tensor"] and not any(spec[4:]), spec
  assert result["params_sharded"] > 0
