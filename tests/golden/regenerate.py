"""Regenerates the golden codec models and bitstream hashes. Run from the repo root:

    python tests/golden/regenerate.py                  # models, hashes and residual files
    python tests/golden/regenerate.py --hashes-only    # keep the models
    python tests/golden/regenerate.py --residual-only  # only the residual models and files
    python tests/golden/regenerate.py --flat-only      # only the flat-base model and files

Only do this for an intended change of the file format, the exported model
format or the coding numerics, and say so in the commit: tests/test_codec.py
(lossy) and tests/test_residual_codec.py (near-lossless and lossless) exist
to catch such changes.

Lossy: the model is tiny.py with `tiny_params()` (tests/codec_helpers.py),
exported through gvae_jax.coding.export; the images are made by
`make_image()`, so nothing but the model and the hashes is stored.

Residual (tau >= 0): the model is the tiny scalable model
(`tiny_scalable_config()`, `tiny_scalable_params()`: the golden lossy
parameters plus a residual layer drawn at a fixed seed), exported to
tiny_scalable_model; residual_hashes.json holds the sha256 of each case's
.gvae file and of its decoded pixels, and residual/ the .gvae files
themselves (a few KB each), so a decoder change is caught on the committed
bytes too, not only on what today's encoder writes.

Flat base (mode FLAT_RESIDUAL, format version 2): tiny_flat_model is the
tiny scalable model with the tiny flat head (`tiny_flat_config()`,
`tiny_flat_params()`) as its flat_head/; flat_hashes.json and flat/ hold the
files coded with base="flat", as for the residual cases.
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

from codec_helpers import (GOLDEN_DIR, GOLDEN_HASHES, GOLDEN_MODEL, make_image,  # noqa: E402
                           tiny_config, tiny_flat_config, tiny_flat_params, tiny_params,
                           tiny_scalable_config, tiny_scalable_params)
from gvae_jax.coding import codec, export, flat_head  # noqa: E402

GOLDEN_SCALABLE_MODEL = GOLDEN_DIR / "tiny_scalable_model"
RESIDUAL_HASHES = GOLDEN_DIR / "residual_hashes.json"
RESIDUAL_FILES = GOLDEN_DIR / "residual"
GOLDEN_FLAT_MODEL = GOLDEN_DIR / "tiny_flat_model"
FLAT_HASHES = GOLDEN_DIR / "flat_hashes.json"
FLAT_FILES = GOLDEN_DIR / "flat"

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

# Flat-base files: (name, height, width, seed, tau, grayscale), coded with base="flat".
FLAT_CASES = (
    ("flat_lossless_24x40_t0", 24, 40, 5, 0, False),
    ("flat_near_33x70_t1", 33, 70, 6, 1, False),  # two patches side by side
    ("flat_near_17x20_t5", 17, 20, 7, 5, False),
    ("flat_gray_20x12_t2", 20, 12, 8, 2, True),
)


def case_image(height: int, width: int, seed: int, grayscale: bool) -> np.ndarray:
  image = make_image(height, width, seed)
  return image[:, :, 1] if grayscale else image


def compute_hashes(model: export.ExportedModel) -> dict:
  hashes = {}
  for name, height, width, seed, rate, grayscale in CASES:
    data = codec.compress(model, case_image(height, width, seed, grayscale), rate)
    pixels = codec.decompress(model, data)
    hashes[name] = {"gvae_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                    "decoded_sha256": hashlib.sha256(pixels.tobytes()).hexdigest()}
  return hashes


def compute_residual_hashes(model: export.ExportedModel) -> dict:
  """The residual cases' hashes; writes their .gvae files to RESIDUAL_FILES."""
  hashes = {}
  for name, height, width, seed, rate, tau, grayscale in RESIDUAL_CASES:
    data = codec.compress(model, case_image(height, width, seed, grayscale), rate, tau=tau)
    pixels = codec.decompress(model, data)
    hashes[name] = {"gvae_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                    "decoded_sha256": hashlib.sha256(pixels.tobytes()).hexdigest()}
    RESIDUAL_FILES.mkdir(exist_ok=True)
    (RESIDUAL_FILES / f"{name}.gvae").write_bytes(data)
  return hashes


def compute_flat_hashes(model: export.ExportedModel) -> dict:
  """The flat cases' hashes; writes their .gvae files to FLAT_FILES."""
  hashes = {}
  for name, height, width, seed, tau, grayscale in FLAT_CASES:
    data = codec.compress(model, case_image(height, width, seed, grayscale), tau=tau, base="flat")
    pixels = codec.decompress(model, data)
    hashes[name] = {"gvae_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                    "decoded_sha256": hashlib.sha256(pixels.tobytes()).hexdigest()}
    FLAT_FILES.mkdir(exist_ok=True)
    (FLAT_FILES / f"{name}.gvae").write_bytes(data)
  return hashes


def write_flat_model() -> None:
  """GOLDEN_FLAT_MODEL: the golden scalable model with the tiny flat head."""
  import shutil
  import tempfile

  config = tiny_flat_config()
  config.data.folder = ""
  config.train.export_dir = ""
  with tempfile.TemporaryDirectory() as temp:
    head = flat_head.write_flat_head(config, tiny_flat_params(config), Path(temp) / "head")
    if GOLDEN_FLAT_MODEL.exists():
      shutil.rmtree(GOLDEN_FLAT_MODEL)
    flat_head.attach_flat_head(GOLDEN_SCALABLE_MODEL, head, GOLDEN_FLAT_MODEL)


# CPU features that change XLA's float32 kernels (vector width, FMA), hence
# the residual probabilities: files written with one signature may fail their
# pixel check with another (README, Portability).
_FLOAT_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                   "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd", "sve")


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
                      help="keep the committed models, recompute the hashes (and residual files)")
  parser.add_argument("--residual-only", action="store_true",
                      help="leave the lossy golden model and hashes alone")
  parser.add_argument("--flat-only", action="store_true",
                      help="only the flat-base golden model, files and hashes")
  args = parser.parse_args()
  if not args.flat_only:
    regenerate_lossy_and_residual(args)
  if not args.hashes_only:
    write_flat_model()
  flat = export.load_model(GOLDEN_FLAT_MODEL)
  hashes = {"model_fingerprint": flat.fingerprint.hex(), "platform": platform_signature(),
            "cases": compute_flat_hashes(flat)}
  FLAT_HASHES.write_text(json.dumps(hashes, indent=2) + "\n")
  print(f"wrote {FLAT_HASHES} and {FLAT_FILES}/ ({len(FLAT_CASES)} cases, "
        f"model {flat.fingerprint.hex()})")


def regenerate_lossy_and_residual(args):
  if not args.residual_only:
    if not args.hashes_only:
      config = tiny_config()
      config.data.folder = config.eval.folder = ""  # no machine paths in the repo
      export.export_params(config, tiny_params(config), GOLDEN_MODEL, force=True)
    model = export.load_model(GOLDEN_MODEL)
    hashes = {"model_fingerprint": model.fingerprint.hex(), "cases": compute_hashes(model)}
    GOLDEN_HASHES.write_text(json.dumps(hashes, indent=2) + "\n")
    print(f"wrote {GOLDEN_HASHES} ({len(CASES)} cases, model {model.fingerprint.hex()})")
  if not args.hashes_only:
    config = tiny_scalable_config()
    config.data.folder = config.eval.folder = ""
    export.export_params(config, tiny_scalable_params(config), GOLDEN_SCALABLE_MODEL, force=True)
  scalable = export.load_model(GOLDEN_SCALABLE_MODEL)
  hashes = {"model_fingerprint": scalable.fingerprint.hex(), "platform": platform_signature(),
            "cases": compute_residual_hashes(scalable)}
  RESIDUAL_HASHES.write_text(json.dumps(hashes, indent=2) + "\n")
  print(f"wrote {RESIDUAL_HASHES} and {RESIDUAL_FILES}/ ({len(RESIDUAL_CASES)} cases, "
        f"model {scalable.fingerprint.hex()})")


if __name__ == "__main__":
  main()
