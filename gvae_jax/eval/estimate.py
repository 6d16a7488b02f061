"""The model's own estimates (no entropy coder): estimated RD and estimated bits.

`estimate_rd`: rate-distortion of (model, params) on images, for `gvae
estimate --workdir` and training-time evaluation. Rates are the model's bit
estimates with rounding, as at coding time; the reconstruction is clipped
and rounded to 8 bits, as a decoder writes it; metrics follow
gvae_jax.eval.quality.

`lossy_bits`: bits_y and bits_z of an exported model's lossy layer at
train=False, the estimate that `gvae eval` and the report put next to the
real file size; `y_rate` picks the model's own rate of y or the coded one
(what the range coder pays under the exported tables, escapes included;
models.hyperprior), whatever the model was trained with.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax import metrics
from gvae_jax.eval import quality


def default_rates(levels: int, fractional: Sequence[float]) -> list[float]:
  rates = set(float(i) for i in range(levels))
  rates.update(float(r) for r in fractional if 0 <= r <= levels - 1)
  return sorted(rates)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, x, s):
  out = model.apply({"params": params}, x, s, train=False)
  x_hat = jnp.round(jnp.clip(out["x_tilde"], 0.0, 1.0) * 255.0) / 255.0
  num_pixels = x.shape[1] * x.shape[2]
  bpp = (out["bits_y"] + out["bits_z"]) / num_pixels
  # Scalable models: the lossless rate estimate (base layer + residual, tau = 0).
  lossless_bpsp = (out["bits_y"] + out["bits_z"] + out.get("bits_r", jnp.nan)) / (3 * num_pixels)
  return bpp, metrics.psnr(x, x_hat), x_hat, lossless_bpsp


def estimate_rd(model, params, images: Sequence[tuple[str, np.ndarray]],
                rates: Sequence[float]) -> dict:
  """Per-rate averages and per-image rows of bpp, PSNR and MS-SSIM."""
  rows, per_image = [], []
  for rate in rates:
    bpps, psnrs, ssims, lossless = [], [], [], []
    for name, pixels in images:
      x = jnp.asarray(pixels, jnp.float32)[None] / 255.0
      bpp, psnr, x_hat, bpsp = _forward(model, params, x, jnp.full((1,), rate, jnp.float32))
      ssim = quality.ms_ssim_or_none(x[0], x_hat[0], max_value=1.0)
      ssim = float("nan") if ssim is None else ssim
      bpps.append(float(bpp[0])); psnrs.append(float(psnr[0])); ssims.append(ssim)
      lossless.append(float(bpsp[0]))
      per_image.append({"image": name, "rate": rate, "bpp": bpps[-1], "psnr": psnrs[-1],
                        "ms_ssim": ssim, "lossless_bpsp": _or_none(lossless[-1])})
    rows.append({"rate": rate, "bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs)),
                 "ms_ssim": _or_none(np.nanmean(ssims)) if not np.all(np.isnan(ssims)) else None,
                 "lossless_bpsp": _or_none(float(np.mean(lossless)))})
  return {"rates": rows, "images": per_image}


def _or_none(value: float) -> float | None:
  return None if np.isnan(value) else float(value)


def format_table(report: dict) -> str:
  lossless = any(row.get("lossless_bpsp") is not None for row in report["rates"])
  lines = ["| rate s | bpp | PSNR (dB) | MS-SSIM |" + (" lossless bpsp |" if lossless else ""),
           "|---|---|---|---|" + ("---|" if lossless else "")]
  for row in report["rates"]:
    ssim = "-" if row["ms_ssim"] is None else f"{row['ms_ssim']:.4f}"
    line = f"| {row['rate']:.2f} | {row['bpp']:.4f} | {row['psnr']:.2f} | {ssim} |"
    if lossless:
      line += f" {row['lossless_bpsp']:.4f} |"
    lines.append(line)
  return "\n".join(lines)


@functools.partial(jax.jit, static_argnums=0)
def _lossy_bits(model, params, pixels, s):
  out = model.apply({"params": params}, pixels.astype(jnp.float32)[None] / 255.0, s,
                    train=False)
  return out["bits_y"][0], out["bits_z"][0]


def lossy_bits(exported, pixels: np.ndarray, rate,
               y_rate: str | None = None) -> tuple[float, float]:
  """(bits_y, bits_z) of an ExportedModel's lossy layer for uint8 RGB [H, W, 3] at rate s.

  y_rate: None for the model's configured rate of y, else "likelihood" or "coded".
  """
  s = jnp.full((1,), np.float32(rate), jnp.float32)
  model = exported.lossy_model
  if y_rate is not None and y_rate != model.y_rate:
    model = model.clone(y_rate=y_rate)  # same parameters: y_rate only changes the rate term
  bits_y, bits_z = _lossy_bits(model, exported.lossy_params, jnp.asarray(pixels), s)
  return float(bits_y), float(bits_z)
