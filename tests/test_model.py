"""The decoder against a direct numpy float64 forward of the LLaMA / OLMo-v1 equations."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from maxlm import model as model_lib
from maxlm.core.config import load_config
from helpers import model_config as _cfg, numpy_forward


@pytest.mark.parametrize("extra", [
    {},
    {"tie_embeddings": "true"},
    {"family": "olmo", "tie_embeddings": "true", "clip_qkv": 0.5},
    {"kv_heads": 4, "head_dim": 16},
])
def test_logits_match_numpy_float64(extra):
  cfg = _cfg(**extra)
  graphdef, _, _ = model_lib.abstract_model(cfg)
  params = model_lib.init_params(cfg, seed=3)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12))
  got = np.asarray(model_lib.bind(graphdef, params).logits(jnp.asarray(tokens)))
  want = numpy_forward(cfg, params, tokens)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_document_masking_isolates_segments():
  cfg = _cfg()
  graphdef, _, _ = model_lib.abstract_model(cfg)
  params = model_lib.init_params(cfg, seed=1)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, 10))
  segments = np.array([[0] * 4 + [1] * 6])
  got = np.asarray(model_lib.bind(graphdef, params).logits(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(segments)))
  np.testing.assert_allclose(got, numpy_forward(cfg, params, tokens, segments), rtol=2e-4, atol=2e-4)
  # the second document does not see the first: changing the first document leaves it unchanged
  other = tokens.copy()
  other[0, :4] = (other[0, :4] + 1) % cfg.vocab_size
  got2 = np.asarray(model_lib.bind(graphdef, params).logits(jnp.asarray(other), segment_ids_BxT=jnp.asarray(segments)))
  np.testing.assert_allclose(got2[0, 4:], got[0, 4:], rtol=1e-6, atol=1e-6)
  assert np.abs(got2[0, :4] - got[0, :4]).max() > 1e-3


# The demo preset (and so _cfg) unrolls its scan (scan_unroll 4 >= 2 layers); unroll 1 is the rolled loop of the
# large presets.
@pytest.mark.parametrize("remat,scan,unroll", [("full", "true", 1), ("none", "true", 1),
                                               pytest.param("dots", "false", 1, marks=pytest.mark.slow)])
def test_remat_and_scan_do_not_change_values_or_gradients(remat, scan, unroll):
  base = _cfg()
  other = _cfg(remat=remat, scan_layers=scan, scan_unroll=unroll)
  g1, _, _ = model_lib.abstract_model(base)
  g2, _, _ = model_lib.abstract_model(other)
  params = model_lib.init_params(base, seed=2)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, base.vocab_size, size=(2, 8)))

  def loss(graphdef, p):
    return jnp.mean(model_lib.bind(graphdef, p).logits(tokens) ** 2)

  v1, gr1 = jax.value_and_grad(lambda p: loss(g1, p))(params)
  v2, gr2 = jax.value_and_grad(lambda p: loss(g2, p))(params)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gr1), jax.tree.leaves(gr2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_preset_parameter_counts_match_the_mile_paper():
  counts = {name: model_lib.param_count(model_lib.abstract_model(load_config(name).model)[1])
            for name in ("mile_468m", "mile_1b", "mile_7b")}
  assert round(counts["mile_468m"] / 1e6, 1) == 468.2
  assert round(counts["mile_1b"] / 1e9, 3) == 1.205
  assert round(counts["mile_7b"] / 1e9, 2) == 6.74


def test_weights_carry_logical_axes_for_every_dimension():
  _, abstract, specs = model_lib.abstract_model(_cfg())
  flat_a = jax.tree_util.tree_leaves_with_path(abstract)
  flat_s = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  for path, leaf in flat_a:
    spec = flat_s[path]
    assert len(spec) == leaf.ndim and all(a is not None for a in spec), (path, spec)


def test_ffn_coefficients_are_the_down_projection_inputs():
  """The per-layer |silu(gate) * up| that knowledge entropy sums (seed 002) comes out of the scanned forward."""
  cfg = _cfg()
  graphdef, _, _ = model_lib.abstract_model(cfg)
  params = model_lib.init_params(cfg, seed=4)
  tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 9))
  _, coeffs = model_lib.bind(graphdef, params)(jnp.asarray(tokens), return_ffn_coefficients=True,
                                                compute_dtype="float32")
  want = []
  numpy_forward(cfg, params, tokens, coefficients=want)
  assert coeffs.shape == (cfg.layers, 2, 9, cfg.ffn)
  np.testing.assert_allclose(np.asarray(coeffs), np.stack(want), rtol=2e-4, atol=2e-5)


def test_rope_matches_rotate_half_in_float64():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 5, 3, 8))
  positions = np.array([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
  cos, sin = model_lib.rope_tables(jnp.asarray(positions), 8, 10000.0)
  got = np.asarray(model_lib.apply_rope(jnp.asarray(x, jnp.float32), cos, sin))
  inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
  ang = np.concatenate([positions[..., None] * inv] * 2, -1)[:, :, None, :]
  rotated = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  np.testing.assert_allclose(got, x * np.cos(ang) + rotated * np.sin(ang), rtol=1e-5, atol=1e-5)
