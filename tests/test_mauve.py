"""MAUVE: features equal mauve's own featurizer on the same local model, the human side is the documents' next tokens,
the score is mauve's on those features, and bad input fails with the fix."""

import json
import os
import sys

import numpy as np
import pytest

from maxlm import model_text
from maxlm import convert, evaluate
from maxlm.evals import mauve as mauve_eval

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mauve = pytest.importorskip("mauve")
from mauve.utils import featurize_tokens_from_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import tiny_run  # noqa: E402

N, M = 4, 6
WORDS = "the cat dog sees a bird big blue apple admires alice anna baker barn basket bear".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny run, its HF export (the featurizer: a LLaMA with the PCFG's word-level tokenizer) and a data file of 30
  documents long enough plus 3 too short."""
  root = tmp_path_factory.mktemp("mauve")
  cfg, _ = tiny_run(root / "run", ["model.compute_dtype=float32"])
  convert.to_hf(str(root / "run"), str(root / "hf"), dtype="float32")
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(WORDS, int(rng.integers(N + M, N + M + 8)))) for _ in range(30)]
  docs[5:5] = ["the cat", "a dog sees", "blue"]
  data = root / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  return root, cfg, docs, data


def reference_features(texts, hf_dir, max_length=1024):
  """mauve's own featurizer (mauve.utils.featurize_tokens_from_model) with its tokenization rule."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  model = transformers.AutoModel.from_pretrained(str(hf_dir)).eval()
  tokens = [tokenizer.encode(t, return_tensors="pt", truncation=True, max_length=max_length) for t in texts]
  return featurize_tokens_from_model(model, tokens, batch_size=3).numpy()


def test_features_equal_mauves_featurizer(setup):
  root, _, docs, _ = setup
  texts = docs[:7]  # lengths differ, so batches are padded
  ours = mauve_eval.featurize(texts, str(root / "hf"), batch_size=4)
  ref = reference_features(texts, root / "hf")
  assert ours.shape == ref.shape == (7, 32)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_mauve_cli_report(setup, tmp_path):
  root, cfg, docs, data = setup
  out = tmp_path / "mauve.json"
  rc = evaluate.main(["mauve", "--checkpoint", str(root / "run"), "--data", str(data), "--prefix-tokens", str(N),
                      "--max-new-tokens", str(M), "--featurizer", str(root / "hf"), "--num-samples", "24",
                      "--seed", "3", "--output", str(out)])
  assert rc == 0
  report = json.loads(out.read_text())
  assert 0 <= report["mauve"] <= 1 and report["num_buckets"] >= 2
  s = report["settings"]
  assert (s["prefix_tokens"], s["max_new_tokens"], s["num_samples"], s["seed"]) == (N, M, 24, 3)
  assert s["featurizer"] == str(root / "hf") and s["step"] == 0 and s["temperature"] == 1.0
  assert report["documents"] == {"read": 33, "long_enough": 30, "used": 24}
  samples = [json.loads(line) for line in open(report["samples"])]
  codec = model_text.text_codec(cfg)
  long_docs = [d for d in docs if len(d.split()) >= N + M][:24]
  for sample, doc in zip(samples, long_docs):
    ids = codec.encode_batch([doc])[0]
    assert sample["prefix_ids"] == ids[:N] and sample["human_ids"] == ids[N:N + M]
    assert len(sample["model_ids"]) == M and codec.eos_id not in sample["model_ids"]
  # The score is mauve's on features of exactly these texts (mauve's featurizer, same seed).
  p = reference_features([x["human"] for x in samples], root / "hf")
  q = reference_features([x["model"] for x in samples], root / "hf")
  expected = mauve.compute_mauve(p_features=p, q_features=q, seed=3).mauve
  assert report["mauve"] == pytest.approx(expected, abs=1e-6)
  assert samples[0]["human"] == " ".join(long_docs[0].split()[:N + M])


def test_mauve_errors(setup, tmp_path, capsys):
  root, _, _, data = setup
  base = ["mauve", "--checkpoint", str(root / "run"), "--data", str(data), "--output", str(tmp_path / "x.json")]
  assert evaluate.main(base + ["--prefix-tokens", "20", "--max-new-tokens", "20", "--featurizer",
                               str(root / "hf")]) == 2
  assert "no document of" in capsys.readouterr().err
  assert evaluate.main(base + ["--prefix-tokens", "40", "--max-new-tokens", "40", "--featurizer",
                               str(root / "hf")]) == 2
  assert "exceed the model's max_positions 64: lower them" in capsys.readouterr().err
  assert evaluate.main(base + ["--prefix-tokens", "4", "--max-new-tokens", "4", "--featurizer",
                               str(tmp_path / "nope")]) == 2
  assert "is not a local Hugging Face model directory" in capsys.readouterr().err
  assert not (tmp_path / "x.json").exists()
