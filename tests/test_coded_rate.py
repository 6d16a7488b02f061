"""coded_rate: the bits the range coder pays, against the likelihood and the real coder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gvae_jax.coding import coder, varint
from gvae_jax.entropy import asymmetric_gaussian, coded_rate, gaussian
from gvae_jax.models import GainedMeanScaleHyperprior


def test_in_range_equals_minus_log2_likelihood():
  scale = jnp.full((7,), 3.0)
  v = jnp.asarray([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
  want = -np.log2(np.asarray(gaussian.likelihood(v, scale)))
  np.testing.assert_allclose(coded_rate.symmetric_bits(v, scale), want, rtol=1e-5)
  want_a = -np.asarray(asymmetric_gaussian.log_likelihood(v, scale, 2 * scale)) / np.log(2)
  np.testing.assert_allclose(coded_rate.asymmetric_bits(v, scale, 2 * scale), want_a, rtol=1e-5)


def test_escape_pays_tail_and_varint():
  scale = jnp.asarray([0.5, 0.5, 0.5])
  half = int(coded_rate.half_widths(np.asarray(gaussian.scale_table()))[
      int(gaussian.scale_to_index(jnp.asarray(0.5), gaussian.scale_table()))])
  v = jnp.asarray([half + 1.0, half + 200.0, -(half + 1.0)])
  bits = np.asarray(coded_rate.symmetric_bits(v, scale))
  # The likelihood is far below 2^-16 there, so the in-range floor would say 16 bits;
  # an escape pays the escape symbol (<= 16 bits) plus 1 or 2 varint bytes.
  assert 8 < bits[0] <= 16 + 8 and bits[1] == pytest.approx(bits[0] + 8, abs=1e-3)
  assert bits[2] == pytest.approx(bits[0], abs=1e-3)
  likelihood_bits = -np.log2(np.asarray(gaussian.likelihood(v, scale), np.float64) + 1e-300)
  assert np.all(bits < likelihood_bits)


def test_gradients_are_finite():
  v = jnp.linspace(-40, 40, 81)
  g = jax.grad(lambda s: jnp.sum(coded_rate.symmetric_bits(v, s)))(jnp.full((81,), 0.3))
  ga = jax.grad(lambda s: jnp.sum(coded_rate.asymmetric_bits(v, s, 2 * s)))(jnp.full((81,), 0.3))
  assert np.all(np.isfinite(g)) and np.all(np.isfinite(ga))


@pytest.mark.parametrize("entropy_model", ["symmetric", "asymmetric"])
def test_coded_model_rate_is_finite_and_close(entropy_model):
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 32, 3))
  out = {}
  for y_rate in ("likelihood", "coded"):
    model = GainedMeanScaleHyperprior(n=8, m=8, levels=2, y_rate=y_rate,
                                      entropy_model=entropy_model)
    variables = model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)))
    out[y_rate] = float(model.apply(variables, x, jnp.zeros((1,)))["bits_y"][0])
  assert np.isfinite(out["coded"]) and out["coded"] > 0
  # An untrained model's y stays inside its rows, where both rates agree.
  assert out["coded"] == pytest.approx(out["likelihood"], rel=1e-4)


def test_bad_y_rate_is_refused():
  model = GainedMeanScaleHyperprior(n=8, m=8, levels=2, y_rate="exact")
  with pytest.raises(ValueError, match="y_rate"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))


def test_escape_pricing_stays_in_step_with_the_coder():
  """coded_rate restates coder.escape_codes and varint's byte count in jnp (entropy sits
  below coding); this ties the two copies together on every value float32 holds exactly
  (|v| < 2**24, up to 4-byte varints), far beyond any latent a model produces."""
  half_left, half_right = 7, 11
  lengths = half_left + half_right + 1
  magnitudes = np.unique(np.concatenate([np.arange(1, 300), 2 ** np.arange(6, 24) - 1,
                                         2 ** np.arange(6, 24) - half_right - 1]))
  values = np.concatenate([half_right + magnitudes, -half_left - magnitudes]).astype(np.float64)
  zero = jnp.zeros(values.shape)  # log_p = log_escape = 0: only the varint bits remain
  bits = np.asarray(coded_rate._coded_bits(jnp.asarray(values), zero, zero, half_left,
                                           half_right, 16))
  codes = coder.escape_codes(values.astype(np.int64) + half_left, np.full(values.shape, lengths))
  want = np.asarray([8 * len(varint.encode([int(c)])) for c in codes], np.float64)
  np.testing.assert_array_equal(bits, want)
