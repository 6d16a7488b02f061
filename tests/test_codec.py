"""The lossy codec: bit-exact round trips, the API's checks, golden bitstreams."""
import hashlib
import json

import numpy as np
import pytest

from codec_helpers import (GOLDEN_MODEL, assert_tables_match, golden_coders, golden_params, make_image,
                           model_reconstruction, other_params, tiny_config)
from gvae_jax.coding.coder import CODER_NAMES
from gvae_jax.coding import codec, container, export
from gvae_jax.coding.container import FormatError, Header, Mode
from gvae_jax.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny model, exported to disk and loaded back: the path the CLI takes.

  Its parameters are tiny_params() (init at a fixed seed, perturbed), read
  from the golden model so the tests skip the slow init compile.
  """
  config = tiny_config()
  out = tmp_path_factory.mktemp("model") / "tiny"
  export.export_params(config, golden_params(), out)
  return export.load_model(out)


def assert_round_trip(model, pixels, rate):
  encoded = codec.encode(model, pixels, rate)
  decoded = codec.decode(model, encoded.data)
  # The decoder saw exactly the encoder's integers...
  np.testing.assert_array_equal(decoded.z_symbols, encoded.z_symbols)
  np.testing.assert_array_equal(decoded.y_indexes, encoded.y_indexes)
  np.testing.assert_array_equal(decoded.y_symbols, encoded.y_symbols)
  # ...and rebuilt exactly the encoder-side reconstruction.
  encoder_side = codec.reconstruct(model, encoded)
  if pixels.ndim == 2:
    expected = ((encoder_side.astype(np.uint16).sum(axis=2) + 1) // 3).astype(np.uint8)
  else:
    expected = encoder_side
  np.testing.assert_array_equal(decoded.pixels, expected)
  return encoded, encoder_side


# 1x1, 1xN, Nx1, 65x3 and other sizes that are not multiples of 64.
SIZES = [(1, 1), (1, 37), (37, 1), (65, 3), (3, 65), (64, 64), (50, 100), (128, 70)]
RATES = [0.0, 0.37, 0.5, 1.0]


@pytest.mark.parametrize("height,width", SIZES)
def test_round_trip_is_bit_exact_and_matches_the_model(tiny, height, width):
  pixels = make_image(height, width, seed=height * 1000 + width)
  for rate in RATES:
    _, encoder_side = assert_round_trip(tiny, pixels, rate)
    # The model's own quantised reconstruction runs as one fused program, so
    # float32 may round differently by an ulp: at most one grey level, rarely.
    reference, _ = model_reconstruction(tiny, pixels, rate)
    diff = np.abs(reference.astype(np.int16) - encoder_side)
    assert diff.max() <= 1, (rate, diff.max())
    assert np.mean(diff > 0) <= 0.01, (rate, np.mean(diff > 0))


def test_random_crops_and_rates(tiny):
  rng = np.random.default_rng(7)
  source = make_image(200, 240, seed=11)
  for _ in range(8):
    height, width = rng.integers(1, 129, 2)  # padded sizes stay within 128: few compiles
    top, left = rng.integers(0, 200 - height + 1), rng.integers(0, 240 - width + 1)
    crop = np.ascontiguousarray(source[top:top + height, left:left + width])
    rate = float(rng.uniform(0, tiny.levels - 1))
    _, encoder_side = assert_round_trip(tiny, crop, rate)
    reference, _ = model_reconstruction(tiny, crop, rate)
    assert np.abs(reference.astype(np.int16) - encoder_side).max() <= 1


def test_symbols_use_many_table_rows(tiny):
  # Guards the fixture: a test model coding only zeros would prove little.
  encoded = codec.encode(tiny, make_image(128, 128, 3), 1.0)
  assert len(np.unique(encoded.y_indexes)) >= 8
  assert np.ptp(encoded.y_symbols) >= 10 and np.ptp(encoded.z_symbols) >= 4


def test_grayscale_is_coded_as_rgb_and_decoded_as_gray(tiny):
  gray = make_image(30, 41, 5)[:, :, 0]
  encoded, _ = assert_round_trip(tiny, gray, 0.5)
  assert encoded.header.channels == 1
  decoded = codec.decompress(tiny, encoded.data)
  assert decoded.shape == (30, 41) and decoded.dtype == np.uint8
  # [H, W, 1] is grayscale too, and codes the same bytes.
  assert codec.compress(tiny, gray[:, :, None], 0.5) == encoded.data


def test_header_holds_the_exact_float32_rate(tiny):
  data = codec.compress(tiny, make_image(8, 8), 0.1)
  header = codec.read_header(data)
  assert header.rate == float(np.float32(0.1)) and header.rate != 0.1
  assert header.fingerprint == tiny.fingerprint
  assert (header.height, header.width, header.channels) == (8, 8, 3)
  assert header.mode == Mode.LOSSY and header.tau == 0


@pytest.mark.parametrize("rate", [-0.01, 1.0001, 2, float("nan"), float("inf"), "abc", None])
def test_rate_out_of_range_is_refused(tiny, rate):
  with pytest.raises(codec.RateError):
    codec.compress(tiny, make_image(8, 8), rate)


def test_bad_pixels_are_refused(tiny):
  with pytest.raises(UserError, match="uint8"):
    codec.compress(tiny, np.zeros((4, 4, 3), np.float32), 0)
  with pytest.raises(UserError, match="RGB"):
    codec.compress(tiny, np.zeros((4, 4, 4), np.uint8), 0)
  with pytest.raises(UserError, match="no pixels"):
    codec.compress(tiny, np.zeros((0, 4, 3), np.uint8), 0)


def test_compress_to_bpp_finds_the_largest_rate_within_budget(tiny):
  pixels = make_image(64, 96, 9)
  low = len(codec.compress(tiny, pixels, 0.0))
  high = len(codec.compress(tiny, pixels, 1.0))
  target = 8.0 * (low + high) / 2 / pixels[..., 0].size
  data, rate = codec.compress_to_bpp(tiny, pixels, target)
  assert 8.0 * len(data) / pixels[..., 0].size <= target
  assert 0 < rate < 1 and codec.read_header(data).rate == rate
  assert data == codec.compress(tiny, pixels, rate)
  assert 8.0 * len(codec.compress(tiny, pixels, rate + 0.01)) / pixels[..., 0].size > target
  # Above the top rate's size: the top rate. Below s = 0: an error.
  assert codec.compress_to_bpp(tiny, pixels, 8.0 * high / pixels[..., 0].size)[1] == 1.0
  with pytest.raises(UserError, match="lowest rate"):
    codec.compress_to_bpp(tiny, pixels, 8.0 * (low - 1) / pixels[..., 0].size)
  with pytest.raises(UserError, match="positive"):
    codec.compress_to_bpp(tiny, pixels, -1)


def repack(data, sections=None, **changes):
  """The same file with header fields changed and a freshly computed (valid) CRC."""
  header, old_sections = container.unpack(data)
  fields = {**header.__dict__, **changes}
  return container.pack(Header(**fields), old_sections if sections is None else sections)


def test_a_file_of_another_model_is_refused(tiny, tmp_path):
  config = tiny_config()
  other = export.export_params(config, other_params(golden_params()), tmp_path / "other")
  data = codec.compress(other, make_image(16, 16), 0.5)
  with pytest.raises(codec.ModelMismatchError, match="made by a different model"):
    codec.decompress(tiny, data)


def test_valid_headers_the_decoder_cannot_use_are_refused(tiny):
  data = codec.compress(tiny, make_image(16, 16), 0.5)
  cases = [
      (dict(mode=Mode.RESIDUAL, tau=1), "needs a scalable model"),
      (dict(channels=2), "channels"),
      (dict(rate=1.5), "out of range"),
      (dict(rate=0.1), "not a float32"),
      # (Larger than the lossy limit is refused by the container itself: test_container.)
      (dict(height=4096, width=4096), "coded in tiles"),  # mode 0 must run whole: refused
      (dict(mode=Mode.LOSSY_TILED), "coded whole"),
      (dict(coder_id=77), "unknown entropy coder"),
  ]
  for changes, message in cases:
    with pytest.raises(UserError, match=message):
      codec.decompress(tiny, repack(data, **changes))
  header, sections = container.unpack(data)
  with pytest.raises(FormatError, match="2 sections"):
    codec.decompress(tiny, repack(data, sections=sections[:1]))


# --- Golden bitstreams: a committed model and stored hashes (tests/golden). ---

@pytest.fixture(scope="module")
def golden():
  return export.load_model(GOLDEN_MODEL)


@pytest.mark.parametrize("coder", golden_coders())
def test_golden_bitstreams(golden, coder):
  """Any change of format or numerics changes these (one set per coder, tests/golden).

  On the platform that wrote a set (its "platform": CPU features and
  jaxlib), today's encoder writes the committed files byte for byte and
  they decode to the stored pixels. Elsewhere float32 kernels may round
  differently (README, Portability): the committed files must still decode
  to an image of the right shape, and today's files round-trip. If a change
  is intended, run `python tests/golden/regenerate.py --hashes-only` under
  the coder's profile and say so in the commit.
  """
  from golden.regenerate import (CASES, case_image, files_dir, hashes_path,
                                 platform_signature)

  model = golden
  stored = json.loads(hashes_path(coder).read_text())
  lossy = stored["lossy"]
  assert model.fingerprint.hex() == lossy["model_fingerprint"]
  assert set(lossy["cases"]) == {case[0] for case in CASES}
  same_platform = stored["platform"] == platform_signature()
  for name, height, width, seed, rate, grayscale in CASES:
    expected = lossy["cases"][name]
    committed = (files_dir(coder) / f"{name}.gvae").read_bytes()
    assert (len(committed), hashlib.sha256(committed).hexdigest()) == (
        expected["bytes"], expected["gvae_sha256"]), name
    pixels = codec.decompress(model, committed)
    assert pixels.shape == case_image(height, width, seed, grayscale).shape, name
    encoded = codec.encode(model, case_image(height, width, seed, grayscale), rate,
                           coder=CODER_NAMES[coder])
    if same_platform:
      assert hashlib.sha256(pixels.tobytes()).hexdigest() == expected["decoded_sha256"], name
      assert encoded.data == committed, name
    if not grayscale:  # (reconstruct gives RGB; a gray file decodes to their average)
      np.testing.assert_array_equal(codec.decompress(model, encoded.data),
                                    codec.reconstruct(model, encoded))


def test_golden_tables_are_what_export_builds_today(golden):
  model = golden
  rebuilt = export.build_exported_model(model.config, model.params,
                                        tail_mass=model.manifest["tail_mass"])
  assert_tables_match(model, rebuilt)
