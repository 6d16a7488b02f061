"""Regenerates the golden exact lossy-base residual model and files (mode
EXACT_RESIDUAL, format version 7).

    python tests/golden/regenerate_exact_residual.py               # model, files, hashes
    python tests/golden/regenerate_exact_residual.py --hashes-only # keep the model

The model (tiny_exact_residual_model) is the golden tiny lossy model with a
prior head and a "delta" residual head drawn at seed 0
(codec_helpers.tiny_scalable_params on tiny_delta_config), converted with
`gvae convert-exact` (gvae_jax.coding.export.convert_exact). The files
(exact_residual/, hashes in exact_residual_hashes.json) are lossless and
near-lossless files on its lossy base, coded with the constriction coder
(installed in every profile). Like the other exact sets they carry no
platform: they must decode to the same pixels everywhere (only the decoded
pixels are checked elsewhere: the encoder's analysis is float). Only for an
intended change of this mode's format or numerics; say so in the commit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec_helpers import GOLDEN_DIR, tiny_delta_config, tiny_scalable_params  # noqa: E402
from golden.regenerate import case_image  # noqa: E402
from gvae_jax.coding import codec, export  # noqa: E402
from gvae_jax.coding.coder import CONSTRICTION_RANGE_CODER_ID  # noqa: E402

MODEL = GOLDEN_DIR / "tiny_exact_residual_model"
HASHES = GOLDEN_DIR / "exact_residual_hashes.json"
FILES = GOLDEN_DIR / "exact_residual"
# (name, height, width, seed, rate, tau, grayscale)
CASES = (
    ("exact_residual_24x40_s0.5_lossless", 24, 40, 21, 0.5, 0, False),
    ("exact_residual_33x70_s0.37_tau2", 33, 70, 22, 0.37, 2, False),  # odd size
    ("exact_residual_gray_20x12_s1_tau5", 20, 12, 23, 1.0, 5, True),
)


def compute_hashes(model: export.ExportedModel) -> dict:
  FILES.mkdir(exist_ok=True)
  out = {}
  for name, height, width, seed, rate, tau, grayscale in CASES:
    pixels = case_image(height, width, seed, grayscale)
    data = codec.compress(model, pixels, rate=rate, tau=tau, base="lossy",
                          coder=CONSTRICTION_RANGE_CODER_ID)
    (FILES / f"{name}.gvae").write_bytes(data)
    decoded = codec.decompress(model, data)
    out[name] = {"gvae_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                 "mode": codec.read_header(data).mode.name,
                 "decoded_sha256": hashlib.sha256(decoded.tobytes()).hexdigest()}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hashes-only", action="store_true", help="keep the committed model")
  args = parser.parse_args()
  if not args.hashes_only:
    config = tiny_delta_config()
    with tempfile.TemporaryDirectory() as temp:
      export.export_params(config, tiny_scalable_params(config), Path(temp) / "float")
      export.convert_exact(Path(temp) / "float", MODEL, force=True)
  model = export.load_model(MODEL)
  assert model.exact_residual is not None
  hashes = {"model_fingerprint": model.fingerprint.hex(), "cases": compute_hashes(model)}
  HASHES.write_text(json.dumps(hashes, indent=2) + "\n")
  print(f"wrote {HASHES} and {FILES}/ ({len(CASES)} cases, model {model.fingerprint.hex()})")


if __name__ == "__main__":
  main()
