"""Entropy coder backed by constriction's queue range coder (id 2), the default profile's.

constriction (bamler-lab, Rust with numpy bindings) is maintained for current
numpy and Python, which the TFC ops are not. Its range coder keeps 64-bit
state, emits 32-bit words, and models probabilities with 24 bits.

Exact model quantisation: the project's CDFs are integers at precision p <= 16
(counts C_k summing to 2**p). constriction takes float probabilities and
requantises them itself ("fast" quantisation, `perfect=False`): for n symbols
with float weights w_k it uses the 24-bit CDF

  F_k = floor(S_k * (2**24 - n) / sum(w)) + k,   S_k = w_0 + ... + w_{k-1}

evaluated in the weights' float type. Passing the integer counts as float64
makes every step exact: S_k and sum(w) = 2**p are integers below 2**53,
(2**24 - n) / 2**p is a division by a power of two, and the product has at
most 40 significant bits. So F is a fixed integer function of the counts on
every IEEE-754 machine, whatever constriction's build or vector width: the
same integers in, the same bits out. (float32 weights would round the product
and are never used.) The coder's F_k+1 - F_k is about 2**(24-p) C_k, so this
costs nothing measurable over coding the counts directly.

Stream layouts:
  indexed (`encode` / `decode`, the lossy layer's CdfTable rows): the escape
      section of gvae_jax.coding.coder, then the range coder's words as
      little-endian uint32. The symbols are coded grouped by table row (rows
      in increasing order, each row's symbols in C order), one concrete model
      per row, so a table row is converted once per stream, not per symbol.
  explicit CDFs (`encode_with_cdfs`): the words only; escapes go to the caller.
  sessions (`cdf_encoder`): every call of the session in one stream
      (ONE_STREAM), in call order: constriction's queue coder has no per-call
      cost, where one stream per call would cost its final words each.

Hostile input: any words decode to symbols inside each model's alphabet (the
decoder's state stays in its interval), so a garbage stream yields garbage
symbols that the caller's checks reject; anything constriction raises, Rust
panics included, becomes a CodingError.
"""
from __future__ import annotations

import weakref
from typing import Callable, Sequence

import numpy as np

import constriction

from gvae_jax.coding.coder import (CONSTRICTION_RANGE_CODER_ID, INT32, CdfDecoder, CdfEncoder,
                                   CodingError, EntropyCoder, check_cdf_rows, check_counts,
                                   check_indexes, check_symbols, escape_codes, join_stream,
                                   read_escapes, split_stream, window_codes, window_symbols,
                                   window_values)
from gvae_jax.entropy.cdf_tables import CdfTable

_WORD = np.dtype("<u4")
# One family for per-symbol rows; lazy: each row is used for one symbol only,
# so it is quantised on the fly instead of tabulated (same numbers, faster).
_PER_SYMBOL = constriction.stream.model.Categorical(lazy=True)


def _counts(cdf: np.ndarray) -> np.ndarray:
  """float64 counts (exact integers) of integer CDF rows (module doc)."""
  return np.ascontiguousarray(np.diff(cdf, axis=-1), np.float64)


def _words(data: bytes) -> np.ndarray:
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"stream must be bytes, got {type(data).__name__}")
  if len(data) % _WORD.itemsize:
    raise CodingError(f"range-coded data of {len(data)} bytes is not a whole number of "
                      "32-bit words; file is corrupt")
  return np.frombuffer(bytes(data), _WORD).astype(np.uint32)


def _guarded(call, *args):
  """constriction's errors (and Rust panics, which are BaseExceptions) -> CodingError."""
  try:
    return call(*args)
  except (KeyboardInterrupt, SystemExit, MemoryError):
    raise
  except BaseException as e:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
    raise CodingError(f"range decoder rejected the stream: {e}") from None


class _Table:
  """A CdfTable's rows as constriction models, each built on first use."""

  def __init__(self, table: CdfTable):
    self.cdf, self.lengths = table.cdf, table.lengths  # no reference to the table itself
    self._models: dict[int, object] = {}

  def model(self, row: int):
    model = self._models.get(row)
    if model is None:
      counts = _counts(self.cdf[row, :int(self.lengths[row]) + 2])
      model = constriction.stream.model.Categorical(counts, perfect=False)
      self._models[row] = model
    return model


class _Session(CdfEncoder):
  def __init__(self, coder: "ConstrictionRangeCoder"):
    super().__init__(coder)
    self.encoder = constriction.stream.queue.RangeEncoder()
    self.coded = 0

  def encode(self, symbols, cdf, offsets, precision):
    cdf, values, escaped = window_values(symbols, cdf, offsets, precision, False)
    return self._encode(values, _counts(cdf), escaped)

  def encode_counts(self, symbols, counts, offsets, precision):
    counts, offsets = check_counts(counts, offsets)
    values, escaped = window_codes(symbols, offsets, counts.shape[1] - 1)
    return self._encode(values, counts, escaped)

  def _encode(self, values, counts, escaped):
    if values.size:
      self.encoder.encode(values, _PER_SYMBOL, counts)
      self.coded += values.size
    return escaped

  def finish(self) -> list[bytes]:
    if not self.coded:  # nothing coded: no stream at all
      return []
    return [self.encoder.get_compressed().astype(_WORD).tobytes()]


class _DecodingSession(CdfDecoder):
  def __init__(self, coder: "ConstrictionRangeCoder", streams: Sequence[bytes]):
    super().__init__(coder, streams)
    if len(self.streams) > 1:
      raise CodingError(f"{len(self.streams)} streams where this coder writes one; "
                        "file is corrupt")
    self.decoder = constriction.stream.queue.RangeDecoder(
        _words(self.streams[0]) if self.streams else np.zeros(0, np.uint32))
    self.calls = 0

  def decode(self, cdf, offsets, precision, escapes):
    cdf, offsets = check_cdf_rows(cdf, offsets, precision, False)
    return self._decode(_counts(cdf) if offsets.size else None, offsets, cdf.shape[1] - 2,
                        escapes)

  def decode_counts(self, counts, offsets, precision, escapes):
    counts, offsets = check_counts(counts, offsets)
    return self._decode(counts, offsets, counts.shape[1] - 1, escapes)

  def _decode(self, counts, offsets, window, escapes):
    if offsets.size and not self.streams:
      raise CodingError("the file holds no stream but its decoding needs one; file is corrupt")
    self.calls += 1
    values = (_guarded(self.decoder.decode, _PER_SYMBOL, counts) if offsets.size
              else np.zeros(0, np.int32))
    return window_symbols(values, window, offsets, escapes)

  def finish(self) -> None:
    # The encoder writes a stream only if something was coded; its words end
    # where the decoder stops (it may have read the last word only in part).
    if self.streams and not self.calls:
      raise CodingError("a stream is left over; file is corrupt")


class ConstrictionRangeCoder(EntropyCoder):
  """constriction's queue range coder; see the module doc for the layouts."""

  coder_id = CONSTRICTION_RANGE_CODER_ID
  name = "constriction-range"
  ONE_STREAM = True
  MODELS_BY_COUNTS = True

  def __init__(self):
    # Models of the tables in use, dropped with their table.
    self._tables: "weakref.WeakKeyDictionary[CdfTable, _Table]" = weakref.WeakKeyDictionary()

  def _models(self, table: CdfTable) -> _Table:
    entry = self._tables.get(table)
    if entry is None:
      entry = self._tables[table] = _Table(table)
    return entry

  def encode(self, symbols: np.ndarray, indexes: np.ndarray, table: CdfTable) -> bytes:
    symbols, indexes = check_symbols(symbols, indexes, table)
    symbols, indexes = symbols.ravel(), indexes.ravel()
    values = symbols.astype(np.int64) - table.offsets[indexes]
    lengths = table.lengths[indexes].astype(np.int64)
    escaped = (values < 0) | (values >= lengths)
    coded = np.where(escaped, lengths, values).astype(np.int32)
    order = np.argsort(indexes, kind="stable")  # grouped by row (module doc)
    rows, starts = np.unique(indexes[order], return_index=True)
    bounds = np.append(starts, order.size)
    models = self._models(table)
    encoder = constriction.stream.queue.RangeEncoder()
    for row, start, stop in zip(rows, bounds[:-1], bounds[1:]):
      encoder.encode(np.ascontiguousarray(coded[order[start:stop]]), models.model(int(row)))
    words = encoder.get_compressed().astype(_WORD).tobytes() if symbols.size else b""
    return join_stream(escape_codes(values[escaped], lengths[escaped]), words)

  def decode(self, data: bytes, indexes: np.ndarray, table: CdfTable) -> np.ndarray:
    indexes = check_indexes(indexes, table)
    shape, indexes = indexes.shape, indexes.ravel()
    escapes, coded = split_stream(data)
    words = _words(coded)
    if indexes.size == 0:
      if len(escapes) or len(coded):
        raise CodingError("stream has data but no symbols are expected")
      return np.zeros(shape, np.int32)
    order = np.argsort(indexes, kind="stable")
    rows, starts = np.unique(indexes[order], return_index=True)
    bounds = np.append(starts, order.size)
    models = self._models(table)
    decoder = constriction.stream.queue.RangeDecoder(words)
    values = np.empty(indexes.size, np.int64)
    for row, start, stop in zip(rows, bounds[:-1], bounds[1:]):
      values[order[start:stop]] = _guarded(decoder.decode, models.model(int(row)),
                                           int(stop - start))
    lengths = table.lengths[indexes].astype(np.int64)
    if np.any((values < 0) | (values > lengths)):  # cannot happen for valid models
      raise CodingError("range decoder produced out-of-range values")
    escaped = values == lengths
    values[escaped] = read_escapes(escapes, lengths[escaped])
    symbols = values + table.offsets[indexes]
    if symbols.min() < INT32.min or symbols.max() > INT32.max:
      raise CodingError("escaped value out of int32 range")
    return symbols.astype(np.int32).reshape(shape)

  def encode_with_cdfs(self, symbols: np.ndarray, cdf: np.ndarray, offsets: np.ndarray,
                       precision: int, validate: bool = True) -> tuple[bytes, np.ndarray]:
    cdf, values, escaped = window_values(symbols, cdf, offsets, precision, validate)
    if values.size == 0:
      return b"", escaped
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(values, _PER_SYMBOL, _counts(cdf))
    return encoder.get_compressed().astype(_WORD).tobytes(), escaped

  def decode_with_cdfs(self, data: bytes, cdf: np.ndarray, offsets: np.ndarray,
                       precision: int, escapes: Callable[[int], np.ndarray],
                       validate: bool = True) -> np.ndarray:
    cdf, offsets = check_cdf_rows(cdf, offsets, precision, validate)
    words = _words(data)
    if offsets.size == 0:
      if len(data):
        raise CodingError("stream has data but no symbols are expected")
      return np.zeros(0, np.int32)
    decoder = constriction.stream.queue.RangeDecoder(words)
    values = _guarded(decoder.decode, _PER_SYMBOL, _counts(cdf))
    return window_symbols(values, cdf.shape[1] - 2, offsets, escapes)

  def cdf_encoder(self) -> CdfEncoder:
    return _Session(self)

  def cdf_decoder(self, streams: Sequence[bytes]) -> CdfDecoder:
    return _DecodingSession(self, streams)
