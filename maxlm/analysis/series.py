"""One checkpoint or a series of them (`RUN@all`) for the tools that score a checkpoint and report numbers
(hessian-trace, probe): each checkpoint scored in turn, the numbers per step in one JSON, a plot of them over steps.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from maxlm import pretrained
from maxlm.errors import DataError


def over_checkpoints(spec: str, score: Callable[[str], dict], log=print) -> dict:
  """score(spec) for one checkpoint; for RUN@all {"checkpoint": spec, "results": [score(RUN@STEP), ...]}."""
  specs = pretrained.expand(spec)
  if len(specs) == 1:
    return score(specs[0])
  results = []
  for i, one in enumerate(specs, 1):
    log(f"maxlm: checkpoint {i} of {len(specs)}: {one}")
    results.append(score(one))
  return {"checkpoint": spec, "results": results}


def report(checkpoint: str, output: str, score: Callable[[str], dict], line: Callable[[dict], str], plot: dict
           ) -> dict:
  """A tool's CLI over one checkpoint or RUN@all: the JSON at `output`, a line per checkpoint, and for a series
  OUTPUT.png of plot["key"] over the steps (plot: plot_over_steps' keyword arguments)."""
  from maxlm.analysis.hessian import write_json  # pylint: disable=import-outside-toplevel
  if os.path.isdir(output):
    raise DataError(f"--output {output} is a directory; give a JSON file name")
  out = over_checkpoints(checkpoint, score)
  write_json(output, out)
  for r in out.get("results", [out]):
    print(f"{r['checkpoint']}: {line(r)}")
  if "results" in out:
    plot_over_steps(out["results"], path=os.path.splitext(output)[0] + ".png", **plot)
  print(f"wrote {output}")
  return out


def plot_over_steps(results: list[dict], *, key: str, path: str, ylabel: str, err_key: Optional[str] = None,
                    baseline_key: Optional[str] = None) -> str:
  """results[i][key] against results[i]["step"] (error bars from err_key, a dashed baseline from baseline_key)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  steps = [r["step"] for r in results]
  fig, ax = plt.subplots(figsize=(6, 4))
  errors = [r.get(err_key) or 0.0 for r in results] if err_key else None
  ax.errorbar(steps, [r[key] for r in results], yerr=errors, marker="o", capsize=3, label=key)
  if baseline_key:
    ax.plot(steps, [r[baseline_key] for r in results], linestyle="--", color="gray", label=baseline_key)
    ax.legend(fontsize=8)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(f"{ylabel} over checkpoints", fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
