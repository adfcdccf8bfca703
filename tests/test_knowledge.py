"""Knowledge dynamics (seed 002): knowledge entropy and A against transformers (LLaMA and OLMo, both modes, HF dirs
and run dirs), resuscitation against a numpy transcription and the layer-0 exactness check, knowledge injection
rows / schedule / packing / resume against direct constructions, probes in both modes against a direct computation.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.run import start
from maxlm.checkpoint import params as ckpt_params
from maxlm import pretrained
from maxlm import analyze, model as model_lib, train
from maxlm.checkpoint import checkpointer as checkpoint
from maxlm.run import knowledge_probes as probes_lib
from maxlm.state import layout as state_lib
from maxlm.analysis import knowledge_entropy as ke
from maxlm.analysis import resuscitate as rs
from maxlm.core.config import load_config
from maxlm.data_pipelines import build_train_iterator, knowledge_injection as ki, load_grammar
from maxlm.core.errors import ConfigError, ConversionError, DataError

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWLEDGE = os.path.join(HERE, "data", "knowledge")
PARAPHRASE, ONCE = os.path.join(KNOWLEDGE, "paraphrase.json"), os.path.join(KNOWLEDGE, "once.json")
TINY = ["model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
        "model.ffn=64", "model.max_positions=32", "model.compute_dtype=float32", "model.remat=none",
        "model.init_std=0.1", "train.seq_len=16", "train.global_batch=8", "train.steps=4", "optim.warmup_steps=1",
        "run.progress=false", "run.tensorboard=false", "run.eval_batches=0", "run.log_every=1", "loss.objective=ce"]
WORDS = [f"w{i}" for i in range(40)]
TEXTS = [" ".join(WORDS[(3 * i + j) % 40] for j in range(n)) for i, n in enumerate([3, 11, 1, 7, 14, 5, 9])]


# ----------------------------------------------------------------------------- fixtures


def write_tokenizer(directory):
  """A word-level HF tokenizer with a pad token that is not its end-of-text token."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"pad_token": "<pad>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  return tok


def text_file(path, texts=TEXTS):
  with open(path, "w") as f:
    for t in texts:
      f.write(json.dumps({"text": t}) + "\n")
  return str(path)


def hf_model(directory, family):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  common = dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
  torch.manual_seed(0 if family == "llama" else 1)
  if family == "llama":
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, rms_norm_eps=1e-5,
                                                               initializer_range=0.2, **common))
  else:
    m = transformers.OlmoForCausalLM(transformers.OlmoConfig(num_key_value_heads=4, clip_qkv=0.8,
                                                             tie_word_embeddings=True, initializer_range=0.2,
                                                             **common))
  m.eval().save_pretrained(str(directory))
  tok = write_tokenizer(str(directory))
  return m, tok


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {family: (root / family, *hf_model(root / family, family)) for family in ("llama", "olmo")}


def torch_coefficients(m, ids_NxT, mask_NxT, mode):
  """A by transformers: |input of each down_proj| summed over counted tokens, divided by the sequence count."""
  import torch  # pylint: disable=import-outside-toplevel
  captured = []
  hooks = [layer.mlp.down_proj.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].double()))
           for layer in m.model.layers]
  try:
    with torch.no_grad():
      kwargs = {"attention_mask": torch.tensor(mask_NxT)} if mode == "valid" else {}
      m(input_ids=torch.tensor(ids_NxT, dtype=torch.long), **kwargs)
  finally:
    for h in hooks:
      h.remove()
  weights = torch.tensor(mask_NxT if mode == "valid" else np.ones_like(mask_NxT), dtype=torch.float64)
  return np.stack([(a.abs() * weights[..., None]).sum((0, 1)).numpy() for a in captured]) / ids_NxT.shape[0]


def tokenized(tok, texts, seq_len):
  ids, mask = np.zeros((len(texts), seq_len), np.int64), np.zeros((len(texts), seq_len), np.int64)
  for i, t in enumerate(texts):
    row = tok.encode(t, add_special_tokens=False).ids[:seq_len]
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  return ids, mask


def numpy_entropy(a):
  out = []
  for row in np.asarray(a, np.float64):
    p = row / row.sum()
    out.append(-sum(pi * np.log(pi + 1e-9) for pi in p))
  return np.asarray(out)


# ----------------------------------------------------------------------------- knowledge entropy


def test_knowledge_entropy_formula():
  a = np.random.default_rng(0).uniform(0, 3, (4, 50)).astype(np.float32)
  np.testing.assert_allclose(ke.layer_entropies(a), numpy_entropy(a), rtol=1e-12)
  assert ke.knowledge_entropy(a) == pytest.approx(numpy_entropy(a).sum(), rel=1e-12)
  uniform = np.ones((3, 64))
  assert ke.knowledge_entropy(uniform) == pytest.approx(3 * np.log(64), abs=1e-6)  # the maximum, L ln m
  one_hot = np.zeros((2, 8))
  one_hot[:, 3] = 5.0
  assert ke.knowledge_entropy(one_hot) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("family", ["llama", "olmo"])
def test_coefficients_match_transformers_in_both_modes(tmp_path, hf_dirs, family):
  directory, m, tok = hf_dirs[family]
  data = text_file(tmp_path / "docs.jsonl")
  ids, mask = tokenized(tok, TEXTS, 12)
  assert (ids[mask == 0] == 0).all() and mask.sum() < mask.size  # pads are the pad token, and there are some
  results = {}
  for mode in ("valid", "reference"):
    # batch 3 over 7 documents: the last batch has filler rows, which must count for nothing
    (r,) = ke.knowledge_entropy_series([str(directory)], data, seq_len=12, batch_size=3, mode=mode, progress=False)
    want = torch_coefficients(m, ids, mask, mode)
    assert r.coefficients.shape == (3, 40) and r.coefficients.dtype == np.float32 and r.step is None
    np.testing.assert_allclose(r.coefficients, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(r.per_layer, numpy_entropy(want), rtol=1e-5)
    assert r.knowledge_entropy == pytest.approx(numpy_entropy(want).sum(), rel=1e-5)
    results[mode] = r
  # Pads change A in reference mode only: the two modes are different computations.
  assert np.abs(results["valid"].coefficients - results["reference"].coefficients).max() > 1e-3


def test_rows_longer_than_max_positions_match_transformers(tmp_path, hf_dirs):
  """KE pads every row to 2048 tokens whatever the model's max_position_embeddings, and transformers runs RoPE
  past it; so does maxlm (with a warning), pads included in A in mode reference."""
  directory, m, tok = hf_dirs["llama"]
  assert m.config.max_position_embeddings == 64
  texts = TEXTS + [" ".join(WORDS[j % 40] for j in range(75))]  # one document longer than 64 tokens
  data = text_file(tmp_path / "docs.jsonl", texts)
  ids, mask = tokenized(tok, texts, 80)
  for mode in ("valid", "reference"):
    said = []
    (r,) = ke.knowledge_entropy_series([str(directory)], data, seq_len=80, batch_size=4, mode=mode, progress=False,
                                       log=said.append)
    np.testing.assert_allclose(r.coefficients, torch_coefficients(m, ids, mask, mode), rtol=2e-5, atol=1e-7)
    assert any("max_positions = 64" in s for s in said)


def test_run_dir_gives_the_hf_directory_s_coefficients(tmp_path, hf_dirs):
  from maxlm import convert  # pylint: disable=import-outside-toplevel
  directory = hf_dirs["olmo"][0]
  convert.from_hf(str(directory), str(tmp_path / "run"), log=lambda *a: None)
  data = text_file(tmp_path / "docs.jsonl")
  for mode in ("valid", "reference"):
    (hf,) = ke.knowledge_entropy_series([str(directory)], data, seq_len=12, mode=mode, progress=False)
    (run,) = ke.knowledge_entropy_series([str(tmp_path / "run")], data, seq_len=12, mode=mode, progress=False)
    assert run.step == 0
    np.testing.assert_array_equal(run.coefficients, hf.coefficients)


def tiny_run_with_steps(run_dir, steps=(2, 5), extra=()):
  """A 'run' of params-only checkpoints at several steps (different random weights), without training."""
  cfg = load_config("demo", TINY + [f"run.dir={run_dir}", *extra])
  for i, step in enumerate(steps):
    ckpt_params.save_params(str(run_dir), cfg, model_lib.init_params(cfg.model, seed=i), step=step)
  return cfg


def test_cli_over_run_at_all_writes_json_npy_png(tmp_path):
  cfg = tiny_run_with_steps(tmp_path / "run")
  grammar = load_grammar("builtin:demo")
  docs = [grammar.decode(s) for s in grammar.sample_sentences(9, seed=3)[0]]
  data = text_file(tmp_path / "pcfg.jsonl", docs)
  out = tmp_path / "ke"
  assert analyze.main(["knowledge-entropy", "--checkpoint", f"{tmp_path / 'run'}@all", "--checkpoint",
                       f"{tmp_path / 'run'}@2", "--data", data, "--seq-len", "16", "--batch-size", "4",
                       "--mode", "reference", "--output", str(out)]) == 0
  report = json.loads((out / "knowledge_entropy.json").read_text())
  assert report["mode"] == "reference" and [r["step"] for r in report["results"]] == [2, 5, 2]
  for r in report["results"]:
    a = np.load(out / r["coefficients"])
    assert a.shape == (cfg.model.layers, cfg.model.ffn) and a.dtype == np.float32
    assert r["knowledge_entropy"] == pytest.approx(float(numpy_entropy(a).sum()), rel=1e-6)
    np.testing.assert_allclose(r["per_layer"], numpy_entropy(a), rtol=1e-6)
  first, _, again = report["results"]
  assert first["knowledge_entropy"] == again["knowledge_entropy"]
  assert (out / "knowledge_entropy.png").stat().st_size > 1000


def test_bad_inputs_are_clear_errors(tmp_path):
  tiny_run_with_steps(tmp_path / "run", steps=(0,))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(DataError, match="holds no documents"):
    ke.knowledge_entropy_series([str(tmp_path / "run")], str(empty), seq_len=16, progress=False)
  said = []
  ke.knowledge_entropy_series([str(tmp_path / "run")], text_file(tmp_path / "d.jsonl"), seq_len=48, progress=False,
                              log=said.append)  # past max_positions: a warning, not an error (next test)
  assert any("past" in s and "max_positions = 32" in s and "--seq-len 32" in s for s in said), said
  other = tmp_path / "mistral"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
  with pytest.raises(ConversionError, match="'MistralForCausalLM' is not supported; supported: LlamaForCausalLM"):
    ke.knowledge_entropy_series([str(other)], text_file(tmp_path / "d.jsonl"), seq_len=16, progress=False)
  assert analyze.main(["knowledge-entropy", "--checkpoint", str(other), "--data", str(empty), "--seq-len", "16",
                       "--output", str(tmp_path / "o")]) == 2


# ----------------------------------------------------------------------------- resuscitation


def transcribed_rule(a, p, q):
  """KE's change_parameters.py in plain numpy: torch.quantile's linear interpolation, <= (ties), mean / A."""
  scales, selected = np.ones_like(a, np.float64), np.zeros(a.shape, bool)
  for l, row in enumerate(np.asarray(a, np.float64)):
    s = np.sort(row)
    pos = p * (len(s) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    threshold = s[lo] + (pos - lo) * (s[hi] - s[lo])
    for i, v in enumerate(row):
      if v <= threshold:
        selected[l, i] = True
        scales[l, i] = q * row.mean() / v
  return scales, selected


def test_resuscitation_rule_matches_numpy_transcription():
  a = np.random.default_rng(0).uniform(0.1, 2.0, (3, 11))
  a[1] = [1, 2, 2, 2, 3, 4, 5, 6, 2, 7, 8]  # the 0.4-quantile is 2, held by four tied units: all are selected
  for p, q in ((0.5, 1.0), (0.4, 3.0), (0.9, 2.0)):
    scales, selected = rs.resuscitation_scales(a, p, q)
    want_scales, want_selected = transcribed_rule(a, p, q)
    np.testing.assert_array_equal(selected, want_selected)
    np.testing.assert_allclose(scales, want_scales, rtol=1e-12)
  assert rs.resuscitation_scales(a, 0.4, 1.0)[1][1].sum() == 5  # 1 and the four 2s


def test_resuscitate_scales_only_the_up_projection():
  cfg = load_config("demo", TINY).model
  params = jax.tree.map(np.asarray, model_lib.init_params(cfg, seed=0))
  a = np.random.default_rng(1).uniform(0.5, 1.5, (cfg.layers, cfg.ffn))
  new, selected = rs.resuscitate_params(cfg, params, a, 0.5, 2.0)
  scales, _ = transcribed_rule(a, 0.5, 2.0)
  np.testing.assert_allclose(new["layers"]["up_proj"], params["layers"]["up_proj"] * scales[:, None, :], rtol=1e-6)
  for name in params["layers"]:
    if name != "up_proj":
      np.testing.assert_array_equal(new["layers"][name], params["layers"][name])
  np.testing.assert_array_equal(new["embed"], params["embed"])
  assert selected.sum(axis=1).tolist() == [cfg.ffn // 2] * cfg.layers


def test_resuscitate_errors(tmp_path):
  cfg = load_config("demo", TINY).model
  params = jax.tree.map(np.asarray, model_lib.init_params(cfg, seed=0))
  with pytest.raises(DataError, match=r"shape \(2, 63\) but the model has \(layers, ffn\) = \(2, 64\)"):
    rs.resuscitate_params(cfg, params, np.ones((2, 63)), 0.5, 1.0)
  for p in (0.0, 1.0, 1.5):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
      rs.resuscitate_params(cfg, params, np.ones((2, 64)), p, 1.0)
  a = np.ones((2, 64))
  a[1, 7] = 0.0
  with pytest.raises(DataError, match=r"A\[1, 7\] is 0 among the selected units"):
    rs.resuscitate_params(cfg, params, a, 0.5, 1.0)


def test_resuscitated_checkpoint_layer0_exactness_export_and_training(tmp_path):
  from maxlm import convert, evaluate  # pylint: disable=import-outside-toplevel
  tiny_run_with_steps(tmp_path / "run", steps=(3,))
  grammar = load_grammar("builtin:demo")
  data = text_file(tmp_path / "pcfg.jsonl", [grammar.decode(s) for s in grammar.sample_sentences(12, seed=5)[0]])
  (source,) = ke.knowledge_entropy_series([str(tmp_path / "run")], data, seq_len=16, progress=False)
  np.save(tmp_path / "a.npy", source.coefficients)
  out = tmp_path / "resuscitated"
  assert analyze.main(["resuscitate", "--checkpoint", str(tmp_path / "run"), "--coefficients",
                       str(tmp_path / "a.npy"), "--ratio", "0.5", "--factor", "2", "--output", str(out)]) == 0
  marker = json.loads((out / "maxlm_derived.json").read_text())
  assert marker["ratio"] == 0.5 and marker["factor"] == 2.0 and marker["step"] == 3
  (derived,) = ke.knowledge_entropy_series([str(out)], data, seq_len=16, progress=False)
  _, selected = rs.resuscitation_scales(source.coefficients, 0.5, 2.0)
  # Layer 0's input is untouched, so its selected units now average exactly q * mean(A_0).
  np.testing.assert_allclose(derived.coefficients[0][selected[0]], 2.0 * source.coefficients[0].mean(), rtol=2e-5)
  np.testing.assert_allclose(derived.coefficients[0][~selected[0]], source.coefficients[0][~selected[0]], rtol=2e-5)
  assert derived.per_layer[0] > source.per_layer[0] and derived.knowledge_entropy > source.knowledge_entropy
  # The derived run exports and evaluates like any checkpoint.
  convert.to_hf(str(out), str(tmp_path / "hf"), dtype="float32", log=lambda *a: None)
  assert (tmp_path / "hf" / "tokenizer.json").exists()
  report = evaluate.evaluate(str(out), data, seq_len=16, batch_size=4, output=str(tmp_path / "eval.json"),
                             log=lambda *a: None)
  assert np.isfinite(report["uniform_avg"]["loss"])
  # init_from: step 0, fresh optimizer, the resuscitated weights.
  cfg = load_config("demo", TINY + [f"run.dir={tmp_path / 'cont'}", f"checkpoint.init_from={out}"])
  lay = state_lib.layout(cfg)
  state = start.init_from(lay, str(out))
  assert int(state["step"]) == 0
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
  _, want, _ = pretrained.load_params(str(out))
  np.testing.assert_array_equal(np.asarray(state["params"]["layers"]["up_proj"]), want["layers"]["up_proj"])


@pytest.mark.slow
def test_training_continues_from_a_resuscitated_checkpoint_at_step_0(tmp_path):
  tiny_run_with_steps(tmp_path / "run", steps=(7,))
  cfg_model = load_config("demo", TINY).model
  a = np.random.default_rng(0).uniform(0.5, 1.0, (cfg_model.layers, cfg_model.ffn)).astype(np.float32)
  np.save(tmp_path / "a.npy", a)
  rs.resuscitate(str(tmp_path / "run"), str(tmp_path / "a.npy"), ratio=0.5, factor=3.0, output=str(tmp_path / "r"),
                 log=lambda *x: None)
  cfg = load_config("demo", TINY + [f"run.dir={tmp_path / 'cont'}", f"checkpoint.init_from={tmp_path / 'r'}",
                                    "train.steps=2"])
  summary = train.train(cfg, verbose=False)
  assert summary["start_step"] == 0 and sorted(summary["losses"]) == [1, 2]
  assert checkpoint.Checkpointer(cfg.run.dir, cfg.checkpoint, read_only=True).steps() == [2]


def test_resuscitate_an_hf_directory_copies_its_tokenizer(tmp_path, hf_dirs):
  directory = hf_dirs["llama"][0]
  np.save(tmp_path / "a.npy", np.random.default_rng(0).uniform(0.5, 1.0, (3, 40)).astype(np.float32))
  rs.resuscitate(str(directory), str(tmp_path / "a.npy"), ratio=0.5, factor=1.0, output=str(tmp_path / "out"),
                 log=lambda *a: None)
  cfg, _, _ = pretrained.load_params(str(tmp_path / "out"))
  assert cfg.data.tokenizer == str(tmp_path / "out" / "tokenizer" / "tokenizer.json")
  assert (tmp_path / "out" / "tokenizer" / "tokenizer_config.json").exists()
  with pytest.raises(ConversionError, match="already exists and is not empty"):
    rs.resuscitate(str(directory), str(tmp_path / "a.npy"), ratio=0.5, factor=1.0, output=str(tmp_path / "out"))


# ----------------------------------------------------------------------------- injection


def test_schedule_over_ten_groups():
  interval = 3
  got = {s: ki.injection_group(s, interval) for s in range(1, 70)}
  for s, k in got.items():
    want = None if s % interval else ((s // interval) % 10 or 10)
    assert k == want, s
  assert [got[s] for s in range(3, 31, 3)] == list(range(1, 11))
  assert got[33] == 1 and got[60] == 10 and ki.injection_group(5, 0) is None
  assert ki.groups_used(14, 3) == [1, 2, 3, 4] and ki.groups_used(1000, 3) == list(range(1, 11))
  items = json.load(open(PARAPHRASE))
  once = json.load(open(ONCE))
  assert ki.group_texts(items, once, 1)[:len(items)] == [x["train_context"] for x in items]
  assert ki.group_texts(items, once, 4)[:len(items)] == [x["paraphrases"][2] for x in items]
  slices = [ki.once_slice(13, k) for k in range(1, 11)]
  assert [s.stop - s.start for s in slices] == [2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
  assert sum((list(range(13))[s] for s in slices), []) == list(range(13))  # contiguous, each item exactly once
  assert [ki.once_slice(60, k) for k in (1, 10)] == [slice(0, 6), slice(54, 60)]  # KE: 6 once items per group


def demo_cfg(tmp_path, extra=()):
  return load_config("ke_inject_demo", TINY + [f"run.dir={tmp_path / 'run'}", f"inject.paraphrase_file={PARAPHRASE}",
                                               f"inject.once_file={ONCE}", "inject.interval=2",
                                               "model.max_positions=64", *extra])  # probes are up to 53 tokens


def iterators(cfg, rows=None):
  def plain():
    return build_train_iterator(cfg.data, seq_len=cfg.train.seq_len, batch_size=len(rows or range(8)), seed=0)
  grammar = load_grammar("builtin:demo")
  encode = lambda texts: [grammar.encode(t) for t in texts]  # noqa: E731
  injector = ki.Injector(json.load(open(PARAPHRASE)), json.load(open(ONCE)), interval=cfg.inject.interval,
                         steps=cfg.train.steps, global_batch=cfg.train.global_batch, encode_batch=encode,
                         eos_id=grammar.separator_id)
  wrapped = ki.InjectingIterator(plain(), injector, rows or range(8), separator_id=grammar.separator_id,
                                 document_masking=cfg.data.document_masking)
  return plain(), wrapped, grammar


def direct_rows(grammar, texts, windows, rows_total):
  """concat(paragraph_i + EOS, window_i)[:T+1] for global rows 0..n-1, paragraphs packed when n > rows."""
  tokens = [grammar.encode(t) + [grammar.separator_id] for t in texts]
  if len(tokens) > rows_total:
    size, extra = divmod(len(tokens), rows_total)
    groups, start = [], 0
    for i in range(rows_total):
      n = size + (i < extra)
      groups.append(sum(tokens[start:start + n], []))
      start += n
    tokens = groups
  out = windows.copy()
  for i, prefix in enumerate(tokens):
    out[i] = (prefix + list(windows[i]))[:windows.shape[1]]
  return out


def windows_of(batch):
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def test_injected_rows_equal_a_direct_construction(tmp_path):
  cfg = demo_cfg(tmp_path, ["data.document_masking=true", "train.steps=40"])
  plain, wrapped, grammar = iterators(cfg)
  items, once = json.load(open(PARAPHRASE)), json.load(open(ONCE))
  with plain, wrapped:
    for step in range(1, 7):
      a, b = next(plain), next(wrapped)
      k = ki.injection_group(step, 2)
      if k is None:
        for key in a:
          np.testing.assert_array_equal(a[key], b[key])
        continue
      texts = ki.group_texts(items, once, k)
      assert len(texts) == 7  # 6 paraphrase items + 1 once item: one per row, the 8th row untouched
      want = direct_rows(grammar, texts, windows_of(a), 8)
      np.testing.assert_array_equal(windows_of(b), want)
      np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])  # labels are not masked
      np.testing.assert_array_equal(b["segment_ids"], 1 + np.cumsum(b["inputs"] == grammar.separator_id, axis=1))
      assert (b["inputs"][7] == a["inputs"][7]).all()


def test_packing_when_the_batch_has_fewer_rows_than_paragraphs(tmp_path):
  cfg = demo_cfg(tmp_path, ["train.global_batch=4", "train.seq_len=32"])
  items, once = json.load(open(PARAPHRASE)), json.load(open(ONCE))
  paragraphs = [np.arange(n) for n in (3, 1, 4, 1, 5, 9, 2)]
  packed = ki.pack(paragraphs, 4)
  assert [len(p) for p in packed] == [3 + 1, 4 + 1, 5 + 9, 2]  # groups of 2, 2, 2, 1
  # Process 1 of 2 owns global rows 2 and 3 and rewrites only those, as the single process does.
  _, whole, grammar = iterators(cfg, rows=[0, 1, 2, 3])
  plain, half, _ = iterators(cfg, rows=[2, 3])
  with plain, half, whole:
    for step in (1, 2):
      a, b, w = next(plain), next(half), next(whole)
    texts = ki.group_texts(items, once, 1)
    full = direct_rows(grammar, texts, windows_of(w), 4)
    np.testing.assert_array_equal(windows_of(w), full)
    # The half iterator's own 2 rows (its data shard) get the paragraph groups of global rows 2 and 3.
    as_global = np.concatenate([np.zeros_like(windows_of(a)), windows_of(a)])
    np.testing.assert_array_equal(windows_of(b), direct_rows(grammar, texts, as_global, 4)[2:])


def test_resume_in_the_middle_of_an_injection_schedule_is_exact(tmp_path):
  from maxlm.checkpoint.checkpointer import IteratorState  # pylint: disable=import-outside-toplevel
  cfg = demo_cfg(tmp_path, ["train.steps=40"])
  _, first, _ = iterators(cfg)
  with first:
    for _ in range(3):
      next(first)
    saved = IteratorState(first.get_state()).get_state()  # through the checkpoint's JSON form
    after = [next(first) for _ in range(5)]  # steps 4..8: injections at 4, 6, 8
  _, second, _ = iterators(cfg)
  with second:
    restored = IteratorState()
    restored.set_state(saved)
    second.set_state(restored.state)
    again = [next(second) for _ in range(5)]
  for x, y in zip(after, again):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  _, third, _ = iterators(demo_cfg(tmp_path, ["train.steps=40", "inject.interval=4"]))
  with third, pytest.raises(DataError, match="other knowledge-injection settings"):
    third.set_state(restored.state)
  with third, pytest.raises(DataError, match="no knowledge-injection state"):
    third.set_state({k: v for k, v in restored.state.items() if k != "injection"})


def test_malformed_fictional_knowledge_files(tmp_path):
  items = json.load(open(PARAPHRASE))
  del items[2]["mem_target"]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(items))
  with pytest.raises(DataError, match="item 2 lacks the field.s. mem_target"):
    ki.load_items(str(bad))
  few = json.load(open(PARAPHRASE))
  few[1]["paraphrases"] = few[1]["paraphrases"][:3]
  (tmp_path / "few.json").write_text(json.dumps(few))
  with pytest.raises(DataError, match="item 1 has 3 paraphrases but the schedule injects up to paraphrase 9"):
    ki.load_items(str(tmp_path / "few.json"), paraphrases_needed=9)
  (tmp_path / "notjson.json").write_text("{")
  with pytest.raises(DataError, match="not valid JSON"):
    ki.load_items(str(tmp_path / "notjson.json"))
  with pytest.raises(ConfigError, match="does not exist; point it at"):
    ki.load_items(str(tmp_path / "missing.json"))
  with pytest.raises(ConfigError, match=r"does not exist \(relative to the working directory .*\)"):
    ki.load_items("no/such/relative.json")  # a preset's relative path read from another directory
  cfg = load_config("demo", TINY + ["inject.interval=2"])
  with pytest.raises(ConfigError, match="neither inject.paraphrase_file nor inject.once_file"):
    ki.load_groups(cfg)


# ----------------------------------------------------------------------------- probes


def direct_probe_losses(logits_fn, items, kind, mode, batch_size, grammar):
  """Probes scored from full logits (one causal forward of all probes, right-padded: real positions never see the
  pads) with a float64 log-softmax, then KE's or the exact reduction."""
  input_key, target_key = ki.PROBE_FIELDS[kind]
  pairs = [(item[input_key][j], item[target_key][j]) for item in items
           for j in range(5 if mode == "reference" else len(item[input_key]))]
  seqs = [grammar.encode(f"{a} {b}") for a, b in pairs]
  ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for i, seq in enumerate(seqs):
    ids[i, :len(seq)] = seq
  logits = np.asarray(logits_fn(ids), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  per_probe, lengths, sums = [], [], []
  for i, ((a, _), seq) in enumerate(zip(pairs, seqs)):
    ce = [-logp[i, t - 1, seq[t]] for t in range(max(len(grammar.encode(a)), 1), len(seq))]
    sums.append(sum(ce))
    per_probe.append(sum(ce) / len(ce))
    lengths.append(len(seq))
  if mode == "exact":
    return float(np.mean(per_probe))
  out = [sums[i] / (max(lengths[i - i % batch_size:i - i % batch_size + batch_size]) - 1) for i in range(len(sums))]
  return float(np.mean(out))


@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_probes_match_a_direct_computation(mode):
  from maxlm.state import step as step_lib  # pylint: disable=import-outside-toplevel
  cfg = load_config("demo", TINY + ["model.max_positions=128"])
  graphdef = model_lib.abstract_model(cfg.model)[0]
  params = model_lib.init_params(cfg.model, seed=3)
  grammar = load_grammar("builtin:demo")
  items = json.load(open(PARAPHRASE))
  items[0] = dict(items[0], mem_input=items[0]["mem_input"] + ["alice sees"], mem_target=items[0]["mem_target"]
                  + ["a owl"])  # a 6th probe: KE's reference reads only 5
  sets = probes_lib.build_probe_sets({"paraphrase": items}, lambda ts: [grammar.encode(t) for t in ts], mode=mode)
  assert len(sets[0].tokens) == (30 if mode == "reference" else 31)
  ce_step = jax.jit(lambda p, b: step_lib.token_statistics(cfg, graphdef, p, b)["ce"])
  length = probes_lib.padded_length(sets, cfg.model.max_positions)
  got = probes_lib.score(lambda b: ce_step(params, b), sets, mode=mode, batch_size=4, length=length,
                         pad_id=grammar.separator_id)
  model = model_lib.bind(graphdef, params)
  logits_fn = jax.jit(lambda ids: model.logits(ids, compute_dtype="float32"))
  for kind in ki.PROBE_FIELDS:
    want = direct_probe_losses(logits_fn, items, kind, mode, 4, grammar)
    assert got[f"probe/paraphrase/{kind}"] == pytest.approx(want, rel=2e-5)
    assert got[f"probe/paraphrase/{kind}/ppl"] == pytest.approx(np.exp(want), rel=2e-5)


def test_training_with_injection_logs_probes_and_saves_the_schedule_state(tmp_path):
  cfg = demo_cfg(tmp_path, ["inject.probe_every=3", "train.steps=4", "checkpoint.every=2"])
  train.train(cfg, verbose=False)
  from maxlm.run.trackers import read_metrics  # pylint: disable=import-outside-toplevel
  records = [r for r in read_metrics(cfg.run.dir) if "probe/once/memorization" in r]
  assert [r["step"] for r in records] == [0, 3, 4]
  keys = {f"probe/{g}/{k}{s}" for g in ("paraphrase", "once") for k in ki.PROBE_FIELDS for s in ("", "/ppl")}
  assert keys <= set(records[0])
  ckpt = checkpoint.Checkpointer(cfg.run.dir, cfg.checkpoint, read_only=True)
  state = ckpt._process_data_state(2)  # pylint: disable=protected-access
  ckpt.close()
  assert state["injection"]["batches"] == 2


@pytest.mark.slow
def test_training_resume_mid_schedule_equals_uninterrupted(tmp_path):
  base = ["optim.schedule=constant", "optim.warmup_steps=0", "inject.probe_every=0"]
  straight = train.train(demo_cfg(tmp_path / "a", base + ["train.steps=6", "checkpoint.every=3"]), verbose=False)
  first = train.train(demo_cfg(tmp_path / "b", base + ["train.steps=3", "checkpoint.every=100"]), verbose=False)
  second = train.train(demo_cfg(tmp_path / "b", base + ["train.steps=6", "checkpoint.every=100"]), verbose=False)
  assert second["start_step"] == 3
  assert {**first["losses"], **second["losses"]} == straight["losses"]


@pytest.mark.parametrize("scan", [True, False])
def test_decoder_accumulates_weighted_coefficient_sums_per_layer(scan):
  cfg = load_config("demo", TINY + [f"model.scan_layers={str(scan).lower()}"]).model
  graphdef = model_lib.abstract_model(cfg)[0]
  decoder = model_lib.bind(graphdef, model_lib.init_params(cfg, seed=2))
  rng = np.random.default_rng(2)
  tokens, weights = rng.integers(0, cfg.vocab_size, (3, 10)), rng.uniform(0, 1, (3, 10)).astype(np.float32)
  _, stacked = decoder(jnp.asarray(tokens), return_ffn_coefficients=True, compute_dtype="float32")
  _, sums = decoder(jnp.asarray(tokens), ffn_abs_sums_weights_BxT=jnp.asarray(weights), compute_dtype="float32")
  want = np.einsum("lbtf,bt->lf", np.abs(np.asarray(stacked, np.float64)), weights)
  assert sums.shape == (cfg.layers, cfg.ffn) and sums.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(sums), want, rtol=1e-5)


def test_olmo_1b_preset_carries_ke_recipe_and_plans():
  from maxlm.state import plan  # pylint: disable=import-outside-toplevel
  cfg = load_config("ke_olmo1b_inject", num_devices=8)
  o, t, i = cfg.optim, cfg.train, cfg.inject
  assert (o.lr, o.warmup_steps, o.schedule, o.min_lr_ratio) == (4e-4, 80, "cosine", 0.1)
  assert (t.steps, t.global_batch, t.seq_len, i.interval) == (1600, 128, 1024, 160)
  assert (cfg.model.family, cfg.model.hidden, cfg.model.layers, cfg.model.ffn) == ("olmo", 2048, 16, 8192)
  assert "1,176,764,416 parameters" in plan.dry_run_report(cfg, 8)  # OLMo-1B-hf: 1.18B
