"""LEB128 varints and zigzag signs: the one integer serialisation of every .gvae section.

A varint holds 7 bits a byte, least significant group first, the high bit set
on every byte but the last. Minimal encodings only: a varint never ends with a
0x00 continuation group, so every integer has exactly one encoding and a
decoder can reject padding. Signed integers go through zigzag (0, -1, 1, -2 ->
0, 1, 2, 3). All functions are vectorised over numpy arrays (uint64), so
side information of a million escapes costs milliseconds, not a Python loop.
"""
from __future__ import annotations

import numpy as np

MAX_BYTES = 5  # 35 bits: every count, length and escape code of the format fits


class VarintError(ValueError):
  """The bytes are not a sequence of minimal varints of at most MAX_BYTES."""


def encode(values) -> bytes:
  """LEB128 of non-negative integers < 2**(7 * MAX_BYTES), in order."""
  codes = np.asarray(values, np.int64).ravel()
  if codes.size == 0:
    return b""
  if codes.min() < 0 or codes.max() >= 1 << (7 * MAX_BYTES):
    raise ValueError(f"varints hold integers in [0, 2**{7 * MAX_BYTES})")
  codes = codes.astype(np.uint64)
  nbytes = np.ones(codes.size, np.int64)
  for k in range(1, MAX_BYTES):
    nbytes += codes >= np.uint64(1 << (7 * k))
  starts = np.cumsum(nbytes) - nbytes
  owner = np.repeat(np.arange(codes.size), nbytes)
  position = np.arange(int(nbytes.sum())) - starts[owner]
  groups = (codes[owner] >> (7 * position).astype(np.uint64)) & np.uint64(0x7F)
  more = (position < nbytes[owner] - 1).astype(np.uint64) << np.uint64(7)
  return (groups | more).astype(np.uint8).tobytes()


def decode(data: bytes, count: int | None = None) -> np.ndarray:
  """Every varint of `data` (int64), which must end with a complete one; with
  `count`, exactly that many (VarintError otherwise)."""
  raw = np.frombuffer(bytes(data), np.uint8)
  ends = np.flatnonzero(raw < 0x80)
  if raw.size and (ends.size == 0 or ends[-1] + 1 != raw.size):
    raise VarintError("truncated number")
  if count is not None and ends.size != count:
    raise VarintError(f"{ends.size} numbers where {count} are expected")
  if ends.size == 0:
    return np.zeros(0, np.int64)
  starts = np.concatenate([[0], ends[:-1] + 1])
  nbytes = ends - starts + 1
  if nbytes.max() > MAX_BYTES or np.any((raw[ends] == 0) & (nbytes > 1)):
    raise VarintError("malformed number")
  owner = np.repeat(np.arange(ends.size), nbytes)
  position = np.arange(raw.size) - starts[owner]
  groups = (raw & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
  return np.add.reduceat(groups, starts).astype(np.int64)


def read_one(data: bytes, pos: int = 0) -> tuple[int, int]:
  """(value, position after it) of the varint at data[pos] (VarintError)."""
  value = 0
  for k in range(MAX_BYTES):
    if pos + k >= len(data):
      raise VarintError("truncated number")
    byte = data[pos + k]
    value |= (byte & 0x7F) << (7 * k)
    if byte < 0x80:
      if byte == 0 and k:
        raise VarintError("malformed number")
      return value, pos + k + 1
  raise VarintError("malformed number")


def zigzag(values) -> np.ndarray:
  v = np.asarray(values, np.int64)
  return np.where(v >= 0, 2 * v, -2 * v - 1)


def unzigzag(codes) -> np.ndarray:
  c = np.asarray(codes, np.int64)
  return np.where(c % 2 == 0, c >> 1, -((c + 1) >> 1))
