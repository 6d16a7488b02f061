"""Lossy-base near-lossless and lossless files in exact arithmetic (mode EXACT_RESIDUAL,
gvae_jax.coding.exact_residual): the base image, the prior u and the residual head's
mixtures are integers that do not depend on the platform."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codec_helpers import (OTHER_CPUS, REPO, make_image, tiny_delta_config,
                           tiny_scalable_config, tiny_scalable_params)
from gvae_jax.coding import codec, container, exact_residual, export
from gvae_jax.coding.container import Mode

SCALABLE = REPO / "gvae_jax" / "default_models" / "scalable"
PHOTO = REPO / "gvae_jax" / "samples" / "photo.png"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(float model directory, converted model directory) of a tiny scalable model with
  the "delta" correction."""
  root = tmp_path_factory.mktemp("exact_residual")
  config = tiny_delta_config()
  export.export_params(config, tiny_scalable_params(config), root / "float")
  export.convert_exact(root / "float", root / "exact")
  return root / "float", root / "exact"


def photo_crop(height, width):
  return np.asarray(Image.open(PHOTO).convert("RGB"))[:height, :width].copy()


@pytest.mark.parametrize("tau", [0, 1, 2, 5])
def test_exact_lossy_base_round_trip_holds_the_bound(tiny, tau):
  model = export.load_model(tiny[1])
  pixels = make_image(37, 53, tau)  # odd size, fractional rate
  encoded = codec.encode(model, pixels, 0.61, tau=tau)
  assert encoded.header.mode == Mode.EXACT_RESIDUAL and encoded.data[4] == 7
  decoded = codec.decompress(model, encoded.data)
  assert np.abs(decoded.astype(int) - pixels).max() <= tau
  if tau == 0:
    np.testing.assert_array_equal(decoded, pixels)
  np.testing.assert_array_equal(decoded, codec.reconstruct(model, encoded))
  # Without a rate the base rate is searched on the same exact layers.
  chosen = codec.encode_residual(model, pixels, tau, base="lossy")
  assert chosen.header.mode == Mode.EXACT_RESIDUAL
  assert np.abs(codec.decompress(model, chosen.data).astype(int) - pixels).max() <= tau


def test_xla_and_numpy_give_the_same_base_prior_and_mixtures(tiny):
  """The exact synthesis with its prior head, and the head's mixtures, evaluated by
  XLA and by NumPy (im2col int64 matmuls): the same integers."""
  model = export.load_model(tiny[1])
  encoded = codec.encode(model, make_image(40, 70, 9), 0.83, tau=1)
  mean, _ = codec.exact_hyper(model, encoded.z_symbols, 0.83)
  prior = model.exact_residual.prior
  pixels, u = model.exact_lossy.synthesize_with_prior(encoded.y_symbols, mean, 0.83, prior)
  pixels_np, u_np = model.exact_lossy.numpy_synthesize_with_prior(encoded.y_symbols, mean, 0.83,
                                                                   prior)
  np.testing.assert_array_equal(pixels, pixels_np)
  np.testing.assert_array_equal(u, u_np)
  assert u.dtype == np.int32 and np.abs(u).max() > 1 << 12  # 2^-16 units, not flags
  head = model.exact_residual.head
  assert head.prior_shift == 0
  rng = np.random.default_rng(0)
  taps = head.context.weight.shape[0]
  context = rng.integers(-255, 256, (32, taps)).astype(np.int64)
  prior_rows = u.reshape(-1, u.shape[-1])[rng.integers(0, u[0, :, :, 0].size, 32)]
  for tau_head, corrected in ((0, False), (2, True)):
    np.testing.assert_array_equal(head.mixture(context, prior_rows, tau_head, corrected),
                                  head.mixture_xla(context, prior_rows, tau_head, corrected))


def test_the_shipped_scalable_model_codes_lossy_base_files_exactly():
  model = export.load_model(SCALABLE)
  assert model.exact_residual is not None and model.flat.exact is not None
  names = [entry["file"] for entry in model.manifest["previous_exact"]]
  assert "exact_lossy.npz" in names  # the same lossy integers, before exact_residual.npz
  pixels = photo_crop(40, 64)
  data = codec.compress(model, pixels, tau=2, base="lossy", rate=1.5)
  assert codec.read_header(data).mode == Mode.EXACT_RESIDUAL
  assert np.abs(codec.decompress(model, data).astype(int) - pixels).max() <= 2
  # base "auto" still compares the bases (here the flat one is the smaller).
  assert codec.read_header(codec.compress(model, pixels, tau=2)).mode in (
      Mode.EXACT_FLAT_RESIDUAL, Mode.EXACT_RESIDUAL)


def _without_exact_residual(converted, out):
  """`converted` as convert-exact wrote it before exact_residual.npz existed."""
  shutil.copytree(converted, out)
  (out / exact_residual.EXACT_RESIDUAL_FILE).unlink()
  manifest = json.loads((out / "manifest.json").read_text())
  manifest.pop("exact_residual")
  fingerprint = export.with_exact_fingerprint(bytes.fromhex(manifest["fingerprint"]),
                                              (out / "exact_lossy.npz").read_bytes())
  manifest["fingerprint_exact"] = fingerprint.hex()
  (out / "manifest.json").write_text(json.dumps(manifest))
  return out


def test_files_of_the_conversion_without_the_residual_head_still_decode(tiny, tmp_path):
  old_dir = _without_exact_residual(tiny[1], tmp_path / "old")
  old = export.load_model(old_dir)
  assert old.exact_residual is None
  pixels = make_image(30, 45, 4)
  old_lossy = codec.compress(old, pixels, rate=0.8)
  old_residual = codec.compress(old, pixels, rate=0.8, tau=1, base="lossy")  # float base
  assert codec.read_header(old_lossy).mode == Mode.EXACT_LOSSY
  assert codec.read_header(old_residual).mode == Mode.RESIDUAL
  new = export.load_model(export.convert_exact(old_dir, tmp_path / "new"))
  assert new.exact_residual is not None and new.fingerprint != old.fingerprint
  assert not (tmp_path / "new" / "exact_lossy_v2.npz").exists()  # same integers: no copy
  for data in (old_lossy, old_residual):
    np.testing.assert_array_equal(codec.decompress(new, data), codec.decompress(old, data))
  # The float model's residual files decode too; the old model refuses the new mode.
  float_file = codec.compress(export.load_model(tiny[0]), pixels, rate=0.8, tau=1)
  assert np.abs(codec.decompress(new, float_file).astype(int) - pixels).max() <= 1
  with pytest.raises(codec.ModelMismatchError):
    codec.decompress(old, codec.compress(new, pixels, rate=0.8, tau=1, base="lossy"))


def test_a_damaged_exact_residual_npz_is_refused(tiny, tmp_path):
  out = shutil.copytree(tiny[1], tmp_path / "damaged")
  path = out / exact_residual.EXACT_RESIDUAL_FILE
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  changed = dict(arrays, **{"head.main.0.bias": arrays["head.main.0.bias"] + 1})
  np.savez(path, **changed)
  with pytest.raises(export.ExportError, match="fingerprint"):
    export.load_model(out)
  wrong = dict(arrays, **{"prior.bias": arrays["prior.bias"][:-1]})
  np.savez(path, **wrong)
  with pytest.raises(export.ExportError, match="wrong shape"):
    export.load_model(out)
  np.savez(path, **arrays)
  (out / "exact_lossy.npz").unlink()
  with pytest.raises(export.ExportError, match="needs a version 2"):
    export.load_model(out)


def test_exact_residual_files_need_the_exact_head(tiny):
  model = export.load_model(tiny[1])
  data = codec.compress(model, make_image(20, 30, 1), rate=0.5, tau=0, base="lossy")
  with pytest.raises(codec.ModelMismatchError):
    codec.decompress(export.load_model(tiny[0]), data)
  with pytest.raises(container.FormatError, match="lossy-base head"):
    codec.decompress(dataclasses.replace(model, exact_residual=None), data)


def test_a_separate_correction_head_keeps_float_lossy_base_files(tmp_path):
  config = tiny_scalable_config()
  export.export_params(config, tiny_scalable_params(config), tmp_path / "float")
  model = export.load_model(export.convert_exact(tmp_path / "float", tmp_path / "exact"))
  assert model.exact_lossy is not None and model.exact_residual is None
  data = codec.compress(model, make_image(20, 30, 2), rate=0.5, tau=1, base="lossy")
  assert codec.read_header(data).mode == Mode.RESIDUAL


def test_golden_exact_residual_files_decode_to_the_same_pixels():
  """tests/golden/exact_residual: no platform in the hashes, no escape."""
  from golden.regenerate_exact_residual import CASES, FILES, HASHES, MODEL

  model = export.load_model(MODEL)
  stored = json.loads(HASHES.read_text())
  assert model.fingerprint.hex() == stored["model_fingerprint"]
  for name, *_ in CASES:
    golden = (FILES / f"{name}.gvae").read_bytes()
    expected = stored["cases"][name]
    assert hashlib.sha256(golden).hexdigest() == expected["gvae_sha256"], name
    assert golden[4] == 7 and Mode(golden[5]) == Mode.EXACT_RESIDUAL
    decoded = codec.decompress(model, golden)
    assert hashlib.sha256(decoded.tobytes()).hexdigest() == expected["decoded_sha256"], name


# --- Other CPU kinds (must-show 1 of the issue: both directions, in subprocesses). ---

# (height, width, rate, tau): lossless and tau 1, 2, 5, fractional rates, odd sizes.
CASES = ((37, 53, 0.37, 0), (40, 64, 1.5, 1), (33, 70, 2.2, 2), (30, 45, 2.81, 5))

_CHILD = r"""
import hashlib, json, sys
import numpy as np
from PIL import Image
from gvae_jax.coding import codec, export
model = export.load_model(sys.argv[1])
photo = np.asarray(Image.open(sys.argv[2]).convert("RGB"))
cases = json.loads(sys.argv[3])
tag, folder = sys.argv[4], sys.argv[5]
out = {}
for h, w, rate, tau in cases:
  path = f"{folder}/{h}x{w}_{rate}_{tau}.{tag}.gvae"
  data = codec.compress(model, photo[:h, :w].copy(), rate=rate, tau=tau, base="lossy")
  open(path, "wb").write(data)
for path in sys.argv[6:]:
  out[path] = hashlib.sha256(codec.decompress(model, open(path, "rb").read()).tobytes()).hexdigest()
print(json.dumps(out))
"""


def test_exact_residual_files_decode_alike_on_other_cpu_kinds(tmp_path):
  """Each CPU kind (and device count, thread count) writes lossy-base files with the
  shipped scalable model; every kind decodes every file to the same pixels, within
  tau of the input (equal for lossless)."""
  cases = json.dumps([list(c) for c in CASES])
  files = [str(tmp_path / f"{h}x{w}_{rate}_{tau}.{tag}.gvae") for tag in OTHER_CPUS
           for h, w, rate, tau in CASES]

  def run(tag, decode):
    env = {**os.environ, **OTHER_CPUS[tag], "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _CHILD, str(SCALABLE), str(PHOTO), cases,
                             tag, str(tmp_path), *decode], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])

  digests = {}
  for tag in OTHER_CPUS:  # each kind writes its files (the earlier kinds' ones exist)
    written = [f for f in files if os.path.exists(f)]
    for path, digest in run(tag, written).items():
      digests.setdefault(path, set()).add(digest)
  for path, digest in run("sse", files).items():  # the later kinds' files, decoded there
    digests.setdefault(path, set()).add(digest)
  model = export.load_model(SCALABLE)
  photo = photo_crop(64, 96)
  for path in files:  # and here, in this process
    data = open(path, "rb").read()
    header = codec.read_header(data)
    assert header.mode == Mode.EXACT_RESIDUAL
    pixels = codec.decompress(model, data)
    digests[path].add(hashlib.sha256(pixels.tobytes()).hexdigest())
    original = photo[:header.height, :header.width]
    assert np.abs(pixels.astype(int) - original).max() <= header.tau
  assert all(len(d) == 1 for d in digests.values()), digests


@pytest.mark.parametrize("ladder", [(4096,), (3, 5, 7)])
def test_exact_files_decode_alike_with_other_step_batch_sizes(tiny, monkeypatch, ladder):
  """The pixels of a step are batched to a ladder of padded sizes (residual_plan); a
  decoder that batches them otherwise (one big padded batch, or many odd small ones)
  gets the same integers, for the lossy base and the flat base alike."""
  from gvae_jax.coding import residual_plan

  model = export.load_model(tiny[1])
  pixels = make_image(29, 41, 8)
  files = [codec.compress(model, pixels, rate=0.4, tau=tau, base="lossy") for tau in (0, 3)]
  expected = [codec.decompress(model, data) for data in files]
  for name in ("_BUCKET_LADDER", "_EXACT_BUCKET_LADDER"):  # the exact head uses the second
    monkeypatch.setattr(residual_plan, name, ladder)
  if ladder[-1] < 2048:  # above the ladder: multiples of 7, not of 2048
    monkeypatch.setattr(residual_plan, "_BUCKET_STEP", 7)
  assert residual_plan.exact_bucket_size(9) == (14 if ladder[-1] < 9 else 4096)
  residual_plan.plan_steps.cache_clear()
  try:
    for data, pixels_then in zip(files, expected):
      np.testing.assert_array_equal(codec.decompress(model, data), pixels_then)
  finally:
    residual_plan.plan_steps.cache_clear()
