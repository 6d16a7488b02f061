"""Image distortion metrics on NHWC batches: MSE, PSNR and MS-SSIM.

Every metric reduces over the last three axes (H, W, C) and returns one value
per example, so an input of shape [B, H, W, C] gives [B]. Integer inputs are
cast to float32 first (uint8 differences would otherwise wrap around); values
are never rescaled, so pass max_value=255 for 0..255 data.

`ms_ssim` reproduces tf.image.ssim_multiscale (TF 2.17) in pure JAX, including
its padding between scales and the relu before the per-scale powers, so
numbers are comparable with papers and tools that use TF. It is jittable and
differentiable and can serve as a training distortion (1 - MS-SSIM).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Wang, Simoncelli & Bovik 2003, the defaults of tf.image.ssim_multiscale.
MS_SSIM_POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _as_float(x) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def _check_images(a: jax.Array, b: jax.Array) -> None:
  if a.ndim < 3 or b.ndim < 3:
    raise ValueError(f"expected images of shape [..., H, W, C]; got shapes "
                     f"{a.shape} and {b.shape}")
  if a.shape[-3:] != b.shape[-3:]:
    raise ValueError(f"images differ in size: {a.shape[-3:]} vs {b.shape[-3:]} (H, W, C)")


def mse(a, b) -> jax.Array:
  """Mean squared error per example: [..., H, W, C] -> [...]."""
  a, b = _as_float(a), _as_float(b)
  _check_images(a, b)
  return jnp.mean(jnp.square(a - b), axis=(-3, -2, -1))


def psnr(a, b, max_value: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB per example; +inf for identical images."""
  # Same form as tf.image.psnr: 20 log10(max) - 10 log10(mse).
  return 20.0 * jnp.log10(jnp.asarray(max_value, jnp.float32)) - 10.0 * jnp.log10(mse(a, b))


def ms_ssim_min_side(filter_size: int = 11, num_scales: int = 5) -> int:
  """Smallest height/width that MS-SSIM accepts (161 for the defaults).

  Each of the num_scales - 1 halvings rounds odd sides up (TF pads one
  replicated row/column before pooling), so a side n is ceil(n / 2^k) at scale
  k, and the VALID filter needs ceil(n / 2^(num_scales-1)) >= filter_size,
  i.e. n > (filter_size - 1) * 2^(num_scales-1).
  """
  return (filter_size - 1) * 2 ** (num_scales - 1) + 1


def _gaussian_window(filter_size: int, sigma: float) -> np.ndarray:
  # TF builds the 2-D kernel as a softmax over -(i^2 + j^2) / (2 sigma^2), which
  # is exactly the outer product of this normalised 1-D window: filter
  # separably, 2 * filter_size taps per pixel instead of filter_size^2.
  coords = np.arange(filter_size, dtype=np.float64) - (filter_size - 1) / 2.0
  window = np.exp(-0.5 * np.square(coords) / sigma ** 2)
  return window / window.sum()


def _local_mean(x: jax.Array, window: np.ndarray) -> jax.Array:
  """Gaussian-weighted mean of each channel, VALID padding: [N,H,W,C] -> [N,H',W',C]."""
  channels = x.shape[-1]
  size = window.shape[0]
  dimension_numbers = ("NHWC", "HWIO", "NHWC")
  # Depthwise (one group per channel); HIGHEST keeps GPUs from using TF32.
  for kernel_shape in ((size, 1, 1, 1), (1, size, 1, 1)):
    kernel = jnp.tile(jnp.asarray(window, x.dtype).reshape(kernel_shape), (1, 1, 1, channels))
    x = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="VALID",
        dimension_numbers=dimension_numbers, feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST)
  return x


def _ssim_and_cs(x: jax.Array, y: jax.Array, window: np.ndarray, c1: jax.Array,
                 c2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel SSIM and contrast-structure term: [N,H,W,C] -> ([N,C], [N,C])."""
  # One convolution for the four local moments instead of four.
  moments = _local_mean(jnp.concatenate([x, y, x * y, jnp.square(x) + jnp.square(y)], -1),
                        window)
  mean_x, mean_y, mean_xy, mean_sq = jnp.split(moments, 4, axis=-1)
  # Same arithmetic order as TF's _ssim_helper (compensation = 1).
  num0 = mean_x * mean_y * 2.0
  den0 = jnp.square(mean_x) + jnp.square(mean_y)
  luminance = (num0 + c1) / (den0 + c1)
  cs = (mean_xy * 2.0 - num0 + c2) / (mean_sq - den0 + c2)
  return jnp.mean(luminance * cs, axis=(1, 2)), jnp.mean(cs, axis=(1, 2))


def _halve(x: jax.Array) -> jax.Array:
  """2x2 average pooling; an odd side first gets its last row/column repeated, as in TF."""
  _, height, width, _ = x.shape
  if height % 2 or width % 2:
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="symmetric")
  n, height, width, c = x.shape
  return x.reshape(n, height // 2, 2, width // 2, 2, c).mean(axis=(2, 4))


def _power_of_nonnegative(x: jax.Array, powers: jax.Array) -> jax.Array:
  """x ** powers for x >= 0, with a zero (not NaN) gradient where x == 0.

  d/dx x^p is infinite at 0 for p < 1; times relu's zero gradient it would
  give NaN and poison training, while TF's forward value 0^p is kept.
  """
  positive = x > 0
  powered = jnp.power(jnp.where(positive, x, 1.0), powers)
  return jnp.where(positive, powered, jnp.where(powers == 0, 1.0, 0.0))


def ms_ssim(a, b, max_value: float = 1.0,
            power_factors: Sequence[float] = MS_SSIM_POWER_FACTORS,
            filter_size: int = 11, filter_sigma: float = 1.5,
            k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Multi-scale SSIM per example, [..., H, W, C] -> [...], as tf.image.ssim_multiscale.

  Per channel: the product over scales of relu(cs_k) ** p_k (relu(ssim) at the
  coarsest scale), then averaged over channels. No colour transform is made.
  Raises ValueError if H or W is below `ms_ssim_min_side(filter_size,
  len(power_factors))` (161 by default), where TF fails an assertion.
  """
  a, b = _as_float(a), _as_float(b)
  _check_images(a, b)
  a, b = jnp.broadcast_arrays(a, b)
  num_scales = len(power_factors)
  if num_scales < 1:
    raise ValueError("power_factors must hold at least one weight")
  height, width, channels = a.shape[-3:]
  min_side = ms_ssim_min_side(filter_size, num_scales)
  if height < min_side or width < min_side:
    raise ValueError(
        f"image of {height}x{width} pixels is too small for MS-SSIM with {num_scales} "
        f"scales and an {filter_size}-tap filter: both sides must be at least {min_side} "
        f"(the side after {num_scales - 1} halvings, rounding up, must still be "
        f">= {filter_size}); use PSNR or fewer power_factors for small images")

  batch_shape = a.shape[:-3]
  x = a.reshape((-1, height, width, channels))
  y = b.reshape((-1, height, width, channels))
  window = _gaussian_window(filter_size, filter_sigma)
  max_value = jnp.asarray(max_value, x.dtype)
  c1 = jnp.square(k1 * max_value)
  c2 = jnp.square(k2 * max_value)

  terms = []
  for scale in range(num_scales):
    if scale > 0:
      x, y = _halve(x), _halve(y)
    ssim_value, cs = _ssim_and_cs(x, y, window, c1, c2)
    # MS-SSIM takes cs at every scale but the coarsest, where it takes the full SSIM.
    terms.append(ssim_value if scale == num_scales - 1 else cs)
  terms = jax.nn.relu(jnp.stack(terms, axis=-1))  # [N, C, scales]
  powers = jnp.asarray(power_factors, x.dtype)
  per_channel = jnp.prod(_power_of_nonnegative(terms, powers), axis=-1)
  return jnp.mean(per_channel, axis=-1).reshape(batch_shape)
