"""What the range coder pays for a y symbol: the "coded" rate of the Gaussian conditionals.

The model's log-likelihood charges a symbol far from the mean without bound
(thousands of bits for |v| = 5 at scale 0.11), but the coder never pays that:
its integer table for the symbol's scale row (gvae_jax.coding.export) gives
every in-range symbol at least one of 2**precision counts, and codes a value
outside the row's range [-h_left, h_right] as the row's escape symbol (whose
probability is the mass beyond the range) followed by a LEB128 varint of the
distance beyond the range (gvae_jax.coding.coder). So, for v = y' - mean,

  in range:   bits = -log2(max(P(v), 2**-precision))
  escaped:    bits = -log2(max(P(beyond the range), 2**-precision)) + 8 * varint bytes

with h = ceil(z * table scale), z the Gaussian quantile of tail_mass / 2, the
table scale the first of gaussian.scale_table() at or above the scale (the row
the coder uses). P(v) and the escape mass take the predicted scales, so the
rate keeps a gradient wherever the coder's cost depends on them; a symbol
whose cost is the fixed floor or an escape has none, as in the coder.

Training on this rate (config `model.y_rate = "coded"`) optimises the bits a
file costs instead of a bound that overstates the rare outliers of an
overconfident model; the estimate it gives tracks real files (results README,
issue 15). It is an approximation of the table only in the rounding of
probabilities to counts and in using the predicted rather than the table
scale for P.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.scipy.special import log_ndtr
import numpy as np
from scipy import special

from gvae_jax.entropy import asymmetric_gaussian, gaussian

TAIL_MASS = 1e-4  # probability left to each y and z table row's escape (export's default)
PRECISION = 16  # counts of a row sum to 2**PRECISION (export's default)
_VARINT_GROUP = 7  # payload bits per varint byte (gvae_jax.coding.varint)


def half_widths(scales: np.ndarray, tail_mass: float = TAIL_MASS) -> np.ndarray:
  """int64 h per scale: a row codes [-h, h] (each side holds <= tail_mass / 2 beyond)."""
  return np.ceil(-special.ndtri(tail_mass / 2) * np.asarray(scales, np.float64)).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _table_half_widths(tail_mass: float) -> np.ndarray:
  """h of every row of gaussian.scale_table(), float32 (computed once per tail mass)."""
  return half_widths(gaussian.scale_table(), tail_mass).astype(np.float32)


def _row_half_widths(scale, tail_mass: float) -> jnp.ndarray:
  """h of the table row the coder uses for each scale."""
  return jnp.asarray(_table_half_widths(tail_mass))[
      gaussian.scale_to_index(scale, gaussian.scale_table())]


def _varint_bits(code: jnp.ndarray) -> jnp.ndarray:
  """8 bits per LEB128 byte of the non-negative integer code (float, >= 1 byte)."""
  nbytes = 1.0
  for k in range(1, 5):
    nbytes = nbytes + (code >= float(1 << (_VARINT_GROUP * k)))
  return 8.0 * nbytes


def _coded_bits(values, log_p, log_escape, half_left, half_right, precision: int):
  floor = -precision * np.log(2.0)
  rounded = jnp.round(values)
  above = rounded > half_right
  below = rounded < -half_left
  # The escape code of coder.py: 2 (v - h_right - 1) above, 2 (-v - h_left - 1) + 1 below.
  code = jnp.where(above, 2.0 * (rounded - half_right - 1.0),
                   2.0 * (-rounded - half_left - 1.0) + 1.0)
  escaped = -jnp.maximum(log_escape, floor) / np.log(2.0) + _varint_bits(code)
  in_range = -jnp.maximum(log_p, floor) / np.log(2.0)
  return jnp.where(above | below, escaped, in_range)


def symmetric_bits(values, scale, tail_mass: float = TAIL_MASS,
                   precision: int = PRECISION) -> jnp.ndarray:
  """Coded bits of v under N(0, scale^2) (module doc), elementwise."""
  half = _row_half_widths(scale, tail_mass)
  log_p = gaussian.log_likelihood(values, scale)
  # Mass beyond [-h - 1/2, h + 1/2]: both tails, 2 Phi(-(h + 1/2) / scale).
  log_escape = np.log(2.0) + log_ndtr(-(half + 0.5) / scale)
  return _coded_bits(values, log_p, log_escape, half, half, precision)


def asymmetric_bits(values, scale_left, scale_right, tail_mass: float = TAIL_MASS,
                    precision: int = PRECISION) -> jnp.ndarray:
  """Coded bits of v under the asymmetric Gaussian (left, right scales), elementwise."""
  half_left = _row_half_widths(scale_left, tail_mass)
  half_right = _row_half_widths(scale_right, tail_mass)
  log_p = asymmetric_gaussian.log_likelihood(values, scale_left, scale_right)
  total = scale_left + scale_right
  # Mass beyond each end: that side's weight 2a / (a + b) times its half-Gaussian tail.
  log_left = jnp.log(2.0 * scale_left / total) + log_ndtr(-(half_left + 0.5) / scale_left)
  log_right = jnp.log(2.0 * scale_right / total) + log_ndtr(-(half_right + 0.5) / scale_right)
  log_escape = jnp.logaddexp(log_left, log_right)
  return _coded_bits(values, log_p, log_escape, half_left, half_right, precision)
