"""`python -m maxlm.plot` draws the logged curves of several runs (with the PCFG entropy floor), and
run.profile_steps writes a jax.profiler trace of exactly those steps."""

import glob
import os

import pytest

from maxlm import plot, train
from maxlm.core.config import load_config
from maxlm.data_pipelines.pcfg import grammar_entropy
from maxlm.run.trackers import read_metrics

TINY = ["model.vocab_size=384", "model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2",
        "model.ffn=64", "model.max_positions=32", "model.compute_dtype=float32", "model.remat=none",
        "train.seq_len=16", "train.global_batch=8", "optim.warmup_steps=1", "run.progress=false",
        "run.tensorboard=false", "run.log_every=1", "checkpoint.enabled=false", "run.eval_every=2",
        "run.eval_batches=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("plot_runs")
  dirs = []
  for objective in ("ce", "mile"):
    d = str(root / objective)
    train.train(load_config("demo", TINY + [f"run.dir={d}", "train.steps=4", f"loss.objective={objective}"]),
                verbose=False)
    dirs.append(d)
  return dirs


def test_plot_draws_every_runs_logged_values_and_the_entropy_floor(runs, tmp_path):
  out = str(tmp_path / "curves.png")
  drawn = plot.plot_runs(runs, out, metrics=("ce", "eval/uniform_avg"))
  image = __import__("matplotlib.image", fromlist=["imread"]).imread(out)
  assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 500
  assert drawn["floor"] == pytest.approx(grammar_entropy("builtin:demo").entropy_per_token)
  for d, label in zip(runs, ("ce", "mile")):
    records = read_metrics(d)
    xs, ys = drawn["ce"][label]
    assert xs == [r["step"] for r in records if "ce" in r] and ys == [r["ce"] for r in records if "ce" in r]
    assert drawn["eval/uniform_avg"][label][0] == [2.0, 4.0]
  tokens = plot.plot_runs(runs, out, metrics=("loss",), x="tokens", overwrite=True)  # its own earlier plot
  assert tokens["loss"]["ce"][0] == [s * 8 * 16 for s in (1, 2, 3, 4)]


def test_plot_cli_and_its_errors(runs, tmp_path, capsys):
  out = tmp_path / "cli.png"
  assert plot.main([*runs, "--metrics", "loss,lr", "--labels", "a,b", "--output", str(out)]) == 0
  assert out.stat().st_size > 1000
  assert plot.main([runs[0], "--metrics", "no_such_metric", "--output", str(tmp_path / "new.png")]) == 2
  assert "none of the runs logged no_such_metric" in capsys.readouterr().err
  assert plot.main([str(tmp_path / "missing"), "--output", str(tmp_path / "new.png")]) == 2
  assert plot.main([runs[0], "--output", str(out)]) == 2  # its earlier plot, replaced only when asked
  assert "already exists" in capsys.readouterr().err
  assert plot.main([runs[0], "--output", str(out), "--overwrite"]) == 0
  # The message names the file written: a directory gets curves.png, a name without an extension gets .png.
  capsys.readouterr()
  assert plot.main([runs[0], "--output", str(tmp_path)]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}" and (tmp_path / "curves.png").is_file()
  assert plot.main([runs[0], "--output", str(tmp_path / "bare")]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'bare.png'}" and (tmp_path / "bare.png").is_file()
  new_dir = os.path.join(tmp_path, "plots", "")  # a directory that does not exist yet, named with a trailing slash
  assert plot.main([runs[0], "--output", new_dir]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {new_dir}curves.png" and os.listdir(new_dir) == ["curves.png"]


def test_profile_steps_write_a_trace(tmp_path):
  run_dir = tmp_path / "r"
  train.train(load_config("demo", TINY + [f"run.dir={run_dir}", "train.steps=4", "run.profile_steps=1:3",
                                          "run.eval_batches=0"]), verbose=False)
  traces = glob.glob(str(run_dir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
