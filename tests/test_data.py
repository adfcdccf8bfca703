"""Token store and training sources: prepare exactness, bad records, crash-resume, mixture proportions,
determinism and resume, process sharding, document masking, validation batches, replay, errors, CLI."""

import gzip
import hashlib
import importlib
import json
import os
import random
import dataclasses
import types

import numpy as np
import pytest
import tensorstore as ts
import tokenizers
import zstandard
from tokenizers import decoders, models, pre_tokenizers, trainers

from maxlm import data as data_cli
from maxlm.data_pipelines import build_eval_batches, build_train_iterator, describe, inspect_store, prepare
from maxlm.data_pipelines import token_store
from maxlm.core.config import DataConfig
from maxlm.core.errors import DataError

prepare_mod = importlib.import_module("maxlm.data_pipelines.prepare")  # the package re-exports prepare()

DOMAIN_WORDS = {  # disjoint vocabularies: every token of a window tells its domain
    "Alpha": [f"al{i}" for i in range(60)],
    "Beta Set": [f"be{i}" for i in range(60)],
    "Gamma": [f"ga{i}" for i in range(60)],
}
SEP = "</s>"


def _doc(rng, domain):
  return " ".join(rng.choice(DOMAIN_WORDS[domain]) for _ in range(rng.randint(3, 40)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Raw files in every format with known bad records, a word-level and a BPE tokenizer."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  vocab = {SEP: 0, "<unk>": 1}
  for words in DOMAIN_WORDS.values():
    for w in words:
      vocab[w] = len(vocab)
  word = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  word.save(str(root / "word.json"))
  bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator([_doc(rng, d) for d in DOMAIN_WORDS for _ in range(50)],
                          trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", SEP],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bpe.save(str(root / "bpe.json"))
  raw = root / "raw"
  raw.mkdir()
  docs = {}  # file -> accepted (text, domain) in order
  records = lambda d, n: [{"text": _doc(rng, d), "meta": {"pile_set_name": d}} for _ in range(n)]
  a = records("Alpha", 150) + records("Beta Set", 100)
  rng.shuffle(a)
  with open(raw / "a.jsonl", "w") as f:
    for i, r in enumerate(a):
      f.write(json.dumps(r) + "\n")
      if i == 10:
        f.write("{not json\n")                                  # malformed JSON
        f.write(json.dumps({"meta": {"pile_set_name": "Alpha"}}) + "\n")  # missing text
        f.write(json.dumps({"text": None, "meta": {"pile_set_name": "Alpha"}}) + "\n")  # null text
        f.write(json.dumps({"text": "x", "meta": {"pile_set_name": " "}}) + "\n")  # blank domain
        f.write("\n")                                           # blank line: not a record
  docs["a.jsonl"] = [(r["text"], r["meta"]["pile_set_name"]) for r in a]
  b = records("Gamma", 120)
  with gzip.open(raw / "b.jsonl.gz", "wb") as f:
    for i, r in enumerate(b):
      f.write((json.dumps(r) + "\n").encode())
      if i % 50 == 0:
        f.write(b'{"text": "bad \xff\xfe bytes", "meta": {"pile_set_name": "Gamma"}}\n')  # undecodable
    f.write(json.dumps({"text": "x", "meta": {}}).encode() + b"\n")  # missing domain
  docs["b.jsonl.gz"] = [(r["text"], "Gamma") for r in b]
  c = records("Beta Set", 80) + records("Alpha", 40)
  with open(raw / "c.jsonl.zst", "wb") as f:
    f.write(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in c).encode()))
  docs["c.jsonl.zst"] = [(r["text"], r["meta"]["pile_set_name"]) for r in c]
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  d = records("Gamma", 60) + [{"text": None, "meta": {"pile_set_name": "Gamma"}}]
  pq.write_table(pa.Table.from_pylist(d), raw / "d.parquet")
  docs["d.parquet"] = [(r["text"], "Gamma") for r in d[:-1]]
  bad = {"a.jsonl": {"malformed JSON": 1, "missing text field 'text'": 1, "text field 'text' is null": 1,
                     "empty domain field 'meta.pile_set_name'": 1},
         "b.jsonl.gz": {"undecodable bytes (not UTF-8)": 3, "missing domain field 'meta.pile_set_name'": 1},
         "c.jsonl.zst": {}, "d.parquet": {"text field 'text' is null": 1}}
  return types.SimpleNamespace(root=root, raw=raw, word=str(root / "word.json"), bpe=str(root / "bpe.json"),
                               docs=docs, bad=bad)


def _prepare(corpus, out, tokenizer=None, **kw):
  kw.setdefault("validation_fraction", 0.2)
  return prepare(str(corpus.raw / "*"), tokenizer or corpus.word, str(out), domain_key="meta.pile_set_name",
                 workers=1, progress=False, **kw)


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("store") / "st"
  _prepare(corpus, out)
  return str(out)


def _read_array(root, domain, split):
  m = json.load(open(os.path.join(root, "manifest.json")))
  path = os.path.join(root, m["domains"][domain]["path"], split)
  if not os.path.exists(path):
    return np.zeros(0, np.int64)
  arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}).result()
  return arr.read().result().astype(np.int64)


def _expected_tokens(corpus, tokenizer_path, fraction):
  """Independent reference: tokenizer output of every accepted document, in file order, plus separators,
  split by the documented rule (blake2b-64 of the UTF-8 text < fraction * 2^64 -> validation)."""
  tok = tokenizers.Tokenizer.from_file(tokenizer_path)
  sep = tok.token_to_id(SEP)
  out = {}
  for name in sorted(corpus.docs):
    for text, domain in corpus.docs[name]:
      h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
      split = "validation" if h < fraction * 2.0**64 else "train"
      out.setdefault((domain, split), []).extend(tok.encode(text, add_special_tokens=False).ids + [sep])
  return out


@pytest.mark.parametrize("tokenizer", ["word", "bpe"])
def test_prepare_is_exact(corpus, tmp_path, tokenizer):
  path = getattr(corpus, tokenizer)
  out = tmp_path / "st"
  manifest = _prepare(corpus, out, tokenizer=path)
  expected = _expected_tokens(corpus, path, 0.2)
  assert sorted(manifest["domains"]) == sorted(DOMAIN_WORDS)
  for (domain, split), toks in expected.items():
    np.testing.assert_array_equal(_read_array(str(out), domain, split), toks)
    assert manifest["domains"][domain][split]["tokens"] == len(toks)
  total_docs = sum(len(v) for v in corpus.docs.values())
  assert manifest["totals"]["documents"] == total_docs
  assert manifest["totals"]["tokens"] == sum(len(v) for v in expected.values())
  assert manifest["tokenizer"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
  assert manifest["dtype"] == "uint16"
  assert 0 < manifest["domains"]["Alpha"]["validation"]["documents"] < manifest["domains"]["Alpha"]["train"][
      "documents"]


def test_bad_records_are_counted_per_file(corpus, store):
  manifest = json.load(open(os.path.join(store, "manifest.json")))
  per_file = {os.path.basename(s["file"]): s for s in manifest["inputs"]}
  for name, bad in corpus.bad.items():
    assert per_file[name]["bad_records"] == bad, name
    assert per_file[name]["documents"] == len(corpus.docs[name])
    for reason in bad:
      assert per_file[name]["bad_examples"][reason]
  assert per_file["a.jsonl"]["blank_lines"] == 1
  assert manifest["totals"]["bad_records"]["undecodable bytes (not UTF-8)"] == 3


@pytest.mark.parametrize("suffix", ["gz", "zst"])
def test_a_truncated_input_file_is_an_error_naming_it(corpus, tmp_path, suffix):
  # gzip raises at the cut; zstandard's stream reader would end quietly there (a shorter file, one "malformed JSON").
  raw = tmp_path / "raw"
  raw.mkdir()
  text = "".join(json.dumps({"text": f"al{i % 60} al2 " * 30}) + "\n" for i in range(3000)).encode()
  blob = gzip.compress(text) if suffix == "gz" else zstandard.ZstdCompressor().compress(text)
  (raw / f"t.jsonl.{suffix}").write_bytes(blob[:len(blob) // 2])
  with pytest.raises(DataError, match=rf"input file .*t.jsonl.{suffix} is truncated or corrupt .*records were read "
                                      r"before the damage"):
    prepare(str(raw / "*"), corpus.word, str(tmp_path / "st"), workers=1, progress=False)
  assert not (tmp_path / "st" / "manifest.json").exists()
  # Whole multi-frame .zst files still read completely.
  (raw / f"t.jsonl.{suffix}").unlink()
  half = len(text) // 2
  cut = text.index(b"\n", half) + 1
  c = zstandard.ZstdCompressor()
  (raw / "m.jsonl.zst").write_bytes(c.compress(text[:cut]) + c.compress(text[cut:]))
  m = prepare(str(raw / "*"), corpus.word, str(tmp_path / "st2"), workers=1, progress=False)
  assert m["inputs"][0]["documents"] == 3000 and not m["inputs"][0]["bad_records"]


def test_prepare_resumes_after_crash_and_is_identical(corpus, store, tmp_path, monkeypatch):
  out = tmp_path / "st"
  real = prepare_mod.tokenize_file
  calls = []

  def crashing(path, root, settings):
    calls.append(os.path.basename(path))
    if len(calls) == 3:
      raise KeyboardInterrupt("simulated crash")
    return real(path, root, settings)

  monkeypatch.setattr(prepare_mod, "tokenize_file", crashing)
  with pytest.raises(KeyboardInterrupt):
    _prepare(corpus, out)
  assert not (out / "manifest.json").exists()
  calls.clear()
  manifest = _prepare(corpus, out)
  assert calls == ["c.jsonl.zst", "d.parquet"]  # finished files are not redone
  reference = json.load(open(os.path.join(store, "manifest.json")))
  assert manifest == reference
  for domain in DOMAIN_WORDS:
    for split in token_store.SPLITS:
      np.testing.assert_array_equal(_read_array(str(out), domain, split), _read_array(store, domain, split))
  calls.clear()
  assert _prepare(corpus, out) == reference and calls == []  # complete: nothing to do
  with pytest.raises(DataError, match="other inputs or settings"):
    _prepare(corpus, out, validation_fraction=0.5)


def test_prepare_with_worker_processes(corpus, store, tmp_path):
  out = tmp_path / "st"
  manifest = prepare(str(corpus.raw / "*"), corpus.word, str(out), domain_key="meta.pile_set_name",
                     validation_fraction=0.2, workers=2, progress=False)
  assert manifest == json.load(open(os.path.join(store, "manifest.json")))
  np.testing.assert_array_equal(_read_array(str(out), "Gamma", "train"), _read_array(store, "Gamma", "train"))


def test_a_hugging_face_directory_is_a_tokenizer(corpus, tmp_path):
  """--tokenizer and data.tokenizer take a model directory as transformers saves it: its tokenizer.json is used
  (the same store as from the file), and a directory without one is an error that says what it lacks."""
  import shutil  # pylint: disable=import-outside-toplevel
  from maxlm.core.config import load_config  # pylint: disable=import-outside-toplevel
  hf_dir = tmp_path / "my_model"
  hf_dir.mkdir()
  shutil.copy(corpus.bpe, hf_dir / "tokenizer.json")
  (hf_dir / "config.json").write_text("{}")
  from_dir = _prepare(corpus, tmp_path / "from_dir", tokenizer=str(hf_dir))
  from_file = _prepare(corpus, tmp_path / "from_file", tokenizer=corpus.bpe)
  assert from_dir["tokenizer"]["sha256"] == from_file["tokenizer"]["sha256"]
  for domain in DOMAIN_WORDS:
    np.testing.assert_array_equal(_read_array(str(tmp_path / "from_dir"), domain, "train"),
                                  _read_array(str(tmp_path / "from_file"), domain, "train"))
  assert load_config("demo", [f"data.tokenizer={hf_dir}"]).data.tokenizer == str(hf_dir / "tokenizer.json")
  (hf_dir / "tokenizer.json").unlink()
  with pytest.raises(DataError, match=r"a directory without tokenizer.json or tokenizer.model"):
    _prepare(corpus, tmp_path / "none", tokenizer=str(hf_dir))


def test_sentencepiece_and_plain_text(tmp_path):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  rng = random.Random(1)
  lines = [_doc(rng, "Alpha") + " " + _doc(rng, "Gamma") for _ in range(300)]
  (tmp_path / "train.txt").write_text("\n".join(lines))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=60, model_type="bpe", minloglevel=2, eos_id=2, bos_id=1, unk_id=0, pad_id=-1)
  raw = tmp_path / "raw"
  raw.mkdir()
  texts = ["\n".join(lines[i:i + 5]) for i in range(0, 50, 5)]
  for i, t in enumerate(texts):
    (raw / f"{i:02d}.txt").write_text(t)
  (raw / "zz.txt").write_bytes(b"bad \xff bytes")
  m = prepare(str(raw / "*.txt"), str(tmp_path / "sp.model"), str(tmp_path / "st"), workers=1, progress=False)
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  expected = [t for text in texts for t in sp.encode(text) + [sp.eos_id()]]
  np.testing.assert_array_equal(_read_array(str(tmp_path / "st"), "default", "train"), expected)
  assert m["tokenizer"]["kind"] == "sentencepiece" and m["tokenizer"]["separator_id"] == 2
  assert m["totals"]["bad_records"] == {"undecodable bytes (not UTF-8)": 1}


def _cfg(store, **kw):
  base = dict(source="store", path=store, mixture="", weights={}, shuffle=True, document_masking=False,
              prefetch=2, num_workers=0, index_file="", tokenizer="")
  base.update(kw)
  return dataclasses.replace(DataConfig(), **base)


def _domain_of_rows(inputs, vocab_ranges):
  out = []
  for row in inputs:
    toks = row[row > 1]
    out.append(next(d for d, (lo, hi) in vocab_ranges.items() if lo <= toks[0] < hi))
  return out


def _vocab_ranges():
  ranges, start = {}, 2
  for d, words in DOMAIN_WORDS.items():
    ranges[d] = (start, start + len(words))
    start += len(words)
  return ranges


def test_mixture_proportions_match_weights(store):
  weights = {"Alpha": 0.6, "Beta Set": 0.3, "Gamma": 0.1}
  it = build_train_iterator(_cfg(store, weights=weights), seq_len=8, batch_size=32, seed=0)
  rows = []
  for _ in range(60):
    rows += _domain_of_rows(next(it)["inputs"], _vocab_ranges())
  it.close()
  n = len(rows)
  for d, w in weights.items():
    frac = rows.count(d) / n
    assert abs(frac - w) < 4 * np.sqrt(w * (1 - w) / n), (d, frac, w)


def test_default_mixture_is_proportional_to_tokens(store):
  m = json.load(open(os.path.join(store, "manifest.json")))
  tokens = {d: m["domains"][d]["train"]["tokens"] for d in DOMAIN_WORDS}
  total = sum(tokens.values())
  it = build_train_iterator(_cfg(store), seq_len=8, batch_size=32, seed=1)
  rows = []
  for _ in range(60):
    rows += _domain_of_rows(next(it)["inputs"], _vocab_ranges())
  it.close()
  for d, t in tokens.items():
    w = t / total
    assert abs(rows.count(d) / len(rows) - w) < 4 * np.sqrt(w * (1 - w) / len(rows))


def test_unknown_domain_lists_known_ones(store):
  with pytest.raises(DataError, match=r"not in the store: \['Nope'\]. Known domains: \['Alpha', 'Beta Set', 'Gamma'\]"):
    build_train_iterator(_cfg(store, weights={"Alpha": 1, "Nope": 1}), seq_len=8, batch_size=2, seed=0)
  with pytest.raises(DataError, match="Known domains"):
    build_train_iterator(_cfg(store, mixture="pile"), seq_len=8, batch_size=2, seed=0)


def test_missing_store_says_how_to_prepare(tmp_path):
  with pytest.raises(DataError, match="python -m maxlm.data prepare"):
    build_train_iterator(_cfg(str(tmp_path / "none")), seq_len=8, batch_size=2, seed=0)
  with pytest.raises(DataError, match="python -m maxlm.data prepare"):
    describe(_cfg(""))


def test_determinism_and_exact_resume(store):
  cfg = _cfg(store, weights={"Alpha": 2, "Beta Set": 1, "Gamma": 1})
  a = build_train_iterator(cfg, seq_len=16, batch_size=4, seed=3)
  run = [next(a) for _ in range(12)]
  b = build_train_iterator(cfg, seq_len=16, batch_size=4, seed=3)
  for x in run:
    np.testing.assert_array_equal(next(b)["inputs"], x["inputs"])
  c = build_train_iterator(cfg, seq_len=16, batch_size=4, seed=4)
  assert not all(np.array_equal(next(c)["inputs"], x["inputs"]) for x in run[:3])
  k = build_train_iterator(cfg, seq_len=16, batch_size=4, seed=3)
  for _ in range(5):
    next(k)
  state = json.loads(json.dumps(k.get_state()))
  k.close()
  resumed = build_train_iterator(cfg, seq_len=16, batch_size=4, seed=3)
  resumed.set_state(state)
  for x in run[5:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["inputs"], x["inputs"])
    np.testing.assert_array_equal(got["targets"], x["targets"])
  other = build_train_iterator(cfg, seq_len=16, batch_size=8, seed=3)
  with pytest.raises(DataError, match="global_batch: saved 4, now 8"):
    other.set_state(state)
  for it in (a, b, c, resumed, other):
    it.close()


def test_epochs_reshuffle_and_targets_are_next_tokens(store):
  cfg = _cfg(store, weights={"Gamma": 1})
  n_windows = (token_store.TokenStore(store).num_tokens("Gamma") - 1) // 8
  it = build_train_iterator(cfg, seq_len=8, batch_size=1, seed=0)
  epoch1 = [next(it) for _ in range(n_windows)]
  epoch2 = [next(it)["inputs"][0] for _ in range(n_windows)]
  it.close()
  for b in epoch1[:20]:
    np.testing.assert_array_equal(b["inputs"][0, 1:], b["targets"][0, :-1])
  rows1 = [tuple(b["inputs"][0]) for b in epoch1]
  assert sorted(rows1) == sorted(tuple(r) for r in epoch2) and rows1 != [tuple(r) for r in epoch2]


def test_processes_are_disjoint_and_cover_all_windows(store):
  cfg = _cfg(store, weights={"Gamma": 1})
  seq_len = 8
  tokens = _read_array(store, "Gamma", "train")
  n = (tokens.shape[0] - 1) // seq_len
  all_windows = sorted(tuple(tokens[i * seq_len:i * seq_len + seq_len + 1]) for i in range(n))
  seen = []
  for p in range(3):  # a global batch of 3, process p loads row p
    it = build_train_iterator(cfg, seq_len=seq_len, batch_size=3, seed=9, rows=[p])
    local = len(range(p, n, 3))
    for _ in range(local):
      b = next(it)
      seen.append(tuple(np.append(b["inputs"][0], b["targets"][0, -1])))
    it.close()
  assert sorted(seen) == all_windows  # each window exactly once across processes


def test_global_batches_do_not_depend_on_how_many_processes_read_them(store):
  """Levanter's loader: row r of global batch b is element b * B + r of one global order, so 1, 2 or 4 processes
  (each loading its block of rows, or tensor peers loading the same rows) see the same global batches, and the
  state (the next batch index) resumes on any process count."""
  cfg = _cfg(store)
  with build_train_iterator(cfg, seq_len=8, batch_size=4, seed=1) as one:
    whole = [next(one) for _ in range(3)]
    state = json.loads(json.dumps(one.get_state()))
    later = next(one)
  for blocks in ([[0, 1], [2, 3]], [[0], [1], [2], [3]], [[0, 1, 2, 3], [0, 1, 2, 3]]):
    parts = []
    for rows in blocks:
      with build_train_iterator(cfg, seq_len=8, batch_size=4, seed=1, rows=rows) as it:
        parts.append([next(it) for _ in range(3)])
        assert json.loads(json.dumps(it.get_state())) == state  # the same state on every process
      with build_train_iterator(cfg, seq_len=8, batch_size=4, seed=1, rows=rows) as it:
        it.set_state(state)  # a checkpoint of one process count resumed on another
        np.testing.assert_array_equal(next(it)["inputs"], later["inputs"][list(rows)])
    for b in range(3):
      for rows, part in zip(blocks, parts):
        np.testing.assert_array_equal(part[b]["inputs"], whole[b]["inputs"][list(rows)])
        np.testing.assert_array_equal(part[b]["targets"], whole[b]["targets"][list(rows)])


def test_document_masking_segment_ids(store):
  it = build_train_iterator(_cfg(store, document_masking=True), seq_len=32, batch_size=4, seed=0)
  b = next(it)
  it.close()
  for row, seg in zip(b["inputs"], b["segment_ids"]):
    cur, ref = 1, []
    for t in row:
      cur += int(t == 0)  # the separator opens the next document's segment
      ref.append(cur)
    np.testing.assert_array_equal(seg, ref)
  assert b["segment_ids"].dtype == np.int32 and (b["segment_ids"] > 1).any()


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_validation_once(store, process_count):
  seq_len, bs = 8, 6
  per = bs // process_count
  per_process = [build_eval_batches(_cfg(store), seq_len=seq_len, batch_size=bs, num_batches=1000,
                                    rows=range(p * per, (p + 1) * per)) for p in range(process_count)]
  assert sorted(per_process[0]) == sorted(DOMAIN_WORDS)
  for domain in DOMAIN_WORDS:
    tokens = _read_array(store, domain, "validation")
    counts = {len(pp[domain]) for pp in per_process}
    assert len(counts) == 1  # every process runs the same number of eval steps
    targets = []
    n_batches = counts.pop()
    for step in range(n_batches):
      for pp in per_process:
        for row in pp[domain][step]["targets"]:
          targets.extend(row[row != -100].tolist())
    np.testing.assert_array_equal(targets, tokens[1:])


def test_replay_follows_index_file(store, tmp_path):
  seq_len = 8
  st = token_store.TokenStore(store)
  counts = [(st.num_tokens(d) - 1) // seq_len for d in st.domains]
  order = np.random.default_rng(0).permutation(sum(counts))[:40]
  np.save(tmp_path / "idx.npy", order)
  flat = []
  for d in st.domains:
    toks = _read_array(store, d, "train")
    flat += [toks[i * seq_len:i * seq_len + seq_len] for i in range((toks.shape[0] - 1) // seq_len)]
  cfg = _cfg(store, source="replay", index_file=str(tmp_path / "idx.npy"))
  for p in range(2):  # global batches of 8, process p loads rows 4p..4p+3 of each
    it = build_train_iterator(cfg, seq_len=seq_len, batch_size=8, seed=0, rows=range(4 * p, 4 * p + 4))
    rows = [r for _ in range(5) for r in next(it)["inputs"]]
    it.close()
    mine = [g for i, g in enumerate(order) if 4 * p <= i % 8 < 4 * p + 4]
    for row, g in zip(rows, mine):
      np.testing.assert_array_equal(row, flat[g])
  np.save(tmp_path / "bad.npy", np.array([sum(counts)]))
  with pytest.raises(DataError, match="another store or seq_len"):
    build_train_iterator(_cfg(store, source="replay", index_file=str(tmp_path / "bad.npy")), seq_len=seq_len,
                         batch_size=1, seed=0)


def test_describe_and_inspect(store, corpus):
  info = describe(_cfg(store))
  assert info.vocab_size == 2 + sum(len(w) for w in DOMAIN_WORDS.values())
  assert info.domains == sorted(DOMAIN_WORDS) and info.separator_id == 0 and info.true_entropy_per_token is None
  assert info.decode([2, 3]) == "al0 al1"
  report = inspect_store(store)
  assert "Beta Set" in report and "malformed JSON" in report and "sample Gamma" in report


def test_cli(store, corpus, tmp_path, capsys):
  assert data_cli.main(["inspect", store]) == 0
  assert "Alpha" in capsys.readouterr().out
  assert data_cli.main(["prepare", "--input", str(tmp_path / "nothing*"), "--tokenizer", corpus.word,
                        "--output", str(tmp_path / "x")]) == 2
  assert "matches no files" in capsys.readouterr().err
  assert data_cli.main(["prepare", "--input", str(corpus.raw / "c.*"), "--tokenizer", corpus.word,
                        "--output", str(tmp_path / "y"), "--quiet"]) == 0
  assert json.load(open(tmp_path / "y" / "manifest.json"))["totals"]["documents"] == 120


def test_kvstore_specs():
  assert token_store.kvstore_spec("gs://bkt/a/b") == {"driver": "gcs", "bucket": "bkt", "path": "a/b/"}
  assert token_store.kvstore_spec("s3://bkt") == {"driver": "s3", "bucket": "bkt", "path": ""}
  assert token_store.kvstore_spec("/x/y")["driver"] == "file"
  with pytest.raises(DataError, match="unsupported store URL"):
    token_store.kvstore_spec("ftp://h/p")


def test_worker_processes_give_the_same_batches_and_resume(store):
  cfg = _cfg(store, weights={"Alpha": 1, "Gamma": 1})
  ref = build_train_iterator(cfg, seq_len=16, batch_size=4, seed=2)
  expected = [next(ref)["inputs"] for _ in range(6)]
  ref.close()
  cfg.num_workers = 2
  with build_train_iterator(cfg, seq_len=16, batch_size=4, seed=2) as it:
    for x in expected[:3]:
      np.testing.assert_array_equal(next(it)["inputs"], x)
    state = json.loads(json.dumps(it.get_state()))
  with build_train_iterator(cfg, seq_len=16, batch_size=4, seed=2) as again:
    again.set_state(state)
    for x in expected[3:]:
      np.testing.assert_array_equal(next(again)["inputs"], x)


def _write_no_documents(path, kind):
  """An input that yields no documents; returns its bad records by reason, as the reader must count them."""
  if kind == "empty .jsonl":
    path.write_bytes(b"")
    return {}
  if kind == "0-byte .gz":
    path.write_bytes(b"")
    return {}
  path.write_text('{not json\n{"text": 5}\n\n["a list"]\n{"body": "al1"}\n{also not json\n')
  return {"malformed JSON": 2, "text field 'text' is not a string": 1, "not a JSON object": 1,
          "missing text field 'text'": 1}


@pytest.mark.parametrize("kind,name", [("empty .jsonl", "e.jsonl"), ("0-byte .gz", "e.jsonl.gz"),
                                       ("only malformed records", "bad.jsonl")])
def test_input_without_documents_is_an_error(corpus, tmp_path, capsys, kind, name):
  path = tmp_path / name
  bad = _write_no_documents(path, kind)
  out = tmp_path / "st"
  with pytest.raises(DataError) as err:
    prepare(str(path), corpus.word, str(out), workers=1, progress=False)
  msg = str(err.value)
  assert "gave no documents" in msg and str(path) in msg and "Fix:" in msg and "--text-key" in msg
  for reason, n in bad.items():
    assert f"{n} {reason}" in msg
  if not bad:
    assert "empty: no records" in msg
  assert not out.exists()  # "no token store was written": not even an empty directory
  args = ["prepare", "--input", str(path), "--tokenizer", corpus.word, "--output", str(out), "--quiet"]
  assert data_cli.main(args) == 2 and "gave no documents" in capsys.readouterr().err
  # Fixing the input and re-running the same command works: nothing stale was left behind.
  line = json.dumps({"text": "al1 al2"}) + "\n"
  path.write_bytes(gzip.compress(line.encode()) if name.endswith(".gz") else line.encode())
  assert data_cli.main(args) == 0
  assert json.load(open(out / "manifest.json"))["totals"]["documents"] == 1


def test_plain_text_is_one_document_per_file_or_per_line(corpus, tmp_path):
  from maxlm.data_pipelines.token_store import TokenStore  # pylint: disable=import-outside-toplevel
  (tmp_path / "a.txt").write_text("al1 al2\n\nbe1 be2 be3\nal3\n")
  whole = prepare(str(tmp_path / "a.txt"), corpus.word, str(tmp_path / "file"), workers=1, progress=False)
  lines = prepare(str(tmp_path / "a.txt"), corpus.word, str(tmp_path / "line"), workers=1, progress=False,
                  text_lines=True)
  assert whole["totals"]["documents"] == 1 and lines["totals"]["documents"] == 3
  store = TokenStore(str(tmp_path / "line"))
  sep = store.separator_id
  ids = np.asarray(store.read("default", "train", 0, store.num_tokens("default")))
  docs = [d for d in np.split(ids, np.flatnonzero(ids == sep) + 1) if len(d)]
  assert [store.tokenizer().decode(d[:-1]).split() for d in docs] == [["al1", "al2"], ["be1", "be2", "be3"], ["al3"]]


def test_one_empty_file_among_others_is_a_warning(corpus, tmp_path, capsys):
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "empty.jsonl").write_bytes(b"")
  (raw / "good.jsonl").write_text(json.dumps({"text": "al1 al2"}) + "\n")
  m = prepare(str(raw / "*"), corpus.word, str(tmp_path / "st"), workers=1, progress=True)
  assert m["totals"]["documents"] == 1
  assert f"warning: {raw / 'empty.jsonl'} gave no documents (empty: no records)" in capsys.readouterr().err
