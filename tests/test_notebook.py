"""notebooks/quickstart.ipynb: committed without outputs and in step with its generator script; executed top to
bottom with SMALL = True (nbclient, kernel python3), its figures, JSON results and samples checked."""

import base64
import importlib.util
import json
import os
import time

import numpy as np
import pytest


pytestmark = pytest.mark.notebook

nbformat = pytest.importorskip("nbformat", reason="needs the `notebook` extra")
nbclient = pytest.importorskip("nbclient", reason="needs the `notebook` extra")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOK = os.path.join(NOTEBOOKS, "quickstart.ipynb")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("figures/loss_curves.png", "knowledge_entropy/knowledge_entropy.png",
           "token_difficulty/token_difficulty.png")
RUN_NAMES = ("ce", "mile", "emo")


def _generator():
  spec = importlib.util.spec_from_file_location("make_quickstart", os.path.join(NOTEBOOKS, "make_quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one cell tagged `parameters`"
  return cells[0]


def test_committed_notebook_has_no_outputs_and_matches_its_generator():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  assert "SMALL = False" in _parameters_cell(nb).source
  with open(NOTEBOOK, encoding="utf-8") as f:
    assert f.read() == nbformat.writes(_generator().build()) + "\n", \
        "notebooks/quickstart.ipynb is stale: run `python notebooks/make_quickstart.py`"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook run with SMALL = True and OUTPUT_ROOT in a temporary folder (also its working directory)."""
  root = tmp_path_factory.mktemp("quickstart")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cell = _parameters_cell(nb)
  cell.source += f"\nSMALL = True\nOUTPUT_ROOT = {str(root)!r}\n"  # papermill-style injection, in memory
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(root)}})
  t0 = time.perf_counter()
  client.execute()
  seconds = time.perf_counter() - t0
  print(f"quickstart notebook (SMALL) executed in {seconds:.0f} s; load average {os.getloadavg()}")
  return nb, root / "small"


def _displayed_pngs(nb) -> list[bytes]:
  return [base64.b64decode(out["data"]["image/png"]) for c in nb.cells if c.cell_type == "code"
          for out in c.outputs if "image/png" in out.get("data", {})]


@pytest.mark.timeout(1200)
def test_quickstart_figures_are_real_pngs_and_shown_inline(executed):
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  nb, run_root = executed
  shown = _displayed_pngs(nb)
  for name in FIGURES:
    data = (run_root / name).read_bytes()
    assert data.startswith(PNG_SIGNATURE), name
    pixels = matplotlib.image.imread(run_root / name)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 500, name
    # Drawn content, not a blank canvas: many distinct colours and a real spread of brightness.
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50 and pixels.std() > 0.05, name
    assert data in shown, f"{name} is not displayed in the notebook"


@pytest.mark.timeout(1200)
def test_quickstart_results_agree_with_the_runs_they_came_from(executed):
  from maxlm.data_pipelines.pcfg import grammar_entropy  # pylint: disable=import-outside-toplevel
  from maxlm.run.trackers import read_metrics  # pylint: disable=import-outside-toplevel
  _, run_root = executed
  summary = json.loads((run_root / "summary.json").read_text())
  assert {"small", "steps", "true_entropy", "runs", "final_validation_ce", "knowledge_entropy", "token_difficulty_ce",
          "grammatical_samples", "figures"} <= set(summary)
  assert summary["small"] is True and set(summary["runs"]) == set(RUN_NAMES)
  floor = grammar_entropy("builtin:demo").entropy_per_token
  assert summary["true_entropy"] == pytest.approx(floor)
  for name in RUN_NAMES:
    evals = [r["eval/uniform_avg"] for r in read_metrics(str(run_root / name)) if "eval/uniform_avg" in r]
    assert summary["final_validation_ce"][name] == pytest.approx(evals[-1])
    assert len(evals) >= 3 and evals[-1] < evals[0] and evals[-1] > floor - 0.1  # it learned, not below the floor
  ke = json.loads((run_root / "knowledge_entropy" / "knowledge_entropy.json").read_text())
  saved_steps = sorted(int(s) for s in os.listdir(run_root / "ce" / "checkpoints") if s.isdigit())
  assert ke["mode"] == "valid" and [r["step"] for r in ke["results"]] == saved_steps and len(saved_steps) >= 3
  for r in ke["results"]:
    assert r["knowledge_entropy"] == pytest.approx(sum(r["per_layer"]))
    assert (run_root / "knowledge_entropy" / r["coefficients"]).is_file()
  difficulty = json.loads((run_root / "token_difficulty" / "token_difficulty.json").read_text())
  assert len(difficulty["checkpoints"]) == len(RUN_NAMES)
  for result in difficulty["checkpoints"]:
    buckets = result["buckets"]
    assert set(buckets) == {"frequent", "medium", "rare", "overall"}
    parts = [buckets[b] for b in ("frequent", "medium", "rare") if buckets[b]["occurrences"]]
    weighted = sum(b["ce"] * b["occurrences"] for b in parts) / sum(b["occurrences"] for b in parts)
    assert weighted == pytest.approx(buckets["overall"]["ce"], rel=1e-9)


@pytest.mark.timeout(1200)
def test_quickstart_counts_are_the_training_corpus(executed):
  """The frequency buckets come from train_counts.npy: it must count what the runs trained on, read back here
  through the training data iterator itself (one epoch of the finite corpus)."""
  from maxlm import data_pipelines  # pylint: disable=import-outside-toplevel
  from maxlm.core.config import load_config  # pylint: disable=import-outside-toplevel
  _, run_root = executed
  cfg = load_config(str(run_root / "ce" / "config.yaml"), [], num_devices=1)
  counts = np.load(run_root / "token_difficulty" / "train_counts.npy")
  assert counts.sum() == cfg.data.pcfg_tokens
  seen = np.zeros_like(counts)
  with data_pipelines.build_train_iterator(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.global_batch,
                                           seed=cfg.train.seed) as it:
    for _ in range(cfg.train.steps):
      seen += np.bincount(next(it)["inputs"].ravel(), minlength=len(counts))
  # The epoch's inputs are every corpus token but the last (which is only ever a target).
  missing = counts - seen
  assert missing.min() == 0 and missing.sum() == 1


@pytest.mark.timeout(1200)
def test_quickstart_samples_each_run(executed):
  _, run_root = executed
  for name in RUN_NAMES:
    with open(run_root / "samples" / f"{name}.jsonl", encoding="utf-8") as f:
      records = [json.loads(line) for line in f]
    assert len(records) == 4 and all(set(r) >= {"prompt", "completion", "completion_ids"} for r in records)
    assert any(r["completion_ids"] for r in records)
