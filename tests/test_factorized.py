import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.entropy import DeepFactorized


def _init(channels, seed=0):
  module = DeepFactorized(channels)
  x = jnp.zeros((1, 1, 1, channels))
  return module, module.init(jax.random.PRNGKey(seed), x)


def test_density_sums_to_one_over_integers():
  module, variables = _init(4)
  grid = jnp.arange(-400.0, 401.0)[:, None] * jnp.ones((1, 4))
  pmf = module.apply(variables, grid)
  np.testing.assert_allclose(np.sum(np.asarray(pmf, np.float64), axis=0), 1.0, atol=1e-4)


def test_density_sums_to_one_after_random_perturbation():
  module, variables = _init(3, seed=1)
  noisy = jax.tree_util.tree_map(
      lambda p: p + 0.5 * jax.random.normal(jax.random.PRNGKey(7), p.shape), variables)
  grid = jnp.arange(-2000.0, 2001.0)[:, None] * jnp.ones((1, 3))
  pmf = module.apply(noisy, grid)
  np.testing.assert_allclose(np.sum(np.asarray(pmf, np.float64), axis=0), 1.0, atol=1e-3)


def test_cdf_is_monotone():
  module, variables = _init(2)
  x = jnp.linspace(-50, 50, 1001)[:, None] * jnp.ones((1, 2))
  logits = module.apply(variables, x, method=DeepFactorized.logits_cdf)
  assert np.all(np.diff(np.asarray(logits), axis=0) > 0)


def test_tail_likelihood_has_no_cancellation():
  module, variables = _init(1)
  x = jnp.array([[150.0], [300.0], [-300.0]])
  p = np.asarray(module.apply(variables, x), np.float64)[:, 0]
  logits = lambda v: np.asarray(
      module.apply(variables, v, method=DeepFactorized.logits_cdf), np.float64)[:, 0]
  upper, lower = logits(x + 0.5), logits(x - 0.5)
  # Reference in float64, from the tail side: exact up to float32 logits.
  sig = lambda t: 1.0 / (1.0 + np.exp(-t))
  sign = -np.sign(upper + lower)
  reference = np.abs(sig(sign * upper) - sig(sign * lower))
  assert np.all(p > 0)
  np.testing.assert_allclose(p, reference, rtol=1e-3)
