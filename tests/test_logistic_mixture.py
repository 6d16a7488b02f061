import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gvae_jax.entropy import logistic_mixture as lm


def _random_params(shape, k, share, seed=0):
  raw = jax.random.normal(jax.random.PRNGKey(seed), shape + (lm.num_raw_params(k, share),))
  raw = raw.at[..., :].multiply(2.0)
  return lm.split_params(raw, k, share)


@pytest.mark.parametrize("tau", [0, 1, 2, 5])
@pytest.mark.parametrize("share", [True, False])
def test_probabilities_over_the_range_sum_to_one(tau, share):
  params = _random_params((4,), 5, share)
  b = 2 * tau + 1
  low, high = -30 * b, 30 * b
  support = jnp.arange(low, high + 1, b, dtype=jnp.float32)
  context = jnp.asarray(np.random.default_rng(1).integers(-20, 20, (4, 3)), jnp.float32)
  means = lm.conditional_means(params, context)
  # Every channel, every pixel: sum over the support.
  values = jnp.broadcast_to(support[:, None, None], (support.size, 4, 3))
  logp = jax.vmap(lambda v: lm.log_prob(v, params, means, lm.bin_half_width(tau), low, high))(values)
  total = np.exp(np.asarray(logp, np.float64)).sum(0)
  np.testing.assert_allclose(total, 1.0, atol=2e-4)


def test_channel_autoregression_uses_earlier_channels_only():
  params = _random_params((1,), 3, False)
  means = lambda ctx: lm.conditional_means(params, jnp.asarray([ctx]))[0]
  # Blue of the context never influences any mean; red's mean ignores the context.
  np.testing.assert_allclose(means([1.0, 2.0, 3.0]), means([1.0, 2.0, -50.0]), atol=1e-6)
  np.testing.assert_allclose(means([7.0, 2.0, 3.0])[0], means([1.0, 2.0, 3.0])[0])
  assert not np.allclose(means([7.0, 2.0, 3.0])[1], means([1.0, 2.0, 3.0])[1])


@pytest.mark.parametrize("tau", [0, 1, 2, 3, 5, 10])
def test_quantizer_error_bound_and_grid(tau):
  r = jnp.arange(-255, 256, dtype=jnp.float32)
  r_hat = lm.quantize_residual(r, tau)
  assert float(jnp.max(jnp.abs(r - r_hat))) <= tau
  np.testing.assert_array_equal(np.asarray(r_hat) % (2 * tau + 1), 0)
  if tau == 0:
    np.testing.assert_array_equal(r_hat, r)


def test_tiny_bins_use_the_stable_midpoint_rule():
  params = lm.split_params(jnp.zeros((1, lm.num_raw_params(1, True))), 1, True)
  params["log_scales"] = jnp.full_like(params["log_scales"], -3.0)
  means = lm.conditional_means(params, jnp.zeros((1, 3)))
  logp = lm.log_prob(jnp.full((1, 3), 4.0), params, means, 0.5, -255, 255)
  assert np.all(np.isfinite(logp)) and np.all(np.asarray(logp) < -20)
