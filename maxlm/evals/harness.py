"""lm-evaluation-harness on a checkpoint: its Hugging Face export (cached per step under the run), or an HF directory
as it is."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from typing import Optional

from maxlm.checkpoint.checkpointer import checkpoint_dir
from maxlm.checkpoint.params import open_checkpoints
from maxlm.checkpoint.spec import default_output, is_hf_dir, one_checkpoint
from maxlm.core.errors import CheckpointError, DataError, MaxlmError
from maxlm.core.outputs import check_file, write_text

COMMAND = "maxlm.evaluate harness"


def export_cached(checkpoint_path: str, step: Optional[int] = None, *, dtype: str = "float32", log=print) -> str:
  """The HF export of a step under RUN_DIR/hf/step_N, written once (atomically) and reused afterwards."""
  from maxlm.hf.export import to_hf  # pylint: disable=import-outside-toplevel  (torch-free, still heavy)
  ckpt = open_checkpoints(checkpoint_path)
  try:
    step = ckpt.resolve_step(step)
  finally:
    ckpt.close()
  run_dir = os.path.dirname(checkpoint_dir(checkpoint_path))
  out = os.path.join(run_dir, "hf", f"step_{step}_{dtype}")
  marker = os.path.join(out, "maxlm_export.json")
  if os.path.isfile(marker):
    log(f"using the cached export {out}")
    return out
  return to_hf(checkpoint_path, out, step=step, dtype=dtype, overwrite=True, log=log)


@contextlib.contextmanager
def quiet_git_hash():
  """lm-eval records `git describe --always` of the working directory in its results and lets git print "fatal: not a
  git repository" outside one (lm_eval.evaluator.get_git_commit_hash): the same call, git's stderr discarded."""
  from lm_eval import evaluator  # pylint: disable=import-outside-toplevel

  def git_hash():
    try:
      out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True, timeout=30)
    except (subprocess.SubprocessError, OSError):
      return None
    return out.stdout.strip() or None

  original = getattr(evaluator, "get_git_commit_hash", None)
  evaluator.get_git_commit_hash = git_hash
  try:
    yield
  finally:
    if original is not None:
      evaluator.get_git_commit_hash = original


def harness(checkpoint_path: str, tasks: list[str], *, step: Optional[int] = None, num_fewshot: Optional[int] = None,
            limit: Optional[float] = None, batch_size: int = 1, device: str = "cpu", dtype: str = "float32",
            include_path: Optional[str] = None, output: Optional[str] = None, overwrite: bool = False,
            log=print) -> dict:
  """Runs lm-evaluation-harness (model 'hf') on the exported checkpoint; saves the results JSON in the run dir
  (`output`: a new file, or with `overwrite` an earlier output of the harness)."""
  if batch_size < 1:
    raise DataError(f"--batch-size {batch_size} must be >= 1")
  if output is not None:
    output = check_file(output, COMMAND, overwrite=overwrite)
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel
    from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise MaxlmError("lm-evaluation-harness is not installed: pip install 'maxlm[eval]'") from None
  from maxlm.core.paths import tokenizer_file_in  # pylint: disable=import-outside-toplevel
  path, step = one_checkpoint(checkpoint_path, step)
  if is_hf_dir(os.path.expanduser(path)):  # already what lm-eval's hf model reads
    if step is not None:
      raise CheckpointError(f"{checkpoint_path}: a Hugging Face directory has no steps; drop the step")
    hf_dir = os.path.abspath(os.path.expanduser(path))
    if not tokenizer_file_in(hf_dir):
      raise MaxlmError(f"{hf_dir} has no tokenizer.json or tokenizer.model, which the harness needs to tokenize "
                       "its tasks; save the model's tokenizer into it (tokenizer.save_pretrained)")
  else:
    hf_dir = export_cached(path, step, dtype=dtype, log=log)
    with open(os.path.join(hf_dir, "maxlm_export.json")) as f:
      step = json.load(f)["step"]
    if not tokenizer_file_in(hf_dir):
      raise MaxlmError(f"the export {hf_dir} has no tokenizer (the run names none); set data.tokenizer in the "
                       "run's config so the harness can tokenize its tasks")
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise MaxlmError(f"unknown lm-eval task(s) {', '.join(unknown)}; pass --include-path DIR for local YAML tasks")
  try:
    with quiet_git_hash():
      results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": hf_dir, "dtype": dtype},
                                        tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size,
                                        device=device, limit=limit, task_manager=manager, log_samples=False)
  except (ConnectionError, OSError) as e:  # the datasets library on a machine without the task's data or network
    raise DataError(f"lm-evaluation-harness could not load the data of {', '.join(tasks)}: {e}. Fetch the datasets "
                    "into the Hugging Face cache where a network is available (HF_DATASETS_CACHE), or write a local "
                    "task (a YAML with dataset_path: json and local data_files) and pass --include-path") from None
  if results is None:  # non-primary ranks of a distributed harness run
    return {}
  summary = {"checkpoint": os.path.abspath(path), "step": step, "hf_dir": hf_dir, "tasks": tasks,
             "num_fewshot": num_fewshot, "limit": limit, "results": results.get("results", {}),
             "versions": results.get("versions", {}), "n-samples": results.get("n-samples", {}),
             "config": results.get("config", {})}
  if output is None:
    output, overwrite = default_output(checkpoint_path, step, "harness", "_".join(tasks)), True
  output = write_text(output, COMMAND, json.dumps(summary, indent=2, default=str), overwrite=overwrite)
  for task, metrics in summary["results"].items():
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    log(f"{task}: {shown}")
  log(f"wrote {output}")
  summary["output"] = output
  return summary


# ----------------------------------------------------------------------------- CLI
