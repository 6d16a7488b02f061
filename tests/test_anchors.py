import dataclasses

import numpy as np
import pytest
from PIL import Image

from gvae_jax.eval import anchors
from gvae_jax.eval import rd

ALL_LOSSLESS = {**anchors.LOSSLESS_ANCHORS, "jpegls-rgb": anchors.jpegls_rgb(),
                "jpegls-hp1-bias0": anchors.jpegls_hp1(bias=0),
                "webp-lossless-m4-e75": anchors.webp_lossless(method=4, effort=75)}


def smooth_plus_noise(height=48, width=64, noise=6.0, seed=0) -> np.ndarray:
  """Gradients and a soft blob plus Gaussian noise, clipped so 0 and 255 both occur."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width].astype(np.float64)
  blob = 120.0 * np.exp(-((x - width / 2) ** 2 + (y - height / 2) ** 2) / (0.1 * width * height))
  base = np.stack([4.0 * x, 5.0 * y + blob, 255.0 - 3.0 * (x + y) + blob], axis=-1) - 10.0
  return np.clip(base + rng.normal(0.0, noise, base.shape), 0, 255).astype(np.uint8)


IMAGES = {
    "smooth+noise": smooth_plus_noise(),
    # Full-range noise: every R-G difference wraps, the worst case for HP1.
    "uniform noise, odd size": np.random.default_rng(1).integers(
        0, 256, (13, 21, 3), dtype=np.uint8),
    "flat": np.full((8, 8, 3), (0, 255, 17), np.uint8),
}


def usable(anchor):
  reason = anchor.unavailable_reason()
  if reason is not None:
    pytest.skip(reason)
  return anchor


@pytest.mark.parametrize("image_name", list(IMAGES))
@pytest.mark.parametrize("name", list(ALL_LOSSLESS))
def test_lossless_anchors_give_back_the_input_exactly(name, image_name):
  image = IMAGES[image_name]
  data, decoded, encode_seconds, decode_seconds = usable(ALL_LOSSLESS[name])(image)
  assert isinstance(data, bytes) and len(data) > 0
  assert decoded.dtype == np.uint8 and decoded.shape == image.shape
  np.testing.assert_array_equal(decoded, image)
  assert encode_seconds >= 0 and decode_seconds >= 0


@pytest.mark.parametrize("bias", [anchors.HP1_BIAS, 0, 255])
def test_hp1_transform_inverts_exactly_over_all_values(bias):
  values = np.arange(256, dtype=np.uint8)
  red, green, blue = np.meshgrid(values, values, values[::17], indexing="ij")
  image = np.stack([red, green, blue], axis=-1).reshape(256, -1, 3)
  planes = anchors.hp1_forward(image, bias)
  assert planes.shape == (3,) + image.shape[:2] and planes.dtype == np.uint8
  np.testing.assert_array_equal(planes[1], image[..., 1])
  # Equal R and G give the bias itself: CharLS's HP1 centres the differences.
  flat = np.full((1, 1, 3), 77, np.uint8)
  assert anchors.hp1_forward(flat, bias)[0, 0, 0] == bias
  np.testing.assert_array_equal(anchors.hp1_inverse(planes, bias), image)


def test_jpegls_hp1_is_three_planar_streams():
  image = IMAGES["smooth+noise"]
  data = usable(anchors.jpegls_hp1())(image).data
  # 8 bytes of stream lengths, then three JPEG-LS files (SOI marker FFD8).
  first, second = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:8], "big")
  starts = [8, 8 + first, 8 + first + second]
  assert all(data[start:start + 2] == b"\xff\xd8" for start in starts)


@pytest.mark.parametrize("tau", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("image_name", ["smooth+noise", "uniform noise, odd size"])
def test_jpegls_near_stays_within_tau(tau, image_name):
  image = IMAGES[image_name]
  anchor = usable(anchors.NEAR_LOSSLESS_ANCHORS["jpegls-near"])
  decoded = anchor(image, tau).decoded
  error = rd.max_abs_error(image, decoded)
  assert error <= tau
  assert error > 0  # noise this strong cannot be coded exactly at NEAR >= 1


def test_jpegls_near_size_falls_as_tau_grows():
  anchor = usable(anchors.NEAR_LOSSLESS_ANCHORS["jpegls-near"])
  sizes = [len(anchor(IMAGES["smooth+noise"], tau).data) for tau in anchor.settings]
  assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


@pytest.mark.parametrize("tau", [0, 2.5, 128])
def test_jpegls_near_refuses_bad_tau(tau):
  with pytest.raises(ValueError, match="NEAR"):
    usable(anchors.jpegls_near())(IMAGES["flat"], tau)


@pytest.mark.parametrize("name", list(anchors.LOSSY_ANCHORS))
def test_lossy_anchor_size_is_monotone_in_its_setting(name):
  anchor = usable(anchors.LOSSY_ANCHORS[name])
  image = IMAGES["smooth+noise"]
  settings = sorted(anchor.settings, reverse=not anchor.more_bits_with_larger_setting)
  results = [anchor(image, setting) for setting in settings]  # fewest bits first
  sizes = [len(result.data) for result in results]
  assert sizes == sorted(sizes), dict(zip(settings, sizes))
  assert sizes[-1] > sizes[0]
  for result in results:
    assert result.decoded.shape == image.shape and result.decoded.dtype == np.uint8
  # The richest setting must actually look like the image.
  assert rd.psnr(image, results[-1].decoded) > 30.0


def test_lossy_defaults_are_sorted_and_named():
  for name, anchor in anchors.LOSSY_ANCHORS.items():
    assert anchor.name == name and anchor.kind == anchors.LOSSY
    assert len(anchor.settings) >= 5 and anchor.setting_name
    assert list(anchor.settings) == sorted(anchor.settings,
                                           reverse=not anchor.more_bits_with_larger_setting)


def test_a_lossless_anchor_that_decodes_wrongly_is_caught():
  png = anchors.LOSSLESS_ANCHORS["png"]
  corrupted = dataclasses.replace(png, decode_fn=lambda data: png.decode_fn(data) ^ 1)
  with pytest.raises(anchors.AnchorCheckError, match="not lossless"):
    corrupted(IMAGES["smooth+noise"])


def test_a_near_lossless_anchor_that_overshoots_tau_is_caught():
  near = usable(anchors.jpegls_near())
  overshooting = dataclasses.replace(
      near, encode_fn=lambda image, tau: near.encode_fn(image, tau + 2))
  with pytest.raises(anchors.AnchorCheckError, match="exceeds"):
    overshooting(IMAGES["smooth+noise"], 1)


def test_unavailable_codec_is_reported_not_crashed():
  ghost = dataclasses.replace(anchors.jpegxl_lossless(), name="ghost", requires=("NO_SUCH_CODEC",))
  assert not ghost.available
  assert "NO_SUCH_CODEC" in ghost.unavailable_reason()
  usable_anchors, skipped = anchors.split_available({"ghost": ghost, "png": anchors.png()})
  assert list(usable_anchors) == ["png"] and "NO_SUCH_CODEC" in skipped["ghost"]
  with pytest.raises(anchors.AnchorUnavailable, match="NO_SUCH_CODEC"):
    ghost(IMAGES["flat"])


def test_inputs_are_checked():
  png, jpeg = anchors.png(), anchors.jpeg()
  with pytest.raises(ValueError, match="RGB uint8"):
    png(np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match="RGB uint8"):
    png(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="no setting"):
    png(IMAGES["flat"], 5)
  with pytest.raises(ValueError, match="quality"):
    jpeg(IMAGES["flat"])
  # A strided view is fine: the anchor makes it contiguous for the C encoders.
  view = IMAGES["smooth+noise"][::2, ::3]
  np.testing.assert_array_equal(usable(anchors.jpeg2000_reversible())(view).decoded, view)


def test_measure_reports_rate_and_distortion():
  image = IMAGES["smooth+noise"]
  measurement = anchors.measure(anchors.jpeg(), image, 50)
  height, width, _ = image.shape
  assert measurement.anchor == "jpeg-420" and measurement.setting == 50
  assert measurement.bpp == pytest.approx(8 * measurement.num_bytes / (height * width))
  assert measurement.bpsp == pytest.approx(measurement.bpp / 3)
  assert 20 < measurement.psnr < 60 and measurement.max_abs_error > 0
  lossless = anchors.measure(anchors.png(), image)
  assert lossless.psnr == float("inf") and lossless.max_abs_error == 0


def test_hp1_beats_plain_rgb_on_a_kodak_crop(kodak_dir):
  # The point of the colour transform (docs/decoding.md: 3.16 vs 4.36 bpsp on Kodak).
  with Image.open(kodak_dir / "kodim01.png") as file:
    crop = np.asarray(file.convert("RGB"))[200:296, 300:428]
  hp1 = usable(anchors.jpegls_hp1())(crop)
  rgb = usable(anchors.jpegls_rgb())(crop)
  assert len(hp1.data) < 0.9 * len(rgb.data)
