"""Regenerates the golden flat-base model and files (mode FLAT_RESIDUAL, format version 2).

    python tests/golden/regenerate_flat.py               # model, files and hashes
    python tests/golden/regenerate_flat.py --hashes-only # keep the model

tiny_flat_model is the golden tiny scalable model (tests/golden/tiny_scalable_model)
with the tiny flat head (codec_helpers.tiny_flat_config / tiny_flat_params) as
its flat_head/; flat_hashes.json and flat/ hold the files coded with
base="flat" and the TFC range coder, with the platform that wrote them (as
the residual golden sets). Only for an intended change of the flat-base
format or numerics; say so in the commit.
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

from codec_helpers import GOLDEN_DIR, tiny_flat_config, tiny_flat_params  # noqa: E402
from golden.regenerate import GOLDEN_SCALABLE_MODEL, case_image, platform_signature  # noqa: E402
from gvae_jax.coding import codec, export, flat_head  # noqa: E402
from gvae_jax.coding.coder import TFC_RANGE_CODER_ID  # noqa: E402

GOLDEN_FLAT_MODEL = GOLDEN_DIR / "tiny_flat_model"
FLAT_HASHES = GOLDEN_DIR / "flat_hashes.json"
FLAT_FILES = GOLDEN_DIR / "flat"

# Flat-base files: (name, height, width, seed, tau, grayscale), coded with base="flat".
FLAT_CASES = (
    ("flat_lossless_24x40_t0", 24, 40, 5, 0, False),
    ("flat_near_33x70_t1", 33, 70, 6, 1, False),  # two patches side by side
    ("flat_near_17x20_t5", 17, 20, 7, 5, False),
    ("flat_gray_20x12_t2", 20, 12, 8, 2, True),
)



def code_flat_cases(model: export.ExportedModel, cases, files: Path, coder: int) -> dict:
  """The hashes of `cases` coded with base="flat"; writes their .gvae files to `files`."""
  hashes = {}
  for name, height, width, seed, tau, grayscale in cases:
    data = codec.compress(model, case_image(height, width, seed, grayscale), tau=tau, base="flat",
                          coder=coder)
    pixels = codec.decompress(model, data)
    hashes[name] = {"gvae_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                    "decoded_sha256": hashlib.sha256(pixels.tobytes()).hexdigest()}
    files.mkdir(exist_ok=True)
    (files / f"{name}.gvae").write_bytes(data)
  return hashes


def compute_flat_hashes(model: export.ExportedModel) -> dict:
  """The flat cases' hashes; writes their .gvae files to FLAT_FILES."""
  return code_flat_cases(model, FLAT_CASES, FLAT_FILES, TFC_RANGE_CODER_ID)


def write_tiny_flat_model(out: Path, exact: bool = False) -> None:
  """`out`: the golden scalable model with the tiny flat head (converted if `exact`)."""
  import shutil
  import tempfile

  config = tiny_flat_config()
  config.data.folder = ""
  config.train.export_dir = ""
  with tempfile.TemporaryDirectory() as temp:
    head = flat_head.write_flat_head(config, tiny_flat_params(config), Path(temp) / "head")
    if out.exists():
      shutil.rmtree(out)
    export.attach_flat_head(GOLDEN_SCALABLE_MODEL, head, out, exact=exact)


def write_flat_model() -> None:
  """GOLDEN_FLAT_MODEL: the golden scalable model with the tiny flat head."""
  write_tiny_flat_model(GOLDEN_FLAT_MODEL)



def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hashes-only", action="store_true", help="keep the committed model")
  args = parser.parse_args()
  if not args.hashes_only:
    write_flat_model()
  flat = export.load_model(GOLDEN_FLAT_MODEL)
  hashes = {"model_fingerprint": flat.fingerprint.hex(), "platform": platform_signature(),
            "cases": compute_flat_hashes(flat)}
  FLAT_HASHES.write_text(json.dumps(hashes, indent=2) + "\n")
  print(f"wrote {FLAT_HASHES} and {FLAT_FILES}/ ({len(FLAT_CASES)} cases, "
        f"model {flat.fingerprint.hex()})")


if __name__ == "__main__":
  main()
