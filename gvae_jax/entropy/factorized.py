"""Deep factorized density for the hyper latent z (Balle et al. 2018, appendix 6.1).

The math is in plain functions of a parameter dict; `DeepFactorized` is a thin
Flax wrapper that owns the parameters.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Mapping[str, jax.Array]


def logits_cdf(params: Params, x: jax.Array, num_layers: int) -> jax.Array:
  """Logit of the cumulative distribution of each channel at x.

  x: [..., C] (channels last). The function is monotone in x per channel, which
  is what makes tail search by bisection valid.
  """
  lead = x.shape[:-1]
  c = x.shape[-1]
  # [C, 1, L]: a column vector per channel, evaluated at L positions.
  h = jnp.reshape(jnp.moveaxis(x, -1, 0), (c, 1, -1))
  for i in range(num_layers):
    matrix = jax.nn.softplus(params[f"matrix_{i}"])
    h = jnp.matmul(matrix, h) + params[f"bias_{i}"]
    if i < num_layers - 1:
      h = h + jnp.tanh(params[f"factor_{i}"]) * jnp.tanh(h)
  return jnp.moveaxis(jnp.reshape(h, (c,) + lead), 0, -1)


def interval_likelihood(params: Params, x: jax.Array, num_layers: int) -> jax.Array:
  """P(x - 1/2 < Z < x + 1/2) per element, computed in the tail-stable form.

  Subtracting sigmoids on the side where they are small avoids cancellation
  when the interval lies in the upper tail.
  """
  lower = logits_cdf(params, x - 0.5, num_layers)
  upper = logits_cdf(params, x + 0.5, num_layers)
  sign = -jnp.sign(lower + upper)
  sign = jax.lax.stop_gradient(jnp.where(sign == 0, 1.0, sign))
  return jnp.abs(jax.nn.sigmoid(sign * upper) - jax.nn.sigmoid(sign * lower))


class DeepFactorized(nn.Module):
  """A learned univariate density per channel, evaluated on unit-width bins."""

  channels: int
  filters: Sequence[int] = (3, 3, 3)
  init_scale: float = 10.0

  def setup(self):
    dims = (1,) + tuple(self.filters) + (1,)
    scale = self.init_scale ** (1.0 / (len(self.filters) + 1))
    c = self.channels
    params = {}
    for i in range(len(dims) - 1):
      init_value = float(np.log(np.expm1(1.0 / scale / dims[i + 1])))
      params[f"matrix_{i}"] = self.param(
          f"matrix_{i}", nn.initializers.constant(init_value), (c, dims[i + 1], dims[i]))
      params[f"bias_{i}"] = self.param(
          f"bias_{i}", nn.initializers.uniform(scale=1.0), (c, dims[i + 1], 1))
      if i < len(dims) - 2:
        params[f"factor_{i}"] = self.param(
            f"factor_{i}", nn.initializers.zeros, (c, dims[i + 1], 1))
    # uniform(scale=1) draws from [0, 1); centre the biases on zero.
    params = {k: (v - 0.5 if k.startswith("bias") else v) for k, v in params.items()}
    self._params = params
    self._num_layers = len(dims) - 1

  def logits_cdf(self, x: jax.Array) -> jax.Array:
    return logits_cdf(self._params, x, self._num_layers)

  def likelihood(self, x: jax.Array) -> jax.Array:
    return interval_likelihood(self._params, x, self._num_layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.likelihood(x)
