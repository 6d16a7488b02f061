"""Metric conventions of every evaluation: how quality is measured and compared.

One place for the choices that make numbers comparable across `gvae eval`,
`gvae estimate`, training-time evaluation and sweep collation:

* PSNR: over all pixels and the three RGB channels together (one MSE), on
  the 8-bit scale (gvae_jax.eval.rd.psnr); means over images are means of
  per-image PSNR, as papers report Kodak.
* MS-SSIM: over RGB, 5 scales with an 11-tap Gaussian (gvae_jax.metrics,
  tf.image.ssim_multiscale's definition); None for images smaller than
  `metrics.ms_ssim_min_side()` pixels a side, where it is undefined.
* MS-SSIM in dB: -10 log10(1 - MS-SSIM). MS-SSIM curves are plotted and
  compared (BD-rate) on this scale, never on raw MS-SSIM, whose values
  crowd near 1 at high rates.
* BD-rate (gvae_jax.eval.rd, pchip): the test curve against the anchor curve
  in PSNR and in MS-SSIM dB; a pair that cannot be compared is None with the
  reason. `bd_entry` is the only function that computes them.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from gvae_jax.eval import rd


@functools.lru_cache(maxsize=None)
def _ms_ssim_fn(max_value: float):
  import jax

  from gvae_jax import metrics

  return jax.jit(lambda a, b: metrics.ms_ssim(a, b, max_value=max_value))


def ms_ssim_or_none(reference, decoded, max_value: float = 255.0) -> float | None:
  """MS-SSIM of one [H, W, 3] image pair, or None below the smallest defined size."""
  from gvae_jax import metrics

  height, width = reference.shape[:2]
  if min(height, width) < metrics.ms_ssim_min_side():
    return None
  value = _ms_ssim_fn(float(max_value))(reference[None].astype(np.float32),
                                        decoded[None].astype(np.float32))
  return float(value[0])


def ms_ssim_db(value: float | None) -> float | None:
  """-10 log10(1 - MS-SSIM): the dB scale on which MS-SSIM curves are compared."""
  if value is None or not math.isfinite(value):
    return None
  if value >= 1.0:
    return math.inf
  return -10.0 * math.log10(1.0 - value)


# The quality axes of a BD-rate, from a mean row {"bpp", "psnr", "ms_ssim", ...}.
BD_QUALITIES: Mapping[str, Callable[[Mapping], float | None]] = {
    "psnr": lambda row: row.get("psnr"),
    "ms_ssim": lambda row: ms_ssim_db(row.get("ms_ssim")),
}
_NO_MS_SSIM = "MS-SSIM not available (images smaller than 161 pixels a side)"


def _bd_pair(anchor: Sequence[Mapping], test: Sequence[Mapping], quality):
  """(BD-rate %, note, BD-quality) of two curves of mean rows on one quality axis."""
  a = [(row["bpp"], quality(row)) for row in anchor]
  t = [(row["bpp"], quality(row)) for row in test]
  if any(q is None for _, q in a + t):
    return None, _NO_MS_SSIM, None
  try:
    rate = rd.bd_rate([p[0] for p in a], [p[1] for p in a], [p[0] for p in t], [p[1] for p in t])
    delta = rd.bd_psnr([p[0] for p in a], [p[1] for p in a], [p[0] for p in t], [p[1] for p in t])
  except ValueError as e:
    return None, str(e), None
  return rate, None, delta


def bd_entry(anchor: Sequence[Mapping], test: Sequence[Mapping]) -> dict:
  """BD-rates (and BD-PSNR / BD-MS-SSIM dB) of a test curve against an anchor curve.

  Curves are lists of mean rows with "bpp", "psnr" and "ms_ssim". Keys:
  bd_rate_{psnr,ms_ssim}_percent, bd_rate_{psnr,ms_ssim}_note (None when
  computed), bd_psnr_db, bd_ms_ssim_db.
  """
  anchor = sorted(anchor, key=lambda row: row["bpp"])
  test = sorted(test, key=lambda row: row["bpp"])
  entry = {}
  for metric, quality in BD_QUALITIES.items():
    if len(test) < 2:
      rate, note, delta = None, "the model has fewer than 2 lossy rates (a curve needs 2)", None
    else:
      rate, note, delta = _bd_pair(anchor, test, quality)
    entry[f"bd_rate_{metric}_percent"] = rate
    entry[f"bd_rate_{metric}_note"] = note
    entry[f"bd_{metric}_db"] = delta
  return entry
