"""Writes notebooks/quickstart.ipynb (outputs cleared) from the cell sources below, so the notebook is reviewed as code.

`python notebooks/make_quickstart.py [--check]`: --check exits 1 when the committed notebook differs from this script.
"""

from __future__ import annotations

import argparse
import os
import sys

import nbformat

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.ipynb")

INTRO = """\
# maxlm quickstart: CE vs MiLe vs EMO on a synthetic grammar

This notebook trains three small decoder LMs with maxlm on its PCFG corpus, sentences sampled from a probabilistic
grammar. The grammar's true per-token entropy is known, so it is the floor no model can go below. It then looks at
the three models with maxlm's research tools:

1. **Loss curves**: validation CE of each objective against the grammar's entropy.
2. **Knowledge entropy**: how evenly one run's FFN units are used, checkpoint by checkpoint.
3. **Token difficulty**: CE on frequent, medium and rare tokens.
4. **Samples**: a few generated sentences from each run, checked against the grammar.

It runs on a CPU, including Colab's free runtime: about 15 minutes at the default sizes, and 1-2 minutes with
`SMALL = True`. Every run, figure and JSON file goes under `OUTPUT_ROOT`."""

INSTALL = """\
# Installs maxlm unless it is already importable: from the checkout this notebook runs in (or a clone of maxlm in
# the working folder, as on Colab after `!git clone`), else from MAXLM_SOURCE, any pip requirement for maxlm.
import importlib
import importlib.util
import os
import pathlib
import site
import subprocess
import sys
import tomllib

MAXLM_SOURCE = os.environ.get("MAXLM_SOURCE", "")  # e.g. "maxlm @ git+https://github.com/YOUR_ORG/maxlm"


def maxlm_checkout(start: pathlib.Path):
  \"\"\"The nearest folder at or above `start` (or `start/maxlm`) whose pyproject.toml names the project maxlm.\"\"\"
  for folder in (start / "maxlm", start, *start.parents):
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file():
      with open(pyproject, "rb") as f:
        if tomllib.load(f).get("project", {}).get("name") == "maxlm":
          return folder
  return None


if importlib.util.find_spec("maxlm") is None:
  checkout = maxlm_checkout(pathlib.Path.cwd().resolve())
  if checkout is None and not MAXLM_SOURCE:
    raise RuntimeError("maxlm is not installed and this notebook is not inside a maxlm checkout: run "
                       "`!git clone <maxlm repository URL> maxlm` in a cell above, or set MAXLM_SOURCE to a pip "
                       "requirement for maxlm, then run this cell again")
  target = ["-e", str(checkout)] if checkout else [MAXLM_SOURCE]
  print("pip install", *target)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", *target], check=True)
  for folder in site.getsitepackages():
    site.addsitedir(folder)  # an editable install's import hook lives in a .pth file: load it without a restart
  importlib.invalidate_caches()
import maxlm  # noqa: E402

print("maxlm", maxlm.__version__, "from", os.path.dirname(maxlm.__file__))"""

PARAMETERS_INTRO = """\
## Parameters

`SMALL = True` shrinks the models and the number of steps so the whole notebook runs in a few minutes (the test
suite runs it that way; its curves are short but every section works). `OUTPUT_ROOT` (or the environment variable
`MAXLM_QUICKSTART_ROOT`) is where the runs and figures go. Rerunning resumes finished runs instead of training
them again."""

PARAMETERS = """\
SMALL = False  # True: tiny models and few steps, for a quick check
OUTPUT_ROOT = os.environ.get("MAXLM_QUICKSTART_ROOT", "quickstart_runs")  # runs, figures and JSON results
STEPS = 300  # optimizer steps per run
CHECKPOINT_EVERY = 50  # checkpoint and validation interval; knowledge entropy reads these checkpoints
SMALL_STEPS = 90
SMALL_CHECKPOINT_EVERY = 30
KE_RUN = "ce"  # the run whose checkpoints knowledge entropy follows"""

SETUP = """\
import json

import jax
import numpy as np
from IPython.display import Image, display

from maxlm import generate, plot, train
from maxlm.analysis import knowledge_entropy, token_difficulty
from maxlm.core.config import load_config
from maxlm.data_pipelines import pcfg

GRAMMAR = "builtin:demo"
OBJECTIVES = {  # run name -> config overrides; MiLe with gamma 1, EMO with its published defaults
    "ce": ["loss.objective=ce"],
    "mile": ["loss.objective=mile", "loss.gamma=1.0"],
    "emo": ["loss.objective=emo"],
}
if SMALL:
  steps, every, seq_len, batch, eval_batches, held_out_docs = SMALL_STEPS, SMALL_CHECKPOINT_EVERY, 64, 16, 2, 32
  model = ["model.hidden=64", "model.layers=2", "model.heads=4", "model.ffn=256", "model.max_positions=64"]
else:  # the demo preset's model: 4 layers, hidden 256, about 3.7M parameters
  steps, every, seq_len, batch, eval_batches, held_out_docs = STEPS, CHECKPOINT_EVERY, 128, 16, 4, 128
  model = []
RUN_ROOT = os.path.abspath(os.path.join(OUTPUT_ROOT, "small" if SMALL else "full"))
FIGURES = os.path.join(RUN_ROOT, "figures")
os.makedirs(FIGURES, exist_ok=True)
# A finite training corpus that the runs see exactly once: its token counts are the training frequencies.
PCFG_TOKENS = steps * batch * seq_len + 1
grammar = pcfg.load_grammar(GRAMMAR)
TRUE_ENTROPY = pcfg.grammar_entropy(GRAMMAR).entropy_per_token
print(f"{len(jax.devices())} {jax.devices()[0].platform} device(s); runs under {RUN_ROOT}")
print(f"grammar {GRAMMAR}: {grammar.vocab_size} token types, true entropy {TRUE_ENTROPY:.4f} nats/token")"""

TRAIN_INTRO = """\
## 1. Train CE, MiLe and EMO

Three runs that differ only in `loss.objective`, on the same data in the same order. CE and validation CE are logged
whatever the objective, so the runs are compared on the same number. Each run checkpoints every `CHECKPOINT_EVERY`
steps and keeps them all (`checkpoint.keep_last=0`) for the knowledge-entropy section."""

TRAIN = """\
def run_overrides(name: str, objective: list[str]) -> list[str]:
  return [*model, f"train.seq_len={seq_len}", f"train.global_batch={batch}", f"train.steps={steps}",
          f"optim.warmup_steps={max(1, steps // 10)}", f"data.grammar={GRAMMAR}", f"data.pcfg_tokens={PCFG_TOKENS}",
          f"run.dir={RUN_ROOT}/{name}", f"run.log_every={max(1, every // 3)}", f"run.eval_every={every}",
          f"run.eval_batches={eval_batches}", "run.progress=false", f"checkpoint.every={every}",
          "checkpoint.keep_last=0", *objective]


RUNS, CONFIGS = {}, {}
for name, objective in OBJECTIVES.items():
  print(f"--- {name}")
  CONFIGS[name] = load_config("demo", run_overrides(name, objective), num_devices=jax.device_count())
  train.train(CONFIGS[name])
  RUNS[name] = CONFIGS[name].run.dir"""

CURVES_INTRO = """\
## 2. Loss curves against the grammar's entropy

`maxlm.plot.plot_runs` (the same as `python -m maxlm.plot RUN_DIR ... --output FILE.png`) draws the logged metrics of
several runs on shared axes; the dashed line is the true entropy. **What to look for:** all three approach the floor;
the gap that remains is what the model has not learned yet. MiLe and EMO optimise a different objective than CE, yet
their CE stays close to CE's."""

CURVES = """\
CURVES_PNG = os.path.join(FIGURES, "loss_curves.png")
drawn = plot.plot_runs(list(RUNS.values()), CURVES_PNG, metrics=("ce", "eval/uniform_avg"), labels=list(RUNS),
                       title=f"train and validation CE on {GRAMMAR}", overwrite=True)
display(Image(CURVES_PNG))
FINAL_VALIDATION_CE = {name: drawn["eval/uniform_avg"][name][1][-1] for name in RUNS}
for name, ce in FINAL_VALIDATION_CE.items():
  print(f"{name:5s} validation CE {ce:.4f}  gap to the true entropy {ce - TRUE_ENTROPY:+.4f} nats/token")"""

HELD_OUT = """\
# Held-out documents for the analyses: a stream from another seed than the training corpus's (train.seed = 0),
# cut into seq_len-token documents and written as JSONL text, the format the analysis tools read.
HELD_OUT_PATH = os.path.join(RUN_ROOT, "held_out.jsonl")
held_out = grammar.sample_stream(held_out_docs * seq_len, seed=1234).reshape(held_out_docs, seq_len)
with open(HELD_OUT_PATH, "w") as f:
  for document in held_out:
    f.write(json.dumps({"text": grammar.decode(document)}) + "\\n")
print(f"{held_out_docs} documents of {seq_len} tokens in {HELD_OUT_PATH}")"""

KE_INTRO = """\
## 3. Knowledge entropy over checkpoints

Knowledge entropy (Kim et al., 2024) sums, over layers, the entropy of how the FFN's coefficient magnitude is spread
over its units on a document set (`python -m maxlm.analyze knowledge-entropy --checkpoint RUN@all`). **What to look
for:** it falls as training goes on: the model comes to rely on fewer units. The right panel shows the last
checkpoint's per-layer entropy against its maximum, ln(units)."""

KE = """\
KE_DIR = os.path.join(RUN_ROOT, "knowledge_entropy")
ke_results = knowledge_entropy.knowledge_entropy_series([f"{RUNS[KE_RUN]}@all"], HELD_OUT_PATH, seq_len=seq_len,
                                                        batch_size=16, progress=False)
ke_report = knowledge_entropy.write_outputs(ke_results, "valid", KE_DIR, overwrite=True)  # a rerun replaces its own
display(Image(os.path.join(KE_DIR, "knowledge_entropy.png")))
for r in ke_results:
  print(f"{KE_RUN} step {r.step:4d}: knowledge entropy {r.knowledge_entropy:.4f}")"""

TOKENS_INTRO = """\
## 4. Token difficulty: frequent, medium and rare tokens

Token types are sorted by their count in the training corpus and bucketed by cumulative share of occurrences:
frequent (the first 80%), medium (the next 15%), rare (the last 5%). Per bucket: mean CE and mean predictive entropy
on the held-out documents (`python -m maxlm.analyze token-difficulty`). **What to look for:** rare tokens are the
hardest for every run. MiLe up-weights tokens whose prediction is uncertain and EMO spreads the loss over similar
tokens, so compare their rare-bucket CE with CE's."""

TOKENS = """\
TOKENS_DIR = os.path.join(RUN_ROOT, "token_difficulty")
os.makedirs(TOKENS_DIR, exist_ok=True)
# The training corpus is the first PCFG_TOKENS tokens of the grammar's stream for train.seed: count them.
COUNTS_PATH = os.path.join(TOKENS_DIR, "train_counts.npy")
train_tokens = grammar.sample_stream(PCFG_TOKENS, seed=CONFIGS["ce"].train.seed)
np.save(COUNTS_PATH, np.bincount(train_tokens, minlength=grammar.vocab_size))
difficulty = token_difficulty.token_difficulty(list(RUNS.values()), HELD_OUT_PATH, COUNTS_PATH, seq_len=seq_len,
                                               log=lambda message: None)
with open(os.path.join(TOKENS_DIR, "token_difficulty.json"), "w") as f:
  json.dump(difficulty, f, indent=2)
token_difficulty.plot(difficulty, os.path.join(TOKENS_DIR, "token_difficulty.png"), overwrite=True)
display(Image(os.path.join(TOKENS_DIR, "token_difficulty.png")))
BUCKET_CE = {}
for name, result in zip(RUNS, difficulty["checkpoints"]):
  BUCKET_CE[name] = {bucket: cells["ce"] for bucket, cells in result["buckets"].items()}
  print(f"{name:5s} " + "  ".join(f"{bucket} {ce:.3f}" for bucket, ce in BUCKET_CE[name].items()))"""

SAMPLES_INTRO = """\
## 5. Generated sentences

Each run continues a few prompts until it ends the sentence (`<eos>`), sampling at temperature 1 with a fixed seed
(`python -m maxlm.generate --checkpoint RUN --prompt TEXT --temperature 1`). The grammar can tell whether a sentence
is one it derives. **What to look for:** the longer a run trains, the more of its sentences are grammatical."""

SAMPLES = """\
PROMPTS = ["the", "alice sees", "my old dog", "later"]
SAMPLES_DIR = os.path.join(RUN_ROOT, "samples")


def grammatical(ids: list[int]) -> bool:
  \"\"\"Whether the grammar derives the sentence (the unknown-word token, or ids past the grammar's, never are).\"\"\"
  if not ids or min(ids) < 1 or max(ids) >= grammar.unknown_id:
    return False
  return bool(np.isfinite(grammar.sentence_logprob(ids)))


SAMPLES = {}
for name, run_dir in RUNS.items():
  records = generate.generate(run_dir, PROMPTS, max_new_tokens=32, sampling=generate.Sampling(temperature=1.0),
                              output=os.path.join(SAMPLES_DIR, f"{name}.jsonl"), log=lambda message: None)
  SAMPLES[name] = []
  for r in records:
    ok = grammatical(grammar.encode(r["prompt"]) + r["completion_ids"])
    SAMPLES[name].append({"prompt": r["prompt"], "completion": r["completion"], "grammatical": ok})
    print(f"{name:5s} {'ok ' if ok else '-- '} {r['prompt']} |{r['completion']}")"""

SUMMARY_INTRO = """\
## Results

Everything above is also on disk: `summary.json` collects the numbers, and the command-line tools named in each
section reproduce any figure from the run directories."""

SUMMARY = """\
summary = {
    "small": SMALL, "steps": steps, "grammar": GRAMMAR, "true_entropy": TRUE_ENTROPY, "runs": RUNS,
    "final_validation_ce": FINAL_VALIDATION_CE,
    "knowledge_entropy": {"run": KE_RUN, "series": [{"step": r.step, "knowledge_entropy": r.knowledge_entropy}
                                                    for r in ke_results]},
    "token_difficulty_ce": BUCKET_CE,
    "grammatical_samples": {name: sum(s["grammatical"] for s in samples) / len(samples)
                            for name, samples in SAMPLES.items()},
    "figures": {"loss_curves": CURVES_PNG, "knowledge_entropy": os.path.join(KE_DIR, "knowledge_entropy.png"),
                "token_difficulty": os.path.join(TOKENS_DIR, "token_difficulty.png")},
}
with open(os.path.join(RUN_ROOT, "summary.json"), "w") as f:
  json.dump(summary, f, indent=2)
print(json.dumps({k: summary[k] for k in ("final_validation_ce", "token_difficulty_ce", "grammatical_samples")},
                 indent=2))
print("wrote", os.path.join(RUN_ROOT, "summary.json"))"""

# (kind, source, tags): the notebook top to bottom.
CELLS = (
    ("markdown", INTRO, ()),
    ("code", INSTALL, ()),
    ("markdown", PARAMETERS_INTRO, ()),
    ("code", PARAMETERS, ("parameters",)),
    ("code", SETUP, ()),
    ("markdown", TRAIN_INTRO, ()),
    ("code", TRAIN, ()),
    ("markdown", CURVES_INTRO, ()),
    ("code", CURVES, ()),
    ("code", HELD_OUT, ()),
    ("markdown", KE_INTRO, ()),
    ("code", KE, ()),
    ("markdown", TOKENS_INTRO, ()),
    ("code", TOKENS, ()),
    ("markdown", SAMPLES_INTRO, ()),
    ("code", SAMPLES, ()),
    ("markdown", SUMMARY_INTRO, ()),
    ("code", SUMMARY, ()),
)


def build() -> nbformat.NotebookNode:
  """The quickstart notebook, no outputs, with stable cell ids (so a regenerated file diffs only where code did)."""
  nb = nbformat.v4.new_notebook()
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  for i, (kind, source, tags) in enumerate(CELLS):
    make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
    cell = make(source, id=f"cell-{i:02d}")
    if tags:
      cell.metadata["tags"] = list(tags)
    nb.cells.append(cell)
  nbformat.validate(nb)
  return nb


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--check", action="store_true", help="compare with the committed notebook instead of writing it")
  args = p.parse_args(argv)
  text = nbformat.writes(build()) + "\n"
  if args.check:
    with open(NOTEBOOK, encoding="utf-8") as f:
      same = f.read() == text
    print(f"{NOTEBOOK} {'matches' if same else 'differs from'} {os.path.basename(__file__)}")
    return 0 if same else 1
  with open(NOTEBOOK, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {NOTEBOOK}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
