"""Real file sizes against the model's estimated bits, per image and rate.

For each image and rate it compresses for real and compares with the model's
estimate (bits_y + bits_z of `__call__(train=False)`), splitting the gap into
where it comes from:

  estimate      -log2 of the float likelihoods at the exact predicted scales
  coded estimate
                the rate the coder pays for y under the exported tables
                (gvae_jax.entropy.coded_rate: 2^-16 floor, escapes and their
                varints) at the exact predicted scales, plus the z estimate;
                the figure real files should match within ~1 %
  table bits    -log2 of the integer CDF tables' probabilities for the coded
                symbols: the cost of quantised tables and of coding y with
                the table scale nearest (in the log domain) to the prediction
  table bits (ceil)
                the same if y used the smallest table scale >= the prediction
                instead (gaussian.scale_to_index; not what the codec does:
                kept to measure that option)
  payload bits  8 * (bytes of the z and y sections): adds the range coder's
                own overhead and the escape sections
  file bits     8 * file bytes: adds the header (55 bytes for a lossy file)

    gvae estimate --model MODEL_DIR --images DIR [--rates 0 1.5 3] [--out report.json]
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.coding import codec, container
from gvae_jax.coding.export import ExportedModel
from gvae_jax.entropy import asymmetric_gaussian, gaussian
from gvae_jax.eval import estimate as estimate_lib


@functools.partial(jax.jit, static_argnums=0)
def _scales(model, params, z_sym, s):
  _, scale = model.apply({"params": params}, z_sym.astype(jnp.float32), s,
                         method=model.hyper_synthesize)
  return scale


def _ceil_rows(scale, y_scales: np.ndarray) -> np.ndarray:
  """y table rows with the smallest table scale >= each predicted scale (both
  scales of an asymmetric model's (left, right) pair)."""
  if isinstance(scale, tuple):
    left, right = (gaussian.scale_to_index(np.asarray(v), y_scales) for v in scale)
    return np.asarray(asymmetric_gaussian.pair_rows(left, right, len(y_scales)))
  return np.asarray(gaussian.scale_to_index(np.asarray(scale), y_scales))


def measure(model: ExportedModel, pixels: np.ndarray, rate: float) -> dict:
  """One image at one rate: real sizes and the estimates (module doc)."""
  encoded = codec.encode(model, pixels, rate)
  header, sections = container.unpack(encoded.data)
  s = jnp.full((1,), np.float32(header.rate), jnp.float32)
  rgb = codec.as_rgb(pixels)[0]
  est_y, est_z = estimate_lib.lossy_bits(model, rgb, header.rate, y_rate="likelihood")
  coded_y, _ = estimate_lib.lossy_bits(model, rgb, header.rate, y_rate="coded")

  z_indexes = np.broadcast_to(np.arange(encoded.z_symbols.shape[-1], dtype=np.int32),
                              encoded.z_symbols.shape)
  table_z = model.z_table.bits(encoded.z_symbols, z_indexes)
  table_y = model.y_table.bits(encoded.y_symbols, encoded.y_indexes)
  scale = _scales(model.lossy_model, model.lossy_params, jnp.asarray(encoded.z_symbols), s)
  table_y_ceil = model.y_table.bits(encoded.y_symbols, _ceil_rows(scale, model.y_scales))
  payload_bytes = sum(len(section) for section in sections)
  estimate = est_y + est_z
  coded = coded_y + est_z
  pixels_count = header.height * header.width
  return {
      "rate": float(header.rate), "height": header.height, "width": header.width,
      "file_bytes": len(encoded.data), "header_bytes": len(encoded.data) - payload_bytes,
      "z_bytes": len(sections[0]), "y_bytes": len(sections[1]),
      "estimate_bits_y": est_y, "estimate_bits_z": est_z, "estimate_bits": estimate,
      "table_bits_y": table_y, "table_bits_z": table_z,
      "table_bits_y_ceil": table_y_ceil, "coded_bits_y": coded_y, "coded_bits": coded,
      "estimate_bpp": estimate / pixels_count, "coded_bpp": coded / pixels_count,
      "file_bpp": 8.0 * len(encoded.data) / pixels_count,
      "payload_overhead_pct": 100.0 * (8.0 * payload_bytes / estimate - 1.0),
      "file_overhead_pct": 100.0 * (8.0 * len(encoded.data) / estimate - 1.0),
      "file_vs_coded_pct": 100.0 * (8.0 * len(encoded.data) / coded - 1.0),
      "table_overhead_pct": 100.0 * ((table_y + table_z) / estimate - 1.0),
      "table_ceil_overhead_pct": 100.0 * ((table_y_ceil + table_z) / estimate - 1.0),
  }


def real_vs_estimate(model: ExportedModel, images: Sequence[tuple[str, np.ndarray]],
                     rates: Sequence[float]) -> dict:
  """Per-image rows and per-rate totals of real versus estimated bits.

  images: (name, uint8 [H, W, 3] or [H, W]) pairs. Per-rate overheads are of
  the summed bits over all images (what a table of averages reports).
  """
  rows, totals = [], []
  for rate in rates:
    per_rate = []
    for name, pixels in images:
      row = {"image": name, **measure(model, pixels, rate)}
      per_rate.append(row)
    rows.extend(per_rate)
    estimate = sum(r["estimate_bits"] for r in per_rate)
    payload = 8.0 * sum(r["z_bytes"] + r["y_bytes"] for r in per_rate)
    file_bits = 8.0 * sum(r["file_bytes"] for r in per_rate)
    table = sum(r["table_bits_y"] + r["table_bits_z"] for r in per_rate)
    ceil = sum(r["table_bits_y_ceil"] + r["table_bits_z"] for r in per_rate)
    coded = sum(r["coded_bits"] for r in per_rate)
    totals.append({
        "rate": float(np.float32(rate)), "images": len(per_rate),
        "estimate_bpp": float(np.mean([r["estimate_bpp"] for r in per_rate])),
        "file_bpp": float(np.mean([r["file_bpp"] for r in per_rate])),
        "table_overhead_pct": 100.0 * (table / estimate - 1.0),
        "table_ceil_overhead_pct": 100.0 * (ceil / estimate - 1.0),
        "payload_overhead_pct": 100.0 * (payload / estimate - 1.0),
        "file_overhead_pct": 100.0 * (file_bits / estimate - 1.0),
        "coded_bpp": float(np.mean([r["coded_bpp"] for r in per_rate])),
        "file_vs_coded_pct": 100.0 * (file_bits / coded - 1.0),
        "max_image_payload_overhead_pct": max(r["payload_overhead_pct"] for r in per_rate),
        "max_image_file_vs_coded_pct": max(r["file_vs_coded_pct"] for r in per_rate),
        "min_image_file_vs_coded_pct": min(r["file_vs_coded_pct"] for r in per_rate),
    })
  return {"fingerprint": model.fingerprint.hex(), "rates": totals, "images": rows}


def format_table(report: dict) -> str:
  lines = ["| rate s | estimate bpp | coded est. bpp | file bpp | tables vs est. "
           "| tables if ceil scale | payload vs est. | file vs est. | file vs coded est. "
           "| per image, file vs coded | worst image payload |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in report["rates"]:
    lines.append(
        f"| {r['rate']:.2f} | {r['estimate_bpp']:.4f} | {r['coded_bpp']:.4f} "
        f"| {r['file_bpp']:.4f} "
        f"| {r['table_overhead_pct']:+.2f}% | {r['table_ceil_overhead_pct']:+.2f}% "
        f"| {r['payload_overhead_pct']:+.2f}% | {r['file_overhead_pct']:+.2f}% "
        f"| {r['file_vs_coded_pct']:+.2f}% "
        f"| {r['min_image_file_vs_coded_pct']:+.2f}..{r['max_image_file_vs_coded_pct']:+.2f}% "
        f"| {r['max_image_payload_overhead_pct']:+.2f}% |")
  return "\n".join(lines)
