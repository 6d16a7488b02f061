"""Backend-neutral entropy coder interface and the registry of coder ids.

Symbol convention (all backends): the caller passes plain integer symbols
(e.g. round(y - mean)) and, per symbol, the row `index` of a CdfTable. The
coder codes value = symbol - table.offsets[index]:

  0 <= value < table.lengths[index]  coded with the row's probabilities;
  any other value                    coded as the row's escape symbol, and the
                                     value itself stored losslessly by the
                                     backend (cheap: tails are rare).

So every int32 symbol round-trips exactly; only the cost depends on the table.
`decode` needs the same indexes and table, and returns the symbols.

Explicit per-symbol CDFs (`encode_with_cdfs` / `decode_with_cdfs`): for
models whose distributions are computed while coding (the residual layer's
pixel-wise mixtures), building a CdfTable with one row per symbol costs a
table parse per call. These take the integer CDFs directly, one row per
symbol: cdf [n, W + 2] int32, 0 = cdf[i, 0] < cdf[i, 1] < ... < cdf[i, W + 1]
= 2**precision, and offsets [n]: row i codes offsets[i] + 0 ... W - 1 with
counts cdf[i, k + 1] - cdf[i, k], and any other value as the escape (index
W). So a row may be a window of the alphabet around the likely values. The
stream holds only the range-coded indexes; the escaped symbols are returned
to the caller, who stores them (e.g. all streams' escapes in one place, so a
stream carries no escape header) and hands them back to the decoder, which
asks for them as it meets escapes. A backend may leave these unimplemented
(NotImplementedError).

Sessions (`cdf_encoder` / `cdf_decoder`): a caller that codes many such calls
in a fixed order (the residual layer: a few per decoding step) opens one
session and makes its calls through it; `finish` returns the session's
streams. Backends whose streams carry a fixed cost each (TFC flushes its
state per stream) may keep one stream per call (`ONE_STREAM = False`); a
queue coder such as constriction's puts every call into a single stream
(`ONE_STREAM = True`), so the caller stores one length instead of thousands.
A session's calls may give a row by its counts instead (`encode_counts` /
`decode_counts`: float64 [n, W + 1], exact integers, cdf[i, k + 1] - cdf[i, k]):
a backend that models by counts (constriction's; `MODELS_BY_COUNTS = True`)
takes them as they are, saving the difference of every row (about 45 us for a
3072 x 17 call); the others get the rows back from a cumulative sum.

Escape section (the layout both backends use for indexed streams, so an
escape costs the same whoever codes it):

  varint E        byte length of the escape section (gvae_jax.coding.varint)
  E bytes         one varint per escaped symbol, in coding order:
                    value < 0        -> 2 * (-value - 1) + 1
                    value >= length  -> 2 * (value - length)
  rest            the backend's range-coded bytes, escapes coded as the
                  row's escape index `length`
"""
from __future__ import annotations

import abc
import importlib
import importlib.util
import threading
from typing import Callable, ClassVar, Sequence

import numpy as np

from gvae_jax.coding import varint
from gvae_jax.entropy.cdf_tables import MAX_PRECISION, CdfTable
from gvae_jax.errors import UserError

TFC_RANGE_CODER_ID = 1
CONSTRICTION_RANGE_CODER_ID = 2
# Checked per coder call, thousands of times a file: dtype kinds and limits are
# cheaper than np.issubdtype and np.iinfo (about 10 us a call between them).
_INTEGER_KINDS = "iu"
INT32 = np.iinfo(np.int32)


class CodingError(UserError):
  """The bytes are not a valid stream for these indexes and table."""


class CdfEncoder:
  """A session of `encode_with_cdfs` calls (module doc); one stream per call."""

  def __init__(self, coder: "EntropyCoder"):
    self.coder = coder
    self.streams: list[bytes] = []

  def encode(self, symbols: np.ndarray, cdf: np.ndarray, offsets: np.ndarray,
             precision: int) -> np.ndarray:
    """Codes the call's symbols (rows valid by construction); returns its escaped symbols."""
    stream, escaped = self.coder.encode_with_cdfs(symbols, cdf, offsets, precision,
                                                  validate=False)
    self.streams.append(stream)
    return escaped

  def encode_counts(self, symbols: np.ndarray, counts: np.ndarray, offsets: np.ndarray,
                    precision: int) -> np.ndarray:
    """`encode` of rows given by their counts (module doc)."""
    counts, offsets = check_counts(counts, offsets)
    return self.encode(symbols, counts_cdf(counts), offsets, precision)

  def finish(self) -> list[bytes]:
    return self.streams


class CdfDecoder:
  """The decoding side of `CdfEncoder`: the calls in the same order, same rows."""

  def __init__(self, coder: "EntropyCoder", streams: Sequence[bytes]):
    self.coder, self.streams, self.next = coder, list(streams), 0

  def decode(self, cdf: np.ndarray, offsets: np.ndarray, precision: int,
             escapes: Callable[[int], np.ndarray]) -> np.ndarray:
    if self.next >= len(self.streams):
      raise CodingError("the file holds fewer streams than its decoding needs; file is corrupt")
    self.next += 1
    return self.coder.decode_with_cdfs(self.streams[self.next - 1], cdf, offsets, precision,
                                       escapes, validate=False)

  def decode_counts(self, counts: np.ndarray, offsets: np.ndarray, precision: int,
                    escapes: Callable[[int], np.ndarray]) -> np.ndarray:
    """`decode` of rows given by their counts (module doc)."""
    counts, offsets = check_counts(counts, offsets)
    return self.decode(counts_cdf(counts), offsets, precision, escapes)

  def finish(self) -> None:
    """CodingError unless every stream was used."""
    if self.next != len(self.streams):
      raise CodingError(f"{len(self.streams) - self.next} streams left over; file is corrupt")


class EntropyCoder(abc.ABC):
  """Codes int32 symbols with per-symbol CdfTable rows (convention above)."""

  coder_id: ClassVar[int]
  name: ClassVar[str]
  ONE_STREAM: ClassVar[bool] = False  # sessions: one stream in all, or one per call
  MODELS_BY_COUNTS: ClassVar[bool] = False  # sessions take counts as they are (module doc)

  def cdf_encoder(self) -> CdfEncoder:
    return CdfEncoder(self)

  def cdf_decoder(self, streams: Sequence[bytes]) -> CdfDecoder:
    """A session over the streams of a `cdf_encoder` session (one if ONE_STREAM)."""
    return CdfDecoder(self, streams)

  @abc.abstractmethod
  def encode(self, symbols: np.ndarray, indexes: np.ndarray, table: CdfTable) -> bytes:
    """One stream holding all symbols, in C order. symbols, indexes: same shape."""

  @abc.abstractmethod
  def decode(self, data: bytes, indexes: np.ndarray, table: CdfTable) -> np.ndarray:
    """int32 symbols shaped like indexes; CodingError if `data` is malformed."""

  def encode_with_cdfs(self, symbols: np.ndarray, cdf: np.ndarray, offsets: np.ndarray,
                       precision: int, validate: bool = True) -> tuple[bytes, np.ndarray]:
    """(stream, escaped symbols in order) for int symbols [n]; symbol i coded with row
    cdf[i] at offsets[i] (module doc).

    validate=False skips the O(n W) check that the rows are valid CDFs, for
    callers that build them valid by construction (ValueError otherwise).
    """
    raise NotImplementedError(f"{self.name} does not take explicit CDFs")

  def decode_with_cdfs(self, data: bytes, cdf: np.ndarray, offsets: np.ndarray,
                       precision: int, escapes: Callable[[int], np.ndarray],
                       validate: bool = True) -> np.ndarray:
    """int32 symbols [n] of a stream from `encode_with_cdfs` with the same rows;
    escapes(k) returns the next k escaped symbols (raising a UserError if
    there are not that many)."""
    raise NotImplementedError(f"{self.name} does not take explicit CDFs")

  def encode_streams(self, symbols: np.ndarray, indexes: np.ndarray,
                     table: CdfTable) -> list[bytes]:
    """One independent stream per slice of the leading axis."""
    symbols, indexes = check_symbols(symbols, indexes, table)
    if symbols.ndim == 0:
      raise ValueError("encode_streams needs a leading stream axis")
    return [self.encode(s, i, table) for s, i in zip(symbols, indexes)]

  def decode_streams(self, streams: Sequence[bytes], indexes: np.ndarray,
                     table: CdfTable) -> np.ndarray:
    """Inverse of `encode_streams`; indexes has the leading stream axis."""
    indexes = check_indexes(indexes, table)
    if indexes.ndim == 0 or len(streams) != indexes.shape[0]:
      raise ValueError(f"{len(streams)} streams for indexes of shape {indexes.shape}")
    out = np.empty(indexes.shape, np.int32)
    for k, data in enumerate(streams):
      out[k] = self.decode(data, indexes[k], table)
    return out


def check_indexes(indexes: np.ndarray, table: CdfTable) -> np.ndarray:
  """int32 indexes, each a valid row of `table` (ValueError otherwise)."""
  indexes = np.asarray(indexes)
  if not np.issubdtype(indexes.dtype, np.integer):
    raise ValueError(f"indexes must be integers, got {indexes.dtype}")
  if indexes.size and (indexes.min() < 0 or indexes.max() >= table.num_rows):
    raise ValueError(f"indexes must be in [0, {table.num_rows}) for this table")
  return indexes.astype(np.int32, copy=False)


def check_symbols(symbols: np.ndarray, indexes: np.ndarray,
                  table: CdfTable) -> tuple[np.ndarray, np.ndarray]:
  """int32 symbols and valid indexes of the same shape (ValueError otherwise)."""
  symbols = np.asarray(symbols)
  if not np.issubdtype(symbols.dtype, np.integer):
    raise ValueError(f"symbols must be integers, got {symbols.dtype}")
  info = np.iinfo(np.int32)
  if symbols.size and (symbols.min() < info.min or symbols.max() > info.max):
    raise ValueError("symbols must fit int32")
  indexes = check_indexes(indexes, table)
  if symbols.shape != indexes.shape:
    raise ValueError(f"symbols {symbols.shape} and indexes {indexes.shape} differ in shape")
  return symbols.astype(np.int32, copy=False), indexes


def check_cdf_rows(cdf: np.ndarray, offsets: np.ndarray, precision: int,
                   validate: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """int32 CDF rows [n, W + 2] (W >= 1) and int64 offsets [n] (ValueError otherwise);
  with `validate`, each row rises strictly from 0 to 2**precision."""
  cdf, offsets = np.asarray(cdf), np.asarray(offsets)
  if cdf.ndim != 2 or cdf.shape[1] < 3:
    raise ValueError(f"cdf must be [n, W + 2] with W >= 1, got shape {cdf.shape}")
  if cdf.dtype.kind not in _INTEGER_KINDS or offsets.dtype.kind not in _INTEGER_KINDS:
    raise ValueError(f"cdf and offsets must be integers, got {cdf.dtype}, {offsets.dtype}")
  if offsets.shape != cdf.shape[:1]:
    raise ValueError(f"offsets must have shape {cdf.shape[:1]}, got {offsets.shape}")
  if not 1 <= precision <= MAX_PRECISION:
    raise ValueError(f"precision must be in [1, {MAX_PRECISION}], got {precision}")
  if validate and cdf.size and (np.any(cdf[:, 0] != 0) or np.any(cdf[:, -1] != 1 << precision)
                                or np.any(np.diff(cdf, axis=1) <= 0)):
    raise ValueError("each cdf row must rise strictly from 0 to 2**precision")
  return cdf.astype(np.int32, copy=False), offsets.astype(np.int64, copy=False)


def window_values(symbols: np.ndarray, cdf: np.ndarray, offsets: np.ndarray, precision: int,
                  validate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """An explicit-CDF call's (checked cdf rows, values to code int32 [n] with the
  escape index W for values outside the window, escaped symbols int64)."""
  cdf, offsets = check_cdf_rows(cdf, offsets, precision, validate)
  coded, escaped = window_codes(symbols, offsets, cdf.shape[1] - 2)
  return cdf, coded, escaped


def window_codes(symbols: np.ndarray, offsets: np.ndarray,
                 window: int) -> tuple[np.ndarray, np.ndarray]:
  """(values to code int32 [n], the escape index `window` for values outside the
  window; escaped symbols int64) of symbols [n] in windows at offsets [n]."""
  symbols = np.asarray(symbols)
  if symbols.shape != offsets.shape or symbols.dtype.kind not in _INTEGER_KINDS:
    raise ValueError(f"symbols must be integers of shape {offsets.shape}, got "
                     f"{symbols.dtype} {symbols.shape}")
  values = symbols.astype(np.int64) - offsets
  escaped = (values < 0) | (values >= window)
  coded = np.where(escaped, window, values).astype(np.int32)
  return coded, symbols[escaped].astype(np.int64)


def check_counts(counts: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64 C-contiguous counts [n, W + 1] (W >= 1) and int64 offsets [n] (ValueError
  otherwise); the values are the caller's (rows valid by construction)."""
  counts, offsets = np.asarray(counts), np.asarray(offsets)
  if counts.ndim != 2 or counts.shape[1] < 2 or counts.dtype != np.float64:
    raise ValueError(f"counts must be float64 [n, W + 1] with W >= 1, got {counts.dtype} "
                     f"{counts.shape}")
  if offsets.shape != counts.shape[:1] or offsets.dtype.kind not in _INTEGER_KINDS:
    raise ValueError(f"offsets must be integers of shape {counts.shape[:1]}")
  return np.ascontiguousarray(counts), offsets.astype(np.int64, copy=False)


def counts_cdf(counts: np.ndarray) -> np.ndarray:
  """int32 CDF rows [n, W + 2] of counts [n, W + 1] (module doc)."""
  counts = np.asarray(counts)
  cdf = np.zeros((counts.shape[0], counts.shape[1] + 1), np.int64)
  np.cumsum(counts.astype(np.int64), axis=1, out=cdf[:, 1:])
  return cdf.astype(np.int32)


def window_symbols(values: np.ndarray, window: int, offsets: np.ndarray,
                   escapes: Callable[[int], np.ndarray]) -> np.ndarray:
  """Inverse of `window_values`: int32 symbols of decoded values (the escape index
  `window` for the escaped ones, taken from `escapes`; CodingError for values a
  valid stream cannot give)."""
  if values.size and (values.min() < 0 or values.max() > window):
    raise CodingError("range decoder produced out-of-range values")
  symbols = values.astype(np.int64) + offsets
  escaped = values == window
  count = int(np.count_nonzero(escaped))
  if count:
    symbols[escaped] = np.asarray(escapes(count), np.int64)
  if symbols.size and (symbols.min() < INT32.min or symbols.max() > INT32.max):
    raise CodingError("escaped value out of int32 range")
  return symbols.astype(np.int32)


def escape_codes(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Varint codes of values outside [0, lengths) (escape section, module doc)."""
  values, lengths = np.asarray(values, np.int64), np.asarray(lengths, np.int64)
  return np.where(values < 0, 2 * (-values - 1) + 1, 2 * (values - lengths))


def escaped_values(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Inverse of `escape_codes`."""
  codes, lengths = np.asarray(codes, np.int64), np.asarray(lengths, np.int64)
  magnitude = codes >> 1
  return np.where(codes & 1, -magnitude - 1, lengths + magnitude)


def join_stream(codes: np.ndarray, coded: bytes) -> bytes:
  """One indexed stream: the escape section of `codes`, then the coded bytes."""
  escapes = varint.encode(codes)
  return varint.encode([len(escapes)]) + escapes + coded


def split_stream(data: bytes) -> tuple[bytes, bytes]:
  """(escape section, coded bytes) of a `join_stream` stream (CodingError)."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"stream must be bytes, got {type(data).__name__}")
  data = bytes(data)
  try:
    length, pos = varint.read_one(data)
  except varint.VarintError:
    raise CodingError("truncated or malformed stream header") from None
  if pos + length > len(data):
    raise CodingError(f"truncated stream: escape section needs {length} bytes, "
                      f"{len(data) - pos} left")
  return data[pos:pos + length], data[pos + length:]


def read_escapes(section: bytes, lengths: np.ndarray) -> np.ndarray:
  """The escaped symbols (int64) of an escape section, one per entry of the
  escaped symbols' row lengths (CodingError if the section does not hold them)."""
  try:
    codes = varint.decode(section, len(lengths))
  except varint.VarintError:
    raise CodingError(f"escape section does not hold the {len(lengths)} escaped values the "
                      "stream needs") from None
  return escaped_values(codes, lengths)


# Registry: id -> factory, or "module:Class" for backends loaded on first use.
_FACTORIES: dict[int, Callable[[], EntropyCoder] | str] = {
    TFC_RANGE_CODER_ID: "gvae_jax.coding.tfc_backend:TfcRangeCoder",
    CONSTRICTION_RANGE_CODER_ID: "gvae_jax.coding.constriction_backend:ConstrictionRangeCoder",
}
# What to install for a backend whose library is missing (the README's profiles).
_INSTALL_HINTS = {
    TFC_RANGE_CODER_ID: "; coder 1 (TFC) files are written and read by the tfc profile: "
                        "install it with "
                        "pip install -c requirements/constraints-tfc.txt -e '.[tfc]' (Python 3.11)",
    CONSTRICTION_RANGE_CODER_ID: "; install constriction (pip install constriction), which "
                                 "both profiles include",
}
_INSTANCES: dict[int, EntropyCoder] = {}
_LOCK = threading.Lock()


def register_coder(coder_id: int, factory: Callable[[], EntropyCoder] | str) -> None:
  """Adds a backend under a new id in [1, 255] (the file stores one byte)."""
  if not 1 <= coder_id <= 255:
    raise ValueError(f"coder id must be in [1, 255], got {coder_id}")
  with _LOCK:
    if coder_id in _FACTORIES:
      raise ValueError(f"coder id {coder_id} is already registered")
    _FACTORIES[coder_id] = factory


def coder_ids() -> tuple[int, ...]:
  return tuple(sorted(_FACTORIES))


def get_coder(coder_id: int) -> EntropyCoder:
  """The (shared) backend for an id; CodingError for ids this build lacks."""
  with _LOCK:
    if coder_id in _INSTANCES:
      return _INSTANCES[coder_id]
    factory = _FACTORIES.get(coder_id)
    if factory is None:
      known = ", ".join(map(str, sorted(_FACTORIES)))
      raise CodingError(f"unknown entropy coder id {coder_id} (this build has: {known})")
    try:
      if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
      coder = factory()
    except ImportError as e:  # the backend's library is not in this environment
      raise CodingError(f"entropy coder {coder_id} is not installed here "
                        f"({e.name or e} is missing){_INSTALL_HINTS.get(coder_id, '')}") from None
    _INSTANCES[coder_id] = coder
    return coder


# The names users give on the command line (`--coder`).
CODER_NAMES = {"tfc": TFC_RANGE_CODER_ID, "constriction": CONSTRICTION_RANGE_CODER_ID}


def default_coder_id() -> int:
  """The writer's coder: TFC where its ops are installed (the `tfc` profile),
  constriction otherwise (the default profile)."""
  if importlib.util.find_spec("tensorflow_compression_ops") is not None:
    return TFC_RANGE_CODER_ID
  return CONSTRICTION_RANGE_CODER_ID
