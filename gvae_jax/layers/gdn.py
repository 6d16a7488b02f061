"""Generalized divisive normalization (Balle et al. 2016) as a Flax module."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gvae_jax.ops import lower_bound

# Parameters are stored as p with value = max(p, sqrt(min + pedestal))**2 - pedestal,
# which keeps beta and gamma non-negative and gives well-scaled gradients near 0.
_PEDESTAL = 2.0**-36


def _nonneg(p: jax.Array, minimum: float) -> jax.Array:
  bound = (minimum + _PEDESTAL) ** 0.5
  return lower_bound(p, bound) ** 2 - _PEDESTAL


def _nonneg_init(value: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.maximum(value + _PEDESTAL, _PEDESTAL))


class GDN(nn.Module):
  """y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2); inverse: x_i * sqrt(...).

  Channels last. `inverse=True` gives IGDN for synthesis transforms.
  """

  inverse: bool = False
  beta_min: float = 1e-6
  gamma_init: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    beta_p = self.param("beta", lambda _, c: _nonneg_init(jnp.ones((c,))), channels)
    gamma_p = self.param(
        "gamma", lambda _, c: _nonneg_init(self.gamma_init * jnp.eye(c)), channels)
    beta = _nonneg(beta_p, self.beta_min)
    gamma = _nonneg(gamma_p, 0.0)
    # gamma[i, j]: weight of input channel j in the norm of output channel i.
    norm = jnp.einsum("...j,ij->...i", x * x, gamma) + beta
    return x * jnp.sqrt(norm) if self.inverse else x * jax.lax.rsqrt(norm)
