"""Error-bound (tau) conditioned 1x1 convolution for the bias-correction head.

out = conv1x1(x) * softplus(Linear(onehot(tau))) + Linear(onehot(tau)),
tau in 1..max_tau; larger tau reuse the max_tau branch (docs/decoding.md section 3).
With zero_init the layer outputs exactly 0 at initialisation (conv and shift
start at zero), for heads that learn a correction added to another output.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class TauConditionalConv(nn.Module):
  features: int
  max_tau: int = 5
  zero_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, tau: jax.Array) -> jax.Array:
    """x [B, H, W, C]; tau [B] integers >= 1 (clipped to max_tau)."""
    onehot = jax.nn.one_hot(jnp.clip(tau, 1, self.max_tau) - 1, self.max_tau)
    zeros = {"kernel_init": nn.initializers.zeros} if self.zero_init else {}
    scale = jax.nn.softplus(nn.Dense(self.features, name="scale")(onehot))
    shift = nn.Dense(self.features, name="shift", **zeros)(onehot)
    y = nn.Conv(self.features, (1, 1), name="conv", **zeros)(x)
    return y * scale[:, None, None, :] + shift[:, None, None, :]
