"""Analysis / synthesis transforms of the mean-scale hyperprior (Balle 2018, Minnen 2018).

`dtype` is the convolutions' compute dtype (None: float32, as the codec
uses); parameters are always float32. With bfloat16 the GDN norms still sum
in float32 (their float32 parameters promote them) and every transform
returns float32, so the entropy models and losses see float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gvae_jax.layers import GDN


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME", name=name,
                 dtype=dtype)


def _float32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


class UpConv(nn.Module):
  """Stride-2 upsampling convolution as a 3x3 convolution to 4x channels + depth-to-space.

  A 5x5 stride-2 transposed convolution splits into four output phases whose
  sub-kernels (3x3, 3x2, 2x3, 2x2) all fit in one 3x3 kernel, so this spans the
  same family of maps. It is used instead because XLA's CPU gradient of a
  transposed convolution is ~20x slower (measured: 3.9 s vs 0.2 s for
  8x64x64x64 -> 64 channels, forward + backward).
  """

  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Conv(4 * self.features, (3, 3), padding="SAME", name="conv", dtype=self.dtype)(x)
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, 2, 2, self.features)
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, self.features)


def _deconv(features: int, kernel: int, stride: int, name: str, dtype: Any = None) -> UpConv:
  del kernel, stride  # always the 5x5 / stride-2 equivalent, see UpConv
  return UpConv(features, dtype=dtype, name=name)


class Analysis(nn.Module):
  """g_a: four stride-2 5x5 convolutions with GDN: x [B,H,W,3] -> y [B,H/16,W/16,M]."""

  n: int
  m: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(3):
      x = GDN(name=f"gdn_{i}")(_conv(self.n, 5, 2, f"conv_{i}", self.dtype)(x))
    return _float32(_conv(self.m, 5, 2, "conv_3", self.dtype)(x))


class Synthesis(nn.Module):
  """g_s: four stride-2 upsampling convolutions (see UpConv) with inverse GDN.

  With `prior_channels > 0` it also returns features u (for the residual
  layer) from a parallel output head on the last hidden activation.
  """

  n: int
  out_channels: int = 3
  prior_channels: int = 0
  dtype: Any = None

  @nn.compact
  def __call__(self, y: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    h = y
    for i in range(3):
      h = GDN(inverse=True, name=f"igdn_{i}")(_deconv(self.n, 5, 2, f"deconv_{i}", self.dtype)(h))
    x = _float32(_deconv(self.out_channels, 5, 2, "deconv_3", self.dtype)(h))
    u = None
    if self.prior_channels:
      u = _float32(_deconv(self.prior_channels, 5, 2, "prior_head", self.dtype)(h))
    return x, u


class HyperAnalysis(nn.Module):
  """h_a: y [.., M] -> z [.., N] at 1/4 the resolution."""

  n: int
  dtype: Any = None

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    h = nn.leaky_relu(_conv(self.n, 3, 1, "conv_0", self.dtype)(y))
    h = nn.leaky_relu(_conv(self.n, 5, 2, "conv_1", self.dtype)(h))
    return _float32(_conv(self.n, 5, 2, "conv_2", self.dtype)(h))


class HyperSynthesis(nn.Module):
  """h_s: z_hat -> raw (mean, scale) parameters for y, each [.., M].

  With scales=2 (the asymmetric Gaussian) it returns (mean, left scale, right
  scale): the last convolution has 3M outputs instead of 2M.
  """

  m: int
  scales: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, z: jax.Array) -> tuple[jax.Array, ...]:
    h = nn.leaky_relu(_deconv(self.m, 5, 2, "deconv_0", self.dtype)(z))
    h = nn.leaky_relu(_deconv(self.m * 3 // 2, 5, 2, "deconv_1", self.dtype)(h))
    out = _float32(_conv((1 + self.scales) * self.m, 3, 1, "conv_2", self.dtype)(h))
    return tuple(out[..., k * self.m:(k + 1) * self.m] for k in range(1 + self.scales))
