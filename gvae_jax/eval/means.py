"""Per-setting means of a `gvae eval` run's rows, its RD curves and their BD-rates.

Shared by the harness (which writes them into results.json) and the plots
(which draw them), so neither imports the other.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from gvae_jax.eval import quality
from gvae_jax.eval.anchors import LOSSY

MODEL_CODEC = "gvae"  # the codec name of the model's own rows


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def compute_means(rows: Sequence[dict]) -> list[dict]:
  """One row per (codec, mode, setting), over the images that coded without error."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["codec"], row["mode"], repr(row["setting"])), []).append(row)
  means = []
  for (codec_name, mode, _), group in groups.items():
    ok = [r for r in group if not r.get("error")]
    first = group[0]
    mean = {"codec": codec_name, "mode": mode, "setting_name": first["setting_name"],
            "setting": first["setting"], "tau": first.get("tau") if ok else None,
            "images": len(ok), "failed_images": len(group) - len(ok)}
    if ok:
      psnrs = [r["psnr"] for r in ok]
      ssims = [r.get("ms_ssim") for r in ok]
      mse = float(np.mean([r["mse"] for r in ok]))
      mean.update(
          tau=ok[0].get("tau"),
          rate=_mean(r.get("rate") for r in ok),
          bytes=_mean(r["bytes"] for r in ok), bpp=_mean(r["bpp"] for r in ok),
          bpsp=_mean(r["bpsp"] for r in ok),
          psnr=float(np.mean(psnrs)) if all(math.isfinite(p) for p in psnrs) else math.inf,
          mse=mse, psnr_of_mean_mse=(math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)),
          ms_ssim=_mean(ssims) if all(s is not None for s in ssims) else None,
          max_error=max(r["max_error"] for r in ok),
          tau_ok=all(r.get("tau_ok", True) for r in ok) if ok[0].get("tau") is not None else None,
          encode_seconds=_mean(r["encode_seconds"] for r in ok),
          decode_seconds=_mean(r["decode_seconds"] for r in ok),
          encode_seconds_median=float(np.median([r["encode_seconds"] for r in ok])),
          decode_seconds_median=float(np.median([r["decode_seconds"] for r in ok])),
          choose_rate_seconds=_mean(r.get("choose_rate_seconds") for r in ok),
          estimated_bits=_mean(r.get("estimated_bits") for r in ok),
          estimated_bpp=_mean(r.get("estimated_bpp") for r in ok),
          estimated_bpsp=_mean(r.get("estimated_bpsp") for r in ok),
          estimate_lossy_bits=_mean(r.get("estimate_lossy_bits") for r in ok),
          estimate_residual_bits=_mean(r.get("estimate_residual_bits") for r in ok),
          coded_estimated_bits=_mean(r.get("coded_estimated_bits") for r in ok),
          lossy_bits=_mean(r.get("lossy_bits") for r in ok),
          residual_bits=_mean(r.get("residual_bits") for r in ok))
      if any(r.get("base") for r in ok):
        mean["flat_base_files"] = sum(r.get("base") == "flat" for r in ok)
      if mean["estimated_bits"]:
        mean["file_vs_estimate_percent"] = 100.0 * (
            8.0 * mean["bytes"] / mean["estimated_bits"] - 1.0)
      if mean.get("coded_estimated_bits"):
        mean["file_vs_coded_estimate_percent"] = 100.0 * (
            8.0 * mean["bytes"] / mean["coded_estimated_bits"] - 1.0)
      if mean.get("estimate_residual_bits"):
        mean["residual_vs_estimate_percent"] = 100.0 * (
            mean["residual_bits"] / mean["estimate_residual_bits"] - 1.0)
    means.append(mean)
  return means


def lossy_curve(means: Sequence[dict], codec_name: str) -> list[dict]:
  """The codec's lossy mean rows, by bpp."""
  return sorted((m for m in means if m["codec"] == codec_name and m["mode"] == LOSSY
                 and m.get("bpp") is not None), key=lambda m: m["bpp"])


def bd_rates(means: Sequence[dict]) -> list[dict]:
  """BD-rate of the model's mean lossy curve against each lossy anchor's (quality.bd_entry)."""
  model = lossy_curve(means, MODEL_CODEC)
  anchors = sorted({m["codec"] for m in means if m["codec"] != MODEL_CODEC and m["mode"] == LOSSY})
  return [{"anchor": name, "test": MODEL_CODEC, **quality.bd_entry(lossy_curve(means, name), model)}
          for name in anchors]
