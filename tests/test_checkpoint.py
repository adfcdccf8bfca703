"""Checkpointer: save/restore round trips (optimizer and data state included), retention, bad input, and
restoring onto a different device count (8 simulated CPU devices in a subprocess)."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxlm.checkpoint import params as ckpt_params
from maxlm import pretrained
from maxlm import model
from maxlm.checkpoint import checkpointer as checkpoint
from maxlm.core.config import CheckpointConfig, load_config
from maxlm.core.errors import CheckpointError

TINY = ["model.layers=2", "model.hidden=32", "model.heads=4", "model.kv_heads=2", "model.ffn=64",
        "model.vocab_size=61", "train.seq_len=16", "train.global_batch=4"]


def tiny_state(cfg, seed=0):
  params = model.init_params(cfg.model, seed)
  opt = optax.adamw(1e-3)
  opt_state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(7)}


def abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def cfg():
  return load_config("demo", TINY)


def test_round_trip_with_optimizer_and_data_state(tmp_path, cfg):
  state = tiny_state(cfg)
  state["cost_embedding"] = np.arange(61 * 8, dtype=np.float32).reshape(61, 8)
  data_state = {"epoch": 1, "position": np.int64(12345), "grain": b"\x00\x01binary", "nested": {"a": [1, 2]}}
  with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig(every=5, async_save=True)) as ckpt:
    assert ckpt.save(7, state, data_state=data_state, config=cfg) is False  # off schedule
    assert ckpt.save(10, state, data_state=data_state, config=cfg) is True
    ckpt.wait()
    assert ckpt.steps() == [10]
    restored, restored_data = ckpt.restore(abstract(state))
  assert_trees_equal(restored, state)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert restored_data == {"epoch": 1, "position": 12345, "grain": b"\x00\x01binary", "nested": {"a": [1, 2]}}
  loaded_cfg, params, extras = pretrained.load_params(str(tmp_path))
  assert loaded_cfg.to_dict() == cfg.to_dict()
  assert_trees_equal(params, state["params"])
  np.testing.assert_array_equal(extras["cost_embedding"], state["cost_embedding"])


def test_retention_keeps_last_and_every_kth(tmp_path, cfg):
  state = {"params": {"w": jnp.ones((3,))}, "step": jnp.int32(0)}
  ckpt = checkpoint.Checkpointer(str(tmp_path), CheckpointConfig(every=2, keep_last=2, keep_every=4,
                                                                 async_save=False))
  for step in range(1, 13):
    ckpt.save(step, state, data_state=None, config=cfg)
  ckpt.save(13, state, data_state=None, config=cfg, force=True)  # e.g. the final step or SIGTERM
  assert ckpt.save(13, state, data_state=None, config=cfg, force=True) is False  # already there
  ckpt.close()
  assert checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()).steps() == [4, 8, 12, 13]


def test_missing_dir_and_missing_step(tmp_path, cfg):
  with pytest.raises(CheckpointError, match="does not exist"):
    pretrained.load_params(str(tmp_path / "nope"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="holds no 'checkpoints/'"):
    pretrained.load_params(str(tmp_path / "empty"))
  (tmp_path / "empty" / "config.json").write_text("{}")  # what transformers' save_pretrained leaves
  with pytest.raises(CheckpointError, match="is a Hugging Face model directory, not a maxlm run; import it first "
                                            "with `python -m maxlm.convert from-hf"):
    pretrained.load_params(str(tmp_path / "empty"))
  state = {"params": {"w": jnp.ones((3,))}}
  with checkpoint.Checkpointer(str(tmp_path / "run"), CheckpointConfig(every=1, async_save=False)) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, state, data_state=None, config=cfg)
    with pytest.raises(CheckpointError, match="available steps: 1, 2, 3"):
      ckpt.restore(abstract(state), step=5)
  with pytest.raises(CheckpointError, match="available steps: 1, 2, 3"):
    pretrained.load_params(str(tmp_path / "run"), step=9)


def test_shape_and_structure_mismatch_is_explained(tmp_path, cfg):
  state = tiny_state(cfg)
  with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig(every=1, async_save=False)) as ckpt:
    ckpt.save(1, state, data_state=None, config=cfg)
    wider = tiny_state(load_config("demo", TINY + ["model.ffn=96"]))
    with pytest.raises(CheckpointError, match=r"shape mismatch: params/layers/down_proj: run \(2, 96, 32\)"):
      ckpt.restore(abstract(wider))
    extra = dict(state, cost_embedding=np.zeros((61, 8), np.float32))
    with pytest.raises(CheckpointError, match="missing from the checkpoint: cost_embedding"):
      ckpt.restore(abstract(extra))


def test_params_only_checkpoint_says_use_init_from(tmp_path, cfg):
  state = tiny_state(cfg)
  ckpt_params.save_params(str(tmp_path), cfg, state["params"])
  with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ckpt:
    with pytest.raises(CheckpointError, match="checkpoint.init_from"):
      ckpt.restore(abstract(state))
  with pytest.raises(CheckpointError, match="already holds step 0"):
    ckpt_params.save_params(str(tmp_path), cfg, state["params"])


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path, cfg):
  state = tiny_state(cfg)
  with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig(every=1, async_save=False)) as ckpt:
    ckpt.save(1, state, data_state=None, config=cfg)
    ckpt.save(2, state, data_state=None, config=cfg)
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  data_files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs if os.sep + "d" + os.sep in
                os.path.join(r, f) + os.sep or os.path.basename(r) == "d"]
  assert data_files
  for f in data_files:
    os.remove(f)
  with pytest.raises(CheckpointError, match="step 2 .*corrupt or partially deleted.*Other steps: 1"):
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ckpt:
      ckpt.restore(abstract(state))
  shutil.rmtree(tmp_path / "checkpoints" / "1" / "state")
  with pytest.raises(CheckpointError, match="incomplete: its 'state' item is missing"):
    pretrained.load_params(str(tmp_path), step=1)


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path, cfg):
  state = tiny_state(cfg)
  with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig(every=1, async_save=False)) as ckpt:
    ckpt.save(1, state, data_state={"i": 1}, config=cfg)
  # What a kill mid-save leaves: orbax writes into a temporary directory and renames it only when complete.
  shutil.copytree(tmp_path / "checkpoints" / "1", tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234")
  os.remove(tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234" / "state" / "_METADATA")
  with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ckpt:
    assert ckpt.steps() == [1]
    restored, data_state = ckpt.restore(abstract(state))
  assert data_state == {"i": 1}
  assert_trees_equal(restored, state)


def reshard(path, n, mode, step):
  """Saves or restores sharded params + optimizer state on an (1, n/2, 2) mesh of the current process."""
  from maxlm.core import sharding  # pylint: disable=import-outside-toplevel
  assert len(jax.devices()) == n
  cfg = load_config("demo", TINY + ["model.vocab_size=64", f"mesh.fsdp={max(n // 2, 1)}",
                                    f"mesh.tensor={2 if n > 1 else 1}"], num_devices=n)
  mesh = sharding.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
  _, _, specs = model.abstract_model(cfg.model)
  p_shard = sharding.named_shardings(specs, mesh)
  opt = optax.adamw(1e-3)

  def init():
    params = model.init_params(cfg.model, 0)
    opt_state = opt.init(params)
    _, opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    return {"params": params, "opt_state": opt_state}

  shapes = jax.eval_shape(init)
  # Optimizer moments share their parameter's sharding; scalars are replicated.
  o_shard = optax.tree_map_params(opt, lambda _, s: s, shapes["opt_state"], p_shard,
                                  transform_non_params=lambda _: sharding.replicated(mesh))
  shards = {"params": p_shard, "opt_state": o_shard}
  abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards)
  with checkpoint.Checkpointer(path, CheckpointConfig(every=1, async_save=True)) as ckpt:
    if mode == "save":
      state = jax.jit(init, out_shardings=shards)()
      assert len(state["params"]["layers"]["q_proj"].sharding.device_set) == n
      ckpt.save(step, state, data_state={"devices": n}, config=cfg)
      ckpt.wait()
      return None
    state, data_state = ckpt.restore(abstract_state, step=step)
  q = state["params"]["layers"]["q_proj"]
  assert len(q.sharding.device_set) == n and q.sharding == abstract_state["params"]["layers"]["q_proj"].sharding
  assert_trees_equal(state, jax.jit(init)())
  return data_state


SUBPROCESS = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before jax is imported
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from test_checkpoint import reshard
print("restored", reshard(sys.argv[2], 8, sys.argv[3], int(sys.argv[4])))
"""


def _on_8_devices(path, mode, step):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SUBPROCESS, os.path.abspath(__file__), str(path), mode, str(step)],
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_restore_onto_a_different_device_count(tmp_path):
  assert len(jax.devices()) == 1
  _on_8_devices(tmp_path, "save", 1)
  assert reshard(str(tmp_path), 1, "restore", 1) == {"devices": 8}
  reshard(str(tmp_path), 1, "save", 2)
  assert "restored {'devices': 1}" in _on_8_devices(tmp_path, "restore", 2)
