"""The coding settings a caller gives, rate s and tau, and their checks (no JAX here).

Checked once where they enter: the CLI (before anything slow is imported),
the codec's public functions, and the evaluation harness's arguments.
"""
from __future__ import annotations

import math

import numpy as np

from gvae_jax.errors import UserError

MAX_TAU = 0xFFFF  # the .gvae header stores tau in 16 bits


class RateError(UserError):
  """A rate s outside [0, levels - 1], or not a finite number."""


class TauError(UserError):
  """A tau that is not a whole number in [0, 65535], or tau with a lossy-only model."""


def check_rate(rate, levels: int) -> np.float32:
  """The float32 rate s the codec uses; RateError unless finite and in range."""
  try:
    value = float(rate)
  except (TypeError, ValueError):
    raise RateError(f"rate must be a number, got {rate!r}") from None
  top = levels - 1
  if not math.isfinite(value) or not 0 <= value <= top:
    raise RateError(f"rate {rate} is out of range: this model codes rates s in [0, {top}] "
                    f"({levels} trained levels; fractional values interpolate)")
  s = np.float32(value)
  return np.float32(min(max(s, np.float32(0)), np.float32(top)))


def check_tau(tau, model=None) -> int:
  """The error bound as an int in [0, 65535]; TauError otherwise (or for a lossy-only model).

  model: an ExportedModel (anything with is_scalable and name), or None to
  check the number alone.
  """
  if isinstance(tau, (bool, np.bool_)) or not isinstance(tau, (str, int, float, np.integer,
                                                                np.floating)):
    raise TauError(f"tau must be a whole number >= 0, got {tau!r}")
  try:
    value = float(tau)
  except ValueError:
    raise TauError(f"tau must be a whole number >= 0, got {tau!r}") from None
  if not math.isfinite(value) or value != math.floor(value):
    raise TauError(f"tau must be a whole number (the largest error per pixel value), got {tau}")
  if value < 0:
    raise TauError(f"tau must be >= 0 (0 is lossless), got {tau}")
  if value > MAX_TAU:
    raise TauError(f"tau {tau} is too large (at most {MAX_TAU})")
  if model is not None and not model.is_scalable:
    raise TauError(f"model {model.name} is lossy-only: near-lossless and lossless coding "
                   "(tau) need a scalable model (e.g. experiments/configs/small_nearlossless.py)")
  return int(value)
