"""The flat base layer: residual coding without a lossy layer.

With a flat base the decoder's base image is x_base = FLAT_BASE_VALUE (128)
everywhere, so the residual r = x - 128 is the image itself, shifted into
[-128, 127], and the file needs no y / z sections. Its head is a
ResidualModel (model name "flat_residual") whose "prior" u is not a learned
feature map but the availability of each causal context tap:

  u[y, x, t] = 1 if the t-th tap (di, dj) of pixel (y, x) is a decoded pixel
               of the same 64x64 patch and of the image, else 0

(taps in MaskedConv.taps order). Why: the step-wise coder decodes all
64x64 patches in parallel (gvae_jax.coding.residual_codec), pixel (i, j) of
every patch at step a*i + j, so a tap that crosses into the patch above or
to the left is never decoded yet at that step (for the patch above the tap
(di, dj) lands on step a*(64 + i + di) + j + dj > a*i + j for any kernel of
radius < 64 / a; likewise for the left patch). The context outside a patch
must therefore be zero, and a zero residual is a plausible value (x = 128),
so the head cannot tell "grey" from "not available". The flags tell it; they
enter the head's first 1x1 layer, which on a concatenation is the same as a
masked convolution of an availability channel. They depend only on the
image size, so encoder and decoder compute them alike, and the flat mode
reuses the lossy-base residual coder unchanged with x_base = 128 and this u.
"""
from __future__ import annotations

import numpy as np

from gvae_jax.layers.masked import causal_mask

FLAT_BASE_VALUE = 128
PATCH = 64  # must equal gvae_jax.coding.residual_codec.PATCH (checked there)
# The residual r = x - 128 of an 8-bit value.
R_MIN, R_MAX = -FLAT_BASE_VALUE, 255 - FLAT_BASE_VALUE


def tap_offsets(kernel_size: int, order: int) -> np.ndarray:
  """[T, 2] (di, dj) of the causal taps, in MaskedConv.taps order (row-major)."""
  return np.argwhere(causal_mask(kernel_size, order)) - kernel_size // 2


def tap_availability(height: int, width: int, offsets: np.ndarray, padded_height: int,
                     padded_width: int) -> np.ndarray:
  """float32 [padded_height, padded_width, T]: the flags u of the module doc.

  Pixels of the padding (outside the image) get flags too (they are never
  coded; their u is never read).
  """
  offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
  yy, xx = np.mgrid[0:padded_height, 0:padded_width]
  ny = yy[..., None] + offsets[:, 0]
  nx = xx[..., None] + offsets[:, 1]
  i = (yy % PATCH)[..., None] + offsets[:, 0]
  j = (xx % PATCH)[..., None] + offsets[:, 1]
  inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
  same_patch = (i >= 0) & (i < PATCH) & (j >= 0) & (j < PATCH)
  return (inside & same_patch).astype(np.float32)
