import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gvae_jax.layers import MaskedConv, causal_mask, decoding_steps, step_of_pixel


@pytest.mark.parametrize("k, a", [(5, 2), (7, 2), (5, 3), (7, 1), (5, 5)])
def test_output_depends_only_on_earlier_steps(k, a):
  h, w = 9, 11
  conv = MaskedConv(4, k, a)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, h, w, 3))
  variables = conv.init(jax.random.PRNGKey(1), x)
  base = conv.apply(variables, x)
  steps = step_of_pixel(h, w, a)
  for (i, j) in [(4, 5), (0, 0), (8, 10), (3, 9)]:
    changed = conv.apply(variables, x.at[0, i, j].add(10.0))
    moved = np.any(np.abs(np.asarray(changed - base))[0] > 1e-6, axis=-1)
    # Only pixels decoded strictly after (i, j) may see it.
    assert np.all(steps[moved] > steps[i, j])


def test_raster_order_is_type_a_mask():
  mask = causal_mask(5, 3)
  expected = np.zeros((5, 5), bool)
  expected[:2] = True
  expected[2, :2] = True
  np.testing.assert_array_equal(mask, expected)


def test_dlpr_schedule_length():
  assert decoding_steps(64, 64, 2) == 190
  # 24 raster taps, minus the two up-right ones not reached yet, plus (+1, -3)
  # one row down, which the slope-2 wavefront has already decoded.
  assert causal_mask(7, 2).sum() == 23


def test_taps_reproduce_the_convolution_at_one_pixel():
  conv = MaskedConv(6, 7, 2)
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 12, 12, 3))
  variables = conv.init(jax.random.PRNGKey(3), x)
  full = conv.apply(variables, x)
  offsets, weights, bias = conv.apply(variables, method=MaskedConv.taps)
  padded = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  i, j = 5, 7
  gathered = jnp.stack([padded[0, i + 3 + di, j + 3 + dj] for di, dj in offsets])
  value = jnp.einsum("tc,tcf->f", gathered, weights) + bias
  np.testing.assert_allclose(value, full[0, i, j], rtol=1e-5, atol=1e-5)


def test_bad_parameters_are_refused():
  with pytest.raises(ValueError):
    causal_mask(4, 2)
  with pytest.raises(ValueError):
    causal_mask(5, 0)
