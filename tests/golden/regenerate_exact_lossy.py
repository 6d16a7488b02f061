"""Regenerates the golden exact lossy model and files of today's exact_lossy.npz
version (modes EXACT_LOSSY and EXACT_LOSSY_TILED, format version 6).

    python tests/golden/regenerate_exact_lossy.py               # model, files and hashes
    python tests/golden/regenerate_exact_lossy.py --hashes-only # keep the model

One set per exact_lossy.npz version (gvae_jax.coding.exact_lossy.VERSION):
version 1 in tiny_exact_lossy_model, exact_lossy_hashes.json and exact_lossy/
(frozen: today's code reads and decodes it but converts to today's version
only), version 2 in tiny_exact_lossy_v2_model, exact_lossy_v2_hashes.json and
exact_lossy_v2/ (frozen likewise), version 3 in tiny_exact_lossy_v3_model,
exact_lossy_v3_hashes.json and exact_lossy_v3/. Each model is the golden tiny model (tests/golden/tiny_model)
converted with `gvae convert-exact` (gvae_jax.coding.export.convert_exact);
the files are coded with the constriction coder (installed in every profile). Like the exact flat set they
carry no platform: they must decode to the same pixels everywhere. (Only the
decoded pixels are checked on other machines: the encoder's analysis
transform is float, so another machine may write other bytes for the same
image, which it then decodes alike everywhere too.) Only for an intended
change of the exact lossy format or numerics; say so in the commit.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec_helpers import GOLDEN_DIR, GOLDEN_MODEL  # noqa: E402
from golden.regenerate import case_image  # noqa: E402
from gvae_jax.coding import codec, exact_lossy, export  # noqa: E402
from gvae_jax.coding.coder import CONSTRICTION_RANGE_CODER_ID  # noqa: E402


@dataclasses.dataclass(frozen=True)
class GoldenSet:
  version: int  # of exact_lossy.npz
  model: Path
  hashes: Path
  files: Path


SETS = {
    1: GoldenSet(1, GOLDEN_DIR / "tiny_exact_lossy_model", GOLDEN_DIR / "exact_lossy_hashes.json",
                 GOLDEN_DIR / "exact_lossy"),
    2: GoldenSet(2, GOLDEN_DIR / "tiny_exact_lossy_v2_model",
                 GOLDEN_DIR / "exact_lossy_v2_hashes.json", GOLDEN_DIR / "exact_lossy_v2"),
    3: GoldenSet(3, GOLDEN_DIR / "tiny_exact_lossy_v3_model",
                 GOLDEN_DIR / "exact_lossy_v3_hashes.json", GOLDEN_DIR / "exact_lossy_v3"),
}

# (name, height, width, seed, rate, grayscale)
CASES = (
    ("exact_lossy_24x40_s0.5", 24, 40, 11, 0.5, False),
    ("exact_lossy_33x70_s0.37", 33, 70, 12, 0.37, False),  # fractional rate, odd size
    ("exact_lossy_gray_20x12_s1", 20, 12, 13, 1.0, True),
    ("exact_lossy_tiled_150x130_s0.75", 150, 130, 14, 0.75, False),  # GOLDEN_TILES
)
GOLDEN_TILES = {"TILE_PIXELS": 128, "TILED_ABOVE": 128 * 128}


@contextlib.contextmanager
def golden_tiles():
  """gvae_jax.coding.tiling with GOLDEN_TILES' constants (restored after)."""
  from gvae_jax.coding import tiling

  saved = {name: getattr(tiling, name) for name in GOLDEN_TILES}
  try:
    for name, value in GOLDEN_TILES.items():
      setattr(tiling, name, value)
    yield
  finally:
    for name, value in saved.items():
      setattr(tiling, name, value)


def compute_hashes(model: export.ExportedModel, files: Path) -> dict:
  files.mkdir(exist_ok=True)
  out = {}
  with golden_tiles():
    for name, height, width, seed, rate, grayscale in CASES:
      pixels = case_image(height, width, seed, grayscale)
      data = codec.compress(model, pixels, rate=rate, coder=CONSTRICTION_RANGE_CODER_ID)
      (files / f"{name}.gvae").write_bytes(data)
      decoded = codec.decompress(model, data)
      out[name] = {"gvae_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                   "mode": codec.read_header(data).mode.name,
                   "decoded_sha256": hashlib.sha256(decoded.tobytes()).hexdigest()}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hashes-only", action="store_true", help="keep the committed model")
  args = parser.parse_args()
  golden = SETS[exact_lossy.VERSION]
  if not args.hashes_only:
    export.convert_exact(GOLDEN_MODEL, golden.model, force=True)
  model = export.load_model(golden.model)
  assert model.exact_lossy.version == golden.version
  hashes = {"model_fingerprint": model.fingerprint.hex(), "exact_lossy_version": golden.version,
            "cases": compute_hashes(model, golden.files)}
  golden.hashes.write_text(json.dumps(hashes, indent=2) + "\n")
  print(f"wrote {golden.hashes} and {golden.files}/ ({len(CASES)} cases, "
        f"model {model.fingerprint.hex()})")


if __name__ == "__main__":
  main()
