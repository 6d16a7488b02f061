"""Asymmetric Gaussian conditional (G-VAE, Cui et al. 2021): two scales around mu.

With v = y - mu, left scale a = sigma_left and right scale b = sigma_right,
the density is two half-Gaussians joined at the mean,

  p(v) = 2 / (a + b) * phi(v / a)   for v < 0
  p(v) = 2 / (a + b) * phi(v / b)   for v >= 0,     phi = the N(0, 1) density,

i.e. the half-Gaussian of each side weighted w_left = 2a / (a + b) and
w_right = 2b / (a + b). It integrates to 1 and is continuous at the mean, and
with a = b it is N(0, a^2). Its CDF is

  F(v) = w_left * Phi(v / a)               for v <= 0
  F(v) = 1 - w_right * Phi(-v / b)         for v >= 0.

The likelihood of the quantisation bin [v - 1/2, v + 1/2] is the sum of the
mass of its part left of the mean and its part right of it:

  left  = w_left  * (Phi(min(v + 1/2, 0) / a) - Phi(min(v - 1/2, 0) / a))
  right = w_right * (Phi(-max(v - 1/2, 0) / b) - Phi(-max(v + 1/2, 0) / b))

A bin entirely left of the mean is a difference of two lower-tail CDF values
and a bin entirely right of it one of two upper-tail values (Phi(-x)), so
neither subtracts numbers close to 1 and the tails keep their relative
accuracy (as gaussian.likelihood does with |v|); the bin that straddles the
mean gets both halves, each at most 1/2, with no cancellation either.

Coding uses integer tables with one row per (left scale, right scale) pair of
the symmetric scale table (see `pair_rows` and gvae_jax.coding.export).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from gvae_jax.entropy import gaussian


def _bin_mass(values, scale_left, scale_right, phi, xp):
  """The bin likelihood above, for any array namespace xp and N(0, 1) CDF phi."""
  total = scale_left + scale_right
  w_left = 2.0 * scale_left / total
  w_right = 2.0 * scale_right / total
  upper = values + 0.5
  lower = values - 0.5
  left = w_left * (phi(xp.minimum(upper, 0.0) / scale_left)
                   - phi(xp.minimum(lower, 0.0) / scale_left))
  right = w_right * (phi(-xp.maximum(lower, 0.0) / scale_right)
                     - phi(-xp.maximum(upper, 0.0) / scale_right))
  return left + right


def likelihood(values: jax.Array, scale_left: jax.Array, scale_right: jax.Array) -> jax.Array:
  """P(v - 1/2 < V < v + 1/2) for the asymmetric Gaussian V (module doc), v = y - mean."""
  return _bin_mass(values, scale_left, scale_right, jax.scipy.special.ndtr, jnp)


def log_likelihood(values: jax.Array, scale_left: jax.Array,
                   scale_right: jax.Array) -> jax.Array:
  """Natural log of `likelihood`, stable in the tails.

  A bin entirely on one side of the mean is log(w) plus that half-Gaussian's
  log interval mass (gaussian.log_interval_mass); the bin that straddles the
  mean holds at least ~1e-4 of the mass for table scales, so its two halves
  are summed directly. Each branch sees safe inputs where it is not used.
  """
  values = jnp.asarray(values, jnp.float32)
  total = scale_left + scale_right
  upper = values + 0.5
  lower = values - 0.5
  left_side = upper <= 0.0
  right_side = lower >= 0.0
  straddles = ~(left_side | right_side)
  log_left = jnp.log(2.0 * scale_left / total) + gaussian.log_interval_mass(
      lower / scale_left, upper / scale_left)
  log_right = jnp.log(2.0 * scale_right / total) + gaussian.log_interval_mass(
      lower / scale_right, upper / scale_right)
  centre = jnp.log(likelihood(jnp.where(straddles, values, 0.0), scale_left, scale_right))
  return jnp.where(left_side, log_left, jnp.where(right_side, log_right, centre))


def likelihood_np(values: np.ndarray, scale_left: np.ndarray,
                  scale_right: np.ndarray) -> np.ndarray:
  """The same in float64 numpy (scipy's ndtr): what the integer tables are built from."""
  values = np.asarray(values, np.float64)
  return _bin_mass(values, np.asarray(scale_left, np.float64),
                   np.asarray(scale_right, np.float64), special.ndtr, np)


def pair_rows(left_row: jax.Array, right_row: jax.Array, levels: int) -> jax.Array:
  """Row of the pair table for (left scale row, right scale row): left * levels + right."""
  return (left_row * levels + right_row).astype(jnp.int32)
