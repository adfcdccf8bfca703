"""Nothing lost, round two (issue 26, items 3-6): a failed save names its step, a tokenizer that is not the store's
is refused, a run dir never mixes two runs, a LoRA run is pinned to its base, and damaged stores, inputs and
checkpoints are errors that name what is damaged."""

import json
import os

import jax
import numpy as np
import pytest

from maxlm import train
from maxlm.checkpoint.checkpointer import Checkpointer
from maxlm.core.config import CheckpointConfig, load_config
from maxlm.core.errors import CheckpointError, ConfigError, DataError
from maxlm.data_pipelines.pcfg import load_grammar
from maxlm.data_pipelines.tokenization import run_tokenizer

TINY = ["model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
        "model.ffn=64", "model.max_positions=32", "model.compute_dtype=float32", "model.remat=none",
        "train.seq_len=16", "train.global_batch=8", "optim.warmup_steps=1", "run.progress=false",
        "run.tensorboard=false", "run.eval_batches=0", "run.log_every=1", "checkpoint.async_save=false"]
GRAMMAR = load_grammar("builtin:demo")


def config(run_dir, steps, *extra):
  return load_config("demo", TINY + [f"run.dir={run_dir}", f"train.steps={steps}", *extra])


def run(run_dir, steps, *extra):
  return train.train(config(run_dir, steps, *extra), verbose=False)


@pytest.fixture(scope="module")
def word_store(tmp_path_factory):
  """A token store of the demo grammar's sentences, its word-level tokenizer, and another tokenizer file."""
  from maxlm.data_pipelines import prepare  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("word_store")
  tok = root / "tokenizer.json"
  GRAMMAR.to_hf_tokenizer().save(str(tok))
  other = root / "other" / "tokenizer.json"  # the same words with one more: another file, another hash
  other.parent.mkdir()
  spec = json.loads(tok.read_text())
  spec["model"]["vocab"]["zzz_extra"] = len(spec["model"]["vocab"])
  other.write_text(json.dumps(spec))
  docs = [GRAMMAR.decode(s) for s in GRAMMAR.sample_sentences(400, 3)[0]]
  with open(root / "raw.jsonl", "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")
  prepare(str(root / "raw.jsonl"), str(tok), str(root / "store"), workers=1, progress=False)
  return root


# ----------------------------------------------------------------------------- 6. failed save, tokenizers


def test_a_save_failure_reported_late_names_its_step(tmp_path):
  # orbax may report an async save's failure only when it is waited for, after poll() saw the save finish: the
  # message must still name that step, not "step -1".
  ckpt = Checkpointer(str(tmp_path / "r"), CheckpointConfig(async_save=True, every=1, keep_last=0))
  cfg = config(tmp_path / "r", 2)
  state = {"params": {"w": np.ones((4,), np.float32)}}
  assert ckpt.save(2, state, data_state=None, config=cfg)
  ckpt.poll()  # finished (or not yet): either way the next failure is step 2's
  ckpt._manager.wait_until_finished()  # pylint: disable=protected-access
  ckpt.poll()

  def full(*_):
    raise OSError(28, "No space left on device")

  real, ckpt._manager.wait_until_finished = ckpt._manager.wait_until_finished, full  # pylint: disable=protected-access
  with pytest.raises(CheckpointError, match=r"saving checkpoint step 2 .* failed: No space left on device") as info:
    ckpt.wait()
  assert "step -1" not in str(info.value)
  ckpt._manager.wait_until_finished = real  # pylint: disable=protected-access
  ckpt.close()


def test_a_tokenizer_that_is_not_the_stores_is_refused_before_anything_is_written(word_store, tmp_path):
  run_dir = tmp_path / "r"
  store, other = word_store / "store", word_store / "other" / "tokenizer.json"
  with pytest.raises(DataError, match=r"tokenizer .*other/tokenizer.json \(sha256 \w+\) is not the one the store .* "
                                      r"was prepared with .*Leave data.tokenizer empty.*data.tokenizer"):
    run(run_dir, 2, "data.source=store", f"data.path={store}", f"data.tokenizer={other}")
  assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
  # The store's own tokenizer, named explicitly, is accepted.
  summary = run(run_dir, 2, "data.source=store", f"data.path={store}", f"data.tokenizer={word_store / 'tokenizer.json'}")
  assert summary["steps"] == 2


def test_a_saved_run_with_the_wrong_tokenizer_exports_and_decodes_none(word_store):
  # A run saved before training checked it: to-hf, generate and evaluate read the tokenizer through run_tokenizer,
  # which refuses it rather than exporting another tokenizer's file with the model.
  cfg = load_config("demo", ["data.source=store", f"data.path={word_store / 'store'}",
                             f"data.tokenizer={word_store / 'other' / 'tokenizer.json'}"])
  kind, why = run_tokenizer(cfg.data)
  assert kind is None and "is not the one the store" in why


# ----------------------------------------------------------------------------- 3. one run per run.dir


def test_a_fresh_start_in_a_run_dir_holding_a_run_is_refused_and_changes_nothing(tmp_path):
  run_dir = tmp_path / "r"
  run(run_dir, 4, "checkpoint.every=2")
  before = {p: (run_dir / p).read_bytes() for p in ("metrics.jsonl", "config.yaml")}
  for extra in ("checkpoint.resume=false", "checkpoint.enabled=false"):
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint steps 2, 4 and metrics in metrics.jsonl\)"
                                          r".*Name a new run.dir"):
      run(run_dir, 2, extra)
  assert {p: (run_dir / p).read_bytes() for p in before} == before
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]
  # A new run.dir is the way: it starts from step 0 there.
  assert run(tmp_path / "new", 2, "checkpoint.resume=false")["start_step"] == 0


def test_a_refused_resume_writes_nothing_and_the_objective_is_kept(tmp_path):
  run_dir = tmp_path / "r"
  run(run_dir, 2, "checkpoint.every=2")
  saved = (run_dir / "config.yaml").read_bytes()
  with pytest.raises(DataError, match="global_batch"):  # the data-iterator state's check, after setup ran
    run(run_dir, 4, "train.global_batch=4")
  assert (run_dir / "config.yaml").read_bytes() == saved
  with pytest.raises(CheckpointError, match=r"loss.objective = 'focal' \(from override 'loss.objective=focal'\), the "
                                            r"run has 'mile'.*new run.dir, with checkpoint.init_from="):
    run(run_dir, 4, "loss.objective=focal")
  with pytest.raises(CheckpointError, match=r"optim.weight_decay = 0.0 .*the run has 0.1"):
    run(run_dir, 4, "optim.weight_decay=0.0")
  assert (run_dir / "config.yaml").read_bytes() == saved
  # Keys that may change on resume are accepted and recorded: config.yaml says from which step.
  summary = run(run_dir, 4, "optim.lr=1e-4")
  assert summary["start_step"] == 2 and sorted(summary["losses"]) == [3, 4]
  text = (run_dir / "config.yaml").read_text()
  assert text.startswith("# history: from step 2 (resumed ")
  assert "train.steps 2 -> 4" in text and "optim.lr 0.003 -> 0.0001" in text
  assert load_config(str(run_dir / "config.yaml")).loss.objective == "mile"
  run(run_dir, 6)  # a later resume keeps the history and adds its own line
  lines = [l for l in (run_dir / "config.yaml").read_text().splitlines() if l.startswith("# history:")]
  assert len(lines) == 2 and "from step 4" in lines[1] and "train.steps 4 -> 6" in lines[1]


# ----------------------------------------------------------------------------- 4. a LoRA run is pinned to its base

LORA = ["train.seq_len=16", "train.global_batch=4", "optim.warmup_steps=0", "optim.lr=1e-2", "lora.rank=4",
        "lora.alpha=8.0", "lora.targets=q,v", "run.progress=false", "run.tensorboard=false", "run.eval_batches=0",
        "run.log_every=1", "run.summary=false", "checkpoint.async_save=false"]


def test_a_lora_run_reads_the_base_step_it_was_trained_on_or_refuses(tmp_path):
  from maxlm import pretrained  # pylint: disable=import-outside-toplevel
  base, lora_dir = tmp_path / "base", tmp_path / "lora"
  run(base, 2, "checkpoint.every=2", "checkpoint.keep_last=2")

  def lora_run(steps):
    return train.train(load_config("emo_lora_demo", LORA + [f"checkpoint.init_from={base}", f"run.dir={lora_dir}",
                                                            f"train.steps={steps}"]), verbose=False)

  lora_run(2)
  assert load_config(str(lora_dir / "config.yaml")).checkpoint.init_from == f"{base}@2"  # the step is recorded
  _, merged, _ = pretrained.load_params(str(lora_dir))
  run(base, 4, "checkpoint.every=2", "checkpoint.keep_last=2")  # the base trains on: steps 2 and 4 on disk
  _, again, _ = pretrained.load_params(str(lora_dir))
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)  # still merged onto step 2, not the base's newest
  summary = lora_run(3)  # a resume rebuilds the base from step 2 too
  assert summary["start_step"] == 2
  run(base, 6, "checkpoint.every=2", "checkpoint.keep_last=2")  # step 2 rotated out of the base
  with pytest.raises(CheckpointError, match=rf"LoRA run {lora_dir} \(step 3\) was trained on {base} at step 2, and "
                                            r"that step is gone .*holds steps 4, 6.*restore step 2"):
    pretrained.load_params(str(lora_dir))
  with pytest.raises(CheckpointError, match=rf"was trained on {base} at step 2, and that step is gone"):
    lora_run(4)


# ----------------------------------------------------------------------------- 5. integrity


def test_a_deleted_store_shard_is_an_error_naming_the_store_and_domain(word_store, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  from maxlm.core.config import DataConfig  # pylint: disable=import-outside-toplevel
  from maxlm.data_pipelines import build_train_iterator  # pylint: disable=import-outside-toplevel
  from maxlm.data_pipelines.token_store import TokenStore  # pylint: disable=import-outside-toplevel
  store = tmp_path / "store"
  shutil.copytree(word_store / "store", store)
  (domain,) = TokenStore(str(store)).domains
  first = TokenStore(str(store)).read(domain, "train", 0, 16)
  assert first.any()
  shutil.rmtree(store / "domains" / domain / "train" / "c")  # `rm -rf STORE/domains/NAME/train/c`
  match = rf"token store {store} is damaged: domain '{domain}' \(train split\) is missing 1 of its 1 shard file"
  with pytest.raises(DataError, match=match):
    TokenStore(str(store)).read(domain, "train", 0, 16)
  with pytest.raises(DataError, match=match):
    it = build_train_iterator(DataConfig(source="store", path=str(store)), seq_len=16, batch_size=4, seed=0)
    next(it)


def test_a_checkpoint_array_read_back_non_finite_names_the_step_and_array(tmp_path):
  # No save writes NaN (the state is checked first), so NaN read back is damage on disk (e.g. flipped bytes in an
  # array file); written here directly through the checkpointer, which does not check.
  cfg = config(tmp_path / "r", 4)
  good = {"params": {"w": np.ones((8,), np.float32), "b": np.zeros((2,), np.float32)}, "step": np.int32(2)}
  bad = {"params": {"w": np.array([1.0] * 7 + [np.nan], np.float32), "b": np.zeros((2,), np.float32)},
         "step": np.int32(4)}
  with Checkpointer(str(tmp_path / "r"), CheckpointConfig(async_save=False, keep_last=0)) as ckpt:
    ckpt.save(2, good, data_state=None, config=cfg, force=True)
    ckpt.save(4, bad, data_state=None, config=cfg, force=True)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), good)
  with Checkpointer(str(tmp_path / "r"), CheckpointConfig(async_save=False)) as ckpt:
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 in .* is damaged: params/w read back holding NaN"):
      ckpt.restore(abstract, 4)
    with pytest.raises(CheckpointError, match=r"step 4 .* is damaged: params/w"):
      ckpt.restore_subtree(("params",), 4)
    said = []
    step, state, _ = ckpt.restore_for_resume(abstract, log=said.append)
  assert step == 2 and np.isfinite(np.asarray(state["params"]["w"])).all()
  assert "damaged: params/w" in said[0] and "moved step 4 aside" in said[0]
