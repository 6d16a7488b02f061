"""Regenerates the golden codec models and bitstreams. Run from the repo root:

    python tests/golden/regenerate.py                  # models, then every installed coder's files
    python tests/golden/regenerate.py --hashes-only    # keep the models
    python tests/golden/regenerate.py --coder constriction  # one coder's files only

Only do this for an intended change of the file format, the exported model
format or the coding numerics, and say so in the commit: tests/test_codec.py
(lossy) and tests/test_residual_codec.py (near-lossless and lossless) exist
to catch such changes.

One golden set per entropy coder (tests/golden/<coder>/, coder names of
gvae_jax.coding.coder.CODER_NAMES), written under the install profile that
writes that coder by default (tfc: the tfc profile; constriction: the
default profile) and recording the platform it was written on (CPU
features, jaxlib): there the tests demand byte-exact files, elsewhere only
that the committed files decode to the stored pixels or are refused by their
pixel check.

Lossy: the model is tiny.py with `tiny_params()` (tests/codec_helpers.py),
exported through gvae_jax.coding.export; the images are made by
`make_image()`. Residual (tau >= 0): the model is the tiny scalable model
(`tiny_scalable_config()`, `tiny_scalable_params()`: the golden lossy
parameters plus a residual layer drawn at a fixed seed), exported to
tiny_scalable_model. Each set's hashes.json holds the sha256 of each case's
.gvae file and of its decoded pixels, and files/ the .gvae files themselves
(a few KB in all), so a decoder change is caught on the committed bytes too,
not only on what today's encoder writes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from codec_helpers import (GOLDEN_DIR, GOLDEN_MODEL, make_image, tiny_config,  # noqa: E402
                           tiny_params, tiny_scalable_config, tiny_scalable_params)
from gvae_jax.coding import codec, export  # noqa: E402
from gvae_jax.coding.coder import CODER_NAMES, CodingError, get_coder  # noqa: E402

GOLDEN_SCALABLE_MODEL = GOLDEN_DIR / "tiny_scalable_model"


def hashes_path(coder: str) -> Path:
  return GOLDEN_DIR / coder / "hashes.json"


def files_dir(coder: str) -> Path:
  return GOLDEN_DIR / coder / "files"


def installed_coders() -> list[str]:
  names = []
  for name, coder_id in sorted(CODER_NAMES.items()):
    try:
      get_coder(coder_id)
    except CodingError:
      continue
    names.append(name)
  return names

# (name, height, width, seed, rate, grayscale)
CASES = (
    ("gradient_48x80_s0", 48, 80, 1, 0.0, False),
    ("odd_33x65_s0.37", 33, 65, 2, 0.37, False),
    ("pixel_1x1_s1", 1, 1, 3, 1.0, False),
    ("gray_40x24_s0.5", 40, 24, 4, 0.5, True),
)


# Residual files: (name, height, width, seed, rate, tau, grayscale). The tiny
# model's base layer is untrained, so residuals span most of [-255, 255]: at
# tau 0, 1 and 3 the windows are two-level, at tau 10 one-level.
RESIDUAL_CASES = (
    ("lossless_24x40_t0", 24, 40, 5, 0.5, 0, False),
    ("near_33x20_t1", 33, 20, 6, 0.25, 1, False),
    ("near_17x65_t3", 17, 65, 7, 1.0, 3, False),
    ("gray_20x12_t3", 20, 12, 8, 0.5, 3, True),
    ("near_16x16_t10", 16, 16, 9, 0.0, 10, False),
)


def case_image(height: int, width: int, seed: int, grayscale: bool) -> np.ndarray:
  image = make_image(height, width, seed)
  return image[:, :, 1] if grayscale else image


def _case(model, coder: str, name: str, pixels: np.ndarray, rate: float, tau) -> dict:
  data = codec.compress(model, pixels, rate, tau=tau, coder=CODER_NAMES[coder])
  decoded = codec.decompress(model, data)
  files_dir(coder).mkdir(parents=True, exist_ok=True)
  (files_dir(coder) / f"{name}.gvae").write_bytes(data)
  return {"gvae_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
          "decoded_sha256": hashlib.sha256(decoded.tobytes()).hexdigest()}


def write_golden_set(coder: str) -> None:
  """Writes tests/golden/<coder>/ (module doc) from the committed models."""
  lossy, scalable = export.load_model(GOLDEN_MODEL), export.load_model(GOLDEN_SCALABLE_MODEL)
  lossy_cases = {name: _case(lossy, coder, name, case_image(h, w, seed, gray), rate, None)
                 for name, h, w, seed, rate, gray in CASES}
  residual_cases = {name: _case(scalable, coder, name, case_image(h, w, seed, gray), rate, tau)
                    for name, h, w, seed, rate, tau, gray in RESIDUAL_CASES}
  hashes = {"coder": coder, "platform": platform_signature(),
            "lossy": {"model_fingerprint": lossy.fingerprint.hex(), "cases": lossy_cases},
            "residual": {"model_fingerprint": scalable.fingerprint.hex(),
                         "cases": residual_cases}}
  hashes_path(coder).write_text(json.dumps(hashes, indent=2) + "\n")
  print(f"wrote {hashes_path(coder)} and {files_dir(coder)}/ "
        f"({len(CASES)} lossy, {len(RESIDUAL_CASES)} residual cases)")


# CPU features that change XLA's float32 kernels (vector width, FMA), hence
# the residual probabilities: files written with one signature may fail their
# pixel check with another (README, Portability).
# avx512_fp16 (Sapphire Rapids on): on 2026-12-04 a host that differs from the one
# that wrote the constriction set only by it (same jaxlib) could not decode its
# lossless file: XLA picks kernels by CPU generation, not only by the older flags.
_FLOAT_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                   "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "neon", "asimd",
                   "sve")


def platform_signature() -> dict:
  """What decides whether residual files decode bit-exactly here."""
  import platform

  import jaxlib
  flags = set()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        flags.update(line.split(":", 1)[1].split())
  except OSError:
    pass
  return {"machine": platform.machine(), "jaxlib": jaxlib.__version__,
          "cpu_features": sorted(flags.intersection(_FLOAT_FEATURES))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hashes-only", action="store_true",
                      help="keep the committed models, rewrite the golden files and hashes")
  parser.add_argument("--coder", choices=sorted(CODER_NAMES), action="append",
                      help="only this coder's golden set (default: every installed coder)")
  args = parser.parse_args()
  if not args.hashes_only:
    config = tiny_config()
    config.data.folder = config.eval.folder = ""  # no machine paths in the repo
    export.export_params(config, tiny_params(config), GOLDEN_MODEL, force=True)
    config = tiny_scalable_config()
    config.data.folder = config.eval.folder = ""
    export.export_params(config, tiny_scalable_params(config), GOLDEN_SCALABLE_MODEL, force=True)
  for coder in args.coder or installed_coders():
    write_golden_set(coder)


if __name__ == "__main__":
  main()
