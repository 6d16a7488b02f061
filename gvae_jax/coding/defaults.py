"""The models shipped inside the package, used when `gvae compress` gets no --model.

gvae_jax/default_models/ holds the exported models (package data, so an
installed wheel has them; 53 MB together):

  lossy/     experiments/models/small_long (step 43000) converted with `gvae
             convert-exact`: the best shipped lossy model (0.37-1.42 bpp on
             Kodak, BD-rate -15 % against JPEG), for --rate / --bpp
  scalable/  experiments/models/small_nearlossless_delta with the flat head
             experiments/models/flat_residual attached in exact form
             (`gvae attach-flat --exact`), converted: for --tau / --lossless;
             its files take the smaller of the flat and the lossy base (in
             practice the flat one); both decode alike on every platform (its
             lossy-base head is converted too: exact_residual.npz). Its lossy
             layer is weaker than lossy/'s, so lossy files use lossy/
  retired/   earlier shipped models, kept only so that the files they wrote
             still decode without --model (retired/small: the lossy model
             before small_long, `small` step 5000, with its version 1 exact
             conversion kept as exact_lossy_v1.npz)

`gvae decompress` without --model picks the shipped model whose fingerprint
the file carries (the scalable model's with or without its flat head: files
of the model before the head was attached decode with it too; an earlier
exact conversion's, listed in the manifest's previous_exact; a retired
model's; see gvae_jax.coding.export). Reads only the manifests here: no JAX.
"""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "default_models"
LOSSY_MODEL = DEFAULT_MODELS_DIR / "lossy"
SCALABLE_MODEL = DEFAULT_MODELS_DIR / "scalable"
RETIRED_MODELS_DIR = DEFAULT_MODELS_DIR / "retired"


def default_model(near_lossless: bool) -> Path:
  """The shipped model for a lossy (False) or near-lossless / lossless (True) file."""
  return SCALABLE_MODEL if near_lossless else LOSSY_MODEL


def model_for_fingerprint(fingerprint: bytes) -> Path | None:
  """The shipped model whose manifest has this fingerprint, or None."""
  wanted = fingerprint.hex()
  retired = sorted(RETIRED_MODELS_DIR.iterdir()) if RETIRED_MODELS_DIR.is_dir() else []
  for directory in [LOSSY_MODEL, SCALABLE_MODEL] + retired:
    try:
      manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
      continue
    if not isinstance(manifest, dict):
      continue
    known = [manifest.get(key) for key in ("fingerprint", "fingerprint_with_flat_head",
                                           "fingerprint_exact",
                                           "source_fingerprint_with_flat_head")]
    previous = manifest.get("previous_exact")  # earlier exact conversions (export)
    if isinstance(previous, list):
      known += [entry.get("fingerprint") for entry in previous if isinstance(entry, dict)]
    if wanted in known:
      return directory
  return None
