"""Seed 003's tools and the MiLe token buckets: Hessian trace against the exact Hessian, widening against the narrow
model's logits (in maxlm and through transformers), token-difficulty against maxlm.evaluate and brute-force buckets,
probes against separable and label-free features; each CLI's JSON and its errors."""

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.run import start
from maxlm.checkpoint import params as ckpt_params
from maxlm import pretrained
from maxlm import analyze, model
from maxlm.analysis import common, hessian, probe as linear_probe, token_difficulty, widen
from maxlm.core.config import load_config
from maxlm.data_pipelines.pcfg import load_grammar
from maxlm.core.errors import ConversionError, DataError

# A GQA LLaMA whose vocabulary holds the demo PCFG's word tokenizer (375 ids), so text data and to-hf work.
SMALL = ["model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
         "model.ffn=64", "model.max_positions=64", "model.compute_dtype=float32", "model.remat=none",
         "model.init_std=0.1", "model.rope_theta=500.0", "train.seq_len=16", "train.global_batch=4"]
# Small enough to form the exact Hessian: 600 parameters.
HESSIAN_MODEL = ["model.vocab_size=12", "model.hidden=8", "model.layers=1", "model.heads=2", "model.kv_heads=1",
                 "model.ffn=8", "model.max_positions=16", "model.compute_dtype=float32", "model.remat=none",
                 "model.init_std=0.3", "train.seq_len=8", "train.global_batch=4"]


def save_run(run_dir, overrides, seed=0, embed_scale=1.0):
  """A params-only checkpoint with non-unit norm scales (a unit scale would hide a wrong norm mapping)."""
  cfg = load_config("demo", list(overrides) + [f"run.dir={run_dir}"])
  params = jax.tree.map(np.asarray, model.init_params(cfg.model, seed))
  params["embed"] = params["embed"] * embed_scale
  rng = np.random.default_rng(seed + 100)
  for name in ("attn_norm", "mlp_norm"):
    if name in params["layers"]:
      params["layers"][name] = rng.uniform(0.5, 1.5, params["layers"][name].shape).astype(np.float32)
  if "final_norm" in params:
    params["final_norm"] = rng.uniform(0.5, 1.5, params["final_norm"].shape).astype(np.float32)
  ckpt_params.save_params(str(run_dir), cfg, params)
  return cfg, params


def logits_of(cfg, params, tokens):
  graphdef = model.abstract_model(cfg.model)[0]
  bound = model.bind(graphdef, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
  return np.asarray(bound.logits(jnp.asarray(tokens), compute_dtype="float32"), np.float64)


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


def write_csv(path, texts, labels):
  import csv
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["text", "label"])
    w.writerows(zip(texts, labels))
  return str(path)


GRAMMAR = load_grammar("builtin:demo")
TOKENS = np.random.default_rng(1).integers(0, 375, (2, 20))


# ----------------------------------------------------------------------------- Hessian trace


def _flat_loss(cfg, params, ids):
  """The mean next-token CE of full rows, written out independently of maxlm.losses, over a flat param vector."""
  from jax.flatten_util import ravel_pytree
  flat, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
  graphdef = model.abstract_model(cfg.model)[0]

  def loss(vec):
    logits = model.bind(graphdef, unravel(vec)).logits(jnp.asarray(ids[:, :-1]), compute_dtype="float32")
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:])[..., None], -1))

  return flat, loss


@pytest.fixture(scope="module")
def hessian_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("hessian")
  # A large embedding keeps RMSNorm's curvature (it grows as 1 / |x|^2) from swamping the trace with noise.
  cfg, params = save_run(root / "run", HESSIAN_MODEL, embed_scale=10.0)
  # Rows of one length (no pads): then E_batch[tr H_batch] is the trace of the Hessian of the mean CE of all rows.
  ids = np.random.default_rng(3).integers(0, 12, (5, 8))
  data = write_jsonl(root / "ids.jsonl", [{"ids": row.tolist()} for row in ids])
  flat, loss = _flat_loss(cfg, params, ids)
  exact = float(jnp.trace(jax.hessian(loss)(flat)))
  return root, cfg, data, exact, flat.size


@pytest.mark.parametrize("probe_kind", ["rademacher", pytest.param("gaussian", marks=pytest.mark.slow)])
def test_hessian_trace_matches_the_exact_hessian(hessian_run, probe_kind):
  root, _, data, exact, count = hessian_run
  out = hessian.hessian_trace(str(root / "run"), data, samples=300, batch_size=2, seq_len=8, probe=probe_kind,
                              seed=0, progress=False)
  assert out["parameters"] == count == 600
  assert abs(exact) > 0.5
  assert 0 < out["stderr"] < 0.25 * abs(exact), out  # the comparison below is not vacuous
  assert abs(out["trace"] - exact) < 4 * out["stderr"], (out["trace"], out["stderr"], exact)


@pytest.mark.multidevice
@pytest.mark.slow
def test_hessian_trace_sharded_over_two_devices_matches_one(hessian_run):
  root, _, data, _, _ = hessian_run
  script = ("import json, sys; from maxlm.analysis import hessian; print(json.dumps(hessian.hessian_trace(sys.argv[1], "
            "sys.argv[2], samples=4, batch_size=2, seq_len=8, probe='gaussian', seed=3, progress=False)))")
  runs = {}
  for n in (1, 2):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script, str(root / "run"), data], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs[n] = json.loads(done.stdout.strip().splitlines()[-1])
  assert (runs[1]["devices"], runs[2]["devices"]) == (1, 2)  # the second run really is sharded
  np.testing.assert_allclose(runs[2]["values"], runs[1]["values"], rtol=1e-4)


def test_rademacher_probes_of_a_diagonal_quadratic_are_exact():
  d = {"a": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32), "b": jnp.arange(1.0, 6.0)}
  loss = lambda p, _: 0.5 * sum(jnp.sum(d[k] * p[k] ** 2) for k in p)  # noqa: E731  H = diag(d)
  params = {"a": jnp.ones((3, 4)), "b": jnp.zeros(5)}
  batches = [None] * 7
  est = hessian.hutchinson(jax.jit(hessian.quadratic_form(loss, "rademacher")), params, batches, seed=1,
                           progress=False)
  exact = float(sum(np.sum(np.asarray(v, np.float64)) for v in d.values()))
  assert est.stderr == 0.0
  np.testing.assert_allclose(est.values, exact, rtol=1e-6)
  gauss = hessian.hutchinson(jax.jit(hessian.quadratic_form(loss, "gaussian")), params, batches, seed=1,
                             progress=False)
  assert gauss.stderr > 0  # Gaussian probes of the same quadratic do vary


def test_lm_batch_scores_as_transformers_labels():
  ids = np.asarray([[5, 6, 7, 0], [8, 9, 0, 0]])
  mask = np.asarray([[1, 1, 1, 0], [1, 1, 0, 0]])
  batch = common.lm_batch(ids, mask)
  # transformers: labels = ids with pads -100, shifted inside the model: position t predicts labels[t + 1].
  labels = np.where(mask > 0, ids, -100)
  np.testing.assert_array_equal(batch["targets"][:, :-1], labels[:, 1:])
  assert (batch["targets"][:, -1] == -100).all()
  np.testing.assert_array_equal(batch["inputs"], ids)


def cli_args(tool, **options):
  """["tool", "--key", "value", ...] with underscores in keys as dashes; a list value repeats its flag."""
  args = [tool]
  for key, value in options.items():
    for v in value if isinstance(value, list) else [value]:
      args += [f"--{key.replace('_', '-')}"] if v is True else [f"--{key.replace('_', '-')}", str(v)]
  return args


def test_hessian_cli_writes_json_and_rejects_bad_input(hessian_run, tmp_path, capsys):
  root, _, data, _, _ = hessian_run
  out = tmp_path / "h.json"
  good = dict(checkpoint=root / "run", data=data, samples=3, batch_size=2, seq_len=8, probe="rademacher", output=out)
  assert analyze.main(cli_args("hessian-trace", **good)) == 0
  result = json.loads(out.read_text())
  assert {"trace", "stderr", "samples", "parameters"} <= set(result) and result["samples"] == 3
  assert len(result["values"]) == 3 and result["parameters"] == 600
  good["overwrite"] = True  # the runs below replace h.json, the tool's own earlier output
  assert analyze.main(cli_args("hessian-trace", **{**good, "data": tmp_path / "missing.jsonl"})) == 2
  assert "does not exist" in capsys.readouterr().err
  assert analyze.main(cli_args("hessian-trace", **{**good, "seq_len": 99})) == 2
  assert "max_positions" in capsys.readouterr().err
  assert analyze.main(cli_args("hessian-trace", **{**good, "samples": 0})) == 2
  assert "must be positive" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    analyze.main(cli_args("hessian-trace", **{**good, "probe": "uniform"}))
  # RUN@all: every kept step, each as RUN@STEP would give it, one JSON and a plot over the steps.
  series_run = tmp_path / "series"
  cfg = hessian_run[1]
  _, params, _ = pretrained.load_params(str(root / "run"))
  ckpt_params.save_params(str(series_run), cfg, params, step=0)
  ckpt_params.save_params(str(series_run), cfg, jax.tree.map(lambda x: np.asarray(x) * 1.1, params), step=5)
  capsys.readouterr()
  assert analyze.main(cli_args("hessian-trace", **{**good, "checkpoint": f"{series_run}@all"})) == 0
  series = json.loads(out.read_text())
  assert [r["step"] for r in series["results"]] == [0, 5] and (tmp_path / "h.png").stat().st_size > 1000
  assert series["results"][0]["trace"] == result["trace"]  # same data, seed and probes: the same estimate
  assert analyze.main(cli_args("widen", checkpoint=f"{series_run}@all", factor=2, output=tmp_path / "w")) == 2
  assert "reads one checkpoint: give RUN (its newest step) or RUN@STEP" in capsys.readouterr().err


# ----------------------------------------------------------------------------- widen


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
  root = tmp_path_factory.mktemp("narrow")
  cfg, params = save_run(root / "run", SMALL)
  return root, cfg, params


def test_norms_commute_with_tiling():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  scale = np.random.default_rng(1).uniform(0.5, 1.5, 8).astype(np.float32)
  bias = np.random.default_rng(2).normal(size=8).astype(np.float32)
  narrow = {"attn_norm": jnp.asarray(scale), "attn_norm_bias": jnp.asarray(bias)}
  wide = {k: jnp.tile(v, 3) for k, v in narrow.items()}
  for family in ("llama", "olmo", "gpt2"):  # RMSNorm, non-parametric LayerNorm, LayerNorm with bias
    cfg = load_config("demo", [f"model.family={family}"]).model
    narrow_out = np.asarray(model.norm(cfg, narrow, "attn_norm", jnp.asarray(x)))
    wide_out = np.asarray(model.norm(cfg, wide, "attn_norm", jnp.tile(x, (1, 1, 3))))
    np.testing.assert_allclose(wide_out, np.tile(narrow_out, (1, 1, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("factor,layers", [(2, None), (3, None), (2, 3)])
def test_widened_logits_equal_the_narrow_models(narrow, tmp_path, factor, layers):
  root, cfg, params = narrow
  wide_cfg = widen.widen(str(root / "run"), str(tmp_path / "wide"), factor=factor, layers=layers, log=lambda *_: 0)
  loaded_cfg, loaded, _ = pretrained.load_params(str(tmp_path / "wide"))
  m = loaded_cfg.model
  assert (m.hidden, m.heads, loaded_cfg.kv_heads, m.ffn, m.layers) == (32 * factor, 4 * factor, 2 * factor,
                                                                        64 * factor, layers or 2)
  assert loaded_cfg.head_dim == cfg.head_dim == 8 and wide_cfg.model.hidden == m.hidden
  ref = logits_of(cfg, params, TOKENS)
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(logits_of(loaded_cfg, loaded, TOKENS), ref, rtol=0, atol=2e-5)
  marker = json.loads((tmp_path / "wide" / "maxlm_derived.json").read_text())
  assert marker["tool"] == "widen" and marker["factor"] == factor


def test_widening_heads_is_required_doubling_head_dim_breaks_it(narrow):
  _, cfg, params = narrow
  wide_cfg = widen.widened_config(cfg, 2)
  wide = widen.widen_params(cfg, params, 2)
  ref = logits_of(cfg, params, TOKENS)
  np.testing.assert_allclose(logits_of(wide_cfg, wide, TOKENS), ref, atol=2e-5)
  # The same weights read as 4 heads of head_dim 16 (same shapes): heads mix and RoPE frequencies change.
  wrong = copy.deepcopy(wide_cfg)
  wrong.model.heads, wrong.model.kv_heads, wrong.model.head_dim = 4, 2, 16
  assert np.abs(logits_of(wrong, wide, TOKENS) - ref).max() > 0.05


def test_widened_checkpoint_through_to_hf_evaluate_and_init_from(narrow, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from maxlm import convert, evaluate
  from maxlm.state import layout as state_lib
  root, cfg, params = narrow
  widen.widen(str(root / "run"), str(tmp_path / "wide"), factor=2, log=lambda *_: 0)
  convert.to_hf(str(tmp_path / "wide"), str(tmp_path / "hf"), dtype="float32", log=lambda *_: 0)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                         attn_implementation="eager")
  assert hf.config.hidden_size == 64 and hf.config.num_key_value_heads == 4 and hf.config.head_dim == 8
  with torch.no_grad():
    hf_logits = hf(torch.tensor(TOKENS)).logits.double().numpy()
  np.testing.assert_allclose(hf_logits, logits_of(cfg, params, TOKENS), atol=1e-4)
  docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": GRAMMAR.decode(s)} for s in
                                               GRAMMAR.sample_sentences(12, 5)[0]])
  quiet = lambda *_: 0  # noqa: E731
  narrow_loss = evaluate.evaluate(str(root / "run"), docs, output=str(tmp_path / "a.json"), log=quiet)
  wide_loss = evaluate.evaluate(str(tmp_path / "wide"), docs, output=str(tmp_path / "b.json"), log=quiet)
  assert abs(narrow_loss["token_weighted"]["loss"] - wide_loss["token_weighted"]["loss"]) < 1e-5
  wide_cfg, wide_params, _ = pretrained.load_params(str(tmp_path / "wide"))
  wide_cfg.mesh.data, wide_cfg.mesh.fsdp, wide_cfg.mesh.tensor = 1, 1, 1
  state = start.init_from(state_lib.layout(wide_cfg), str(tmp_path / "wide"))
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(wide_params)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert int(state["step"]) == 0


def test_widen_refuses_tied_models_unless_untied(tmp_path, capsys):
  cfg, params = save_run(tmp_path / "tied", SMALL + ["model.tie_embeddings=true"])
  args = ["widen", "--checkpoint", str(tmp_path / "tied"), "--factor", "2", "--output", str(tmp_path / "w")]
  assert analyze.main(args) == 2
  err = capsys.readouterr().err
  assert "tied" in err and "--untie" in err and not (tmp_path / "w").exists()
  assert analyze.main(args + ["--untie"]) == 0
  wide_cfg, wide, _ = pretrained.load_params(str(tmp_path / "w"))
  assert not wide_cfg.model.tie_embeddings
  np.testing.assert_allclose(logits_of(wide_cfg, wide, TOKENS), logits_of(cfg, params, TOKENS), atol=2e-5)
  assert analyze.main(args + ["--untie"]) == 2  # the output exists now
  assert analyze.main(["widen", "--checkpoint", str(tmp_path / "tied"), "--factor", "0", "--untie", "--output",
                       str(tmp_path / "w0")]) == 2


# ----------------------------------------------------------------------------- token difficulty


def brute_force_buckets(counts):
  order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
  total, seen, out = sum(counts), 0.0, {}
  for i in order:
    share = seen / total
    out[i] = 0 if share < 0.8 else 1 if share < 0.95 else 2
    seen += counts[i]
  return np.asarray([out[i] for i in range(len(counts))])


def test_buckets_partition_the_types_by_training_share():
  rng = np.random.default_rng(0)
  zipf = rng.permutation(np.floor(5000.0 / np.arange(1, 301)))  # a Zipf-like vocabulary, shuffled ids
  counts = np.concatenate([zipf, np.zeros(20), [50.0, 50.0]])  # unseen types and a tie
  bucket = token_difficulty.bucket_of_types(counts)
  np.testing.assert_array_equal(bucket, brute_force_buckets(counts.tolist()))
  assert set(np.unique(bucket)) == {0, 1, 2} and len(bucket) == len(counts)
  shares = [counts[bucket == b].sum() / counts.sum() for b in range(3)]
  assert shares[0] >= 0.8 and shares[0] + shares[1] >= 0.95
  assert (bucket[counts == 0] == 2).all()


def _evaluation_rows(seq_len):
  """Documents as maxlm.evaluate windows them (joined with the separator, windows of seq_len + 1, stride seq_len),
  and the same windows as id rows for token-difficulty: both then score exactly the same targets."""
  docs = [GRAMMAR.decode(s) for s in GRAMMAR.sample_sentences(30, 7)[0]]
  stream = []
  for d in docs:
    stream += GRAMMAR.encode(d) + [GRAMMAR.separator_id]
  windows = [stream[s:s + seq_len + 1] for s in range(0, len(stream) - 1, seq_len)]
  return docs, windows


def test_token_difficulty_overall_ce_equals_evaluate(narrow, tmp_path):
  from maxlm import evaluate
  root, cfg, _ = narrow
  docs, windows = _evaluation_rows(16)
  text = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
  ids = write_jsonl(tmp_path / "ids.jsonl", [{"ids": w} for w in windows])
  counts = np.random.default_rng(0).integers(0, 1000, 375)
  np.save(tmp_path / "counts.npy", counts)
  report = token_difficulty.token_difficulty([str(root / "run")], ids, str(tmp_path / "counts.npy"), seq_len=17,
                                             batch_size=4, log=lambda *_: 0)
  buckets = report["checkpoints"][0]["buckets"]
  overall = buckets["overall"]
  parts = [buckets[n] for n in ("frequent", "medium", "rare")]
  assert sum(p["types"] for p in parts) == overall["types"] == 384
  assert sum(p["occurrences"] for p in parts) == overall["occurrences"]
  weighted = sum(p["ce"] * p["occurrences"] for p in parts if p["occurrences"]) / overall["occurrences"]
  assert abs(weighted - overall["ce"]) < 1e-9
  ref = evaluate.evaluate(str(root / "run"), text, seq_len=16, batch_size=4, output=str(tmp_path / "e.json"),
                          log=lambda *_: 0)
  assert overall["occurrences"] == ref["domains"][next(iter(ref["domains"]))]["tokens"]
  assert abs(overall["ce"] - ref["token_weighted"]["loss"]) < 1e-5
  assert abs(overall["ppl"] - np.exp(overall["ce"])) < 1e-9 * overall["ppl"]


def test_store_counts_count_the_train_split(tmp_path):
  from maxlm.data_pipelines import prepare
  tok = tmp_path / "tokenizer.json"
  GRAMMAR.to_hf_tokenizer().save(str(tok))
  docs = [GRAMMAR.decode(s) for s in GRAMMAR.sample_sentences(40, 2)[0]]
  write_jsonl(tmp_path / "raw.jsonl", [{"text": d} for d in docs])
  prepare(str(tmp_path / "raw.jsonl"), str(tok), str(tmp_path / "store"), workers=1, progress=False)
  expected = np.bincount([t for d in docs for t in GRAMMAR.encode(d) + [GRAMMAR.separator_id]], minlength=375)
  counts = token_difficulty.store_counts(str(tmp_path / "store"))
  np.testing.assert_array_equal(counts[:len(expected)], expected)
  assert counts.sum() == expected.sum()
  padded = token_difficulty.load_counts(str(tmp_path / "store"), 384, tokenizer_vocab=375)
  assert padded.shape == (384,) and padded[375:].sum() == 0
  with pytest.raises(DataError, match="375 entries but the model's vocabulary has 384: the counts come from another"):
    token_difficulty.load_counts(str(tmp_path / "store"), 384)  # the tokenizer's size unknown: only the model's


def test_token_difficulty_cli_compares_checkpoints_and_rejects_bad_counts(narrow, tmp_path, capsys):
  root, _, _ = narrow
  save_run(tmp_path / "other", SMALL, seed=1)
  docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": GRAMMAR.decode(s)} for s in
                                               GRAMMAR.sample_sentences(10, 3)[0]])
  np.save(tmp_path / "counts.npy", np.arange(375))
  out = tmp_path / "td"
  good = dict(checkpoint=[root / "run", tmp_path / "other"], data=docs, counts=tmp_path / "counts.npy", output=out)
  assert analyze.main(cli_args("token-difficulty", **good)) == 0
  report = json.loads((out / "token_difficulty.json").read_text())
  assert len(report["checkpoints"]) == 2 and (out / "token_difficulty.png").stat().st_size > 1000
  for run in report["checkpoints"]:
    assert set(run["buckets"]) == {"frequent", "medium", "rare", "overall"}
    assert set(run["buckets"]["rare"]) == {"types", "occurrences", "ce", "ppl", "entropy"}
  assert report["checkpoints"][0]["buckets"]["overall"]["ce"] != report["checkpoints"][1]["buckets"]["overall"]["ce"]
  good["overwrite"] = True  # the error cases below reach their own checks, past the earlier output's
  capsys.readouterr()
  fresh = {**good, "output": tmp_path / "td_refused"}  # refusals are checked on an output not written yet
  np.save(tmp_path / "big.npy", np.ones(500))
  assert analyze.main(cli_args("token-difficulty", **{**fresh, "counts": tmp_path / "big.npy"})) == 2
  assert "another tokenizer" in capsys.readouterr().err
  np.save(tmp_path / "short.npy", np.ones(200))  # another tokenizer's counts, shorter than the model's vocabulary
  assert analyze.main(cli_args("token-difficulty", **{**fresh, "counts": tmp_path / "short.npy"})) == 2
  assert "200 entries but the model's vocabulary has 384 and its tokenizer 375" in capsys.readouterr().err
  assert analyze.main(cli_args("token-difficulty", **{**fresh, "counts": tmp_path / "nothing.npy"})) == 2
  assert "neither a token store" in capsys.readouterr().err


# ----------------------------------------------------------------------------- probes


def test_linear_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 20)) * 4
  y = rng.integers(0, 3, 300)
  x = centres[y] + rng.normal(size=(300, 20))
  x_train, x_val = linear_probe.standardise(x[:200], x[200:])
  clf = linear_probe.train_linear(x_train, y[:200], 3, steps=300)
  assert np.mean(linear_probe.predict_linear(clf, x_val) == y[200:]) == 1.0
  # Minibatches reach it too, and the same seed gives the same classifier.
  a = linear_probe.train_linear(x_train, y[:200], 3, steps=200, batch_size=32, seed=4)
  b = linear_probe.train_linear(x_train, y[:200], 3, steps=200, batch_size=32, seed=4)
  np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(b["w"]))
  assert np.mean(linear_probe.predict_linear(a, x_val) == y[200:]) == 1.0


def _first_word_task(n, seed):
  """Texts whose label is their first word (a function of position 0's features), plus label-free copies."""
  rng = np.random.default_rng(seed)
  words = [w for w in GRAMMAR.vocab if w not in ("<eos>", "<unk>")]
  firsts = words[:3]
  texts, labels = [], []
  for _ in range(n):
    k = rng.integers(0, 3)
    texts.append(" ".join([firsts[k]] + list(rng.choice(words, rng.integers(3, 8)))))
    labels.append(f"L{k}")
  return texts, labels


def test_probe_on_a_random_model(narrow, tmp_path):
  root, _, _ = narrow
  texts, labels = _first_word_task(240, 0)
  train = write_csv(tmp_path / "train.csv", texts[:160], labels[:160])
  val = write_csv(tmp_path / "val.csv", texts[160:], labels[160:])
  out = linear_probe.probe(str(root / "run"), train, val, mode="linear", log=lambda *_: 0)
  assert out["accuracy"] == 1.0 and out["classes"] == 3  # the label is in position 0's features
  assert out["features"] == out["seq_len"] * 32
  # Labels that carry no information about the text: the probe cannot beat always answering the majority.
  rng = np.random.default_rng(1)
  noise = ["A" if r < 0.75 else "B" for r in rng.random(240)]
  train = write_csv(tmp_path / "train_noise.csv", texts[:160], noise[:160])
  val = write_csv(tmp_path / "val_noise.csv", texts[160:], noise[160:])
  out = linear_probe.probe(str(root / "run"), train, val, mode="linear", log=lambda *_: 0)
  base = out["majority_baseline"]
  assert base == np.mean(np.asarray(noise[160:]) == "A")
  assert out["accuracy"] <= base + 3 * np.sqrt(base * (1 - base) / 80), out
  assert abs(out["accuracy"] - base) < 0.2, out


def test_probe_cli_finetune_and_bad_input(narrow, tmp_path, capsys):
  root, _, _ = narrow
  texts, labels = _first_word_task(96, 2)
  train = write_csv(tmp_path / "train.csv", texts[:64], labels[:64])
  val = write_csv(tmp_path / "val.csv", texts[64:], labels[64:])
  out = tmp_path / "p.json"
  good = dict(checkpoint=root / "run", train=train, validation=val, mode="finetune", steps=40, lr=3e-3, batch_size=16,
              output=out)
  assert analyze.main(cli_args("probe", **good)) == 0
  result = json.loads(out.read_text())
  assert {"accuracy", "majority_baseline", "mode", "classes"} <= set(result) and result["mode"] == "finetune"
  assert result["train_accuracy"] > 0.9, result  # fine-tuning fits the first-word rule
  good["overwrite"] = True  # the error cases below reach their own checks, past the earlier output's
  (tmp_path / "bad.csv").write_text("sentence,label\nx,y\n")
  assert analyze.main(cli_args("probe", **{**good, "train": tmp_path / "bad.csv"})) == 2
  assert "'text' and 'label'" in capsys.readouterr().err
  write_csv(tmp_path / "one.csv", texts[:5], ["A"] * 5)
  assert analyze.main(cli_args("probe", **{**good, "train": tmp_path / "one.csv"})) == 2
  assert "at least two classes" in capsys.readouterr().err
  assert analyze.main(cli_args("probe", **{**good, "train": tmp_path / "none.csv"})) == 2
  assert "does not exist" in capsys.readouterr().err
