"""Config loading: presets, overrides, and errors that say what to change (in-process and through the CLI)."""

import subprocess
import sys

import pytest
import yaml

from maxlm.core.config import load_config, mesh_shape, save_config, config_from_dict, preset_names
from maxlm.core.errors import ConfigError


def test_every_preset_loads_and_validates():
  names = preset_names()
  for required in ("demo", "mile_468m", "mile_1b", "mile_7b", "ce_468m", "ce_1b", "ce_7b", "focal_1b", "emo_7b"):
    assert required in names
  for name in names:
    cfg = load_config(name)
    assert cfg.train.seq_len <= cfg.model.max_positions


def test_presets_carry_the_mile_recipe():
  cfg = load_config("mile_7b")
  assert (cfg.model.hidden, cfg.model.layers, cfg.model.heads, cfg.model.ffn) == (4096, 32, 32, 11008)
  assert (cfg.train.global_batch, cfg.train.seq_len, cfg.train.steps) == (2048, 2048, 25000)
  assert (cfg.loss.objective, cfg.loss.gamma) == ("mile", 1.0)
  o = cfg.optim
  assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip, o.warmup_steps) == (3e-4, 0.9, 0.95, 1e-8, 0.1, 1.0, 2000)
  assert load_config("ce_1b").loss.objective == "ce" and load_config("focal_1b").loss.objective == "focal"
  assert load_config("mile_1b").model.head_dim == 256


def test_overrides_are_typed_and_applied():
  cfg = load_config("demo", ["train.steps=7", "optim.warmup_steps=2", "optim.lr=1e-3", "loss.emo_clamp=null",
                             "data.weights.ArXiv=0.5"])
  assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.loss.emo_clamp is None
  assert cfg.data.weights == {"ArXiv": 0.5}


@pytest.mark.parametrize("override,fragment", [
    ("train.stpes=3", "did you mean 'train.steps'"),
    ("trian.steps=3", "did you mean 'train'"),
    ("train.steps=abc", "must be of type int"),
    ("loss.objective=mle", "is not one of ce, mile"),
    ("train.seq_len=4096", "exceeds model.max_positions"),
    ("model.heads=5", "not divisible by model.heads"),
    ("loss.reduction=reference", "applies to loss.objective = 'mile' only"),
    ("loss.ignore_index=0", "mark positions without a target with -100"),
])
def test_bad_values_name_the_problem(override, fragment):
  extra = ["loss.objective=ce"] if "reduction" in override else []
  with pytest.raises(ConfigError, match=None) as info:
    load_config("demo", extra + [override])
  assert fragment in str(info.value), str(info.value)


def test_mesh_fill_and_mismatch():
  cfg = load_config("demo")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, -1, 2
  assert mesh_shape(cfg.mesh, 8) == (2, 2, 2)
  cfg.mesh.fsdp = 3
  with pytest.raises(ConfigError, match="product is 8"):
    mesh_shape(cfg.mesh, 8)
  with pytest.raises(ConfigError, match="divisible by mesh.tensor"):
    load_config("demo", ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=3", "model.heads=4"], num_devices=3)


def test_inherit_chain_and_user_yaml(tmp_path):
  path = tmp_path / "mine.yaml"
  path.write_text(yaml.safe_dump({"inherit": "mile_1b", "train": {"steps": 11}, "optim": {"warmup_steps": 1}}))
  cfg = load_config(str(path))
  assert cfg.model.hidden == 2048 and cfg.loss.objective == "mile" and cfg.train.steps == 11
  (tmp_path / "bad.yaml").write_text("model:\n  hiden: 3\n")
  with pytest.raises(ConfigError, match=r"model.hiden.*bad.yaml.*did you mean 'model.hidden'"):
    load_config(str(tmp_path / "bad.yaml"))


def test_saved_config_round_trips(tmp_path):
  cfg = load_config("emo_7b", ["loss.emo_clamp=null"])
  save_config(cfg, str(tmp_path / "config.yaml"))
  again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
  assert again.to_dict() == cfg.to_dict()


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "maxlm.train", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_exit_nonzero_without_traceback():
  out = _cli("--config=demo", "train.stpes=3", "--dry-run")
  assert out.returncode == 2
  assert "unknown config key 'train.stpes'" in out.stderr and "did you mean 'train.steps'" in out.stderr
  assert "Traceback" not in out.stderr
  out = _cli("--config=demo", "mesh.data=2", "mesh.fsdp=1", "--dry-run")
  assert out.returncode == 2 and "devices are present" in out.stderr
  out = _cli("--config=nosuch")
  assert out.returncode == 2 and "unknown preset 'nosuch'" in out.stderr
  out = _cli("--config=demo", "train.steps=3", "train.steps=4", "--dry-run")
  assert out.returncode == 2 and "train.steps is set twice on the command line" in out.stderr


def test_dry_run_7b_on_this_machine():
  out = _cli("--config=mile_7b", "--dry-run", "--devices=128", "mesh.data=16", "mesh.fsdp=8")
  assert out.returncode == 0, out.stderr
  assert "6,738,415,616 parameters" in out.stdout and "data=16 fsdp=8 tensor=1" in out.stdout
  assert "total" in out.stdout


def test_base_yaml_documents_exactly_the_schema_defaults():
  """configs/base.yaml is the readable list of every key; the schema in maxlm/config.py is the one source of
  defaults. The two must not drift apart."""
  import importlib.resources
  from maxlm.core.config import Config
  base = yaml.safe_load((importlib.resources.files("maxlm.configs") / "base.yaml").read_text())
  assert base == Config().to_dict()


def test_choices_come_from_the_schema_literals():
  from maxlm.core.config import choices
  assert choices("loss.objective") == ("ce", "mile", "focal", "emo", "mixce", "tvd")
  assert "splash" in choices("model.attention") and "sft" in choices("data.source")
  with pytest.raises(ConfigError, match=r"loss.emo_mode = 3 \(from override 'loss.emo_mode=3'\) is not one of 1, 2"):
    load_config("demo", ["loss.emo_mode=3"])
  assert load_config("demo", ["lora.targets=q,k,o", "checkpoint.init_from=x"]).lora.targets == ["q", "k", "o"]


def test_a_mesh_axis_used_twice_is_a_contract_violation():
  from maxlm.core import sharding
  assert sharding.logical_to_spec(("vocab", "embed")) == sharding.P("tensor", "fsdp")
  with pytest.raises(ValueError, match="mesh axis 'tensor' would shard both 'vocab' and 'mlp'"):
    sharding.logical_to_spec(("vocab", "mlp"))


def test_the_checkout_root_does_not_shadow_installed_packages_of_the_same_name():
  """`python -m ...` from the repository root puts it on sys.path, where kernels/ would hide Hugging Face's
  `kernels` (transformers and peft import it): the bare names resolve elsewhere, the maxlm.* names stay maxlm's."""
  import os  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import importlib, sys\n"
          "for name in ('kernels', 'data_pipelines', 'configs'):\n"
          "  try:\n"
          "    module = importlib.import_module(name)\n"
          "  except ModuleNotFoundError:\n"
          "    continue\n"
          "  assert not module.__file__.startswith(sys.argv[1]), module.__file__\n"
          "import maxlm.kernels, maxlm.data_pipelines, maxlm.configs\n"
          "assert maxlm.kernels.fused_loss and maxlm.data_pipelines.prepare\n"
          "print('ok')")
  out = subprocess.run([sys.executable, "-c", code, os.path.join(root, "")], cwd=root, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_gs_run_dir_is_kept_as_a_url_and_s3_is_refused_in_one_line():
  """gs:// run directories are written through maxlm.core.files (tests/test_object_store.py), never a local folder
  named gs:; s3:// has no lock with preconditions here and is refused."""
  assert load_config("demo", ["run.dir=gs://bucket/run"]).run.dir == "gs://bucket/run"
  with pytest.raises(ConfigError, match="run directories on s3:// are not supported"):
    load_config("demo", ["run.dir=s3://bucket/run"])
