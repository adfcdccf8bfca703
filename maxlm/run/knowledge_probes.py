"""Knowledge probes during training (kaistAI/Knowledge-Entropy, "KE" below: olmo/data build_eval_dataloader and its
evaluators; docs/KNOWLEDGE.md): memorization, semantic and composition probes of the fictional-knowledge files, scored
by KnowledgeProbeHook into metrics.jsonl.

A probe is input + " " + target, scored on the target tokens only (those after len(encode(input))). Mode `exact`:
mean CE over a probe's target tokens, then the mean over probes. Mode `reference` (KE): the first 5 probes of each
item, each one's summed target CE divided by (longest probe of its batch of probe_batch_size) - 1, then the mean.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import numpy as np

from maxlm import model_text
from maxlm.core import sharding
from maxlm.core.config import IGNORE_INDEX
from maxlm.core.errors import DataError
from maxlm.run.hooks import Hook, Run

KE_PROBES_PER_ITEM = 5  # KE reads d[key][i] for i in range(5)


@dataclasses.dataclass
class ProbeSet:
  """The probes of one group and kind, tokenized: full sequences and how many leading tokens are the prompt."""
  name: str  # e.g. "paraphrase/memorization"
  tokens: list[np.ndarray]
  prompt_lengths: list[int]


def build_probe_sets(groups: dict[str, list[dict]], encode_batch: Callable[[list[str]], list[list[int]]], *,
                     mode: str) -> list[ProbeSet]:
  """One ProbeSet per (group, kind) from fictional-knowledge items (`groups`: {"paraphrase": items, ...})."""
  from maxlm.data_pipelines.knowledge_injection import PROBE_FIELDS  # pylint: disable=import-outside-toplevel
  sets = []
  for group, items in groups.items():
    for kind, (input_key, target_key) in PROBE_FIELDS.items():
      pairs = []
      for i, item in enumerate(items):
        n = len(item[input_key])
        if mode == "reference":
          if n < KE_PROBES_PER_ITEM:
            raise DataError(f"inject.probe_mode = 'reference' scores {KE_PROBES_PER_ITEM} {input_key} probes per "
                            f"item as KE does, but {group} item {i} has {n}; use probe_mode=exact")
          n = KE_PROBES_PER_ITEM
        pairs += [(item[input_key][j], item[target_key][j], i) for j in range(n)]
      full = encode_batch([f"{a} {b}" for a, b, _ in pairs])
      prompts = encode_batch([a for a, _, _ in pairs])
      for (_, _, i), seq, prompt in zip(pairs, full, prompts):
        if len(seq) - max(len(prompt), 1) <= 0:
          raise DataError(f"a {kind} probe of {group} item {i} has no target tokens after its {input_key}; give it "
                          f"a non-empty {target_key}")
      sets.append(ProbeSet(f"{group}/{kind}", [np.asarray(s, np.int32) for s in full], [len(p) for p in prompts]))
  return sets


def probe_batches(probes: ProbeSet, *, batch_size: int, length: int, pad_id: int) -> list[tuple[dict, np.ndarray]]:
  """(batch {"inputs", "targets"} of (batch_size, length), probe lengths of its real rows) in probe order; targets
  are the next tokens on target positions, IGNORE_INDEX elsewhere. Filler rows (last batch) are all IGNORE_INDEX."""
  out = []
  for start in range(0, len(probes.tokens), batch_size):
    chunk = probes.tokens[start:start + batch_size]
    inputs = np.full((batch_size, length), pad_id, np.int32)
    targets = np.full((batch_size, length), IGNORE_INDEX, np.int32)
    for r, (seq, prompt) in enumerate(zip(chunk, probes.prompt_lengths[start:start + batch_size])):
      inputs[r, :len(seq) - 1] = seq[:-1]
      positions = np.arange(len(seq) - 1)
      targets[r, :len(seq) - 1] = np.where(positions + 1 >= prompt, seq[1:], IGNORE_INDEX)
    out.append(({"inputs": inputs, "targets": targets}, np.asarray([len(s) for s in chunk])))
  return out


def probe_losses(ce_BxT: np.ndarray, targets_BxT: np.ndarray, lengths: np.ndarray, mode: str) -> np.ndarray:
  """Per-probe losses of one batch's real rows (`lengths`: their token counts)."""
  n = len(lengths)
  valid = targets_BxT[:n] != IGNORE_INDEX
  sums = np.where(valid, np.asarray(ce_BxT[:n], np.float64), 0.0).sum(axis=1)
  if mode == "reference":
    return sums / (int(lengths.max()) - 1)  # KE: ce.mean(-1) over the batch's padded length - 1
  return sums / valid.sum(axis=1)


def score(ce_fn: Callable[[dict], np.ndarray], sets: list[ProbeSet], *, mode: str, batch_size: int, length: int,
          pad_id: int) -> dict[str, float]:
  """{"probe/<group>/<kind>": mean loss, ".../ppl": its exp} with `ce_fn(batch) -> (B, T)` per-token CE."""
  metrics = {}
  for probes in sets:
    losses = [probe_losses(np.asarray(ce_fn(batch)), batch["targets"], lengths, mode)
              for batch, lengths in probe_batches(probes, batch_size=batch_size, length=length, pad_id=pad_id)]
    mean = float(np.concatenate(losses).mean())
    metrics[f"probe/{probes.name}"] = mean
    metrics[f"probe/{probes.name}/ppl"] = math.exp(min(mean, 700.0))
  return metrics


def padded_length(sets: list[ProbeSet], max_positions: int) -> int:
  """One input length for every probe batch (one compile): the longest probe - 1, rounded up to 8."""
  longest = max(len(s) for p in sets for s in p.tokens) - 1
  if longest > max_positions:
    raise DataError(f"a probe is {longest + 1} tokens long, beyond model.max_positions = {max_positions}; shorten the "
                    "probes of the fictional-knowledge files")
  return min(-(-longest // 8) * 8, max_positions)


# ----------------------------------------------------------------------------- the hook


def wanted(cfg) -> bool:
  return bool(cfg.inject.paraphrase_file or cfg.inject.once_file)


def load_probe_sets(cfg, encode_batch) -> list[ProbeSet]:
  from maxlm.data_pipelines import knowledge_injection as ki  # pylint: disable=import-outside-toplevel
  groups = {}
  for group, path in (("paraphrase", cfg.inject.paraphrase_file), ("once", cfg.inject.once_file)):
    if path:
      groups[group] = ki.load_items(path, key=ki.FILE_KEYS[group])
  return build_probe_sets(groups, encode_batch, mode=cfg.inject.probe_mode)


def make_probe_ce(lay):
  """jit(state, batch) -> per-token CE (B, T) of the state's model, the batch replicated (probe batches are small)."""
  from maxlm.state import step as step_lib  # pylint: disable=import-outside-toplevel
  replicated = sharding.replicated(lay.mesh)

  def ce(state, batch):
    return step_lib.token_statistics(lay.cfg, lay.graphdef, lay.model_params(state), batch)["ce"]

  return jax.jit(ce, in_shardings=(lay.shardings, replicated), out_shardings=replicated)


class KnowledgeProbeHook(Hook):
  """Scores the knowledge probes before the first step, every inject.probe_every steps and after the last step
  (metrics `probe/<group>/<kind>`)."""

  def __init__(self, cfg, lay):
    codec = model_text.text_codec(cfg)
    self.cfg, self.pad_id = cfg, codec.pad_id
    # As KE: probes are text without the tokenizer's special tokens, like the paragraphs injected in training.
    self.sets = load_probe_sets(cfg, codec.encode_text)
    self.length = padded_length(self.sets, cfg.model.max_positions)
    self.ce_step = make_probe_ce(lay)
    self.mesh = lay.mesh
    self.history: dict[int, dict[str, float]] = {}

  def _score(self, run: Run) -> None:
    def ce_fn(batch):
      placed = {k: sharding.put_replicated(v, self.mesh) for k, v in batch.items()}
      return jax.device_get(self.ce_step(run.state, placed))

    metrics = score(ce_fn, self.sets, mode=self.cfg.inject.probe_mode, batch_size=self.cfg.inject.probe_batch_size,
                    length=self.length, pad_id=self.pad_id)
    self.history[run.step] = metrics
    run.logger.log(run.step, metrics)

  def on_start(self, run: Run) -> None:
    if run.step == 0:  # a resumed run was probed at its steps already
      self._score(run)

  def after_step(self, run: Run, device_metrics: dict) -> None:
    every = self.cfg.inject.probe_every
    if every and run.step % every == 0 and run.step < self.cfg.train.steps:
      self._score(run)

  def on_end(self, run: Run) -> None:
    if run.stop_signal is None and run.step not in self.history and run.step > run.start_step:
      self._score(run)
