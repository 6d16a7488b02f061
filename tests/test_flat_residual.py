"""Residual files on a flat base (mode FLAT_RESIDUAL) and the pixel-sampled trainer.

The model is the tiny scalable model of test_residual_codec with a tiny flat
head (codec_helpers.tiny_flat_params, drawn at a fixed seed) attached.
"""
import dataclasses
import json
import struct
import subprocess
import sys
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from codec_helpers import (REPO, exported_here, make_image, tiny_flat_config, tiny_flat_model,
                           tiny_flat_params, tiny_scalable_config, tiny_scalable_params)
from gvae_jax.coding import codec, container, export, flat_head, residual_codec
from gvae_jax.coding.container import FormatError, Mode
from gvae_jax.errors import UserError
from gvae_jax.models import flat_base


@pytest.fixture(scope="module")
def scalable(tmp_path_factory):
  out = tmp_path_factory.mktemp("model") / "scalable"
  export.export_params(tiny_scalable_config(), tiny_scalable_params(), out)
  return export.load_model(out)


@pytest.fixture(scope="module")
def model(scalable):
  return tiny_flat_model(scalable)


def image_with_full_range(height, width, seed=0):
  """make_image with one 0 and one 255 in every channel (so its symbol range is
  the widest an 8-bit image can have)."""
  pixels = make_image(height, width, seed)
  pixels[0, 0], pixels[-1, -1] = 0, 255
  return pixels


def assert_flat_round_trip(model, pixels, tau):
  encoded = codec.encode_flat(model, pixels, tau)
  header = encoded.header
  assert header.mode == Mode.FLAT_RESIDUAL and header.tau == tau and header.rate == 0.0
  assert encoded.data[4] == 2  # format version 2
  _, sections = container.unpack(encoded.data)
  assert len(sections) == codec.NUM_FLAT_SECTIONS  # no y / z sections
  decoded = codec.decode(model, encoded.data)
  error = np.abs(decoded.pixels.astype(np.int32) - pixels.astype(np.int32))
  assert error.max() <= tau, (pixels.shape, tau, error.max())  # on every pixel
  if tau == 0:
    np.testing.assert_array_equal(decoded.pixels, pixels)
  np.testing.assert_array_equal(decoded.residual.r_hat, encoded.residual.r_hat)
  np.testing.assert_array_equal(decoded.pixels, codec.reconstruct(model, encoded))
  assert np.all(decoded.base == flat_base.FLAT_BASE_VALUE)
  return encoded


@pytest.mark.parametrize("tau", [0, 1, 2, 5])
def test_round_trip_generated_image(model, tau):
  assert_flat_round_trip(model, make_image(40, 70, seed=3), tau)


def test_round_trip_crops_across_patches(model):
  """Crops whose patches are cut at odd places, a 1x1 image, a grayscale image."""
  big = make_image(80, 96, seed=5)
  for crop, tau in ((big[5:71, 3:70], 0), (big[:1, :1], 1), (big[10:30, 60:96], 2)):
    assert_flat_round_trip(model, np.ascontiguousarray(crop), tau)
  gray = make_image(20, 30, seed=6)[:, :, 1]
  encoded = codec.encode_flat(model, gray, 1)
  decoded = codec.decompress(model, encoded.data)
  assert decoded.shape == gray.shape and np.abs(decoded.astype(int) - gray).max() <= 1


def test_availability_flags():
  offsets = flat_base.tap_offsets(7, 2)
  # Rows -3, -2 full, row -1 up to dj = 1, three to the left, and (1, -3) (2*1 - 3 < 0).
  assert len(offsets) == 23
  flags = flat_base.tap_availability(70, 70, offsets, 128, 128)
  assert flags.shape == (128, 128, 23)
  assert not flags[0, 0].any()  # the first pixel has no context
  assert flags[10, 10].all()  # inside a patch and the image
  # The first row of the second patch row sees nothing above (another patch).
  above = offsets[:, 0] < 0
  assert not flags[64, 10][above].any() and flags[64, 10][~above].all()
  assert not flags[69, 69][offsets[:, 1] > 0].any()  # the image's right edge


def test_choice_follows_the_estimates(model, monkeypatch):
  monkeypatch.setattr(codec, "BOTH_PIXELS", 0)  # choose on the estimates, as for large images
  pixels = make_image(40, 70, seed=3)
  lossy_size = codec._choose_rate(model, pixels, 1, 4, codec._backend(None))[2]
  for flat_size, mode in ((lossy_size * 10, Mode.RESIDUAL), (lossy_size / 10, Mode.FLAT_RESIDUAL)):
    monkeypatch.setattr(codec, "estimate_flat_size", lambda *a, size=flat_size: size)
    assert codec.encode_residual(model, pixels, 1).header.mode == mode
  # Estimates this close: both are coded and the smaller real file is kept.
  monkeypatch.setattr(codec, "estimate_flat_size", lambda *a: lossy_size)
  chosen = codec.encode_residual(model, pixels, 1)
  rate = codec.choose_rate(model, pixels, 1)
  sizes = {Mode.FLAT_RESIDUAL: len(codec.encode_flat(model, pixels, 1).data),
           Mode.RESIDUAL: len(codec.encode(model, pixels, rate, 1).data)}
  assert len(chosen.data) == min(sizes.values()) and sizes[chosen.header.mode] == len(chosen.data)


def test_auto_is_the_smaller_real_file(model):
  """A small image is coded on both bases: the auto file is the smaller one."""
  pixels = make_image(48, 64, seed=9)
  assert 48 * 64 <= codec.BOTH_PIXELS
  for tau in (0, 2):
    auto = codec.compress(model, pixels, tau=tau)
    flat = codec.encode_flat(model, pixels, tau).data
    lossy = codec.encode(model, pixels, codec.choose_rate(model, pixels, tau), tau).data
    assert auto == min(flat, lossy, key=len), tau
    assert np.abs(codec.decompress(model, auto).astype(int) - pixels).max() <= tau


def test_explicit_bases_and_their_errors(model, scalable):
  pixels = make_image(16, 16, seed=1)
  assert container.unpack(codec.compress(model, pixels, tau=1, base="flat"))[0].mode == \
      Mode.FLAT_RESIDUAL
  assert container.unpack(codec.compress(model, pixels, 1.0, tau=1, base="lossy"))[0].mode == \
      Mode.RESIDUAL
  with pytest.raises(UserError, match="a flat base has no rate"):
    codec.compress(model, pixels, 1.0, tau=1, base="flat")
  with pytest.raises(UserError, match="has no flat head"):
    codec.compress(scalable, pixels, tau=1, base="flat")
  with pytest.raises(UserError, match="base must be one of"):
    codec.compress(model, pixels, tau=1, base="grey")
  with pytest.raises(UserError, match="give tau"):
    codec.compress(model, pixels, 1.0, base="flat")
  # Without a flat head, auto is the lossy layer, as before.
  assert container.unpack(codec.compress(scalable, pixels, tau=1))[0].mode == Mode.RESIDUAL


def with_fixed_crc(data: bytearray) -> bytes:
  count = data[42]
  end = 43 + 4 * count
  crc = zlib.crc32(bytes(data[end + 4:]), zlib.crc32(bytes(data[:end])))
  data[end:end + 4] = struct.pack("<I", crc)
  return bytes(data)


def test_hostile_flat_files(model, scalable):
  pixels = make_image(24, 24, seed=2)
  data = codec.encode_flat(model, pixels, 1).data
  header, sections = container.unpack(data)
  # The lossy-base model without the head: another fingerprint.
  with pytest.raises(codec.ModelMismatchError, match="different model"):
    codec.decode(scalable, data)
  # Its own fingerprint, but no flat head.
  same = dataclasses.replace(scalable, fingerprint=model.fingerprint)
  with pytest.raises(FormatError, match="flat base and needs a model with a flat head"):
    codec.decode(same, data)
  # Five sections (a lossy-base layout) under the flat mode.
  with pytest.raises(FormatError, match="flat-base residual file has 3 sections, this one 5"):
    codec.decode(model, container.pack(header, [b"", b""] + sections))
  with pytest.raises(FormatError, match="check section has 2 bytes"):
    codec.decode(model, container.pack(header, sections[:2] + [b"ab"]))
  # A lossy-base header over flat sections.
  lossy = dataclasses.replace(header, mode=Mode.RESIDUAL, rate=1.0)
  with pytest.raises(FormatError, match="residual file has 5 sections, this one 3"):
    codec.decode(model, container.pack(lossy, sections))
  # Side information cut short, and garbage streams: clear errors, never a traceback.
  with pytest.raises(UserError):
    codec.decode(model, container.pack(header, [sections[0][:2]] + sections[1:]))
  garbage = bytes(np.random.default_rng(0).integers(0, 256, len(sections[1]), np.uint8))
  with pytest.raises(UserError):
    codec.decode(model, container.pack(header, [sections[0], garbage, sections[2]]))
  crafted = bytearray(data)
  crafted[4] = 1
  with pytest.raises(FormatError, match="does not exist in format version 1"):
    codec.decode(model, with_fixed_crc(crafted))


def test_model_directory_with_flat_head(scalable, tmp_path):
  base_dir = tmp_path / "scalable"
  export.write_model_dir(scalable, base_dir)
  head_dir = flat_head.write_flat_head(tiny_flat_config(), tiny_flat_params(), tmp_path / "head",
                                       {"step": 7})
  combined = export.attach_flat_head(base_dir, head_dir, tmp_path / "combined")
  loaded = export.load_model(combined)
  assert loaded.flat is not None and loaded.flat.manifest["step"] == 7
  assert loaded.fingerprint == tiny_flat_model(scalable).fingerprint != scalable.fingerprint
  manifest = json.loads((combined / export.MANIFEST_FILE).read_text())
  assert manifest["fingerprint"] == scalable.fingerprint.hex()  # found by either
  assert manifest["fingerprint_with_flat_head"] == loaded.fingerprint.hex()
  pixels = make_image(16, 16, seed=4)
  data = codec.encode_flat(loaded, pixels, 0).data
  np.testing.assert_array_equal(codec.decompress(tiny_flat_model(scalable), data), pixels)
  with pytest.raises(codec.ModelMismatchError):  # a flat-base file needs the head
    codec.decompress(scalable, data)
  # The model with the head decodes the lossy and lossy-base files of the one without.
  lossy_base = codec.compress(scalable, pixels, 1.0, tau=1)
  assert codec.read_header(lossy_base).mode == Mode.RESIDUAL
  np.testing.assert_array_equal(codec.decompress(loaded, lossy_base),
                                codec.decompress(scalable, lossy_base))
  lossy = codec.compress(scalable, pixels, 1.0)
  np.testing.assert_array_equal(codec.decompress(loaded, lossy), codec.decompress(scalable, lossy))
  assert export.detach(loaded).fingerprint == scalable.fingerprint
  with pytest.raises(flat_head.FlatHeadError, match="already has a flat head"):
    export.attach_flat_head(combined, head_dir, tmp_path / "twice")
  # A manifest whose combined fingerprint is not the head's is refused.
  (combined / export.MANIFEST_FILE).write_text(json.dumps(
      {**manifest, "fingerprint_with_flat_head": "00" * 16}))
  with pytest.raises(export.ExportError, match="fingerprint_with_flat_head"):
    export.load_model(combined)
  (combined / export.MANIFEST_FILE).write_text(json.dumps(manifest))
  params = combined / flat_head.FLAT_HEAD_DIR / flat_head.PARAMS_FILE
  params.write_bytes(params.read_bytes()[:-1] + b"\x00")
  with pytest.raises(export.ExportError, match="fingerprint"):
    export.load_model(combined)
  with pytest.raises(flat_head.FlatHeadError, match="already exists"):
    export.attach_flat_head(base_dir, head_dir, combined)


def test_cli_flat_base(scalable, tmp_path):
  """gvae attach-flat, compress --base flat, info, decompress; a corrupt file is one line."""
  from PIL import Image

  export.write_model_dir(scalable, tmp_path / "scalable")
  flat_head.write_flat_head(tiny_flat_config(), tiny_flat_params(), tmp_path / "head")
  pixels = make_image(20, 28, seed=8)
  Image.fromarray(pixels).save(tmp_path / "in.png")

  def gvae(*args):
    return subprocess.run([sys.executable, "-m", "gvae_jax", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)

  result = gvae("attach-flat", "--model", tmp_path / "scalable", "--flat-head",
                tmp_path / "head", "--out", tmp_path / "combined")
  assert result.returncode == 0, result.stderr
  result = gvae("compress", tmp_path / "in.png", tmp_path / "f.gvae", "--model",
                tmp_path / "combined", "--tau", "2", "--base", "flat")
  assert result.returncode == 0, result.stderr
  info = gvae("info", tmp_path / "f.gvae")
  assert "base:              flat" in info.stdout and "format version:    2" in info.stdout, \
      info.stdout
  result = gvae("decompress", tmp_path / "f.gvae", tmp_path / "out.png", "--model",
                tmp_path / "combined")
  assert result.returncode == 0, result.stderr
  decoded = np.asarray(Image.open(tmp_path / "out.png"))
  assert np.abs(decoded.astype(int) - pixels).max() <= 2
  data = bytearray((tmp_path / "f.gvae").read_bytes())
  header, sections = container.unpack(bytes(data))
  streams = 47 + 4 * len(sections) + len(sections[0])  # where the streams section starts
  for k in range(streams, streams + len(sections[1])):  # every stream byte; the container
    data[k] ^= 0xFF  # CRC is fixed below: the decoder itself must notice
  (tmp_path / "bad.gvae").write_bytes(with_fixed_crc(data))
  result = gvae("decompress", tmp_path / "bad.gvae", tmp_path / "bad.png", "--model",
                tmp_path / "combined")
  last = result.stderr.strip().splitlines()[-1]  # after any TensorFlow / XLA start-up noise
  assert result.returncode != 0 and last.startswith("gvae: error:"), result.stderr
  assert "Traceback" not in result.stderr
  result = gvae("compress", tmp_path / "in.png", tmp_path / "g.gvae", "--model",
                tmp_path / "combined", "--rate", "1", "--base", "flat")
  assert result.returncode != 0 and "base" in result.stderr


# --- The trainer. ---

def test_sampled_bits_equal_the_coder_estimate(model):
  """The trainer's per-pixel bits, summed over every pixel of an image with
  the coder's patch places, equal residual_codec.estimate_bits of the flat
  file: the same taps, flags, mixtures and end bins."""
  from gvae_jax.train import flat_residual as trainer

  pixels = image_with_full_range(70, 75, seed=11)
  height, width = pixels.shape[:2]
  data = trainer.device_data(pixels.reshape(-1, 3), np.zeros(1, np.int64),
                             np.asarray([[height, width]]))
  yy, xx = np.mgrid[0:height, 0:width]
  g, i, j = (jnp.asarray(a.ravel(), jnp.int32) for a in (yy * width + xx, yy % 64, xx % 64))
  head = model.flat
  offsets = jnp.asarray(flat_base.tap_offsets(head.model.kernel_size, head.model.order))
  base, u = codec._flat_base(model, height, width)
  for tau in (0, 2):
    taus = jnp.full((g.shape[0],), tau, jnp.int32)
    batch = trainer.gather_taps(data, g, i, j, offsets, taus, True)
    sampled = float(jnp.sum(trainer.sample_bits(head.model, head.params, *batch, taus,
                                                 tau > 0)))
    estimate = float(np.sum(residual_codec.estimate_bits(codec._flat_view(model), pixels, base,
                                                         u, tau)))
    assert sampled == pytest.approx(estimate, rel=1e-4), tau


@pytest.mark.isolated  # trains in-process (TF input, Orbax, JAX): a fresh interpreter (conftest)
def test_trainer_runs_resumes_and_exports(tmp_path):
  from PIL import Image

  from gvae_jax.train import flat_residual as trainer

  folder = tmp_path / "images"
  folder.mkdir()
  Image.fromarray(make_image(40, 50, seed=1)).save(folder / "a.png")
  Image.fromarray(make_image(60, 30, seed=2)).save(folder / "b.jpg", quality=95)
  config = tiny_flat_config()
  config.data.folder = str(folder)
  config.train.pixels_per_step = 64
  config.train.tau_pixels = 16
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.export_dir = str(tmp_path / "latest")
  workdir = tmp_path / "work"
  trainer.train(config, workdir, stop_after_steps=4)
  assert json.loads((workdir / "progress.json").read_text())["step"] == 4
  trainer.train(config, workdir)  # resumes at step 4
  rows = [json.loads(line) for line in (workdir / "curve.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert all(np.isfinite(r["bpsp_tau0"]) and np.isfinite(r["bpsp_tau5"]) for r in rows)
  head = flat_head.load_flat_head(tmp_path / "latest")
  assert head.manifest["step"] == 6 and (workdir / "exports" / "step_0000006").is_dir()
  _, _, shapes, jpegs = trainer.load_training_pixels(folder, 2)
  assert jpegs == 1 and sorted(map(tuple, shapes)) == [(30, 15), (40, 50)]  # JPEG halved
  # A warm start from the export resumes the schedule at its step (not at warm-up).
  config.train.num_steps = 12
  config.train.warmup_steps = 2
  state = trainer.create_state(config, trainer.build_model(config),
                               len(trainer.tap_offsets(config.model.residual.kernel_size,
                                                     config.model.residual.order)))
  state, _ = trainer._warm_start(state, str(tmp_path / "latest"))
  assert int(state.step) == 6
  assert trainer.learning_rate(config, state) == pytest.approx(float(trainer.schedule(config)(6)))
  assert trainer.learning_rate(config, state) < config.train.learning_rate


# --- Golden flat-base bitstreams (tests/golden: tiny_flat_model, flat/, flat_hashes.json). ---

def test_flat_golden_bitstreams():
  """As test_residual_codec.test_residual_golden_bitstreams, for the flat base:
  the committed files decode within tau to the stored pixels (or, on another
  kind of CPU, are refused by their pixel check), and on the platform that
  wrote them today's encoder writes them byte for byte."""
  import hashlib

  from gvae_jax.coding.coder import TFC_RANGE_CODER_ID, CodingError, get_coder
  try:
    get_coder(TFC_RANGE_CODER_ID)
  except CodingError:
    pytest.skip("the flat golden files are TFC-coded; TFC is not installed in this profile")
  from golden.regenerate import case_image, platform_signature
  from golden.regenerate_flat import FLAT_CASES, FLAT_FILES, FLAT_HASHES, GOLDEN_FLAT_MODEL

  def sha256(data):
    return hashlib.sha256(data).hexdigest()

  model = export.load_model(GOLDEN_FLAT_MODEL)
  stored = json.loads(FLAT_HASHES.read_text())
  assert model.fingerprint.hex() == stored["model_fingerprint"]
  assert set(stored["cases"]) == {case[0] for case in FLAT_CASES}
  same_platform = stored["platform"] == platform_signature()
  for name, height, width, seed, tau, grayscale in FLAT_CASES:
    expected = stored["cases"][name]
    pixels = case_image(height, width, seed, grayscale)
    golden = (FLAT_FILES / f"{name}.gvae").read_bytes()
    assert (len(golden), sha256(golden)) == (expected["bytes"], expected["gvae_sha256"]), name
    header = codec.read_header(golden)
    assert header.mode == Mode.FLAT_RESIDUAL and header.tau == tau and golden[4] == 2, name
    try:
      decoded = codec.decompress(model, golden)
    except CodingError as e:
      assert not same_platform, f"{name}: {e}"
      assert "checksum" in str(e)
    else:
      assert decoded.shape == pixels.shape, name
      assert np.abs(decoded.astype(np.int32) - pixels).max() <= tau, name
      assert sha256(decoded.tobytes()) == expected["decoded_sha256"], name
    if same_platform:
      data = codec.compress(model, pixels, tau=tau, base="flat", coder=TFC_RANGE_CODER_ID)
      assert (len(data), sha256(data)) == (expected["bytes"], expected["gvae_sha256"]), name


def test_golden_flat_model_is_what_the_helpers_make(scalable):
  from golden.regenerate_flat import GOLDEN_FLAT_MODEL

  made, committed = tiny_flat_model(scalable), export.load_model(GOLDEN_FLAT_MODEL)
  assert made.flat.fingerprint == committed.flat.fingerprint
  if exported_here():  # elsewhere the base's z table may differ (codec_helpers.exported_here)
    assert made.fingerprint == committed.fingerprint
