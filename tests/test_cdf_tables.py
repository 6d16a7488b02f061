import io

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from gvae_jax.entropy.cdf_tables import CdfTable, quantize_pmf_to_cdf

SCALES = np.exp(np.linspace(np.log(0.11), np.log(256.0), 24))


def gaussian_pmfs(scales, tail_mass):
  """Unit-bin pmfs of N(0, scale^2) over [-half, half], the tails left out."""
  half = np.ceil(-ndtri(tail_mass / 2) * scales).astype(np.int64)
  lengths = 2 * half + 1
  x = np.arange(lengths.max())[None, :] - half[:, None]
  s = np.asarray(scales)[:, None]
  pmf = ndtr((x + 0.5) / s) - ndtr((x - 0.5) / s)
  return np.where(x <= half[:, None], pmf, 0.0), lengths, -half


def check_table(cdf, lengths, precision):
  total = 1 << precision
  assert cdf.dtype == np.int32
  for row, length in zip(cdf, lengths):
    counts = np.diff(row[:length + 2])
    assert row[0] == 0
    assert counts.sum() == total
    assert counts.min() >= 1  # every symbol and the escape stay codable
    assert np.all(row[length + 1:] == total)  # padding


@pytest.mark.parametrize("tail_mass", [2**-8, 1e-4, 1e-9])
def test_gaussian_tables_are_valid(tail_mass):
  pmf, lengths, _ = gaussian_pmfs(SCALES, tail_mass)
  check_table(quantize_pmf_to_cdf(pmf, lengths), lengths, 16)


def test_random_pmfs_and_precisions_are_valid():
  rng = np.random.default_rng(1)
  for precision in (4, 8, 12, 16):
    for _ in range(5):
      rows, max_len = rng.integers(1, 6), rng.integers(1, min(40, (1 << precision) - 1) + 1)
      lengths = rng.integers(1, max_len + 1, rows)
      pmf = rng.dirichlet(np.full(max_len + 1, 0.3), rows)[:, :max_len]
      pmf[rng.random(pmf.shape) < 0.2] = 0.0  # zero probabilities still get count 1
      check_table(quantize_pmf_to_cdf(pmf, lengths, precision), lengths, precision)


def test_full_alphabet_gets_one_count_each():
  cdf = quantize_pmf_to_cdf(np.full((1, 15), 1 / 15), [15], precision=4)
  np.testing.assert_array_equal(cdf[0], np.arange(17))


def cross_entropy_overhead(pmf, lengths, cdf, precision=16):
  """(ideal bits, quantized bits) per symbol, escape symbol included."""
  out = []
  for row, length, c in zip(pmf, lengths, cdf):
    p = np.append(row[:length], max(0.0, 1 - row[:length].sum()))
    q = np.diff(c[:length + 2]) / (1 << precision)
    ideal = -np.sum(p[p > 0] * np.log2(p[p > 0]))
    out.append((ideal, -np.sum(p * np.log2(q))))
  return np.array(out)


@pytest.mark.parametrize("tail_mass", [2**-8, 1e-4])
def test_quantized_cross_entropy_is_near_ideal(tail_mass):
  pmf, lengths, _ = gaussian_pmfs(SCALES, tail_mass)
  bits = cross_entropy_overhead(pmf, lengths, quantize_pmf_to_cdf(pmf, lengths))
  ideal, quantized = bits[:, 0], bits[:, 1]
  assert np.all(quantized >= ideal - 1e-12)  # Gibbs' inequality, sanity
  typical = ideal > 0.1  # scale >~ 0.2: relative overhead is meaningful
  assert np.all((quantized - ideal)[typical] / ideal[typical] < 1e-3)
  # Near-deterministic rows (scale ~0.1) carry ~1e-4 bits; the floor of one
  # count per symbol costs a few 1e-5 bits there.
  assert np.all((quantized - ideal)[~typical] < 1e-4)


def test_escape_probability_is_the_tail_mass():
  pmf = np.array([[0.25, 0.5, 0.24]])
  cdf = quantize_pmf_to_cdf(pmf, [3])
  escape = cdf[0, 4] - cdf[0, 3]
  assert abs(escape - 0.01 * 65536) <= 1
  cdf = quantize_pmf_to_cdf(pmf, [3], tail_mass=np.array([0.0]))
  assert cdf[0, 4] - cdf[0, 3] == 1


def test_quantization_is_deterministic_and_per_row():
  pmf, lengths, _ = gaussian_pmfs(SCALES[::3], 1e-4)
  cdf = quantize_pmf_to_cdf(pmf, lengths)
  np.testing.assert_array_equal(cdf, quantize_pmf_to_cdf(pmf.copy(), lengths.copy()))
  order = np.arange(len(lengths))[::-1]
  np.testing.assert_array_equal(cdf[order], quantize_pmf_to_cdf(pmf[order], lengths[order]))
  # Entries past a row's length are ignored.
  noisy = pmf + (np.arange(pmf.shape[1])[None, :] >= lengths[:, None]) * 0.5
  np.testing.assert_array_equal(cdf, quantize_pmf_to_cdf(noisy, lengths))


@pytest.mark.parametrize("pmf, lengths, precision", [
    (np.full((1, 16), 1 / 16), [16], 4),  # 16 symbols + escape > 2**4
    (np.array([[0.5, -0.1]]), [2], 16),
    (np.array([[0.5, np.nan]]), [2], 16),
    (np.array([[1.5, 0.1]]), [2], 16),  # not a probability
    (np.array([[0.0, 0.0]]), [2], 16),
    (np.array([[1.0]]), [0], 16),
    (np.array([[1.0]]), [2], 16),
    (np.array([[1.0]]), [1], 17),
])
def test_invalid_inputs_raise(pmf, lengths, precision):
  with pytest.raises(ValueError):
    quantize_pmf_to_cdf(pmf, np.array(lengths), precision,
                        tail_mass=np.zeros(1) if pmf.max() <= 0 else None)


def make_table():
  pmf, lengths, offsets = gaussian_pmfs(SCALES[::4], 1e-4)
  return CdfTable.from_pmf(pmf, lengths, offsets)


def test_table_save_load_round_trip():
  table = make_table()
  buffer = io.BytesIO()
  np.savez(buffer, **table.to_dict("y_"), **make_table().to_dict("z_"))
  buffer.seek(0)
  with np.load(buffer) as arrays:
    loaded = CdfTable.from_dict(arrays, "y_")
  for name in ("cdf", "lengths", "offsets"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(table, name))
    assert getattr(loaded, name).dtype == np.int32
  assert loaded.precision == table.precision == 16
  with pytest.raises(ValueError, match="missing"):
    CdfTable.from_dict(table.to_dict(), "x_")


def test_table_rejects_damaged_arrays():
  table = make_table()
  arrays = table.to_dict()
  for damage in ("zero_count", "bad_end", "bad_start", "long_length", "precision"):
    broken = {k: v.copy() for k, v in arrays.items()}
    if damage == "zero_count":
      broken["cdf"][0, 2] = broken["cdf"][0, 1]
    elif damage == "bad_end":
      broken["cdf"][0, -1] -= 1
    elif damage == "bad_start":
      broken["cdf"][1, 0] = 1
    elif damage == "long_length":
      broken["lengths"][0] = broken["cdf"].shape[1]
    else:
      broken["precision"] = np.asarray(17)
    with pytest.raises(ValueError):
      CdfTable.from_dict(broken)


def test_bits_counts_escapes_as_the_escape_symbol():
  table = CdfTable.from_pmf(np.array([[0.5, 0.25, 0.25 - 2**-10]]), [3], [-1])
  bits = table.bits(np.array([-1, 0, 1, 7, -9]), np.zeros(5, np.int32))
  assert bits == pytest.approx(1 + 2 + 2 + 10 + 10, abs=0.01)
