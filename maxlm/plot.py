"""`python -m maxlm.plot RUN_DIR [RUN_DIR ...] --output FILE.png`: curves of chosen metrics of several runs on shared
axes (x = step or tokens), with the data's true entropy as a floor line when the runs know it (PCFG corpora).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from maxlm.core.errors import DataError, cli_description, cli_exit_code
from maxlm.core.outputs import atomic_file, check_file
from maxlm.run.trackers import read_metrics

COMMAND = "maxlm.plot"
DEFAULT_METRICS = ("ce", "eval/uniform_avg")
# Metrics in nats per token: the ones the entropy floor is drawn against.
PER_TOKEN = ("loss", "ce", "entropy")


def run_series(run_dir: str, metric: str, x: str = "step") -> tuple[list[float], list[float]]:
  """(x values, metric values) of one run, in step order (the last record of a step wins)."""
  records = read_metrics(run_dir)
  by_step = {r["step"]: r[metric] for r in records if metric in r}
  if not by_step:
    return [], []
  steps = sorted(by_step)
  if x == "tokens":
    import yaml  # pylint: disable=import-outside-toplevel
    with open(os.path.join(run_dir, "config.yaml")) as f:
      train = yaml.safe_load(f)["train"]
    per_step = train["global_batch"] * train["seq_len"]
    return [s * per_step for s in steps], [by_step[s] for s in steps]
  return [float(s) for s in steps], [by_step[s] for s in steps]


def grammar_of(run_dir: str) -> Optional[str]:
  """The PCFG grammar a run trained on (data.grammar), or None when its data is not a PCFG."""
  path = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(path):
    return None
  import yaml  # pylint: disable=import-outside-toplevel
  with open(path) as f:
    data = (yaml.safe_load(f) or {}).get("data", {})
  return data.get("grammar", "builtin:demo") if data.get("source") == "pcfg" else None


def true_entropy(run_dir: str) -> Optional[float]:
  """The per-token entropy of a run's training data when it is known (a PCFG grammar), else None."""
  grammar = grammar_of(run_dir)
  if grammar is None:
    return None
  from maxlm.data_pipelines.pcfg import grammar_entropy  # pylint: disable=import-outside-toplevel
  return grammar_entropy(grammar).entropy_per_token


def png_path(output: str) -> str:
  """The file a plot goes to: OUTPUT itself, OUTPUT/curves.png for an existing directory or a name ending in a path
  separator (created), OUTPUT.png when it has no extension (what matplotlib would write anyway, named so that the
  message says the truth). An extension matplotlib cannot write (x.jsonl) is a DataError."""
  if os.path.isdir(output) or output.endswith((os.sep, "/")):
    return os.path.join(output, "curves.png")
  ext = os.path.splitext(output)[1]
  if not ext:
    return output + ".png"
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  formats = FigureCanvasAgg.get_supported_filetypes()
  if ext[1:].lower() not in formats:
    raise DataError(f"--output {output}: matplotlib cannot write a {ext} file; give a name ending in .png (or "
                    f"{', '.join('.' + f for f in sorted(formats) if f != 'png')})")
  return output


def run_name(run_dir: str) -> str:
  return os.path.basename(os.path.normpath(run_dir))


def plot_runs(run_dirs: list[str], output: str, *, metrics: tuple[str, ...] = DEFAULT_METRICS, x: str = "step",
              labels: Optional[list[str]] = None, title: str = "", overwrite: bool = False) -> dict:
  """Draws one panel per metric, one curve per run; returns {metric: {label: (xs, ys)}, "floor": value|None,
  "floor_label": its legend entry (naming the runs and grammar it belongs to unless every run shares it),
  "output": the image written (a new file, or with `overwrite` an earlier plot)}."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  for d in run_dirs:
    if not os.path.isdir(d):
      raise DataError(f"run directory {d!r} does not exist")
  output = check_file(png_path(output), COMMAND, overwrite=overwrite)
  labels = labels or [run_name(d) for d in run_dirs]
  entropies = {label: true_entropy(d) for d, label in zip(run_dirs, labels)}
  known = {label: f for label, f in entropies.items() if f is not None}
  floors = set(known.values())
  floor = next(iter(floors)) if len(floors) == 1 else None  # runs on different data share no floor
  # Whose floor it is, when not every run on the panel has it (another corpus, or grammars of the same entropy).
  grammars = {label: grammar_of(d) for d, label in zip(run_dirs, labels) if label in known}
  floor_label = None if floor is None else (
      f"true entropy {floor:.3f}" if len(known) == len(labels) and len(set(grammars.values())) == 1
      else f"true entropy {floor:.3f} ({', '.join(f'{k}: {v}' for k, v in grammars.items())})")
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
  drawn: dict = {"floor": floor, "floor_label": floor_label}
  for ax, metric in zip(axes[0], metrics):
    drawn[metric] = {}
    for d, label in zip(run_dirs, labels):
      xs, ys = run_series(d, metric, x)
      if xs:
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        drawn[metric][label] = (xs, ys)
    if floor is not None and (metric in PER_TOKEN or metric.startswith("eval/")):
      ax.axhline(floor, color="black", linestyle="--", linewidth=1, label=floor_label)
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel(f"{metric} (nats/token)" if metric in PER_TOKEN or metric.startswith("eval/") else metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  if not any(drawn[m] for m in metrics):
    plt.close(fig)
    raise DataError(f"none of the runs logged {', '.join(metrics)}; pick metrics from their metrics.jsonl")
  for m in metrics:
    if not drawn[m]:
      print(f"maxlm: warning: no run logged {m!r}; its panel is empty", file=sys.stderr)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  try:
    with atomic_file(output, COMMAND, overwrite=overwrite) as tmp:
      fig.savefig(tmp, format=os.path.splitext(output)[1][1:].lower(), dpi=110)
  finally:
    plt.close(fig)
  drawn["output"] = output
  return drawn


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m maxlm.plot", description=cli_description(__doc__))
  p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (holding metrics.jsonl)")
  p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                 help="comma-separated metrics.jsonl keys, one panel each (default: ce,eval/uniform_avg)")
  p.add_argument("--x", choices=["step", "tokens"], default="step", help="x axis: optimizer steps or tokens seen")
  p.add_argument("--labels", default="", help="comma-separated curve labels (default: the run directory names)")
  p.add_argument("--title", default="", help="figure title")
  p.add_argument("--output", required=True, help="PNG file to write, a new file (a directory: DIR/curves.png)")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it is an earlier plot")
  args = p.parse_args(argv)

  def body():
    labels = [s for s in args.labels.split(",") if s] or None
    if labels and len(labels) != len(args.runs):
      raise DataError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    drawn = plot_runs(args.runs, args.output, metrics=tuple(m for m in args.metrics.split(",") if m), x=args.x,
                      labels=labels, title=args.title, overwrite=args.overwrite)
    print(f"wrote {drawn['output']}")

  return cli_exit_code(body)


if __name__ == "__main__":
  sys.exit(main())
