import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gvae_jax import gain


@pytest.fixture
def table():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.uniform(0.2, 5.0, size=(5, 7)), jnp.float32)


@pytest.mark.parametrize("mode", gain.INTERPOLATIONS)
def test_integer_rates_return_trained_rows(table, mode):
  s = jnp.arange(5, dtype=jnp.float32)
  np.testing.assert_array_equal(gain.interpolate(table, s, mode), table)


def test_exponential_is_geometric_and_monotone_between_rows(table):
  s = jnp.linspace(1.0, 2.0, 101)
  g = np.asarray(gain.interpolate(table, s, "exponential"))
  lo, hi = np.asarray(table[1]), np.asarray(table[2])
  expected = lo ** (1 - np.asarray(s)[:, None]+1) * hi ** (np.asarray(s)[:, None]-1)
  np.testing.assert_allclose(g, expected, rtol=1e-5)
  diffs = np.diff(g, axis=0)
  rising = hi > lo
  assert np.all(diffs[:, rising] >= 0) and np.all(diffs[:, ~rising] <= 0)


def test_product_of_gain_and_inverse_is_preserved():
  # If G_i * G'_i is the same constant at every level, exponential interpolation keeps it.
  g = jnp.asarray([[0.5, 2.0], [1.5, 4.0], [3.0, 8.0]])
  inv = 3.0 / g
  s = jnp.asarray([0.3, 1.7, 0.99])
  prod = gain.interpolate(g, s) * gain.interpolate(inv, s)
  np.testing.assert_allclose(prod, 3.0, rtol=1e-5)


def test_rates_are_clipped_to_the_trained_range(table):
  g = gain.interpolate(table, jnp.asarray([-1.0, 9.0]))
  np.testing.assert_array_equal(g, table[jnp.asarray([0, 4])])


@pytest.mark.parametrize("param", gain.PARAMETERIZATIONS)
def test_parameterizations_round_trip_init(param):
  rows = gain.lambda_init_rows([0.01, 0.04, 0.16])
  module = gain.GainTable(3, 4, tuple(rows), param)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1,)))
  out = module.apply(variables, jnp.asarray([0.0, 1.0, 2.0]))
  np.testing.assert_allclose(out[:, 0, 0, 0], rows, rtol=1e-5)
  np.testing.assert_allclose(rows[1:] / rows[:-1], 2.0, rtol=1e-6)  # sqrt(lambda ratio)


def test_unknown_options_are_refused(table):
  with pytest.raises(ValueError, match="interpolation"):
    gain.interpolate(table, jnp.zeros(1), "cubic")
  with pytest.raises(ValueError, match="parameterization"):
    gain.to_positive(table, "square")
