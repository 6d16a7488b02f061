"""Causal (masked) convolutions for the residual context model.

Decoding order (DLPR, Bai et al. 2024): inside a patch, pixel (i, j) is
decoded at step a*i + j. A kernel tap at offset (di, dj) may only see pixels
decoded at an earlier step, i.e. a*di + dj < 0. With a > kernel_size // 2
this is the usual raster-order type-A mask (all rows above, left of centre
in the current row); a = 2 drops the two taps up-right that a wavefront of
slope 2 has not reached yet, which makes ~190 steps per 64x64 patch
instead of 4096.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def causal_mask(kernel_size: int, order: int) -> np.ndarray:
  """Boolean [k, k] mask of the taps decoded before the centre (a*di + dj < 0)."""
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be odd, got {kernel_size}")
  if order < 1:
    raise ValueError(f"decoding-order parameter a must be >= 1, got {order}")
  half = kernel_size // 2
  di, dj = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1), indexing="ij")
  return order * di + dj < 0


def decoding_steps(height: int, width: int, order: int) -> int:
  """Number of steps to decode an height x width patch: a*(h-1) + (w-1) + 1."""
  return order * (height - 1) + width


def step_of_pixel(height: int, width: int, order: int) -> np.ndarray:
  """[h, w] int array: the step at which each pixel of a patch is decoded."""
  i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return order * i + j


class MaskedConv(nn.Module):
  """A 2-D convolution whose kernel only sees already decoded pixels.

  The mask is spatial: every input channel of a neighbouring pixel is
  visible; channels of the centre pixel are handled by the mixture's channel
  autoregression instead.
  """

  features: int
  kernel_size: int = 5
  order: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mask = jnp.asarray(causal_mask(k, self.order), kernel.dtype)[:, :, None, None]
    y = jax.lax.conv_general_dilated(
        x, kernel * mask, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias

  def taps(self) -> tuple[np.ndarray, jax.Array, jax.Array]:
    """(offsets [T, 2], masked kernel weights [T, C_in, C_out], bias): the form the
    step-wise decoder uses to compute features only at the pixels of one step."""
    mask = causal_mask(self.kernel_size, self.order)
    half = self.kernel_size // 2
    offsets = np.argwhere(mask) - half
    kernel = self.variables["params"]["kernel"]
    weights = kernel[mask]
    return offsets, weights, self.variables["params"]["bias"]
