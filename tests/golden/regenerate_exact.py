"""Regenerates the golden exact flat-base model and files (mode EXACT_FLAT_RESIDUAL, format
version 3, and EXACT_FLAT_RESIDUAL_TILED, format version 5).

    python tests/golden/regenerate_exact.py               # model, files and hashes
    python tests/golden/regenerate_exact.py --hashes-only # keep the model

tiny_exact_flat_model is the golden tiny scalable model with the tiny flat
head (codec_helpers.tiny_flat_config / tiny_flat_params) converted to exact
arithmetic (gvae_jax.coding.exact_head) as its flat_head/; exact_hashes.json
and exact/ hold files coded with base="flat" and the constriction coder
(installed in every profile). Unlike the float golden sets they carry no
platform: they must decode to the same pixels everywhere. Only for an
intended change of the exact format or numerics; say so in the commit.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec_helpers import GOLDEN_DIR  # noqa: E402
from golden.regenerate_flat import code_flat_cases, write_tiny_flat_model  # noqa: E402
from gvae_jax.coding import export  # noqa: E402
from gvae_jax.coding.coder import CONSTRICTION_RANGE_CODER_ID  # noqa: E402

GOLDEN_EXACT_MODEL = GOLDEN_DIR / "tiny_exact_flat_model"
EXACT_HASHES = GOLDEN_DIR / "exact_hashes.json"
EXACT_FILES = GOLDEN_DIR / "exact"

# (name, height, width, seed, tau, grayscale), coded with base="flat".
EXACT_CASES = (
    ("exact_lossless_24x40_t0", 24, 40, 5, 0, False),
    ("exact_near_33x70_t1", 33, 70, 6, 1, False),  # two patches side by side
    ("exact_near_70x20_t5", 70, 20, 7, 5, False),  # two patches, one above the other
    ("exact_gray_20x12_t2", 20, 12, 8, 2, True),
)


# Tiled exact files (mode EXACT_FLAT_RESIDUAL_TILED, format version 5), coded
# and decoded with GOLDEN_TILES: the layout (tile order, the tile table, each
# tile's layer) at a tile size that keeps the files small; the real policy's
# 2048-pixel tiles run the same code.
TILED_CASES = (
    ("exact_tiled_70x100_t0", 70, 100, 9, 0, False),  # 2 x 2 tiles, edge tiles partial
    ("exact_tiled_40x140_t3", 40, 140, 10, 3, False),  # 1 x 3 tiles, the last 12 wide
)
GOLDEN_TILES = {"RESIDUAL_TILE_PIXELS": 64, "TILED_ABOVE": 64 * 64}


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


def compute_exact_hashes(model: export.ExportedModel) -> dict:
  return code_flat_cases(model, EXACT_CASES, EXACT_FILES, CONSTRICTION_RANGE_CODER_ID)


def compute_tiled_hashes(model: export.ExportedModel) -> dict:
  with golden_tiles():
    return code_flat_cases(model, TILED_CASES, EXACT_FILES, CONSTRICTION_RANGE_CODER_ID)


def write_exact_model() -> None:
  write_tiny_flat_model(GOLDEN_EXACT_MODEL, exact=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hashes-only", action="store_true", help="keep the committed model")
  args = parser.parse_args()
  if not args.hashes_only:
    write_exact_model()
  model = export.load_model(GOLDEN_EXACT_MODEL)
  hashes = {"model_fingerprint": model.fingerprint.hex(), "cases": compute_exact_hashes(model),
            "tiled_cases": compute_tiled_hashes(model)}
  EXACT_HASHES.write_text(json.dumps(hashes, indent=2) + "\n")
  print(f"wrote {EXACT_HASHES} and {EXACT_FILES}/ ({len(EXACT_CASES) + len(TILED_CASES)} cases, "
        f"model {model.fingerprint.hex()})")


if __name__ == "__main__":
  main()
