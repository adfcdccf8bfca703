"""Text is encoded as transformers' `tokenizer(text)` encodes it wherever a tool scores or continues text: a
tokenizer.json's post-processor (LLaMA's <s>), a SentencePiece model's add_bos_token / add_eos_token. Checked against
AutoTokenizer on tokenizers built here, then end to end: generation from an HF directory whose tokenizer adds <s>
equals transformers' generate, and the analysis rows equal transformers' input ids."""

import json
import os

import pytest

from maxlm import model_text
from maxlm import generate as gen_lib
from maxlm import pretrained
from maxlm.data_pipelines.text_tokenizer import TextTokenizer

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "où est la gare ?",
          "numbers 12 and 345 appear", "rare words: quixotic zephyr"] * 8
TEXTS = ["the lazy fox", "zephyr saves time", "où 12 ?", "unseen wordsmithery"]


def bpe_dir(path, template):
  """A byte-level BPE tokenizer.json with <unk>, <s>, </s>, and `template` as its single-sequence post-processor."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if template:
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>"}, f)
  return str(path)


@pytest.mark.parametrize("template", [None, "<s> $A", "<s> $A </s>", "$A </s>"])
def test_tokenizer_json_specials_equal_transformers(tmp_path, template):
  d = bpe_dir(tmp_path / "tok", template)
  ours = TextTokenizer(os.path.join(d, "tokenizer.json")).encode_with_special_tokens(TEXTS)
  assert ours == [transformers.AutoTokenizer.from_pretrained(d)(t)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": False},
                                   {"add_bos_token": True, "add_eos_token": True}])
def test_sentencepiece_specials_equal_transformers(tmp_path, flags):
  spm = pytest.importorskip("sentencepiece")
  (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=60, model_type="bpe", minloglevel=2)
  d = tmp_path / "tok"
  d.mkdir()
  os.replace(tmp_path / "sp.model", d / "tokenizer.model")
  (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **flags}))
  ours = TextTokenizer(str(d / "tokenizer.model")).encode_with_special_tokens(TEXTS)
  assert ours == [transformers.AutoTokenizer.from_pretrained(str(d))(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def hf_with_bos(tmp_path_factory):
  """A tiny random LlamaForCausalLM (fp32) whose tokenizer.json adds <s>, as LLaMA's does."""
  root = tmp_path_factory.mktemp("bos")
  d = bpe_dir(root / "hf", "<s> $A")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # a peaked next-token distribution: greedy ties cannot flip on rounding
    model.lm_head.weight.mul_(30.0)
  model.save_pretrained(d)
  return d, model


def test_generation_starts_prompts_as_the_tokenizer_does(tmp_path, hf_with_bos):
  d, model = hf_with_bos
  out = tmp_path / "gen.jsonl"
  (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
  assert gen_lib.main(["--checkpoint", d, "--prompts", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "8",
                       "--output", str(out)]) == 0
  records = [json.loads(line) for line in out.read_text().splitlines()]
  tok = transformers.AutoTokenizer.from_pretrained(d)
  for text, record in zip(TEXTS, records):
    ids = tok(text, return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == 1  # the tokenizer starts a text with <s>
    with torch.no_grad():
      want = model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    want = want[0, ids["input_ids"].shape[1]:].tolist()
    assert record["completion_ids"] == (want[:want.index(2)] if 2 in want else want)
  # Token ids given as they are, and ids outside the vocabulary refused.
  (tmp_path / "ids.jsonl").write_text(json.dumps({"ids": [1, 5, 9]}) + "\n")
  assert gen_lib.main(["--checkpoint", d, "--prompts", str(tmp_path / "ids.jsonl"), "--max-new-tokens", "3",
                       "--output", str(tmp_path / "ids_out.jsonl")]) == 0
  assert json.loads((tmp_path / "ids_out.jsonl").read_text())["prompt"] == [1, 5, 9]
  (tmp_path / "bad.jsonl").write_text(json.dumps({"ids": [1, 300]}) + "\n")
  assert gen_lib.main(["--checkpoint", d, "--prompts", str(tmp_path / "bad.jsonl")]) == 2


def test_analysis_rows_are_transformers_input_ids(tmp_path, hf_with_bos):
  d, _ = hf_with_bos
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  rows = model_text.model_rows(pretrained.load(d).cfg, str(data), seq_len=48)
  tok = transformers.AutoTokenizer.from_pretrained(d)
  for text, ids, mask in zip(TEXTS, rows.ids, rows.mask):
    want = tok(text)["input_ids"]
    assert ids[:mask.sum()].tolist() == want and mask.sum() == len(want)


def test_rows_are_truncated_as_transformers_truncates(tmp_path):
  """`tokenizer(text, max_length=n, truncation=True)` cuts the text and keeps the special tokens around it."""
  d = bpe_dir(tmp_path / "tok", "<s> $A </s>")
  tok = transformers.AutoTokenizer.from_pretrained(d)
  codec = model_text.TextCodec(TextTokenizer(os.path.join(d, "tokenizer.json")).encode_batch, str, 2, 0, [1], [2])
  for n in (3, 6, 40):
    assert codec.encode_batch(TEXTS, n) == [tok(t, max_length=n, truncation=True)["input_ids"] for t in TEXTS]
