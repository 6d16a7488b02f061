"""Entropy coder backed by the TensorFlow Compression range coder ops (id 1).

Stream layout (one per `encode`, one per slice of `encode_streams`): the
escape section of gvae_jax.coding.coder, then TFC range coder bytes.

Why escapes live outside the range coder: TFC's own overflow mode (negative
precision) decodes Elias-gamma prefixes with an unbounded loop, and a crafted
4-byte stream makes it spin forever. With positive precision the decoder is a
bounded binary search per symbol whose state stays inside the coding interval
for any input bytes, so garbage decodes to in-range garbage (or fails our
checks) and never hangs or reads out of bounds.

Speed: one TF op call per array (or per batch of streams), never per symbol;
TensorFlow is imported on first use and GPUs are hidden from it.

Explicit per-symbol CDFs (`encode_with_cdfs` / `decode_with_cdfs`, see
gvae_jax.coding.coder) use TFC's range_encode / range_decode ops: one op call
per stream, the CDF rows passed as they are (the last symbol of each row is
its escape); the stream is the range coder's bytes only, the escaped values
go to the caller. Measured here for 3072
symbols with 256-symbol CDFs: 0.37 ms to encode and 0.38 ms to decode,
against 1.1 / 1.6 ms for a per-call lookup table through the indexed ops.
Their decoder runs the same bounded binary search per symbol as the indexed
ops, so garbage bytes decode to in-range garbage and never hang.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import weakref
from typing import Callable, Sequence

import numpy as np

from gvae_jax.coding.coder import (TFC_RANGE_CODER_ID, CodingError, EntropyCoder,
                                   check_cdf_rows, check_indexes, check_symbols, escape_codes,
                                   join_stream, read_escapes, split_stream, window_symbols,
                                   window_values)
from gvae_jax.entropy.cdf_tables import CdfTable

_INT32 = np.iinfo(np.int32)


@functools.cache
def _tf():
  """(tensorflow, tfc ops), imported once; TF must not grab GPUs JAX uses."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # 3 hides the CUDA-registration lines
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialized its devices; nothing to do
    pass
  import tensorflow_compression_ops as ops
  return tf, ops


_LOOKUPS: "weakref.WeakKeyDictionary[CdfTable, np.ndarray]" = weakref.WeakKeyDictionary()


def _lookup(table: CdfTable) -> np.ndarray:
  """The op's table: each row [precision, 0, c1, ..., 2**precision, padding]."""
  lookup = _LOOKUPS.get(table)
  if lookup is None:
    column = np.full((table.num_rows, 1), table.precision, np.int32)
    lookup = np.ascontiguousarray(np.concatenate([column, table.cdf], axis=1))
    _LOOKUPS[table] = lookup
  return lookup


class TfcRangeCoder(EntropyCoder):
  """TFC range coder; see the module doc for the stream layout."""

  coder_id = TFC_RANGE_CODER_ID
  name = "tfc-range"

  def __init__(self):
    # Fail at lookup, not mid-file, where the ops are missing (TF itself loads on first use).
    if importlib.util.find_spec("tensorflow_compression_ops") is None:
      raise ImportError("tensorflow-compression-ops", name="tensorflow_compression_ops")

  def encode(self, symbols: np.ndarray, indexes: np.ndarray, table: CdfTable) -> bytes:
    symbols, indexes = check_symbols(symbols, indexes, table)
    return self._encode(symbols.reshape(1, -1), indexes.reshape(1, -1), table)[0]

  def decode(self, data: bytes, indexes: np.ndarray, table: CdfTable) -> np.ndarray:
    indexes = check_indexes(indexes, table)
    return self._decode([data], indexes.reshape(1, -1), table).reshape(indexes.shape)

  def encode_with_cdfs(self, symbols: np.ndarray, cdf: np.ndarray, offsets: np.ndarray,
                       precision: int, validate: bool = True) -> tuple[bytes, np.ndarray]:
    cdf, coded, escaped = window_values(symbols, cdf, offsets, precision, validate)
    if coded.size == 0:
      return b"", escaped
    tf, ops = _tf()
    # debug_level=0: the rows were checked above (or are valid by construction).
    # Tensors, not numpy arrays: the op's fast path takes only tensors.
    ranged = ops.range_encode(tf.constant(coded.astype(np.int16)), tf.constant(cdf),
                              precision=precision, debug_level=0)
    return bytes(ranged.numpy()), escaped

  def decode_with_cdfs(self, data: bytes, cdf: np.ndarray, offsets: np.ndarray,
                       precision: int, escapes: Callable[[int], np.ndarray],
                       validate: bool = True) -> np.ndarray:
    cdf, offsets = check_cdf_rows(cdf, offsets, precision, validate)
    if not isinstance(data, (bytes, bytearray, memoryview)):
      raise TypeError(f"stream must be bytes, got {type(data).__name__}")
    if offsets.size == 0:
      if len(data):
        raise CodingError("stream has data but no symbols are expected")
      return np.zeros(0, np.int32)
    tf, ops = _tf()
    try:
      # Tensors, not numpy arrays: the op's fast path takes only tensors.
      decoded = ops.range_decode(tf.constant(bytes(data)), tf.constant([offsets.size], tf.int32),
                                 tf.constant(cdf), precision=precision, debug_level=0)
    except tf.errors.OpError as e:
      raise CodingError(f"range decoder rejected the stream: {e.message}") from e
    return window_symbols(decoded.numpy(), cdf.shape[1] - 2, offsets, escapes)

  def encode_streams(self, symbols: np.ndarray, indexes: np.ndarray,
                     table: CdfTable) -> list[bytes]:
    symbols, indexes = check_symbols(symbols, indexes, table)
    if symbols.ndim == 0:
      raise ValueError("encode_streams needs a leading stream axis")
    flat = (symbols.shape[0], int(np.prod(symbols.shape[1:])))  # -1 fails for 0 streams
    return self._encode(symbols.reshape(flat), indexes.reshape(flat), table)

  def decode_streams(self, streams: Sequence[bytes], indexes: np.ndarray,
                     table: CdfTable) -> np.ndarray:
    indexes = check_indexes(indexes, table)
    if indexes.ndim == 0 or len(streams) != indexes.shape[0]:
      raise ValueError(f"{len(streams)} streams for indexes of shape {indexes.shape}")
    flat = (indexes.shape[0], int(np.prod(indexes.shape[1:])))
    return self._decode(list(streams), indexes.reshape(flat), table).reshape(indexes.shape)

  def _encode(self, symbols: np.ndarray, indexes: np.ndarray, table: CdfTable) -> list[bytes]:
    """symbols, indexes: [streams, n] -> one stream of bytes per row."""
    count, n = symbols.shape
    if count == 0:
      return []
    values = symbols.astype(np.int64) - table.offsets[indexes]
    lengths = table.lengths[indexes].astype(np.int64)
    escaped = (values < 0) | (values >= lengths)
    coded = np.where(escaped, lengths, values).astype(np.int32)
    if n == 0:
      ranged = [b""] * count  # nothing to code; skip the ops
    else:
      tf, ops = _tf()
      handle = ops.create_range_encoder(np.asarray([count], np.int32), _lookup(table))
      handle = ops.entropy_encode_index(handle, indexes, coded)
      ranged = [bytes(s) for s in ops.entropy_encode_finalize(handle).numpy()]
    return [join_stream(escape_codes(values[k][escaped[k]], lengths[k][escaped[k]]), ranged[k])
            for k in range(count)]

  def _decode(self, streams: list[bytes], indexes: np.ndarray, table: CdfTable) -> np.ndarray:
    """streams: one per row of indexes [streams, n] -> int32 symbols [streams, n]."""
    count, n = indexes.shape
    parts = [split_stream(data) for data in streams]
    if count == 0:
      return np.zeros((0, n), np.int32)
    if n == 0:
      if any(escapes or ranged for escapes, ranged in parts):
        raise CodingError("stream has data but no symbols are expected")
      return np.zeros((count, 0), np.int32)

    tf, ops = _tf()
    try:
      handle = ops.create_range_decoder(
          tf.constant([ranged for _, ranged in parts], tf.string), _lookup(table))
      handle, decoded = ops.entropy_decode_index(
          handle, indexes, np.asarray([n], np.int32), tf.int32)
      consistent = ops.entropy_decode_finalize(handle).numpy()
    except tf.errors.OpError as e:
      raise CodingError(f"range decoder rejected the stream: {e.message}") from e
    if not np.all(consistent):
      bad = np.flatnonzero(~consistent)
      raise CodingError(f"range-coded data is inconsistent (stream {int(bad[0])}); file is corrupt")

    values = decoded.numpy().astype(np.int64)
    lengths = table.lengths[indexes].astype(np.int64)
    if np.any((values < 0) | (values > lengths)):
      raise CodingError("range decoder produced out-of-range values")
    escaped = values == lengths
    for k, (escapes, _) in enumerate(parts):
      values[k][escaped[k]] = read_escapes(escapes, lengths[k][escaped[k]])
    symbols = values + table.offsets[indexes]
    if symbols.size and (symbols.min() < _INT32.min or symbols.max() > _INT32.max):
      raise CodingError("escaped value out of int32 range")
    return symbols.astype(np.int32)
