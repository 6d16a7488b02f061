import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.layers import GDN


def _random_params(module, x, rng):
  params = module.init(jax.random.PRNGKey(0), x)["params"]
  # Move away from the identity-like initial values so the test is not trivial.
  k1, k2 = jax.random.split(rng)
  return {"beta": params["beta"] + jax.random.uniform(k1, params["beta"].shape),
          "gamma": params["gamma"] + 0.3 * jax.random.uniform(k2, params["gamma"].shape)}


def test_gdn_matches_formula():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4, 6))
  module = GDN()
  params = _random_params(module, x, jax.random.PRNGKey(2))
  y = module.apply({"params": params}, x)
  beta = params["beta"] ** 2 - 2.0**-36
  gamma = params["gamma"] ** 2 - 2.0**-36
  xn = np.asarray(x, np.float64)
  expected = np.empty_like(xn)
  for i in range(6):
    norm = beta[i] + sum(gamma[i, j] * xn[..., j] ** 2 for j in range(6))
    expected[..., i] = xn[..., i] / np.sqrt(norm)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_inverse_gdn_multiplies_by_norm():
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 3, 3, 4))
  forward, inverse = GDN(), GDN(inverse=True)
  params = _random_params(forward, x, jax.random.PRNGKey(4))
  y = forward.apply({"params": params}, x)
  x_back = inverse.apply({"params": params}, x)
  # Same parameters: GDN divides and IGDN multiplies by the same norm.
  np.testing.assert_allclose(np.asarray(y) * np.asarray(x_back), np.asarray(x) ** 2,
                             rtol=1e-5, atol=1e-6)


def test_gdn_parameters_stay_nonnegative_under_negative_storage():
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 2, 2, 3))
  module = GDN()
  params = module.init(jax.random.PRNGKey(0), x)["params"]
  params = {"beta": -jnp.ones(3), "gamma": -jnp.ones((3, 3))}
  y = module.apply({"params": params}, x)
  assert np.all(np.isfinite(y))
  # beta is clamped at its minimum (1e-6), gamma at 0: y ~ x / 1e-3.
  np.testing.assert_allclose(y, np.asarray(x) / np.sqrt(1e-6), rtol=1e-3)


def test_lower_bound_gradient_recovers_parameters():
  x = jnp.ones((1, 1, 1, 2))
  module = GDN()
  params = {"beta": -jnp.ones(2), "gamma": jnp.zeros((2, 2))}
  # Loss that wants a larger beta: gradient must flow despite the clamp.
  grad = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x)))(params)
  assert np.all(np.asarray(grad["beta"]) != 0)
