"""Rate-distortion arithmetic: bits per (sub)pixel, PSNR, max error, Bjontegaard deltas.

Everything here is plain numpy/scipy in float64 (no JAX), so codec evaluations
do not pay for a JAX start-up and uint8 differences never wrap around.

Bjontegaard deltas (VCEG-M33) compare two rate-quality curves:

* `bd_rate`: the average relative rate difference of the test at equal quality,
  in percent. Negative = the test needs fewer bits than the anchor (better);
  -10 means 10 % fewer bits on average. Computed as exp(mean of
  ln R_test(Q) - ln R_anchor(Q) over the common quality range) - 1.
* `bd_psnr`: the average quality difference at equal rate, in the quality's
  unit (dB for PSNR). Positive = the test is better.

"dist" follows the usual BD naming but must be a quality where higher is
better: PSNR in dB, or MS-SSIM as -10 log10(1 - MS-SSIM) dB. Pass MSE-like
distortions as PSNR, not raw. Only the logarithm of the rate matters, so any
rate unit works (bytes, bpp, kbit/s) as long as both curves use the same one.

Two interpolations of each curve are offered:

* "pchip" (default): piecewise cubic Hermite interpolation through the points
  (scipy's PchipInterpolator), as in the JCT-VC / JVET common-test-condition
  spreadsheets (JCTVC-L1100, JVET-T2010) and the `bjontegaard` package. It is
  monotone between points and cannot overshoot, and works from 2 points up.
* "cubic": the original VCEG-M33 least-squares cubic polynomial (exact
  interpolation for 4 points). Needs at least 4 points per curve and can
  swing badly when the points are unevenly spaced.

Both integrate their interpolant exactly over the overlap of the two curves'
ranges. Both reproduce a curve that is linear in (quality, ln rate) exactly,
which gives analytic checks: scaling every rate by k gives a BD-rate of exactly
100 (k - 1) %, and shifting every quality by d gives a BD-PSNR of exactly d.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator

BD_METHODS = ("pchip", "cubic")
_CUBIC_DEGREE = 3


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
  """Bits per pixel (bpp) of a file of num_bytes for an image of height x width."""
  return 8.0 * num_bytes / (height * width)


def bits_per_subpixel(num_bytes: int, height: int, width: int, channels: int = 3) -> float:
  """Bits per subpixel (bpsp, one colour sample): bpp / channels, the lossless convention."""
  return 8.0 * num_bytes / (height * width * channels)


def _checked_pair(reference, decoded) -> tuple[np.ndarray, np.ndarray]:
  reference = np.asarray(reference)
  decoded = np.asarray(decoded)
  if reference.shape != decoded.shape:
    raise ValueError(f"images differ in shape: {reference.shape} vs {decoded.shape}")
  return reference.astype(np.float64), decoded.astype(np.float64)


def mse(reference, decoded) -> float:
  """Mean squared error over all pixels and channels, in float64."""
  reference, decoded = _checked_pair(reference, decoded)
  return float(np.mean(np.square(reference - decoded)))


def psnr(reference, decoded, max_value: float = 255.0) -> float:
  """PSNR in dB over all pixels and RGB channels together (one MSE, not per channel).

  For 0..255 images, as reported for Kodak; +inf for identical images. Equals
  gvae_jax.metrics.psnr(..., max_value=255) up to that function's float32.
  """
  error = mse(reference, decoded)
  if error == 0.0:
    return float("inf")
  return float(10.0 * np.log10(max_value ** 2 / error))


def max_abs_error(reference, decoded) -> int:
  """Largest absolute sample difference (the near-lossless bound), as an int."""
  reference, decoded = _checked_pair(reference, decoded)
  if reference.size == 0:
    return 0
  return int(np.max(np.abs(reference - decoded)))


def _curve(rate: Sequence[float], quality: Sequence[float], label: str,
           min_points: int) -> tuple[np.ndarray, np.ndarray]:
  """(ln rate, quality), both strictly increasing, or a ValueError saying what is wrong."""
  rate = np.asarray(rate, np.float64).ravel()
  quality = np.asarray(quality, np.float64).ravel()
  if rate.shape != quality.shape:
    raise ValueError(f"{label}: {rate.size} rates but {quality.size} quality values")
  if rate.size < min_points:
    raise ValueError(f"{label}: needs at least {min_points} rate-quality points, got {rate.size}")
  if not (np.all(np.isfinite(rate)) and np.all(np.isfinite(quality))):
    raise ValueError(f"{label}: rates and quality values must be finite "
                     f"(a lossless point has infinite PSNR; leave it out)")
  if np.any(rate <= 0):
    raise ValueError(f"{label}: rates must be positive (their logarithm is interpolated)")
  order = np.argsort(rate, kind="stable")
  rate, quality = rate[order], quality[order]
  # The interpolation needs a function in both directions: quality -> rate for
  # BD-rate, rate -> quality for BD-PSNR, so more bits must mean more quality.
  if np.any(np.diff(rate) <= 0) or np.any(np.diff(quality) <= 0):
    raise ValueError(f"{label}: the curve must be strictly monotone (more rate, more quality); "
                     f"got rate {rate.tolist()} with quality {quality.tolist()}")
  return np.log(rate), quality


def _mean_over(x: np.ndarray, y: np.ndarray, lo: float, hi: float, method: str) -> float:
  """Mean of the interpolant of y(x) over [lo, hi], integrated exactly."""
  if method == "pchip":
    integral = PchipInterpolator(x, y).integrate(lo, hi)
  else:
    antiderivative = np.polyint(np.polyfit(x, y, _CUBIC_DEGREE))
    integral = np.polyval(antiderivative, hi) - np.polyval(antiderivative, lo)
  return float(integral) / (hi - lo)


def _overlap(a: np.ndarray, b: np.ndarray, what: str) -> tuple[float, float]:
  lo, hi = max(a[0], b[0]), min(a[-1], b[-1])
  if hi <= lo:
    raise ValueError(f"the two curves do not overlap in {what} "
                     f"(anchor {a[0]:.4g}..{a[-1]:.4g}, test {b[0]:.4g}..{b[-1]:.4g}); "
                     f"Bjontegaard deltas only compare the common range")
  return float(lo), float(hi)


def _curves(rate_anchor, dist_anchor, rate_test, dist_test, method: str):
  if method not in BD_METHODS:
    raise ValueError(f"unknown BD interpolation {method!r}; choose one of {BD_METHODS}")
  min_points = _CUBIC_DEGREE + 1 if method == "cubic" else 2
  anchor = _curve(rate_anchor, dist_anchor, "anchor", min_points)
  test = _curve(rate_test, dist_test, "test", min_points)
  return anchor, test


def bd_rate(rate_anchor: Sequence[float], dist_anchor: Sequence[float],
            rate_test: Sequence[float], dist_test: Sequence[float],
            method: str = "pchip") -> float:
  """Bjontegaard delta rate of test vs anchor, in percent; negative = test saves bits.

  dist_* are qualities (higher is better, e.g. PSNR dB). ln(rate) is
  interpolated as a function of quality over the common quality range.
  """
  (log_rate_a, quality_a), (log_rate_t, quality_t) = _curves(
      rate_anchor, dist_anchor, rate_test, dist_test, method)
  lo, hi = _overlap(quality_a, quality_t, "quality")
  mean_log_ratio = (_mean_over(quality_t, log_rate_t, lo, hi, method)
                    - _mean_over(quality_a, log_rate_a, lo, hi, method))
  return float(np.expm1(mean_log_ratio) * 100.0)


def bd_psnr(rate_anchor: Sequence[float], dist_anchor: Sequence[float],
            rate_test: Sequence[float], dist_test: Sequence[float],
            method: str = "pchip") -> float:
  """Bjontegaard delta quality (dB for PSNR) of test vs anchor; positive = test is better.

  Quality is interpolated as a function of ln(rate) over the common rate range.
  """
  (log_rate_a, quality_a), (log_rate_t, quality_t) = _curves(
      rate_anchor, dist_anchor, rate_test, dist_test, method)
  lo, hi = _overlap(log_rate_a, log_rate_t, "log rate")
  return (_mean_over(log_rate_t, quality_t, lo, hi, method)
          - _mean_over(log_rate_a, quality_a, lo, hi, method))
