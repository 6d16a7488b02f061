"""G-VAE gain units (Cui et al. 2021): per-level channel gains and interpolation.

A table holds one positive row per trained rate level. A continuous rate
s = i + l (0 <= l < 1) mixes rows i and i+1 geometrically:
g(s) = G_i^(1-l) * G_(i+1)^l. The encoder and the decoder call the same
`interpolate` so they can never disagree about the gains.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PARAMETERIZATIONS = ("abs", "exp", "softplus")
INTERPOLATIONS = ("exponential", "linear")
_ABS_FLOOR = 1e-6  # keeps log(gain) finite for the exponential interpolation


def to_positive(p: jax.Array, parameterization: str) -> jax.Array:
  if parameterization == "abs":
    return jnp.maximum(jnp.abs(p), _ABS_FLOOR)
  if parameterization == "exp":
    return jnp.exp(p)
  if parameterization == "softplus":
    return jax.nn.softplus(p)
  raise ValueError(f"unknown gain parameterization {parameterization!r}; "
                   f"choose one of {PARAMETERIZATIONS}")


def from_positive(g: np.ndarray, parameterization: str) -> np.ndarray:
  """Inverse of `to_positive`, used to initialise the stored parameters."""
  g = np.asarray(g, np.float64)
  if parameterization == "abs":
    return g
  if parameterization == "exp":
    return np.log(g)
  if parameterization == "softplus":
    return np.log(np.expm1(g))
  raise ValueError(f"unknown gain parameterization {parameterization!r}")


def interpolate(table: jax.Array, s: jax.Array, mode: str = "exponential") -> jax.Array:
  """Rows of a positive [n, C] table at continuous levels s (shape [B]) -> [B, C].

  Integer s returns the trained row exactly (l = 0 multiplies by exp(0) = 1).
  """
  if mode not in INTERPOLATIONS:
    raise ValueError(f"unknown interpolation {mode!r}; choose one of {INTERPOLATIONS}")
  n = table.shape[0]
  s = jnp.clip(jnp.asarray(s, jnp.float32), 0.0, n - 1)
  i = jnp.clip(jnp.floor(s).astype(jnp.int32), 0, n - 1)
  j = jnp.minimum(i + 1, n - 1)
  frac = (s - i.astype(jnp.float32))[:, None]
  lo, hi = table[i], table[j]
  if mode == "exponential":
    return lo * jnp.exp(frac * (jnp.log(hi) - jnp.log(lo)))
  return lo + frac * (hi - lo)


class GainTable(nn.Module):
  """One learnable [levels, channels] table of positive channel gains."""

  levels: int
  channels: int
  init_rows: Sequence[float] | None = None  # one scalar per level; ones if None
  parameterization: str = "abs"
  interpolation: str = "exponential"

  def setup(self):
    rows = np.ones(self.levels) if self.init_rows is None else np.asarray(self.init_rows)
    if rows.shape != (self.levels,):
      raise ValueError(f"init_rows needs {self.levels} values, got {rows.shape}")
    init = np.repeat(from_positive(rows, self.parameterization)[:, None], self.channels, 1)
    self.table = self.param("table", lambda _: jnp.asarray(init, jnp.float32))

  def positive(self) -> jax.Array:
    return to_positive(self.table, self.parameterization)

  def __call__(self, s: jax.Array) -> jax.Array:
    """Gains for levels s ([B]) broadcastable against NHWC tensors: [B, 1, 1, C]."""
    g = interpolate(self.positive(), s, self.interpolation)
    return g[:, None, None, :]


def lambda_init_rows(lambdas: Sequence[float]) -> np.ndarray:
  """Initial gains ~ sqrt(lambda / geometric mean of lambdas).

  The rate-optimal quantiser step of a Gaussian latent scales like
  1/sqrt(lambda), so starting the gains there gives every level a distinct
  rate from the first step; training from all-ones gains is slow.
  """
  lam = np.asarray(lambdas, np.float64)
  return np.sqrt(lam / np.exp(np.mean(np.log(lam))))
