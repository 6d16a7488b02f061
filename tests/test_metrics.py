"""MSE / PSNR / MS-SSIM: checked against TensorFlow (reference only) and numpy."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gvae_jax import metrics

tf = pytest.importorskip("tensorflow")


def _structured(shape, rng):
  """Smooth gradients and sinusoids plus texture, clipped to [0, 1]."""
  batch, height, width, channels = shape
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  images = []
  for i in range(batch):
    per_channel = [0.5 + 0.3 * np.sin(2 * np.pi * (3 + i + c) * xx) * np.cos(2 * np.pi * 2 * yy)
                   + 0.2 * (xx - yy) for c in range(channels)]
    images.append(np.stack(per_channel, -1))
  images = np.stack(images) + 0.05 * rng.standard_normal(shape)
  return np.clip(images, 0, 1).astype(np.float32)


def _pair(kind, shape, rng):
  if kind == "random":  # unrelated images: low MS-SSIM
    return rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)
  a = rng.random(shape, dtype=np.float32) if kind == "noisy_random" else _structured(shape, rng)
  b = np.clip(a + 0.08 * rng.standard_normal(shape).astype(np.float32), 0, 1)
  return a, b


@pytest.mark.parametrize("shape", [(2, 192, 192, 3), (1, 256, 200, 3)])
@pytest.mark.parametrize("kind", ["random", "noisy_random", "noisy_structured"])
def test_ms_ssim_matches_tensorflow(shape, kind):
  rng = np.random.default_rng(zlib.crc32(repr((shape, kind)).encode()))
  a, b = _pair(kind, shape, rng)
  expected = tf.image.ssim_multiscale(a, b, max_val=1.0).numpy()
  got = np.asarray(metrics.ms_ssim(a, b))
  assert got.shape == (shape[0],)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_ms_ssim_odd_sides_at_the_size_limit_match_tensorflow():
  # 161 and 177 are odd at several scales, exercising TF's pad-then-pool.
  rng = np.random.default_rng(1)
  a, b = _pair("noisy_structured", (2, 161, 177, 1), rng)
  expected = tf.image.ssim_multiscale(a, b, max_val=1.0).numpy()
  np.testing.assert_allclose(np.asarray(metrics.ms_ssim(a, b)), expected, atol=2e-5, rtol=0)


def test_ms_ssim_uint8_with_max_value_255_matches_tensorflow():
  rng = np.random.default_rng(2)
  a, b = _pair("noisy_structured", (1, 192, 192, 3), rng)
  a8, b8 = (np.round(a * 255).astype(np.uint8), np.round(b * 255).astype(np.uint8))
  expected = tf.image.ssim_multiscale(a8, b8, max_val=255).numpy()
  np.testing.assert_allclose(np.asarray(metrics.ms_ssim(a8, b8, max_value=255)), expected,
                             atol=1e-5, rtol=0)


def test_ms_ssim_identical_images_is_one_and_keeps_leading_axes():
  rng = np.random.default_rng(3)
  a = rng.random((1, 2, 192, 192, 3), dtype=np.float32)
  got = np.asarray(metrics.ms_ssim(a, a))
  assert got.shape == (1, 2)
  np.testing.assert_allclose(got, 1.0, atol=1e-6)


def test_ms_ssim_size_rule_matches_tensorflow():
  assert metrics.ms_ssim_min_side() == 161
  assert metrics.ms_ssim_min_side(filter_size=7, num_scales=3) == 25
  ok = np.full((1, 161, 300, 3), 0.5, np.float32)
  assert np.isfinite(tf.image.ssim_multiscale(ok, ok, 1.0).numpy()).all()
  assert np.isfinite(np.asarray(metrics.ms_ssim(ok, ok))).all()
  for shape in [(1, 160, 300, 3), (1, 300, 160, 3)]:
    small = np.full(shape, 0.5, np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError):
      tf.image.ssim_multiscale(small, small, 1.0)
    with pytest.raises(ValueError, match="at least 161"):
      metrics.ms_ssim(small, small)


def test_ms_ssim_rejects_mismatched_sizes():
  with pytest.raises(ValueError, match="differ in size"):
    metrics.ms_ssim(np.zeros((1, 192, 192, 3)), np.zeros((1, 192, 193, 3)))


def test_ms_ssim_jit_matches_eager_and_gradient_is_finite():
  rng = np.random.default_rng(4)
  a, b = _pair("noisy_structured", (2, 192, 192, 3), rng)
  np.testing.assert_allclose(np.asarray(jax.jit(metrics.ms_ssim)(a, b)),
                             np.asarray(metrics.ms_ssim(a, b)), atol=1e-6)
  loss = jax.jit(jax.grad(lambda x, y: jnp.sum(1.0 - metrics.ms_ssim(x, y))))
  grad = np.asarray(loss(a, b))
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0
  # Inverted images make cs negative, so relu gives 0 and a plain 0 ** p would
  # give a NaN gradient; the value must still match TF (0).
  inverted = 1.0 - a
  np.testing.assert_allclose(np.asarray(metrics.ms_ssim(a, inverted)),
                             tf.image.ssim_multiscale(a, inverted, 1.0).numpy(), atol=1e-6)
  assert np.isfinite(np.asarray(loss(a, inverted))).all()


def test_psnr_and_mse_match_numpy_and_tensorflow():
  rng = np.random.default_rng(5)
  a = rng.integers(0, 256, (3, 17, 23, 3), dtype=np.uint8)
  b = np.clip(a.astype(np.int32) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
  err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(metrics.mse(a, b)), err, rtol=1e-5)
  expected = 10 * np.log10(255.0 ** 2 / err)
  got = np.asarray(metrics.psnr(a, b, max_value=255))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, expected, atol=1e-4)  # uint8 must not wrap around
  np.testing.assert_allclose(got, tf.image.psnr(a, b, max_val=255).numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(metrics.psnr(a / 255.0, b / 255.0)), expected, atol=1e-4)
  assert np.isposinf(np.asarray(metrics.psnr(a, a, 255))).all()


def test_psnr_matches_skimage():
  skimage_metrics = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(6)
  a = rng.random((2, 20, 30, 3))
  b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
  expected = [skimage_metrics.peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)]
  np.testing.assert_allclose(np.asarray(metrics.psnr(a, b)), expected, atol=1e-3)
