"""Regenerates the golden codec model and bitstream hashes. Run from the repo root:

    python tests/golden/regenerate.py              # model and hashes
    python tests/golden/regenerate.py --hashes-only

Only do this for an intended change of the file format, the exported model
format or the coding numerics, and say so in the commit: tests/test_golden.py
exists to catch such changes. The model is tiny.py with `tiny_params()`
(tests/codec_helpers.py), exported through gvae_jax.coding.export; the
images are made by `make_image()`, so nothing but the model and the hashes
is stored.
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

from codec_helpers import GOLDEN_HASHES, GOLDEN_MODEL, make_image, tiny_config, tiny_params  # noqa: E402
from gvae_jax.coding import codec, export  # noqa: E402

# (name, height, width, seed, rate, grayscale)
CASES = (
    ("gradient_48x80_s0", 48, 80, 1, 0.0, False),
    ("odd_33x65_s0.37", 33, 65, 2, 0.37, False),
    ("pixel_1x1_s1", 1, 1, 3, 1.0, False),
    ("gray_40x24_s0.5", 40, 24, 4, 0.5, True),
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hashes-only", action="store_true",
                      help="keep the committed model, recompute the hashes")
  args = parser.parse_args()
  if not args.hashes_only:
    config = tiny_config()
    config.data.folder = config.eval.folder = ""  # no machine paths in the repo
    export.export_params(config, tiny_params(config), GOLDEN_MODEL, force=True)
  model = export.load_model(GOLDEN_MODEL)
  hashes = {"model_fingerprint": model.fingerprint.hex(), "cases": compute_hashes(model)}
  GOLDEN_HASHES.write_text(json.dumps(hashes, indent=2) + "\n")
  print(f"wrote {GOLDEN_HASHES} ({len(CASES)} cases, model {model.fingerprint.hex()})")


if __name__ == "__main__":
  main()
