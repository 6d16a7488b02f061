"""Both entropy coder backends against one set of tests (each skipped where
its library is not installed), plus what is particular to each."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from gvae_jax.coding.coder import (CODER_NAMES, CONSTRICTION_RANGE_CODER_ID, TFC_RANGE_CODER_ID,
                                   CodingError, counts_cdf, default_coder_id, get_coder,
                                   register_coder)
from gvae_jax.entropy.cdf_tables import CdfTable

HAS_TFC = importlib.util.find_spec("tensorflow_compression_ops") is not None
HAS_CONSTRICTION = importlib.util.find_spec("constriction") is not None
needs_tfc = pytest.mark.skipif(not HAS_TFC, reason="TFC ops not installed (the tfc profile has them)")
BACKENDS = [pytest.param(TFC_RANGE_CODER_ID, id="tfc", marks=needs_tfc),
            pytest.param(CONSTRICTION_RANGE_CODER_ID, id="constriction",
                         marks=pytest.mark.skipif(not HAS_CONSTRICTION,
                                                  reason="constriction not installed"))]

SCALES = np.exp(np.linspace(np.log(0.11), np.log(64.0), 16))


def gaussian_table(scales=SCALES, tail_mass=1e-4):
  half = np.ceil(-ndtri(tail_mass / 2) * scales).astype(np.int64)
  x = np.arange(2 * half.max() + 1)[None, :] - half[:, None]
  pmf = ndtr((x + 0.5) / scales[:, None]) - ndtr((x - 0.5) / scales[:, None])
  return CdfTable.from_pmf(pmf, 2 * half + 1, -half)


@pytest.fixture(scope="module")
def table():
  return gaussian_table()


@pytest.fixture(scope="module", params=BACKENDS)
def coder(request):
  return get_coder(request.param)


def gaussian_symbols(rng, shape, table_size=len(SCALES)):
  indexes = rng.integers(0, table_size, shape).astype(np.int32)
  symbols = np.rint(rng.normal(size=shape) * SCALES[indexes]).astype(np.int32)
  return symbols, indexes


@needs_tfc
def test_registry():
  from gvae_jax.coding.tfc_backend import TfcRangeCoder
  assert isinstance(get_coder(1), TfcRangeCoder)
  assert get_coder(1) is get_coder(1)
  with pytest.raises(CodingError, match="unknown entropy coder id 200"):
    get_coder(200)
  with pytest.raises(ValueError):
    register_coder(TFC_RANGE_CODER_ID, TfcRangeCoder)
  with pytest.raises(ValueError):
    register_coder(0, TfcRangeCoder)


def test_default_coder_is_tfc_where_installed():
  assert default_coder_id() == (TFC_RANGE_CODER_ID if HAS_TFC else CONSTRICTION_RANGE_CODER_ID)
  assert set(CODER_NAMES.values()) == {TFC_RANGE_CODER_ID, CONSTRICTION_RANGE_CODER_ID}


def test_missing_backend_names_the_profile_to_install():
  # A fresh process where the TFC ops cannot be imported, as in the default profile.
  code = ("import sys; sys.modules['tensorflow_compression_ops'] = None\n"
          "from gvae_jax.coding.coder import get_coder, CodingError\n"
          "try:\n  get_coder(1)\nexcept CodingError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                       capture_output=True, text=True).stdout
  assert "not installed" in out and "constraints-tfc.txt" in out and "[tfc]" in out


def test_importing_the_backends_does_not_import_tensorflow():
  code = ("import sys, gvae_jax.coding.container, gvae_jax.coding.constriction_backend; "
          + ("import gvae_jax.coding.tfc_backend; " if HAS_TFC else "")
          + "assert 'tensorflow' not in sys.modules")
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
  # interval, then no more bytes): harmless here, escapes are not the range coder's.
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
  decoded_some = False
  for _ in range(50):
    garbage = rng.bytes(int(rng.integers(0, 60)))
    escapes = lambda k: np.full(k, 7, np.int64)
    try:
      decoded = coder.decode_with_cdfs(garbage, cdf, offsets, 16, escapes)
    except CodingError:  # e.g. constriction: not a whole number of words
      continue
    decoded_some = True
    assert decoded.shape == (300,)
    inside = decoded - offsets
    assert np.all(((inside >= 0) & (inside < 12)) | (decoded == 7))
  assert decoded_some


# --- Sessions: many explicit-CDF calls in a fixed order (the residual layer). ---

def session_calls(rng, calls=30):
  out = []
  for k in range(calls):
    n, window = int(rng.integers(0, 200)), int(rng.choice([1, 8, 33]))
    cdf = window_rows(rng, n, window)
    offsets = rng.integers(-20, 20, n)
    symbols = offsets + rng.integers(-2, window + 2, n)
    out.append((symbols, cdf, offsets))
  return out


def test_sessions_round_trip(coder):
  rng = np.random.default_rng(6)
  calls = session_calls(rng)
  encoder = coder.cdf_encoder()
  escaped = [encoder.encode(s, c, o, 16) for s, c, o in calls]
  streams = encoder.finish()
  assert len(streams) == (1 if coder.ONE_STREAM else len(calls))
  decoder = coder.cdf_decoder(streams)
  for (symbols, cdf, offsets), esc in zip(calls, escaped):
    np.testing.assert_array_equal(decoder.decode(cdf, offsets, 16, lambda k: esc[:k]), symbols)
  decoder.finish()


def test_sessions_take_counts_for_the_same_streams(coder):
  """A row given by its counts codes as the row itself: the same streams and symbols,
  whether the backend takes counts as they are (MODELS_BY_COUNTS) or rebuilds rows."""
  rng = np.random.default_rng(9)
  calls = session_calls(rng)
  by_rows, by_counts = coder.cdf_encoder(), coder.cdf_encoder()
  escaped = []
  for s, c, o in calls:
    counts = np.diff(c, axis=1).astype(np.float64)
    escaped.append(by_rows.encode(s, c, o, 16))
    np.testing.assert_array_equal(by_counts.encode_counts(s, counts, o, 16), escaped[-1])
  streams = by_rows.finish()
  assert by_counts.finish() == streams
  decoder = coder.cdf_decoder(streams)
  for (symbols, cdf, offsets), esc in zip(calls, escaped):
    counts = np.diff(cdf, axis=1).astype(np.float64)
    np.testing.assert_array_equal(decoder.decode_counts(counts, offsets, 16, lambda k: esc[:k]),
                                  symbols)
  decoder.finish()
  with pytest.raises(ValueError, match="float64"):
    coder.cdf_encoder().encode_counts(calls[0][0], np.diff(calls[0][1], axis=1), calls[0][2], 16)


def test_counts_cdf_is_the_inverse_of_the_difference():
  rng = np.random.default_rng(10)
  cdf = window_rows(rng, 40, 9)
  np.testing.assert_array_equal(counts_cdf(np.diff(cdf, axis=1).astype(np.float64)), cdf)
  assert counts_cdf(np.diff(cdf, axis=1).astype(np.float64)).dtype == np.int32


def test_sessions_refuse_missing_streams(coder):
  rng = np.random.default_rng(7)
  calls = [c for c in session_calls(rng, 5) if len(c[0])]
  encoder = coder.cdf_encoder()
  for s, c, o in calls:
    encoder.encode(s, c, o, 16)
  decoder = coder.cdf_decoder([])
  with pytest.raises(CodingError):
    for _, cdf, offsets in calls:
      decoder.decode(cdf, offsets, 16, lambda k: np.zeros(k, np.int64))


def test_one_stream_session_is_smaller_than_a_stream_per_call():
  coder = get_coder(CONSTRICTION_RANGE_CODER_ID)
  rng = np.random.default_rng(8)
  calls = session_calls(rng, 200)
  encoder = coder.cdf_encoder()
  for s, c, o in calls:
    encoder.encode(s, c, o, 16)
  one = sum(map(len, encoder.finish()))
  separate = sum(len(coder.encode_with_cdfs(s, c, o, 16)[0]) for s, c, o in calls)
  assert one < separate - 200  # each separate stream pays its final words


# --- constriction's model quantisation is exact (constriction_backend doc). ---

def test_constriction_models_are_the_documented_integer_function():
  """The 24-bit CDF constriction uses is floor(S_k (2^24 - n) / 2^16) + k of the
  counts: checked through the code length of each symbol, which for a range
  coder is -log2 of the model's probability up to the final words."""
  import constriction
  rng = np.random.default_rng(9)
  counts = rng.integers(1, 4000, 12)
  counts[-1] += 2**16 - counts.sum()
  assert counts.min() >= 1
  n = counts.size
  s = np.concatenate([[0], np.cumsum(counts)])
  expected = (s * (2**24 - n)) // 2**16 + np.arange(n + 1)
  model = constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)
  for symbol in range(n):
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(np.full(20000, symbol, np.int32), model)
    bits = encoder.num_bits()
    ideal = -20000 * np.log2((expected[symbol + 1] - expected[symbol]) / 2**24)
    assert abs(bits - ideal) <= 64 + 1e-6 * ideal, (symbol, bits, ideal)
