"""Masked-LM batches (data.mlm; IB's generate_samples.py, BERT's create_masked_lm_predictions): the mask token a source
gains, and the transform that turns next-token batches into masked inputs with unshifted targets, train and eval.

Per row: the maskable positions are its real tokens that are not the separator (BERT never masks [CLS] / [SEP]);
k = min(max_predictions, max(1, round(prob * maskable))) of them, chosen by a shuffle, are targets; of those
mask_share become the mask token, random_share a token drawn uniformly from the tokenizer's own ids, the rest keep
their token. inputs = the row so changed; targets = the original token at chosen positions, IGNORE_INDEX elsewhere,
at the same position (no shift). Row r of global batch b draws from SeedSequence([seed, tag, b, r]) alone, so the
masks do not depend on how many processes read the batch.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from maxlm.core.config import IGNORE_INDEX
from maxlm.core.errors import DataError
from maxlm.data_pipelines.text_tokenizer import TextTokenizer, named_special_token
from maxlm.data_pipelines.token_store import TokenStore

MASK = "<mask>"  # the token a tokenizer without one gains, at id = its vocabulary size
MASK_NAMES = ("[MASK]", "<mask>")  # a tokenizer's own mask token, when its config names none
TRAIN_TAG, EVAL_TAG = 0, 1
EVAL_SEED = 0  # validation masks are fixed, whatever train.seed


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  mask_id: int
  random_vocab: int  # random replacements are drawn from [0, random_vocab): the tokenizer's ids, not an added mask
  separator_id: int
  prob: float = 0.15
  max_predictions: int = 5
  mask_share: float = 0.8
  random_share: float = 0.1

  @property
  def vocab_size(self) -> int:
    """The vocabulary the model needs: the tokenizer's plus the mask token when it was added."""
    return max(self.random_vocab, self.mask_id + 1)


def mask_token(data_cfg, vocab_size: int) -> tuple[int, bool]:
  """(mask id, added) for a source whose tokenizer has `vocab_size` ids: a store's tokenizer's own mask token (named
  as mask_token in its tokenizer_config, else [MASK] or <mask> in its vocabulary) when it has one; otherwise (and
  always for a PCFG's word vocabulary) a new <mask> at id vocab_size, so the vocabulary grows by one."""
  if data_cfg.source in ("store", "replay"):
    path = data_cfg.tokenizer or TokenStore(data_cfg.path).tokenizer_path()
    if path:
      tok = TextTokenizer(path)
      for name in (named_special_token(path, "mask_token"),) + MASK_NAMES:
        found = tok.token_id(name) if name else None
        if found is not None and found < vocab_size:
          return int(found), False
  return int(vocab_size), True


def masking_spec(data_cfg, vocab_size: int, separator_id: int) -> MaskingSpec:
  """The data section's masking settings over a tokenizer of `vocab_size` ids."""
  mask_id, _ = mask_token(data_cfg, vocab_size)
  return MaskingSpec(mask_id, vocab_size, separator_id, prob=data_cfg.mlm_prob,
                     max_predictions=data_cfg.mlm_max_predictions, mask_share=data_cfg.mlm_mask_share,
                     random_share=data_cfg.mlm_random_share)


def predictions(maskable: int, spec: MaskingSpec) -> int:
  """How many positions of a row with `maskable` candidates are chosen (0 when it has none)."""
  if maskable == 0:
    return 0
  return min(spec.max_predictions, maskable, max(1, int(np.round(maskable * spec.prob))))


def mask_rows(tokens_BxT: np.ndarray, maskable_BxT: np.ndarray, keys: Sequence[Sequence[int]], spec: MaskingSpec
              ) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) int32 (B, T) of the module docstring; row i draws from SeedSequence(keys[i])."""
  tokens = np.asarray(tokens_BxT, np.int32)
  inputs = tokens.copy()
  targets = np.full(tokens.shape, IGNORE_INDEX, np.int32)
  for i, key in enumerate(keys):
    candidates = np.flatnonzero(maskable_BxT[i])
    k = predictions(len(candidates), spec)
    if k == 0:
      continue
    rng = np.random.default_rng(np.random.SeedSequence([int(x) for x in key]))
    chosen = rng.permutation(candidates)[:k]
    u = rng.random(k)
    drawn = rng.integers(0, spec.random_vocab, k)
    original = tokens[i, chosen]
    replaced = np.where(u < spec.mask_share, spec.mask_id,
                        np.where(u < spec.mask_share + spec.random_share, drawn, original))
    inputs[i, chosen] = replaced
    targets[i, chosen] = original
  return inputs, targets


def mask_batch(batch: dict, spec: MaskingSpec, keys: Sequence[Sequence[int]]) -> dict:
  """A next-token batch (make_batch's) as a masked-LM batch: its inputs masked, targets unshifted, segment ids (from
  the unmasked row) kept. Padding holds the separator (eval_windows), so it is never chosen."""
  tokens = batch["inputs"]
  inputs, targets = mask_rows(tokens, tokens != spec.separator_id, keys, spec)
  return dict(batch, inputs=inputs, targets=targets)


def row_keys(seed: int, tag: int, batch_index: int, rows: Sequence[int], domain: str = "") -> list[tuple[int, ...]]:
  """Seed material of each global row r of batch `batch_index` (the domain's crc32 for validation streams)."""
  extra = (zlib.crc32(domain.encode()),) if domain else ()
  return [(seed, tag, *extra, batch_index, r) for r in rows]


class MaskingIterator:
  """The training iterator with masked-LM batches: batch b's row r masked from (train.seed, b, r). State, fingerprint
  and closing are the wrapped DataIterator's (its state is the global batch index the masks follow)."""

  def __init__(self, inner, spec: MaskingSpec, seed: int, rows: Sequence[int]):
    self.inner, self.spec, self.seed, self.rows = inner, spec, int(seed), tuple(rows)
    self.fingerprint = inner.fingerprint

  @property
  def batch(self) -> int:
    return self.inner.batch

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    index = self.inner.batch
    return mask_batch(next(self.inner), self.spec, row_keys(self.seed, TRAIN_TAG, index, self.rows))

  def get_state(self) -> dict:
    return self.inner.get_state()

  def set_state(self, state: dict):
    self.inner.set_state(state)

  def close(self):
    self.inner.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def mask_eval_batches(batches: dict[str, list[dict]], spec: MaskingSpec, rows: Sequence[int]) -> dict[str, list[dict]]:
  """Validation batches masked from (EVAL_SEED, domain, batch index, global row): the same masks in every run."""
  return {d: [mask_batch(b, spec, row_keys(EVAL_SEED, EVAL_TAG, s, rows, d)) for s, b in enumerate(bs)]
          for d, bs in batches.items()}


def check_vocab(spec: MaskingSpec, model_vocab: int) -> None:
  if spec.vocab_size > model_vocab:
    raise DataError(f"masked-LM batches use token id {spec.mask_id} (the mask token) but the model's vocabulary has "
                    f"{model_vocab} ids; set model.vocab_size >= {spec.vocab_size}")
