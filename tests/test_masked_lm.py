"""Masked-LM pretraining (seed 003's setting): bidirectional attention (model.causal=false) against a float64
reference, document masks kept; the masking transform's statistics and determinism; the ib_mlm_demo preset end to
end; hessian-trace on a masked-LM checkpoint against the exact Hessian of masked-token CE; what a masked LM refuses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_forward
from maxlm import model as model_lib
from maxlm.analysis import common, hessian, probe as linear_probe, token_difficulty
from maxlm.checkpoint import params as ckpt_params
from maxlm.core.config import IGNORE_INDEX, load_config
from maxlm.core.errors import ConfigError, ConversionError
from maxlm.data_pipelines import load_grammar, masking, pcfg_tasks, pipeline
from maxlm.kernels import attention as attention_lib

MLM = ["model.causal=false", "data.mlm=true", "data.source=pcfg"]


def _numpy_attention(q, k, v, segment_ids=None, causal=True):
  """GQA attention in float64 written out: query head n reads kv head n // (N / K)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  k, v = (np.repeat(a, n // a.shape[2], axis=2) for a in (k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  visible = (np.tril(np.ones((t, t), bool)) if causal else np.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    visible = visible & (seg[:, None, :, None] == seg[:, None, None, :])
  logits = np.where(visible, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


# ----------------------------------------------------------------------------- bidirectional attention


@pytest.mark.parametrize("backend", ["auto", "xla"])
@pytest.mark.parametrize("with_segments", [False, True], ids=["full", "documents"])
def test_bidirectional_attention_matches_float64(backend, with_segments):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 24, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 24, 2, 16)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [7, 10, 7]), np.zeros(24, int)])) if with_segments else None
  got = attention_lib.attention(q, k, v, backend=backend, segment_ids_BxT=seg, platform="cpu", causal=False)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, seg, causal=False), rtol=2e-5, atol=2e-5)
  # Not the causal function: the first query reads the whole (segment of the) row.
  assert np.abs(np.asarray(got) - _numpy_attention(q, k, v, seg, causal=True)).max() > 1e-2


def test_bidirectional_model_matches_numpy_forward_and_isolates_documents():
  cfg = load_config("demo", MLM + ["data.grammar=builtin:ib_demo", "model.vocab_size=50", "model.hidden=32",
                                   "model.layers=2", "model.heads=4", "model.kv_heads=2", "model.ffn=48",
                                   "model.max_positions=64", "model.compute_dtype=float32", "model.remat=none",
                                   "model.rope_theta=500.0", "model.init_std=0.2", "train.seq_len=16"]).model
  params = model_lib.init_params(cfg, 0)
  graphdef = model_lib.abstract_model(cfg)[0]
  forward = jax.jit(lambda p, t, s: model_lib.bind(graphdef, p).logits(t, segment_ids_BxT=s, compute_dtype="float32"))
  logits = lambda t, s=None: np.asarray(forward(params, jnp.asarray(t), None if s is None else jnp.asarray(s)))
  tokens = np.random.default_rng(1).integers(0, 50, (2, 16))
  seg = np.stack([np.repeat([1, 2], [9, 7]), np.ones(16, int)]).astype(np.int32)
  for s in (None, seg):
    np.testing.assert_allclose(logits(tokens, s), numpy_forward(cfg, params, tokens, s), rtol=1e-4, atol=1e-4)
  # Bidirectional: position 0 changes when the last token does; documents: segment 1 does not see segment 2.
  changed = tokens.copy()
  changed[:, -1] = (changed[:, -1] + 1) % 50
  assert np.abs(logits(changed)[:, 0] - logits(tokens)[:, 0]).max() > 1e-4
  np.testing.assert_allclose(logits(changed, seg)[0, :9], logits(tokens, seg)[0, :9], rtol=0, atol=1e-6)
  assert np.abs(logits(changed, seg)[1, 0] - logits(tokens, seg)[1, 0]).max() > 1e-4


def test_masked_lm_config_pairs_and_decoding_refusal():
  with pytest.raises(ConfigError, match="model.causal=false"):
    load_config("demo", ["data.mlm=true"])
  with pytest.raises(ConfigError, match="data.mlm=true"):
    load_config("demo", ["model.causal=false"])
  with pytest.raises(ConfigError, match="masked-LM batches are cut from token windows"):
    load_config("demo", MLM[:2] + ["data.source=sft"])
  cfg = load_config("ib_mlm_demo")
  model = model_lib.create(cfg.model)
  with pytest.raises(ConfigError, match="cannot decode token by token with a KV cache"):
    model_lib.prefill(model, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,), jnp.int32), cache_len=8)
  from maxlm.decoding import Generator
  with pytest.raises(ConfigError, match="bidirectional"):
    Generator(cfg, model_lib.init_params(cfg.model, 0))


# ----------------------------------------------------------------------------- the masking transform


def test_masking_statistics_follow_ib_settings():
  spec = masking.MaskingSpec(mask_id=100, random_vocab=100, separator_id=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 100, (4000, 32)).astype(np.int32)
  tokens[rng.random(tokens.shape) < 0.12] = 0  # separators: never chosen
  inputs, targets = masking.mask_rows(tokens, tokens != 0, [(7, 0, 0, r) for r in range(len(tokens))], spec)
  chosen = targets != IGNORE_INDEX
  per_row = chosen.sum(1)
  maskable = (tokens != 0).sum(1)
  assert per_row.max() <= 5 and (per_row >= 1).all()
  np.testing.assert_array_equal(per_row, np.minimum(5, np.maximum(1, np.round(0.15 * maskable))))
  assert chosen.mean() <= 0.15, chosen.mean()
  assert not chosen[tokens == 0].any()
  np.testing.assert_array_equal(targets[chosen], tokens[chosen])  # labels: the original tokens, unshifted
  np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
  n = chosen.sum()
  masked = (inputs[chosen] == 100).mean()
  kept = (inputs[chosen] == tokens[chosen]).mean()
  other = ((inputs[chosen] != 100) & (inputs[chosen] != tokens[chosen])).mean()
  se = np.sqrt(0.1 * 0.9 / n)
  assert abs(masked - 0.8) < 4 * np.sqrt(0.16 / n), masked
  # A random draw equals the original 1 time in 100 (then it reads as kept): 10% + 0.1% kept, 9.9% replaced.
  assert abs(kept - 0.101) < 4 * se and abs(other - 0.099) < 4 * se, (kept, other)
  assert not (inputs[chosen] > 100).any()


def test_masked_batches_are_deterministic_across_process_counts_and_resume():
  cfg = load_config("ib_mlm_demo")
  whole = pipeline.build_train_iterator(cfg.data, seq_len=32, batch_size=8, seed=3)
  halves = [pipeline.build_train_iterator(cfg.data, seq_len=32, batch_size=8, seed=3, rows=r)
            for r in (range(0, 4), range(4, 8))]
  for _ in range(3):
    full = next(whole)
    parts = [next(h) for h in halves]
    for key in ("inputs", "targets", "segment_ids"):
      np.testing.assert_array_equal(full[key], np.concatenate([p[key] for p in parts]))
  assert (full["targets"] != IGNORE_INDEX).any() and (full["inputs"] == 83).any()  # <mask> is id 83 for ib_demo
  state = whole.get_state()
  after = next(whole)
  resumed = pipeline.build_train_iterator(cfg.data, seq_len=32, batch_size=8, seed=3)
  resumed.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(resumed)["inputs"], after["inputs"])
  for it in [whole, resumed, *halves]:
    it.close()
  evals = [pipeline.build_eval_batches(cfg.data, seq_len=32, batch_size=8, num_batches=2, rows=r)["pcfg"]
           for r in (None, range(0, 4))]
  np.testing.assert_array_equal(evals[0][1]["inputs"][:4], evals[1][1]["inputs"])
  assert all((b["targets"] != IGNORE_INDEX).sum(1).max() <= 5 for b in evals[0])
  info = pipeline.describe(cfg.data)
  assert (info.vocab_size, info.mask_id) == (load_grammar("builtin:ib_demo").vocab_size + 1, 83)


# ----------------------------------------------------------------------------- preset and analysis tools


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
  from maxlm.train import train
  root = tmp_path_factory.mktemp("mlm")
  cfg = load_config("ib_mlm_demo", [f"run.dir={root / 'run'}", "train.steps=4", "run.eval_every=0",
                                    "run.eval_batches=2", "run.progress=false", "run.tensorboard=false",
                                    "run.summary=false", "train.global_batch=16", "optim.warmup_steps=1",
                                    "checkpoint.async_save=false"], num_devices=jax.device_count())
  summary = train(cfg, verbose=False)
  g = load_grammar("builtin:ib_demo")
  docs = root / "docs.jsonl"
  docs.write_text("".join(json.dumps({"text": g.decode(s)}) + "\n" for s in g.sample_sentences(24, 5)[0]))
  return root, summary, str(docs)


def test_ib_mlm_demo_trains_and_validates_on_masked_tokens(mlm_run):
  _, summary, _ = mlm_run
  assert summary["steps"] == 4 and all(np.isfinite(v) for v in summary["losses"].values())
  assert summary["true_entropy_per_token"] is None  # the entropy rate is no floor for masked-token CE
  (last,) = summary["evals"].values()
  assert 0 < last["eval/pcfg"] < 6


def test_analysis_tools_read_a_masked_lm_checkpoint(mlm_run, tmp_path):
  root, _, docs = mlm_run
  out = hessian.hessian_trace(str(root / "run"), docs, samples=2, batch_size=4, seq_len=16, probe="rademacher",
                              progress=False)
  assert out["loss"] == "masked-token CE" and np.isfinite(out["trace"])
  g = load_grammar("builtin:ib_demo")
  paths = []
  for name, seed in (("train", 1), ("val", 2)):
    paths.append(str(tmp_path / f"{name}.csv"))
    pcfg_tasks.write_csv(paths[-1], pcfg_tasks.make_task(g, "A", 40, seed).rows)
  result = linear_probe.probe(str(root / "run"), *paths, steps=20, log=lambda *a: None)
  assert 0 <= result["accuracy"] <= 1
  counts = tmp_path / "counts.npy"
  np.save(counts, np.ones(128))
  report = token_difficulty.token_difficulty([str(root / "run")], docs, str(counts), seq_len=16, log=lambda *a: None)
  overall = report["checkpoints"][0]["buckets"]["overall"]
  assert 24 <= overall["occurrences"] <= 5 * 24  # one to five masked targets per sentence
  from maxlm.hf.export import to_hf
  with pytest.raises(ConversionError, match="bidirectional masked LM"):
    to_hf(str(root / "run"), str(tmp_path / "hf"), progress=False, log=lambda *a: None)


TINY_GRAMMAR = "# format: maxlm\nS A B 1.0\nA a 0.5\nA b 0.5\nB c 0.3\nB d 0.3\nB A A 0.4\n"


def test_hessian_trace_of_a_masked_lm_matches_the_exact_hessian(tmp_path):
  grammar = tmp_path / "tiny.txt"
  grammar.write_text(TINY_GRAMMAR)  # vocab: <eos> a b c d <unk>, then <mask> = 6
  cfg = load_config("demo", MLM + [f"data.grammar={grammar}", "model.vocab_size=8", "model.hidden=8",
                                   "model.layers=1", "model.heads=2", "model.kv_heads=1", "model.ffn=8",
                                   "model.max_positions=16", "model.compute_dtype=float32", "model.remat=none",
                                   "model.init_std=0.3", "train.seq_len=8", "data.mlm_prob=0.3",
                                   f"run.dir={tmp_path / 'run'}"])
  params = jax.tree.map(np.asarray, model_lib.init_params(cfg.model, 0))
  params["embed"] = params["embed"] * 10.0  # keeps RMSNorm's curvature from swamping the trace with noise
  ckpt_params.save_params(str(tmp_path / "run"), cfg, params)
  ids = np.random.default_rng(3).integers(1, 5, (5, 6))
  data = tmp_path / "ids.jsonl"
  data.write_text("".join(json.dumps({"ids": row.tolist()}) + "\n" for row in ids))
  samples, batch = 40, 2
  out = hessian.hessian_trace(str(tmp_path / "run"), str(data), samples=samples, batch_size=batch, seq_len=6,
                              probe="rademacher", seed=0, progress=False)
  assert out["loss"] == "masked-token CE"

  # The same minibatches and masks (the tool's public pieces), each one's exact trace from jax.hessian of a CE
  # over the masked positions written out here.
  from jax.flatten_util import ravel_pytree
  flat, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
  graphdef = model_lib.abstract_model(cfg.model)[0]
  rows = {"ids": ids.astype(np.int32), "mask": np.ones_like(ids, np.int32)}
  batches = list(hessian.minibatches(rows, samples=samples, batch_size=batch, seed=0, transform=lambda b, i:
                                     common.scoring_batch(cfg, b["ids"], b["mask"], seed=0, index=i)))
  assert all((b["targets"] != IGNORE_INDEX).sum() >= batch for b in batches)

  def loss(vec, inputs, targets):
    logits = model_lib.bind(graphdef, unravel(vec)).logits(inputs, compute_dtype="float32")
    logp = jax.nn.log_softmax(logits, -1)
    valid = targets != IGNORE_INDEX
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.sum(valid)

  exact_one = jax.jit(lambda i, t: jnp.trace(jax.hessian(loss)(flat, i, t)))
  exact = np.mean([float(exact_one(b["inputs"], b["targets"])) for b in batches])
  assert abs(exact) > 0.5 and 0 < out["stderr"] < 0.5 * abs(exact), (exact, out["stderr"])
  assert abs(out["trace"] - exact) < 4 * out["stderr"], (out["trace"], out["stderr"], exact)
