import math

import numpy as np
import pytest

from gvae_jax.eval import rd

METHODS = rd.BD_METHODS

# A realistic anchor curve (bpp, PSNR dB), rate increasing with quality.
RATE = np.array([0.12, 0.25, 0.5, 0.9, 1.6])
PSNR = np.array([26.5, 29.0, 32.0, 35.0, 38.5])


@pytest.mark.parametrize("method", METHODS)
def test_curve_against_itself_is_zero(method):
  assert rd.bd_rate(RATE, PSNR, RATE, PSNR, method) == pytest.approx(0.0, abs=1e-12)
  assert rd.bd_psnr(RATE, PSNR, RATE, PSNR, method) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("factor", [0.9, 1.25, 0.5])
def test_rate_scaled_copy_gives_that_factor(method, factor):
  # ln(k R) = ln R + ln k at every quality, so the mean log ratio is ln k exactly.
  expected = (factor - 1.0) * 100.0
  assert rd.bd_rate(RATE, PSNR, RATE * factor, PSNR, method) == pytest.approx(expected, abs=1e-9)


def test_ten_percent_fewer_bits_is_minus_ten():
  assert rd.bd_rate(RATE, PSNR, 0.9 * RATE, PSNR) == pytest.approx(-10.0, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_quality_shift_gives_that_bd_psnr(method):
  assert rd.bd_psnr(RATE, PSNR, RATE, PSNR + 0.5, method) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_log_linear_curves_sampled_at_different_points(method):
  # ln R = slope * Q + c: both interpolants reproduce a straight line exactly,
  # so a test curve shifted by +shift dB gives BD-rate exp(-slope * shift) - 1
  # and BD-PSNR +shift, whatever points either curve was sampled at.
  slope, shift = 0.2, 1.0
  quality_anchor = np.array([30.0, 33.0, 36.0, 39.0])
  quality_test = np.array([31.3, 34.1, 37.7, 40.2, 42.0])
  rate_anchor = np.exp(slope * quality_anchor - 3.0)
  rate_test = np.exp(slope * (quality_test - shift) - 3.0)
  expected_rate = math.expm1(-slope * shift) * 100.0  # -18.127 %
  assert rd.bd_rate(rate_anchor, quality_anchor, rate_test, quality_test, method) == \
      pytest.approx(expected_rate, abs=1e-9)
  assert rd.bd_psnr(rate_anchor, quality_anchor, rate_test, quality_test, method) == \
      pytest.approx(shift, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_cubic_log_rate_curve_integrates_exactly(method):
  # ln R(Q) = 0.001 (Q - 30)^3 + 0.15 Q - 4 is a cubic: the VCEG-M33 fit through
  # 4+ points is then exact, so compare with the integral done by hand. PCHIP
  # only approximates a curve that is not piecewise-linear; expect it close.
  def log_rate(q):
    return 0.001 * (q - 30.0) ** 3 + 0.15 * q - 4.0

  quality = np.array([28.0, 31.0, 34.0, 37.0, 40.0])
  rate_anchor = np.exp(log_rate(quality))
  rate_test = np.exp(log_rate(quality) - 0.05 * quality + 1.5)  # ln ratio 1.5 - 0.05 Q
  mean_log_ratio = 1.5 - 0.05 * 34.0  # mean of a linear function over [28, 40]
  expected = math.expm1(mean_log_ratio) * 100.0
  tolerance = 1e-9 if method == "cubic" else 0.5
  assert rd.bd_rate(rate_anchor, quality, rate_test, quality, method) == \
      pytest.approx(expected, abs=tolerance)


@pytest.mark.parametrize("method", METHODS)
def test_sign_conventions(method):
  # Test reaches more quality at every rate: it needs fewer bits (negative
  # BD-rate) and gives more dB (positive BD-PSNR).
  better = PSNR + 1.0
  assert rd.bd_rate(RATE, PSNR, RATE, better, method) < 0
  assert rd.bd_psnr(RATE, PSNR, RATE, better, method) > 0
  assert rd.bd_rate(RATE, better, RATE, PSNR, method) > 0
  assert rd.bd_psnr(RATE, better, RATE, PSNR, method) < 0


@pytest.mark.parametrize("method", METHODS)
def test_swapping_anchor_and_test_inverts_the_ratio(method):
  rate_test = RATE * np.array([0.8, 0.85, 0.9, 0.95, 1.0])
  forward = rd.bd_rate(RATE, PSNR, rate_test, PSNR, method)
  backward = rd.bd_rate(rate_test, PSNR, RATE, PSNR, method)
  assert (1 + forward / 100) * (1 + backward / 100) == pytest.approx(1.0, abs=1e-12)


def test_point_order_does_not_matter():
  order = np.array([3, 0, 4, 1, 2])
  rate_test, psnr_test = RATE * 0.8, PSNR + 0.3
  expected = rd.bd_rate(RATE, PSNR, rate_test, psnr_test)
  assert rd.bd_rate(RATE[order], list(PSNR[order]), rate_test[::-1], psnr_test[::-1]) == \
      pytest.approx(expected, abs=1e-12)


def test_rate_unit_does_not_matter():
  rate_test = RATE * 0.8
  in_bpp = rd.bd_rate(RATE, PSNR, rate_test, PSNR)
  in_bytes = rd.bd_rate(RATE * 49152, PSNR, rate_test * 49152, PSNR)
  assert in_bytes == pytest.approx(in_bpp, abs=1e-9)


def test_pchip_works_from_two_points_cubic_needs_four():
  assert rd.bd_rate(RATE[:2], PSNR[:2], RATE[:2] * 0.9, PSNR[:2]) == pytest.approx(-10.0)
  with pytest.raises(ValueError, match="at least 4"):
    rd.bd_rate(RATE[:3], PSNR[:3], RATE[:3], PSNR[:3], method="cubic")


@pytest.mark.parametrize("rate, psnr, message", [
    ([0.1, 0.2, 0.3], [30.0, 29.0, 31.0], "monotone"),
    ([0.1, 0.1, 0.3], [30.0, 31.0, 32.0], "monotone"),
    ([0.0, 0.2, 0.3], [30.0, 31.0, 32.0], "positive"),
    ([0.1, 0.2, 0.3], [30.0, 31.0, np.inf], "finite"),
    ([0.1, 0.2, 0.3], [30.0, 31.0], "quality values"),
])
def test_bad_curves_are_refused(rate, psnr, message):
  with pytest.raises(ValueError, match=message):
    rd.bd_rate(rate, psnr, RATE, PSNR)
  with pytest.raises(ValueError, match=message):
    rd.bd_psnr(RATE, PSNR, rate, psnr)


def test_disjoint_curves_are_refused():
  with pytest.raises(ValueError, match="do not overlap"):
    rd.bd_rate(RATE, PSNR, RATE, PSNR + 20.0)
  with pytest.raises(ValueError, match="do not overlap"):
    rd.bd_psnr(RATE, PSNR, RATE * 100.0, PSNR)


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="akima"):
    rd.bd_rate(RATE, PSNR, RATE, PSNR, method="akima")


def test_bits_per_pixel_and_subpixel():
  assert rd.bits_per_pixel(768 * 512 // 8, 512, 768) == 1.0
  assert rd.bits_per_subpixel(3 * 768 * 512 // 8, 512, 768) == 1.0
  assert rd.bits_per_subpixel(100, 10, 10, channels=1) == 8.0


def test_psnr_and_max_error_on_uint8():
  image = np.full((4, 6, 3), 100, np.uint8)
  assert rd.psnr(image, image) == float("inf")
  assert rd.psnr(image, image + 1) == pytest.approx(20 * math.log10(255.0))  # MSE 1
  # 0 vs 255 must not wrap around to an error of 1 in uint8 arithmetic.
  zeros, full = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)
  assert rd.max_abs_error(zeros, full) == 255
  assert rd.psnr(zeros, full) == pytest.approx(0.0)
  assert rd.mse(full, zeros) == 255.0 ** 2
  with pytest.raises(ValueError, match="shape"):
    rd.psnr(image, image[:2])
