import subprocess
import sys

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from gvae_jax.coding.coder import (TFC_RANGE_CODER_ID, CodingError, get_coder,
                                   register_coder)
from gvae_jax.coding.tfc_backend import TfcRangeCoder
from gvae_jax.entropy.cdf_tables import CdfTable

SCALES = np.exp(np.linspace(np.log(0.11), np.log(64.0), 16))


def gaussian_table(scales=SCALES, tail_mass=1e-4):
  half = np.ceil(-ndtri(tail_mass / 2) * scales).astype(np.int64)
  x = np.arange(2 * half.max() + 1)[None, :] - half[:, None]
  pmf = ndtr((x + 0.5) / scales[:, None]) - ndtr((x - 0.5) / scales[:, None])
  return CdfTable.from_pmf(pmf, 2 * half + 1, -half)


@pytest.fixture(scope="module")
def table():
  return gaussian_table()


@pytest.fixture(scope="module")
def coder():
  return get_coder(TFC_RANGE_CODER_ID)


def gaussian_symbols(rng, shape, table_size=len(SCALES)):
  indexes = rng.integers(0, table_size, shape).astype(np.int32)
  symbols = np.rint(rng.normal(size=shape) * SCALES[indexes]).astype(np.int32)
  return symbols, indexes


def test_registry():
  assert isinstance(get_coder(1), TfcRangeCoder)
  assert get_coder(1) is get_coder(1)
  with pytest.raises(CodingError, match="unknown entropy coder id 200"):
    get_coder(200)
  with pytest.raises(ValueError):
    register_coder(TFC_RANGE_CODER_ID, TfcRangeCoder)
  with pytest.raises(ValueError):
    register_coder(0, TfcRangeCoder)


def test_importing_the_backend_does_not_import_tensorflow():
  code = ("import sys, gvae_jax.coding.tfc_backend, gvae_jax.coding.container; "
          "assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_gaussian_round_trip_with_far_tails(coder, table):
  rng = np.random.default_rng(0)
  symbols, indexes = gaussian_symbols(rng, (64, 50))
  tails = rng.random(symbols.shape) < 0.02
  far = rng.choice([-(2**31), 2**31 - 1, -70000, 70000, -300, 300, -1, 1], symbols.shape)
  symbols = np.where(tails, far, symbols).astype(np.int32)
  symbols[0, :4] = [-(2**31), 2**31 - 1, 0, -(2**31) + 1]
  data = coder.encode(symbols, indexes, table)
  decoded = coder.decode(data, indexes, table)
  assert decoded.dtype == np.int32 and decoded.shape == symbols.shape
  np.testing.assert_array_equal(decoded, symbols)


def test_many_small_round_trips(coder, table):
  # Also checks that the decoder's end-of-stream consistency check never
  # rejects a valid stream.
  rng = np.random.default_rng(1)
  for n in list(range(1, 40)) + [100, 1000]:
    symbols, indexes = gaussian_symbols(rng, (n,))
    symbols[rng.random(n) < 0.1] *= 40
    data = coder.encode(symbols, indexes, table)
    np.testing.assert_array_equal(coder.decode(data, indexes, table), symbols)


@pytest.mark.parametrize("symbol", [0, 3, -100000, 2**31 - 1])
def test_one_symbol(coder, table, symbol):
  indexes = np.array([5], np.int32)
  data = coder.encode(np.array([symbol]), indexes, table)
  np.testing.assert_array_equal(coder.decode(data, indexes, table), [symbol])
  scalar = np.array(7, np.int32)  # 0-d arrays keep their shape too
  assert coder.decode(coder.encode(np.array(symbol), scalar, table), scalar, table) == symbol


def test_empty(coder, table):
  empty = np.zeros((0, 3), np.int32)
  data = coder.encode(empty, empty, table)
  assert data == b"\x00"
  assert coder.decode(data, empty, table).shape == (0, 3)
  with pytest.raises(CodingError):
    coder.decode(b"\x00\x01", empty, table)
  streams = coder.encode_streams(np.zeros((2, 0), np.int32), np.zeros((2, 0), np.int32), table)
  assert coder.decode_streams(streams, np.zeros((2, 0), np.int32), table).shape == (2, 0)
  assert coder.encode_streams(empty.T[:0], empty.T[:0], table) == []


def test_streams_match_single_stream_encoding(coder, table):
  rng = np.random.default_rng(2)
  symbols, indexes = gaussian_symbols(rng, (5, 8, 9))
  symbols[1, 2, 3] = 10**6
  streams = coder.encode_streams(symbols, indexes, table)
  assert streams == [coder.encode(s, i, table) for s, i in zip(symbols, indexes)]
  np.testing.assert_array_equal(coder.decode_streams(streams, indexes, table), symbols)


def test_size_is_near_ideal(coder):
  rng = np.random.default_rng(3)
  table = gaussian_table(tail_mass=2**-8)
  symbols, indexes = gaussian_symbols(rng, (100_000,))
  values = symbols - table.offsets[indexes]
  symbols = np.clip(values, 0, table.lengths[indexes] - 1) + table.offsets[indexes]  # no escapes
  ideal = table.bits(symbols, indexes)
  size = len(coder.encode(symbols, indexes, table)) * 8
  assert ideal <= size <= ideal * 1.005


def test_invalid_arguments_raise_value_error(coder, table):
  with pytest.raises(ValueError):
    coder.encode(np.zeros(3, np.int32), np.zeros(4, np.int32), table)
  with pytest.raises(ValueError):
    coder.encode(np.zeros(3, np.int32), np.full(3, len(SCALES)), table)
  with pytest.raises(ValueError):
    coder.encode(np.zeros(3, np.float32), np.zeros(3, np.int32), table)
  with pytest.raises(ValueError):
    coder.encode(np.array([2**31]), np.zeros(1, np.int32), table)
  with pytest.raises(ValueError):
    coder.decode(b"\x00", np.array([-1]), table)


def decode_or_coding_error(coder, data, indexes, table):
  try:
    out = coder.decode(data, indexes, table)
  except CodingError:
    return None
  assert out.shape == indexes.shape and out.dtype == np.int32
  return out


def test_corrupt_streams_never_crash(coder, table):
  rng = np.random.default_rng(4)
  symbols, indexes = gaussian_symbols(rng, (300,))
  symbols[::37] = 5000  # escapes, so the escape section is exercised too
  data = coder.encode(symbols, indexes, table)
  outcomes = []
  for cut in range(len(data)):
    outcomes.append(decode_or_coding_error(coder, data[:cut], indexes, table))
  for bit in range(0, 8 * len(data), 3):
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    outcomes.append(decode_or_coding_error(coder, bytes(flipped), indexes, table))
  for n in (0, 1, 4, 50, 500):
    outcomes.append(decode_or_coding_error(coder, rng.bytes(n), indexes, table))
  # Crafted to hang TFC's overflow-mode decoder (value == start of the escape
  # interval, then no more bytes): harmless here, escapes are not TFC's.
  row = table.cdf[0]
  start = int(row[table.lengths[0]])
  crafted = b"\x00" + bytes([start >> 8, start & 255, 0, 0])
  outcomes.append(decode_or_coding_error(coder, crafted, np.zeros(3, np.int32), table))
  assert sum(o is None for o in outcomes) > len(outcomes) // 4  # most are caught


def test_decoding_with_more_symbols_than_encoded_is_safe(coder, table):
  rng = np.random.default_rng(5)
  symbols, indexes = gaussian_symbols(rng, (100,))
  data = coder.encode(symbols, indexes, table)
  more = np.concatenate([indexes, indexes])
  decode_or_coding_error(coder, data, more, table)


# --- Explicit per-symbol CDF rows (the residual codec's path). ---

def window_rows(rng, n, window, precision=16):
  """Valid random rows [n, window + 2]: counts >= 1 for the window and the escape."""
  counts = rng.integers(1, 50, (n, window + 1))
  counts[:, :window] *= rng.integers(1, 40, (n, window))  # peaked-ish
  scaled = np.floor(counts / counts.sum(1, keepdims=True) * (2**precision - window - 1))
  cdf = np.zeros((n, window + 2), np.int64)
  cdf[:, 1:] = np.cumsum(scaled + 1, axis=1)
  cdf[:, -1] = 2**precision
  return cdf.astype(np.int32)


def test_explicit_cdfs_round_trip_with_escapes(coder):
  rng = np.random.default_rng(3)
  n, window = 500, 24
  cdf = window_rows(rng, n, window)
  offsets = rng.integers(-100, 100, n)
  symbols = offsets + rng.integers(-5, window + 5, n)  # some outside: escapes
  data, escaped = coder.encode_with_cdfs(symbols, cdf, offsets, 16)
  outside = (symbols < offsets) | (symbols >= offsets + window)
  np.testing.assert_array_equal(escaped, symbols[outside])
  served = []

  def take(k):
    served.append(k)
    start = sum(served[:-1])
    return escaped[start:start + k]

  decoded = coder.decode_with_cdfs(data, cdf, offsets, 16, take)
  np.testing.assert_array_equal(decoded, symbols)
  assert sum(served) == outside.sum()


def test_explicit_cdfs_check_their_rows(coder):
  rng = np.random.default_rng(4)
  cdf = window_rows(rng, 10, 8)
  offsets = np.zeros(10, np.int64)
  bad = cdf.copy()
  bad[0, 3] = bad[0, 2]  # a zero-count symbol
  with pytest.raises(ValueError, match="rise strictly"):
    coder.encode_with_cdfs(np.zeros(10, np.int32), bad, offsets, 16)
  with pytest.raises(ValueError, match="offsets"):
    coder.encode_with_cdfs(np.zeros(10, np.int32), cdf, offsets[:5], 16)
  with pytest.raises(ValueError, match="shape"):
    coder.encode_with_cdfs(np.zeros(10, np.int32), cdf[:, :2], offsets, 16)
  assert coder.encode_with_cdfs(np.zeros(0, np.int32), cdf[:0], offsets[:0], 16)[0] == b""


def test_explicit_cdfs_decode_garbage_into_range(coder):
  rng = np.random.default_rng(5)
  cdf = window_rows(rng, 300, 12)
  offsets = rng.integers(0, 10, 300)
  for _ in range(50):
    garbage = rng.bytes(int(rng.integers(0, 60)))
    escapes = lambda k: np.full(k, 7, np.int64)
    decoded = coder.decode_with_cdfs(garbage, cdf, offsets, 16, escapes)
    assert decoded.shape == (300,)
    inside = decoded - offsets
    assert np.all(((inside >= 0) & (inside < 12)) | (decoded == 7))
