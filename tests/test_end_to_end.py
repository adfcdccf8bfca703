"""The user's path in one test: raw JSONL -> `maxlm.data prepare` -> train on the store (domain mixture, document
masking, per-domain validation) -> `maxlm.evaluate` -> `maxlm.convert to-hf` -> transformers."""

import json
import random

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from maxlm import train
from maxlm.core.config import load_config
from maxlm.data_pipelines import prepare

WORDS = {"Code": [f"c{i}" for i in range(40)], "Prose": [f"p{i}" for i in range(40)]}


def _corpus(root):
  vocab = {"</s>": 0, "<unk>": 1}
  for words in WORDS.values():
    vocab.update({w: len(vocab) + i for i, w in enumerate(words)})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(str(root / "tokenizer.json"))
  rng = random.Random(0)
  with open(root / "raw.jsonl", "w") as f:
    for i in range(400):
      domain = "Code" if i % 3 else "Prose"
      # Each domain follows its own deterministic word cycle, so the model has something to learn.
      start = rng.randrange(40)
      text = " ".join(WORDS[domain][(start + k) % 40] for k in range(rng.randint(5, 30)))
      f.write(json.dumps({"text": text, "meta": {"set": domain}}) + "\n")
  return str(root / "tokenizer.json")


def test_prepare_train_evaluate_export(tmp_path):
  transformers = pytest.importorskip("transformers")
  tokenizer = _corpus(tmp_path)
  prepare(str(tmp_path / "raw.jsonl"), tokenizer, str(tmp_path / "store"), domain_key="meta.set",
          validation_fraction=0.1, workers=1, progress=False)
  run_dir = tmp_path / "run"
  cfg = load_config("demo", [
      "model.vocab_size=96", "model.hidden=32", "model.layers=2", "model.heads=4", "model.ffn=64",
      "model.max_positions=32", "train.seq_len=32", "train.global_batch=8", "train.steps=30",
      "optim.warmup_steps=2", "optim.lr=1e-2", "run.eval_batches=2", "run.eval_every=0", "run.progress=false",
      f"run.dir={run_dir}", "data.source=store", f"data.path={tmp_path / 'store'}",
      "data.weights.Code=0.5", "data.weights.Prose=0.5", "data.document_masking=true"])
  summary = train.train(cfg, verbose=False)
  final = summary["evals"][30]
  assert set(final) == {"eval/Code", "eval/Prose", "eval/uniform_avg", "eval/worst"}
  assert final["eval/worst"] == max(final["eval/Code"], final["eval/Prose"])
  assert final["eval/uniform_avg"] < np.log(82)  # below a uniform guess over the 82-token vocabulary

  from maxlm.evaluate import evaluate
  report = evaluate(str(run_dir), str(tmp_path / "store"))
  text = json.dumps(report)
  assert "Code" in text and "Prose" in text

  from maxlm.convert import to_hf
  out = to_hf(str(run_dir), str(tmp_path / "hf"), dtype="float32", log=lambda *a: None)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = tokenizers.Tokenizer.from_file(tokenizer)
  sample = "c1 c2 c3 p7"
  assert hf_tok(sample, add_special_tokens=False)["input_ids"] == ours.encode(sample).ids
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert model.config.vocab_size == 96


def test_the_quickstart_command_from_a_fresh_working_directory(tmp_path):
  """`python -m maxlm.train --config=demo` as the README runs it: the preset's relative run.dir (runs/demo) under
  the working directory, in a process of its own (only the step count shortened)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  cmd = [sys.executable, "-m", "maxlm.train", "--config=demo", "train.steps=4", "optim.warmup_steps=1",
         "run.eval_every=0", "checkpoint.every=2"]
  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  run = tmp_path / "runs" / "demo"
  steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps and steps[-1] == 4 and (run / "checkpoints").is_dir() and (run / "config.yaml").is_file()
