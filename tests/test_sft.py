"""Instruction tuning (data.source = sft): Stanford Alpaca's masks and the chat template's against constructions with
transformers' tokenizer, response-only CE against transformers on the export, packing, the held-out split, resumable
iterator state, bad records, and the emo_sft_demo preset from an import with no model overrides."""

import json
import os
import shutil

import numpy as np
import pytest

from maxlm import pretrained
from maxlm import convert, evaluate, train
from maxlm.core.config import load_config
from maxlm.data_pipelines import pipeline, sft
from maxlm.core.errors import CheckpointError, DataError
from maxlm.state.layout import ARCHITECTURE_KEYS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sft")
ALPACA, CHAT = os.path.join(DATA, "alpaca_tiny.json"), os.path.join(DATA, "chat_tiny.jsonl")
# Stanford Alpaca's train.py PROMPT_DICT, copied here so the reference does not read maxlm's copy.
STANFORD = {
    "prompt_input": ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"),
    "prompt_no_input": ("Below is an instruction that describes a task. Write a response that appropriately completes "
                        "the request.\n\n### Instruction:\n{instruction}\n\n### Response:"),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 512  # the model's vocabulary; the test tokenizer has 500 tokens


def make_tokenizer(directory: str, chat_template: str = CHATML) -> None:
  """A byte-level BPE tokenizer trained on the Alpaca file (BOS added like LLaMA's), with a ChatML chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  records = json.load(open(ALPACA))
  texts = [" ".join((r["instruction"], r["input"], r["output"])) for r in records] * 3
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "model_max_length": 256}
  if chat_template:
    config["chat_template"] = chat_template
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)


def make_hf_model(directory: str) -> None:
  """A tiny random LlamaForCausalLM with the test tokenizer: the base the SFT demo imports."""
  make_tokenizer(directory)
  hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    rope_theta=10000.0, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                                    tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(hf_cfg).save_pretrained(directory)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(HF dir, maxlm import of it): a tiny LLaMA with a BPE tokenizer and a chat template."""
  root = tmp_path_factory.mktemp("sft")
  make_hf_model(str(root / "hf"))
  convert.from_hf(str(root / "hf"), str(root / "imported"), log=lambda *a: None)
  return root / "hf", root / "imported"


def data_cfg(tok_dir, **kw):
  cfg = load_config("demo", [f"data.tokenizer={tok_dir}/tokenizer.json", "data.source=sft", f"data.path={ALPACA}",
                             "data.document_masking=true"]).data
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def stanford_example(tok, record):
  """Stanford Alpaca's preprocess for one record: tokenize source + target (target = output + eos text), labels
  -100 on the first len(tokenize(source)) tokens."""
  source = STANFORD["prompt_input" if record.get("input", "") != "" else "prompt_no_input"].format_map(record)
  ids = tok(source + record["output"] + tok.eos_token).input_ids
  labels = list(ids)
  labels[:len(tok(source).input_ids)] = [-100] * len(tok(source).input_ids)
  return ids, labels


def test_alpaca_masks_match_stanford_construction(imported):
  hf_dir, _ = imported
  tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  data = sft.load(data_cfg(hf_dir))
  records = json.load(open(ALPACA))
  assert len(data.train) == len(records) and data.kinds == {"alpaca": len(records), "chat": 0}
  with_input = 0
  for record, (ids, labels) in zip(records, data.train):
    ref_ids, ref_labels = stanford_example(tok, record)
    assert ids.tolist() == ref_ids and labels.tolist() == ref_labels
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    with_input += record["input"] != ""
  assert 0 < with_input < len(records)  # both templates were exercised


def test_chat_masks_match_transformers_chat_template(imported):
  hf_dir, _ = imported
  tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  data = sft.load(data_cfg(hf_dir, path=CHAT))
  conversations = [json.loads(line)["messages"] for line in open(CHAT)]
  assert data.kinds == {"alpaca": 0, "chat": len(conversations)}
  for messages, (ids, labels) in zip(conversations, data.train):

    def rendered(msgs, gen=False):
      out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
      return list(out["input_ids"] if hasattr(out, "keys") else out)

    ref = rendered(messages) + [tok.eos_token_id]
    ref_labels = [-100] * len(ref)
    for k, m in enumerate(messages):
      if m["role"] == "assistant":
        start, end = len(rendered(messages[:k], gen=True)), len(rendered(messages[:k + 1]))
        ref_labels[start:end] = ref[start:end]
    ref_labels[-1] = tok.eos_token_id
    assert ids.tolist() == ref and labels.tolist() == ref_labels
    # The trained tokens are exactly the assistant turns (each closed by the template's end marker) and EOS.
    answers = "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant") + "</s>"
    assert tok.decode([i for i, l in zip(ids, labels) if l != -100]) == answers


def test_chat_records_without_a_template_are_an_error(tmp_path):
  make_tokenizer(str(tmp_path / "tok"), chat_template="")
  with pytest.raises(DataError, match="has no chat template.*data.sft_template=alpaca"):
    sft.load(data_cfg(tmp_path / "tok", path=CHAT))


def test_bad_records_are_counted_and_a_file_of_only_bad_ones_is_an_error(imported, tmp_path):
  hf_dir, _ = imported
  records = json.load(open(ALPACA))
  mixed = records[:5] + [{"instruction": "No answer here.", "input": ""}, {"instruction": "x", "output": 3}, "text"]
  (tmp_path / "mixed.json").write_text(json.dumps(mixed))
  data = sft.load(data_cfg(hf_dir, path=str(tmp_path / "mixed.json")))
  assert len(data.train) == 5
  assert data.stats.bad_records == {"Alpaca record without a string 'output'": 2, "not a JSON object": 1}
  summary = data.summary(256)
  assert "3 bad record(s)" in summary and "record 5" in summary and "without a string 'output'" in summary
  (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "a"}, {"instruction": "b", "input": "c"}]))
  with pytest.raises(DataError, match=r"no usable instruction record: 2 bad record\(s\).*without a string 'output'"):
    sft.load(data_cfg(hf_dir, path=str(tmp_path / "bad.json")))
  (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\nnot json\n')
  data = sft.load(data_cfg(hf_dir, path=str(tmp_path / "broken.jsonl")))
  assert len(data.train) == 1 and data.stats.bad_records == {"not valid JSON": 1}


def test_packing_truncation_and_the_held_out_split(imported, tmp_path):
  hf_dir, _ = imported
  cfg = data_cfg(hf_dir, validation_fraction=0.25)
  data = sft.load(cfg)
  assert len(data.train) + len(data.validation) == 24 and 0 < len(data.validation) < 24
  # The split follows content, not position: a reversed file holds out the same records.
  records = json.load(open(ALPACA))
  (tmp_path / "reversed.json").write_text(json.dumps(records[::-1]))
  reversed_data = sft.load(data_cfg(hf_dir, path=str(tmp_path / "reversed.json"), validation_fraction=0.25))
  assert sorted(ids.tobytes() for ids, _ in reversed_data.validation) == sorted(
      ids.tobytes() for ids, _ in data.validation)
  seq_len = 128
  kept, truncated, dropped = sft.truncate(data.train, seq_len)
  # Truncated: longer than seq_len + 1 tokens; dropped: of those, no response token left within the cut.
  assert truncated == sum(len(ids) > seq_len + 1 for ids, _ in data.train) > dropped
  assert dropped == sum(len(ids) > seq_len + 1 and (labels[1:seq_len + 1] == -100).all()
                        for ids, labels in data.train) > 0
  assert len(kept) == len(data.train) - dropped and max(len(ids) for ids, _ in kept) == seq_len + 1
  batches = sft.batches_of(kept, seq_len, 0, batch_size=4, num_batches=0, packing=True)
  # Every example's (input, target) pairs appear exactly once, whole, inside one row and one segment.
  found = []
  for b in batches:
    for inputs, targets, segments in zip(b["inputs"], b["targets"], b["segment_ids"]):
      for s in range(1, segments.max() + 1):
        where = np.flatnonzero(segments == s)
        assert (np.diff(where) == 1).all()
        found.append((inputs[where].tolist(), targets[where].tolist()))
      assert (targets[segments == 0] == -100).all()
  expected = [(ids[:-1].tolist(), labels[1:].tolist()) for ids, labels in kept]
  assert sorted(found) == sorted(expected)
  assert sum(len(b["inputs"]) for b in batches) * seq_len < sum(len(ids) for ids, _ in kept) * 2  # it packs
  assert "longer than seq_len + 1 = 129 tokens (truncated)" in data.summary(seq_len)


def test_train_iterator_state_resumes_exactly(imported):
  hf_dir, _ = imported
  cfg = data_cfg(hf_dir, validation_fraction=0.25)
  kwargs = dict(seq_len=128, batch_size=4, seed=3)
  with pipeline.build_train_iterator(cfg, **kwargs) as it:
    for _ in range(7):  # past the first epoch (about 5 batches of 4 rows)
      next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
  with pipeline.build_train_iterator(cfg, **kwargs) as it:
    it.set_state(state)
    for want in expected:
      got = next(it)
      for k in ("inputs", "targets", "segment_ids"):
        np.testing.assert_array_equal(got[k], want[k])
  # Two processes split the rows of each global batch: process p loads rows 2p, 2p+1.
  with pipeline.build_train_iterator(cfg, **kwargs) as it:
    single = [next(it) for _ in range(2)]
  for p in range(2):
    with pipeline.build_train_iterator(cfg, **dict(kwargs, rows=[2 * p, 2 * p + 1])) as it:
      for whole in single:
        np.testing.assert_array_equal(next(it)["inputs"], whole["inputs"][2 * p:2 * p + 2])


def test_packing_needs_document_masking(imported):
  hf_dir, _ = imported
  with pytest.raises(Exception, match="data.sft_packing = true .* needs data.document_masking = true"):
    pipeline.describe(data_cfg(hf_dir, document_masking=False))


def test_response_only_loss_matches_transformers_on_the_export(imported, tmp_path):
  hf_dir, run = imported
  convert.to_hf(str(run), str(tmp_path / "export"), dtype="float32", log=lambda *a: None)
  report = evaluate.evaluate(str(run), ALPACA, data_format="sft", seq_len=256, batch_size=4,
                             compute_dtype="float32", output=str(tmp_path / "sft.json"), log=lambda *a: None)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
  m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32,
                                                        attn_implementation="eager").eval()
  total, count = 0.0, 0
  for record in json.load(open(ALPACA)):
    ids, labels = stanford_example(tok, record)
    with torch.no_grad():
      logits = m(torch.tensor([ids])).logits[0, :-1].double()
    targets = torch.tensor(labels[1:])
    valid = targets != -100
    total += float(torch.nn.functional.cross_entropy(logits[valid], targets[valid], reduction="sum"))
    count += int(valid.sum())
  assert report["domains"]["sft"]["tokens"] == count
  assert abs(report["domains"]["sft"]["loss"] - total / count) < 1e-5, (report["domains"], total / count)


def test_emo_sft_demo_takes_model_and_tokenizer_from_the_import(imported, tmp_path):
  """`--config=emo_sft_demo checkpoint.init_from=IMPORT` needs no model overrides; a contradicting one is an error
  naming both values."""
  hf_dir, run = imported
  overrides = [f"checkpoint.init_from={run}", f"data.path={ALPACA}", f"run.dir={tmp_path / 'sft'}",
               "train.steps=2", "run.progress=false", "run.tensorboard=false"]
  cfg = load_config("emo_sft_demo", overrides)
  assert cfg.data.tokenizer == "" and cfg.data.source == "sft"
  summary = train.train(cfg, verbose=False)
  saved = load_config(str(tmp_path / "sft" / "config.yaml"))
  imported_cfg = pretrained.load_params(str(run))[0]
  for key in ARCHITECTURE_KEYS:
    assert getattr(saved.model, key) == getattr(imported_cfg.model, key), key
  assert saved.data.tokenizer == imported_cfg.data.tokenizer and saved.data.tokenizer.startswith(str(run))
  assert summary["steps"] == 2 and all(np.isfinite(v) for v in summary["losses"].values())
  assert summary["evals"] and "eval/sft" in summary["evals"][2]  # the held-out split is evaluated
  shutil.rmtree(tmp_path / "sft")
  with pytest.raises(CheckpointError, match=r"model.hidden = 64 \(from override 'model.hidden=64'\) contradicts "
                                            r"the source's model.hidden = 32"):
    train.train(load_config("emo_sft_demo", overrides + ["model.hidden=64"]), verbose=False)


def test_chat_templates_render_in_a_fresh_interpreter():
  """jinja2.ext is not loaded by `import jinja2`: the renderer must import it (it did only when something else had)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys\n"
          "from maxlm.data_pipelines import sft\n"
          "assert 'jinja2.ext' not in sys.modules or print('preloaded')\n"
          "render = sft._chat_renderer('{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
          "<{{ m.role }}>{{ m.content }}{% endfor %}', {})\n"
          "print(render([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},"
          " {'role': 'user', 'content': 'x'}], False))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "<user>hi<assistant>yo"
