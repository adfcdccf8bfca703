"""Evaluation: per-domain loss on a JSONL file equals the reference CE on the model's logits, the run's own data
and CLI errors work, and lm-evaluation-harness runs end to end on the exported model with a local task."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.evals import harness
from maxlm.checkpoint import params as ckpt_params
from maxlm import evaluate, losses, model
from maxlm.core.config import load_config
from maxlm.data_pipelines.raw_records import collect_documents
from maxlm.data_pipelines.tokenization import run_encoder

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY = ["model.layers=2", "model.hidden=32", "model.heads=4", "model.kv_heads=2", "model.ffn=64",
        "model.vocab_size=384", "model.max_positions=64", "model.init_std=0.1", "model.compute_dtype=float32",
        "train.seq_len=16", "train.global_batch=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_run")
  cfg = load_config("demo", TINY)
  params = model.init_params(cfg.model, 3)
  ckpt_params.save_params(str(root), cfg, params)
  return root, cfg, params


def test_jsonl_loss_per_domain_matches_reference(run):
  root, cfg, params = run
  report = evaluate.evaluate(str(root), os.path.join(DATA, "pcfg_docs.jsonl"), batch_size=3)
  assert sorted(report["domains"]) == ["grammar_a", "grammar_b"]
  assert os.path.isfile(report["output"])
  assert json.load(open(report["output"]))["domains"] == report["domains"]
  # Reference: the same windows through the model's fp32 logits and maxlm.losses.cross_entropy.
  encode, sep, _ = run_encoder(cfg.data)
  docs = collect_documents(os.path.join(DATA, "pcfg_docs.jsonl"))
  graphdef = model.abstract_model(cfg.model)[0]

  @jax.jit
  def reference_ce(tokens, targets):
    logits = model.bind(graphdef, params).logits(tokens, compute_dtype="float32")
    ce, metrics = losses.cross_entropy(logits, targets)
    return ce * metrics["n_valid"]

  for domain, texts in docs.items():
    stream = np.concatenate([np.r_[ids, sep] for ids in encode(texts)]).astype(np.int32)
    assert report["domains"][domain]["tokens"] == len(stream) - 1  # every token but the first is a target
    total = 0.0
    for start in range(0, len(stream) - 1, 16):
      window = stream[start:start + 17]
      targets = np.full(16, -100, np.int32)
      targets[:len(window) - 1] = window[1:]
      tokens = np.zeros(16, np.int32)
      tokens[:len(window) - 1] = window[:-1]
      total += float(reference_ce(jnp.asarray(tokens[None]), jnp.asarray(targets[None])))
    np.testing.assert_allclose(report["domains"][domain]["loss"], total / (len(stream) - 1), rtol=1e-5)
    np.testing.assert_allclose(report["domains"][domain]["perplexity"], np.exp(total / (len(stream) - 1)),
                               rtol=1e-5)


def test_run_data_and_text_file(run, tmp_path):
  root, _, _ = run
  report = evaluate.evaluate(str(root), None, num_batches=1, batch_size=2, output=str(tmp_path / "r.json"))
  assert list(report["domains"]) == ["pcfg"] and report["domains"]["pcfg"]["tokens"] == 2 * 16
  text = tmp_path / "sentences.txt"
  text.write_text("alice forgets a owl\n\nthe duck remembers carol\n")
  report = evaluate.evaluate(str(root), str(text), output=str(tmp_path / "t.json"))
  assert report["domains"]["all"]["tokens"] == 4 + 1 + 4 + 1 - 1


def test_cli_errors_exit_2(run, tmp_path, capsys):
  root, _, _ = run
  assert evaluate.main(["--checkpoint", str(tmp_path / "none")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert evaluate.main(["--checkpoint", str(root), "--step", "5"]) == 2
  assert "available steps: 0" in capsys.readouterr().err
  assert evaluate.main(["--checkpoint", str(root), "--data", str(tmp_path / "missing.jsonl")]) == 2
  assert "does not exist" in capsys.readouterr().err
  # Words outside the grammar are the tokenizer's <unk> (issue 14): text from anywhere evaluates.
  unknown = tmp_path / "unknown_words.txt"
  unknown.write_text("colourless green ideas\n")
  assert evaluate.main(["--checkpoint", str(root), "--data", str(unknown), "--output", str(tmp_path / "u.json")]) == 0
  assert json.load(open(tmp_path / "u.json"))["domains"]["all"]["tokens"] == 3


def test_lm_eval_harness_end_to_end(run, tmp_path, monkeypatch):
  pytest.importorskip("lm_eval")
  pytest.importorskip("accelerate")  # lm-eval's hf model imports it
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
  root, _, _ = run
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  template = open(os.path.join(DATA, "lm_eval", "pcfg_next_word.yaml")).read()
  (tasks / "pcfg_next_word.yaml").write_text(
      template.replace("DATA_FILE", os.path.join(DATA, "lm_eval", "pcfg_next_word.jsonl")))
  summary = evaluate.harness(str(root), ["maxlm_pcfg_next_word"], include_path=str(tasks))
  acc = summary["results"]["maxlm_pcfg_next_word"]["acc,none"]
  assert 0.0 <= acc <= 1.0 and summary["n-samples"]["maxlm_pcfg_next_word"]["effective"] == 10
  assert os.path.isfile(summary["output"]) and os.path.dirname(summary["output"]) == str(root / "eval")
  # The export is cached per step: a second run reuses it.
  logs = []
  harness.export_cached(str(root), log=logs.append)
  assert logs and logs[0].startswith("using the cached export")
  # An HF directory goes to lm-eval as it is (no export), with the same result; its JSON lands in the working dir.
  monkeypatch.chdir(tmp_path)
  direct = evaluate.harness(summary["hf_dir"], ["maxlm_pcfg_next_word"], include_path=str(tasks))
  assert direct["results"]["maxlm_pcfg_next_word"]["acc,none"] == acc and direct["step"] is None
  assert direct["hf_dir"] == summary["hf_dir"] and os.path.dirname(direct["output"]) == str(tmp_path)


def test_a_hugging_face_directory_and_run_at_step_evaluate_as_the_run(run, tmp_path, monkeypatch):
  """`--checkpoint` takes an HF directory (the run's own fp32 export scores what the run scores; its JSON goes to
  the working directory, since a model cache may be read-only) and RUN@STEP (the same as --step)."""
  from maxlm import convert  # pylint: disable=import-outside-toplevel
  from maxlm.core.errors import CheckpointError, DataError  # pylint: disable=import-outside-toplevel
  root, _, _ = run
  hf_dir = tmp_path / "exported"
  convert.to_hf(str(root), str(hf_dir), dtype="float32", log=lambda *a: None)
  data = os.path.join(DATA, "pcfg_docs.jsonl")
  want = evaluate.evaluate(str(root), data, batch_size=3, output=str(tmp_path / "run.json"))
  monkeypatch.chdir(tmp_path)
  got = evaluate.evaluate(str(hf_dir), data, batch_size=3, seq_len=16, log=lambda *a: None)  # the run's windows
  assert got["output"] == str(tmp_path / "loss_exported_pcfg_docs.json") and got["step"] is None
  for domain, r in want["domains"].items():
    assert got["domains"][domain]["tokens"] == r["tokens"]
    np.testing.assert_allclose(got["domains"][domain]["loss"], r["loss"], rtol=1e-6)
  at_step = evaluate.evaluate(f"{root}@0", data, batch_size=3, output=str(tmp_path / "at.json"))
  assert at_step["step"] == 0 and at_step["domains"] == want["domains"]
  with pytest.raises(DataError, match="Hugging Face directory, which has no run data: pass --data"):
    evaluate.evaluate(str(hf_dir), None)
  with pytest.raises(CheckpointError, match="name different steps"):
    evaluate.evaluate(f"{root}@0", data, step=3)
  with pytest.raises(CheckpointError, match="no steps"):
    evaluate.evaluate(f"{hf_dir}@3", data)
