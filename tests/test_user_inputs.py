"""A stranger's inputs (issue 26): tokenizer.json files that truncate and pad, --output onto a run's files or any file
maxlm did not write, and the bad inputs that must end in one line (exit 2) instead of a traceback."""

import json
import os

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from maxlm import data as data_cli
from maxlm import evaluate as evaluate_cli
from maxlm import generate as generate_cli
from maxlm import analyze as analyze_cli
from maxlm import plot as plot_cli
from maxlm import train as train_cli
from maxlm.core import outputs
from maxlm.core.config import load_config
from maxlm.core.errors import ConfigError, ConversionError, DataError
from maxlm.data_pipelines import inspect_store, prepare
from maxlm.data_pipelines import raw_records
from maxlm.data_pipelines.text_tokenizer import TextTokenizer
from maxlm.run.lock import RunDirLock

WORDS = [f"w{i}" for i in range(40)]
# An unwritable place for a root user: nothing can be created under /proc.
UNWRITABLE = "/proc/maxlm-no-such-dir/out"


def _docs(n=30):
  return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + 3 * i)) for i in range(n)]


@pytest.fixture(scope="module")
def bert_like(tmp_path_factory):
  """A WordLevel tokenizer.json trained on test text that, like BERT's, truncates to 8 tokens and pads with [PAD]."""
  root = tmp_path_factory.mktemp("tok")
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.train_from_iterator(_docs(), trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[SEP]"]))
  tok.enable_truncation(max_length=8)
  tok.enable_padding(pad_id=0, pad_token="[PAD]", length=8)
  path = root / "tokenizer.json"
  tok.save(str(path))
  assert json.loads(path.read_text())["truncation"]["max_length"] == 8  # the settings are in the file
  return str(path)


def _jsonl(path, texts, prefix=b""):
  path.write_bytes(prefix + b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts))
  return str(path)


def _run_dir(root):
  """What a training run leaves: config, metrics history, a checkpoint with Orbax metadata."""
  run = root / "R"
  (run / "checkpoints" / "40").mkdir(parents=True)
  (run / "config.yaml").write_text("run: {}\n")
  (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
  (run / "checkpoints" / "40" / "_CHECKPOINT_METADATA").write_text("{}")
  return run


def _snapshot(run):
  return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- 1. tokenizers that truncate and pad


def test_a_tokenizer_json_that_truncates_and_pads_encodes_whole_documents(bert_like, tmp_path, capsys):
  docs = _docs()
  tok = TextTokenizer(bert_like)  # what prepare, SFT, evaluate, analysis rows, generate and injection all load
  lengths = [len(ids) for ids in tok.encode_batch(docs)]
  assert lengths == [len(d.split()) for d in docs] and max(lengths) > 8
  assert tok.encode_with_special_tokens(["w1 w2"]) == [[tok.token_id("w1"), tok.token_id("w2")]]  # no [PAD]s
  m = prepare(_jsonl(tmp_path / "a.jsonl", docs), bert_like, str(tmp_path / "store"), workers=1, progress=False)
  assert m["totals"]["tokens"] == sum(lengths) + len(docs)  # every token kept, one separator per document
  assert m["totals"]["document_tokens"] == {"min": min(lengths), "max": max(lengths)}
  assert "exactly" not in capsys.readouterr().err


def test_a_store_whose_documents_all_have_one_length_is_warned_about(bert_like, tmp_path, capsys):
  same = [" ".join(WORDS[i:i + 6]) for i in range(20)]
  prepare(_jsonl(tmp_path / "a.jsonl", same), bert_like, str(tmp_path / "store"), workers=1, progress=False)
  assert "all 20 documents are exactly 6 tokens long" in capsys.readouterr().err
  assert "all 20 documents are exactly 6 tokens long" in inspect_store(str(tmp_path / "store"))


# ----------------------------------------------------------------------------- 2. --output never overwrites


def test_output_files_refuse_a_runs_files_and_files_maxlm_did_not_write(tmp_path):
  run = _run_dir(tmp_path)
  for target in ("metrics.jsonl", "config.yaml", "checkpoints/40/_CHECKPOINT_METADATA", "checkpoints/40/new.json"):
    for overwrite in (False, True):
      with pytest.raises(DataError, match="refused"):
        outputs.write_text(str(run / target), "maxlm.evaluate", "{}", overwrite=overwrite)
  foreign = tmp_path / "notes.json"
  foreign.write_text("mine")
  with pytest.raises(DataError, match="already exists"):
    outputs.write_text(str(foreign), "maxlm.evaluate", "{}")
  with pytest.raises(DataError, match="a file maxlm did not write"):
    outputs.write_text(str(foreign), "maxlm.evaluate", "{}", overwrite=True)
  assert foreign.read_text() == "mine"
  ours = str(tmp_path / "eval.json")
  outputs.write_text(ours, "maxlm.evaluate", "1")
  with pytest.raises(DataError, match="an output of maxlm.evaluate, not an earlier output of maxlm.generate"):
    outputs.write_text(ours, "maxlm.generate", "2", overwrite=True)
  outputs.write_text(ours, "maxlm.evaluate", "2", overwrite=True)  # its own earlier output, asked for
  assert open(ours).read() == "2"
  open(ours, "w").write("edited by hand")
  with pytest.raises(DataError, match="changed since"):
    outputs.write_text(ours, "maxlm.evaluate", "3", overwrite=True)


def test_every_output_flag_refuses_a_runs_files(tmp_path, capsys):
  run = _run_dir(tmp_path)
  before = _snapshot(run)
  commands = [
      (evaluate_cli.main, ["--checkpoint", str(run), "--output", str(run / "metrics.jsonl")]),
      (evaluate_cli.main, ["harness", "--checkpoint", str(run), "--tasks", "x", "--output", str(run / "config.yaml")]),
      (generate_cli.main, ["--checkpoint", str(run), "--prompt", "a", "--output", str(run / "config.yaml")]),
      (analyze_cli.main, ["hessian-trace", "--checkpoint", str(run), "--data", "x.jsonl", "--output",
                          str(run / "checkpoints/40/_CHECKPOINT_METADATA")]),
      (analyze_cli.main, ["probe", "--checkpoint", str(run), "--train", "a.csv", "--validation", "b.csv", "--output",
                          str(run / "metrics.jsonl")]),
      (analyze_cli.main, ["knowledge-entropy", "--checkpoint", str(run), "--data", "x.jsonl", "--output",
                          str(run / "checkpoints" / "40")]),
      (analyze_cli.main, ["token-difficulty", "--checkpoint", str(run), "--data", "x.jsonl", "--counts", "c.npy",
                          "--output", str(run / "checkpoints")]),
      (plot_cli.main, [str(run), "--output", str(run / "checkpoints/40/curves.png")]),
      (data_cli.main, ["pcfg-tasks", "--task", "B", "--num", "5", "--output", str(run / "metrics.jsonl")]),
      (data_cli.main, ["prepare", "--input", "x.jsonl", "--tokenizer", "t.json", "--output", str(run)]),
  ]
  for main, argv in commands:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "maxlm: error:" in err and "Traceback" not in err and "wrote" not in err, (argv, err)
  assert _snapshot(run) == before


def test_to_hf_inside_a_runs_checkpoints_is_refused(tmp_path):
  run = _run_dir(tmp_path)
  with pytest.raises(ConversionError, match="checkpoint rotation deletes"):
    with outputs.atomic_output(str(run / "checkpoints" / "40" / "x"), outputs.HF_EXPORT):
      pass
  assert not (run / "checkpoints" / "40" / "x").exists()


def test_plot_and_pcfg_tasks_replace_only_their_own_output_with_overwrite(tmp_path, capsys):
  csv = tmp_path / "task.csv"
  args = ["pcfg-tasks", "--grammar", "builtin:ib_demo", "--task", "B", "--num", "5", "--output", str(csv)]
  assert data_cli.main(args) == 0
  assert data_cli.main(args) == 2 and "already exists" in capsys.readouterr().err
  assert data_cli.main(args + ["--overwrite"]) == 0
  (tmp_path / "other.csv").write_text("text,label\n")
  assert data_cli.main(args[:-1] + [str(tmp_path / "other.csv"), "--overwrite"]) == 2
  assert (tmp_path / "other.csv").read_text() == "text,label\n"


# ----------------------------------------------------------------------------- 7. one line, not a traceback


def test_lone_surrogate_is_a_malformed_record_and_leaves_no_parts(bert_like, tmp_path, capsys):
  raw = tmp_path / "a.jsonl"
  raw.write_text('{"text": "w1 w2 w3"}\n{"text": "w1 \\ud800 w2"}\n{"text": "w4 w5"}\n')
  assert data_cli.main(["prepare", "--input", str(raw), "--tokenizer", bert_like, "--output",
                        str(tmp_path / "s"), "--workers", "1"]) == 0
  m = json.loads((tmp_path / "s" / "manifest.json").read_text())
  assert m["totals"]["documents"] == 2 and m["totals"]["bad_records"] == {raw_records.LONE_SURROGATE: 1}
  assert not (tmp_path / "s" / "_parts").exists()
  (tmp_path / "b.jsonl").write_text('{"text": "\\ud800"}\n')
  assert data_cli.main(["prepare", "--input", str(tmp_path / "b.jsonl"), "--tokenizer", bert_like, "--output",
                        str(tmp_path / "s2"), "--workers", "1"]) == 2
  err = capsys.readouterr().err
  assert "lone surrogate" in err and "Traceback" not in err and not (tmp_path / "s2").exists()


def test_a_utf8_bom_does_not_make_the_first_line_malformed(bert_like, tmp_path):
  path = _jsonl(tmp_path / "a.jsonl", ["w1 w2", "w3 w4"], prefix=b"\xef\xbb\xbf")
  m = prepare(path, bert_like, str(tmp_path / "s"), workers=1, progress=False)
  assert m["totals"]["documents"] == 2 and m["totals"]["bad_records"] == {}
  prompts = tmp_path / "p.jsonl"
  prompts.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "hi"}\n')
  assert generate_cli.read_prompts(str(prompts)) == ["hi"]
  from maxlm.analysis.probe import read_task  # pylint: disable=import-outside-toplevel
  from maxlm.data_pipelines import sft  # pylint: disable=import-outside-toplevel
  chat = tmp_path / "chat.jsonl"
  chat.write_bytes(b"\xef\xbb\xbf" + b'{"messages": []}\n')
  stats = raw_records.FileStats(str(chat))
  assert sft.read_records(str(chat), stats) == [("line 1", {"messages": []})] and not stats.bad_records
  task = tmp_path / "task.csv"
  task.write_bytes(b"\xef\xbb\xbftext,label\nhi,A\n")
  assert read_task(str(task)) == (["hi"], ["A"])


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_prepare_workers_below_one_is_refused(bert_like, tmp_path, capsys, workers):
  raw = _jsonl(tmp_path / "a.jsonl", ["w1 w2"])
  assert data_cli.main(["prepare", "--input", raw, "--tokenizer", bert_like, "--output", str(tmp_path / "s"),
                        "--workers", workers]) == 2
  assert f"--workers {workers}" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_prepare_onto_an_existing_file_is_refused(bert_like, tmp_path, capsys):
  raw = _jsonl(tmp_path / "a.jsonl", ["w1 w2"])
  target = tmp_path / "taken"
  target.write_text("keep me")
  assert data_cli.main(["prepare", "--input", raw, "--tokenizer", bert_like, "--output", str(target)]) == 2
  err = capsys.readouterr().err
  assert "is an existing file" in err and "Traceback" not in err and target.read_text() == "keep me"


def test_config_errors_of_a_new_run(tmp_path, capsys):
  assert train_cli.main([f"--config={tmp_path}", "--dry-run"]) == 2
  assert "is a directory" in capsys.readouterr().err
  with pytest.raises(ConfigError, match=r"optim.warmup_steps = 20 .*is above train.steps = 5"):
    load_config("demo", ["train.steps=5"])
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match="run.dir .* is a file"):
    load_config("demo", [f"run.dir={tmp_path / 'file'}"])
  with pytest.raises(ConfigError, match="is below .*file, which is a file"):
    load_config("demo", [f"run.dir={tmp_path / 'file' / 'run'}"])
  with pytest.raises(ConfigError, match="inside the token store"):
    load_config("demo", ["data.source=store", f"data.path={tmp_path / 'store'}", f"run.dir={tmp_path / 'store/r'}"])


def test_unwritable_places_are_one_line(tmp_path, capsys):
  with pytest.raises(ConfigError, match="cannot be written"):
    with RunDirLock(UNWRITABLE):
      pass
  with pytest.raises(ConversionError, match="cannot be written"):
    with outputs.atomic_output(UNWRITABLE, outputs.HF_EXPORT):
      pass
  with pytest.raises(DataError, match="cannot be written"):
    outputs.write_text(UNWRITABLE + ".json", "maxlm.evaluate", "{}")


def test_bad_numbers_and_formats_of_evaluate_and_plot(tmp_path, capsys):
  assert evaluate_cli.main(["--checkpoint", str(tmp_path), "--batch-size", "0"]) == 2
  assert "--batch-size 0 must be >= 1" in capsys.readouterr().err
  assert plot_cli.main([str(tmp_path), "--output", str(tmp_path / "x.jsonl")]) == 2
  err = capsys.readouterr().err
  assert "cannot write a .jsonl file" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 8. feedback, not noise


def test_evaluate_convert_and_finetune_probe_show_progress(tmp_path, capfd):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from maxlm.analysis import probe as linear_probe  # pylint: disable=import-outside-toplevel
  from maxlm.evals.loss import evaluate  # pylint: disable=import-outside-toplevel
  from maxlm.hf.export import to_hf  # pylint: disable=import-outside-toplevel
  from maxlm.hf.imports import from_hf  # pylint: disable=import-outside-toplevel
  from helpers import tiny_run  # pylint: disable=import-outside-toplevel
  cfg, params = tiny_run(tmp_path / "run")
  evaluate(str(tmp_path / "run"), None, seq_len=8, batch_size=2, num_batches=2, log=lambda *a: None)  # PCFG data
  assert "evaluate: 100%" in capfd.readouterr().err
  to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), log=lambda *a: None)
  assert "to-hf: 100%" in capfd.readouterr().err
  from_hf(str(tmp_path / "hf"), str(tmp_path / "back"), log=lambda *a: None)
  assert "from-hf: 100%" in capfd.readouterr().err
  rows = {"ids": np.tile(np.arange(8, dtype=np.int32), (4, 1)), "mask": np.ones((4, 8), np.int32),
          "labels": np.array([0, 1, 0, 1])}
  linear_probe.finetune(cfg, params, rows, 2, steps=3, batch_size=2)
  assert "finetune probe: 100%" in capfd.readouterr().err


def test_convert_onto_an_unwritable_place_is_one_line(tmp_path, capsys):
  from maxlm import convert  # pylint: disable=import-outside-toplevel
  from helpers import tiny_run  # pylint: disable=import-outside-toplevel
  tiny_run(tmp_path / "run")
  assert convert.main(["to-hf", "--checkpoint", str(tmp_path / "run"), "--output", UNWRITABLE]) == 2
  err = capsys.readouterr().err
  assert "cannot be written" in err and "Traceback" not in err


def test_closed_event_loops_at_shutdown_print_nothing(capsys, monkeypatch):
  import sys  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  from maxlm.core import errors  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  errors.quiet_library_tracebacks()
  for _ in range(8):  # what a full disk left: tensorstore's loops collected after they closed
    sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), err_msg=None))
  for _ in range(3):
    sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("something else"), err_msg=None))
  assert capsys.readouterr().err.splitlines() == ["maxlm: ignored at shutdown: ValueError: something else"]


def test_lm_eval_does_not_make_git_complain(tmp_path, capfd, monkeypatch):
  pytest.importorskip("lm_eval")
  from lm_eval import evaluator  # pylint: disable=import-outside-toplevel
  from maxlm.evals.harness import quiet_git_hash  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)  # not a git repository
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
  with quiet_git_hash():
    assert evaluator.get_git_commit_hash() is None
  assert "fatal" not in capfd.readouterr().err


def test_cpu_peak_flops_is_a_named_stable_figure(monkeypatch):
  from maxlm.core import cpu_peak  # pylint: disable=import-outside-toplevel
  from maxlm.state import plan  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv(cpu_peak.ENV, raising=False)
  first, second = cpu_peak.cpu_peak_flops(), cpu_peak.cpu_peak_flops()
  assert first == second and first[0] > 0 and first[1].startswith("nominal ")  # no measurement: load cannot move it
  plan.peak_flops_per_device.cache_clear()
  try:
    assert plan.peak_flops_per_device()[1].startswith("nominal ")
    monkeypatch.setenv(cpu_peak.ENV, "1.5e12")
    plan.peak_flops_per_device.cache_clear()
    assert plan.peak_flops_per_device() == (1.5e12, f"{cpu_peak.ENV}=1.5e12")
  finally:
    plan.peak_flops_per_device.cache_clear()
  assert cpu_peak.fp32_flops_per_cycle({"avx2", "fma", "avx"}) == (32, "AVX2 FMA")


def _fake_run(root, name, data, ce):
  run = root / name
  run.mkdir()
  (run / "config.yaml").write_text(json.dumps({"data": data}))  # YAML reads JSON
  (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "ce": ce - s / 10}) + "\n" for s in (1, 2)))
  return str(run)


def test_plot_names_whose_entropy_floor_it_draws(tmp_path):
  pcfg = _fake_run(tmp_path, "pcfg_run", {"source": "pcfg", "grammar": "builtin:demo"}, 6.0)
  store = _fake_run(tmp_path, "pile_run", {"source": "store", "path": "/data/pile"}, 7.0)
  drawn = plot_cli.plot_runs([pcfg, store], str(tmp_path / "mixed.png"), metrics=("ce",))
  assert drawn["floor"] is not None and "pcfg_run: builtin:demo" in drawn["floor_label"]
  both = plot_cli.plot_runs([pcfg, pcfg], str(tmp_path / "same.png"), metrics=("ce",), labels=["a", "b"])
  assert both["floor_label"] == f"true entropy {both['floor']:.3f}"  # every run's own floor: nothing to say


def test_base_yaml_says_what_the_terse_keys_mean():
  from maxlm.core.config import load_config as _  # noqa: F401  (the package's configs are importable)
  import importlib.resources  # pylint: disable=import-outside-toplevel
  text = (importlib.resources.files("maxlm.configs") / "base.yaml").read_text()
  for key in ("mixture", "index_file", "entropy_floor", "ratio", "emo_mode"):
    line = next(l for l in text.splitlines() if l.strip().startswith(f"{key}:"))
    assert "#" in line and len(line.split("#", 1)[1].strip()) > 20, line
