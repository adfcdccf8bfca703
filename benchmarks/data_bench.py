"""Data benchmarks: prepare throughput (HF BPE, per core), store exactness, and the grain read path (tokens/s).

    python benchmarks/data_bench.py [--mb 40] [--seq-len 1024] [--batch-size 8] [--workdir DIR]

Synthetic Zipf text in 3 domains -> JSONL.zst files; a BPE tokenizer is trained on a sample of it.
"""

import argparse
import json
import os
import tempfile
import time
import types

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizer threads: measure per core  # noqa: E402

import numpy as np
import tensorstore as ts
import tokenizers
import zstandard
from tokenizers import decoders, models, pre_tokenizers, trainers

from maxlm.data_pipelines import build_train_iterator, prepare

DOMAINS = ("web", "code", "papers")


def make_corpus(workdir: str, mb: float, files_per_domain: int = 2):
  rng = np.random.default_rng(0)
  syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "xe", "do", "fi", "gu"]
  words = np.array(["".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(20000)])
  zipf = 1.0 / np.arange(1, words.size + 1)
  zipf /= zipf.sum()
  raw = os.path.join(workdir, "raw")
  os.makedirs(raw, exist_ok=True)
  per_file = mb * 1e6 / (len(DOMAINS) * files_per_domain)
  samples = []
  for d in DOMAINS:
    for k in range(files_per_domain):
      size, lines = 0, []
      while size < per_file:
        text = " ".join(words[rng.choice(words.size, rng.integers(50, 800), p=zipf)])
        line = json.dumps({"text": text, "meta": {"pile_set_name": d}})
        lines.append(line)
        size += len(text)
        if len(samples) < 2000:
          samples.append(text)
      with open(os.path.join(raw, f"{d}-{k}.jsonl.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3).compress(("\n".join(lines) + "\n").encode()))
  return raw, samples


def train_bpe(samples, path):
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(samples, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<unk>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(path)


def check_exact(raw, tok_path, store):
  """Tokens in the store == tokenizer output over every accepted document + separators, per domain."""
  tok = tokenizers.Tokenizer.from_file(tok_path)
  sep = tok.token_to_id("</s>")
  m = json.load(open(os.path.join(store, "manifest.json")))
  for d in DOMAINS:
    expected = []
    for name in sorted(os.listdir(raw)):
      if not name.startswith(d + "-"):
        continue
      with open(os.path.join(raw, name), "rb") as f:
        lines = zstandard.ZstdDecompressor().decompress(f.read(), max_output_size=1 << 31).decode().splitlines()
      texts = [json.loads(line)["text"] for line in lines]
      for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
        expected.extend(enc.ids + [sep])
    path = os.path.join(store, m["domains"][d]["path"], "train")
    got = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}).result().read().result()
    if not np.array_equal(got, np.asarray(expected, got.dtype)):
      return False
  return True


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mb", type=float, default=40)
  ap.add_argument("--seq-len", type=int, default=1024)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--batches", type=int, default=300)
  ap.add_argument("--workdir", default="")
  args = ap.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="maxlm_data_bench_")
  raw, samples = make_corpus(workdir, args.mb)
  tok_path = os.path.join(workdir, "bpe.json")
  train_bpe(samples, tok_path)
  results = {}
  for workers in (1, 2):
    store = os.path.join(workdir, f"store_w{workers}")
    t = time.perf_counter()
    m = prepare(os.path.join(raw, "*"), tok_path, store, domain_key="meta.pile_set_name", workers=workers,
                progress=False)
    dt = time.perf_counter() - t
    tokens, mbytes = m["totals"]["tokens"], m["totals"]["bytes"] / 1e6
    results[f"prepare_workers{workers}"] = {
        "seconds": round(dt, 2), "tokens": tokens, "MB_text": round(mbytes, 1),
        "tokens_per_s_per_core": round(tokens / dt / workers), "MB_per_s_per_core": round(mbytes / dt / workers, 2)}
  store = os.path.join(workdir, "store_w1")
  results["exact"] = check_exact(raw, tok_path, store)
  cfg = types.SimpleNamespace(source="store", path=store, mixture="", weights={}, shuffle=True,
                              document_masking=True, prefetch=8, num_workers=0)
  it = build_train_iterator(cfg, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
  for _ in range(20):
    next(it)
  t = time.perf_counter()
  for _ in range(args.batches):
    b = next(it)
  dt = time.perf_counter() - t
  it.close()
  results["read"] = {"seq_len": args.seq_len, "batch_size": args.batch_size, "batches": args.batches,
                     "tokens_per_s": round(args.batches * b["inputs"].size / dt)}
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
