"""The `.gvae` file format: a fixed header, a section table, a CRC, payload.

All integers are little-endian. Format version 7 (each older version is the
same without the modes that came after it: version 6 without mode 10,
version 5 without modes 8 to 10, version 4 without 6 to 10, version 3
without 5 to 10, version 2 without 4 to 10, version 1 without 2 to 10):

  offset    size  type    field
  0         4     bytes   magic b"GVAE"
  4         1     u8      format version (1 to 7: the lowest that has the mode)
  5         1     u8      mode: 0 lossy, 1 residual on the lossy layer
                          (near-lossless / lossless), 2 residual on a flat
                          base x_base = 128 (no lossy layer; version 2 only),
                          3 stored (the pixels, zlib-deflated; lossless;
                          version 2 on), 4 residual on a flat base coded
                          by the exact head (mode 2's sections; decodes
                          alike on every platform; version 3 on),
                          5 lossy with its networks run in tiles (mode
                          0's sections; images above 2048x2048 padded
                          pixels, gvae_jax.coding.tiling; version 4 on),
                          6 and 7: modes 2 and 4 with the residual
                          coded tile by tile (tiles of 2048 pixels,
                          each its own layer: images above 2048x2048
                          padded pixels; version 5 on),
                          8 and 9: modes 0 and 5 with the lossy layer's
                          decoder in exact integer arithmetic
                          (gvae_jax.coding.exact_lossy; version 6 on),
                          10: mode 1 with the lossy layer, the prior and
                          the residual head in exact integer arithmetic
                          (gvae_jax.coding.exact_residual; version 7 on)
  6         1     u8      entropy coder id (gvae_jax.coding.coder; 1 = TFC, 2 = constriction)
  7         1     u8      image channels (>= 1)
  8         16    bytes   model fingerprint (first 16 bytes of a SHA-256)
  24        8     f64     rate s (finite, >= 0; 0 in modes 2, 3, 4, 6, 7)
  32        2     u16     tau: residual error bound (0 for lossy)
  34        4     u32     image height (>= 1)
  38        4     u32     image width (>= 1; height * width <= 2**28)
  42        1     u8      n: number of sections (<= 64)
  43        4n    u32     byte length of each section
  43 + 4n   4     u32     CRC-32 (zlib) of bytes [0, 43 + 4n) followed by
                          all section bytes: the checksum covers everything
  47 + 4n   ...           the sections, back to back; nothing follows them

Writers give a file the lowest version that has its mode, so lossy and
lossy-base residual files are byte for byte what version 1 wrote (and
version-1 readers still read them), flat and stored ones what version 2
wrote, exact flat ones what version 3 wrote, tiled lossy ones what version 4
wrote, and so on; a file claiming a mode newer
than its version is refused.

`unpack` raises FormatError for any malformed input and never anything else
(for bytes-like input); it runs in time linear in the input and never trusts
a length before comparing it with the bytes actually present.

`read_header_from_file` / `read_file` read a path in a streaming way: only
a regular file is opened (no devices or FIFOs: `gvae info /dev/zero` fails at
once), then at most the 47 + 4 * 64 header bytes are read and checked
(magic, version, header fields, and the file size the section table implies
against the size on disk) before the rest is read, so a wrong, truncated or
padded file costs no more memory than its header.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import struct
import zlib
from typing import Sequence

from gvae_jax.errors import UserError

MAGIC = b"GVAE"
FORMAT_VERSION = 7  # the newest this module reads and writes
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5, 6, 7)
FINGERPRINT_SIZE = 16
MAX_SECTIONS = 64
MAX_PIXELS = 2**28
MAX_SECTION_BYTES = 2**32 - 1

_FIXED = struct.Struct("<4sBBBB16sdHIIB")  # everything before the section lengths
_U32 = struct.Struct("<I")
assert _FIXED.size == 43


class FormatError(UserError):
  """The bytes are not a valid .gvae file."""


class Mode(enum.IntEnum):
  LOSSY = 0
  RESIDUAL = 1  # near-lossless: lossy layer plus a residual within +-tau
  FLAT_RESIDUAL = 2  # near-lossless: a residual within +-tau on x_base = 128 (version 2)
  # The pixels themselves (one zlib section), for images the networks would
  # code in more bits than that, e.g. 1 pixel high (padding to 64 rows costs
  # 64x). Version 2.
  STORED = 3
  # FLAT_RESIDUAL's layer coded with exact integer arithmetic
  # (gvae_jax.coding.exact_head): decodes alike on every platform. Version 3.
  EXACT_FLAT_RESIDUAL = 4
  # LOSSY's sections, with the lossy layer's networks run tile by tile
  # (gvae_jax.coding.tiling): large images in bounded memory. Version 4.
  LOSSY_TILED = 5
  # FLAT_RESIDUAL's and EXACT_FLAT_RESIDUAL's layer coded tile by tile
  # (gvae_jax.coding.tiling.residual_tiles; side information of every tile in
  # one section, gvae_jax.coding.residual_layout): large images in bounded
  # memory. Version 5.
  FLAT_RESIDUAL_TILED = 6
  EXACT_FLAT_RESIDUAL_TILED = 7
  # LOSSY's and LOSSY_TILED's sections, with the hyper synthesis and the
  # synthesis in exact integer arithmetic (gvae_jax.coding.exact_lossy):
  # decodes to the same pixels on every platform. Version 6.
  EXACT_LOSSY = 8
  EXACT_LOSSY_TILED = 9
  # RESIDUAL's sections, with the lossy layer (as EXACT_LOSSY), the prior and the
  # residual head in exact integer arithmetic (gvae_jax.coding.exact_residual):
  # decodes to the same pixels on every platform. Version 7.
  EXACT_RESIDUAL = 10


# The first format version with each mode (what the writer uses).
MODE_VERSION = {Mode.LOSSY: 1, Mode.RESIDUAL: 1, Mode.FLAT_RESIDUAL: 2, Mode.STORED: 2,
                Mode.EXACT_FLAT_RESIDUAL: 3, Mode.LOSSY_TILED: 4,
                Mode.FLAT_RESIDUAL_TILED: 5, Mode.EXACT_FLAT_RESIDUAL_TILED: 5,
                Mode.EXACT_LOSSY: 6, Mode.EXACT_LOSSY_TILED: 6, Mode.EXACT_RESIDUAL: 7}
EXACT_LOSSY_MODES = (Mode.EXACT_LOSSY, Mode.EXACT_LOSSY_TILED)
TILED_LOSSY_MODES = (Mode.LOSSY_TILED, Mode.EXACT_LOSSY_TILED)
LOSSY_MODES = (Mode.LOSSY, Mode.LOSSY_TILED) + EXACT_LOSSY_MODES
TILED_FLAT_MODES = (Mode.FLAT_RESIDUAL_TILED, Mode.EXACT_FLAT_RESIDUAL_TILED)
EXACT_MODES = (Mode.EXACT_FLAT_RESIDUAL, Mode.EXACT_FLAT_RESIDUAL_TILED)
FLAT_MODES = (Mode.FLAT_RESIDUAL, Mode.EXACT_FLAT_RESIDUAL) + TILED_FLAT_MODES
# Residual files on the lossy base (five sections: z, y, side information, streams, check).
LOSSY_BASE_MODES = (Mode.RESIDUAL, Mode.EXACT_RESIDUAL)
RESIDUAL_MODES = LOSSY_BASE_MODES + FLAT_MODES


@dataclasses.dataclass(frozen=True)
class Header:
  fingerprint: bytes  # FINGERPRINT_SIZE bytes naming the exported model
  mode: Mode
  rate: float  # G-VAE rate s
  tau: int  # residual error bound; 0 for lossy
  height: int
  width: int
  channels: int
  coder_id: int


def model_fingerprint(blob: bytes) -> bytes:
  """A FINGERPRINT_SIZE-byte fingerprint of a serialized model."""
  return hashlib.sha256(blob).digest()[:FINGERPRINT_SIZE]


def _header_problem(header: Header) -> str | None:
  """Why `header` cannot be written or trusted, or None."""
  if not isinstance(header.fingerprint, bytes) or len(header.fingerprint) != FINGERPRINT_SIZE:
    return f"fingerprint must be {FINGERPRINT_SIZE} bytes"
  if header.mode not in MODE_VERSION:
    return f"unknown mode {header.mode}"
  if not 0 <= header.tau <= 0xFFFF:
    return f"tau {header.tau} not in [0, 65535]"
  if header.mode in LOSSY_MODES + (Mode.STORED,) and header.tau != 0:
    return f"tau must be 0 in {header.mode.name.lower()} mode"
  if header.mode in FLAT_MODES and header.rate != 0:
    return "rate must be 0 with a flat base"
  if not (math.isfinite(header.rate) and header.rate >= 0):
    return f"rate {header.rate} must be finite and >= 0"
  if not (1 <= header.height <= 0xFFFFFFFF and 1 <= header.width <= 0xFFFFFFFF):
    return f"image size {header.height}x{header.width} is empty or too large"
  if header.height * header.width > MAX_PIXELS:
    return f"image of {header.height}x{header.width} pixels exceeds the limit of {MAX_PIXELS}"
  if not 1 <= header.channels <= 0xFF:
    return f"channels {header.channels} not in [1, 255]"
  if not 1 <= header.coder_id <= 0xFF:
    return f"coder id {header.coder_id} not in [1, 255]"
  return None


def pack(header: Header, sections: Sequence[bytes]) -> bytes:
  """The .gvae bytes for a header and payload sections (ValueError if invalid)."""
  problem = _header_problem(header)
  if problem:
    raise ValueError(f"invalid header: {problem}")
  if len(sections) > MAX_SECTIONS:
    raise ValueError(f"{len(sections)} sections exceed the limit of {MAX_SECTIONS}")
  sections = [bytes(s) for s in sections]
  if any(len(s) > MAX_SECTION_BYTES for s in sections):
    raise ValueError("a section exceeds 4 GiB")
  try:
    head = _FIXED.pack(MAGIC, MODE_VERSION[header.mode], int(header.mode), header.coder_id,
                       header.channels, header.fingerprint, float(header.rate), header.tau,
                       header.height, header.width, len(sections))
  except struct.error as e:  # e.g. a float where an integer belongs
    raise ValueError(f"invalid header: {e}") from e
  head += b"".join(_U32.pack(len(s)) for s in sections)
  crc = zlib.crc32(head)
  for s in sections:
    crc = zlib.crc32(s, crc)
  return b"".join([head, _U32.pack(crc)] + sections)


def _check_prefix(view: memoryview, size: int) -> None:
  """Magic and version of the first bytes of a file of `size` bytes."""
  if size == 0:
    raise FormatError("empty file")
  if bytes(view[:4]) != MAGIC[:min(size, 4, len(view))]:
    raise FormatError("not a .gvae file (bad magic)")
  if size >= 5 and view[4] not in SUPPORTED_VERSIONS:
    raise FormatError(f"unsupported format version {view[4]} "
                      f"(this reader supports {', '.join(map(str, SUPPORTED_VERSIONS))})")
  if size < _FIXED.size:
    raise FormatError(f"truncated file: expected at least {_FIXED.size} bytes, got {size}")


def _table_bounds(fields, size: int) -> tuple[int, int]:
  """(section count, end of the section table) of a header, checked against `size`."""
  count = fields[-1]
  if count > MAX_SECTIONS:
    raise FormatError(f"corrupt header: {count} sections exceed the limit of {MAX_SECTIONS}")
  table_end = _FIXED.size + 4 * count
  if size < table_end + 4:
    raise FormatError(f"truncated file: expected at least {table_end + 4} bytes, got {size}")
  return count, table_end


def _expected_size(lengths, table_end: int, size: int) -> int:
  """The file size the section table declares, which must be `size`."""
  expected = table_end + 4 + sum(lengths)
  if size < expected:
    raise FormatError(f"truncated file: expected {expected} bytes, got {size}")
  if size > expected:
    raise FormatError(f"trailing data: expected {expected} bytes, got {size}")
  return expected


def _header_of(fields) -> Header:
  (_, version, mode, coder_id, channels, fingerprint, rate, tau, height, width, _) = fields
  if mode not in {int(m) for m in MODE_VERSION}:
    raise FormatError(f"invalid header: unknown mode {mode}")
  if MODE_VERSION[Mode(mode)] > version:
    raise FormatError(f"invalid header: mode {mode} does not exist in format version {version}")
  return Header(fingerprint=bytes(fingerprint), mode=Mode(mode), rate=rate, tau=tau,
                height=height, width=width, channels=channels, coder_id=coder_id)


MAX_HEADER_BYTES = _FIXED.size + 4 * MAX_SECTIONS + 4


def read_header_from_file(file, size: int) -> tuple[Header, int]:
  """(header, expected file size) from an open binary file of `size` bytes at offset 0.

  Reads at most MAX_HEADER_BYTES. FormatError for a bad magic, version,
  header field or section table, or a size on disk other than the table's
  (truncated or trailing data). The CRC is not checked (that needs the
  whole file: `unpack` does it).
  """
  prefix = file.read(min(size, _FIXED.size))
  _check_prefix(memoryview(prefix), size)
  fields = _FIXED.unpack_from(prefix)
  count, table_end = _table_bounds(fields, size)
  table = file.read(4 * count)
  lengths = struct.unpack(f"<{count}I", table)
  expected = _expected_size(lengths, table_end, size)
  header = _header_of(fields)
  problem = _header_problem(header)
  if problem:
    raise FormatError(f"invalid header: {problem}")
  return header, expected


def open_file(path):
  """(open binary file, its size) for a .gvae path: regular files only (UserError)."""
  import os

  from gvae_jax import fileio

  try:
    file = fileio.open_regular_file(path, ".gvae file")
  except FileNotFoundError:
    raise UserError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise UserError(f"{path}: is a directory, not a .gvae file") from None
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
  return file, os.fstat(file.fileno()).st_size


def read_file(path, check=None) -> bytes:
  """The bytes of the .gvae file at `path`, read only after its header checks out.

  check(header, size), if given, runs after the header checks and before the
  body is read (e.g. a memory limit). The bytes still need `unpack` (CRC).
  """
  file, size = open_file(path)
  with file:
    try:
      header, expected = read_header_from_file(file, size)
    except FormatError as e:
      raise FormatError(f"{path}: {e}") from None
    if check is not None:
      check(header, expected)
    file.seek(0)
    data = file.read(expected + 1)
  if len(data) != expected:  # the file changed while we read it
    raise FormatError(f"{path}: file changed while being read ({len(data)} bytes, "
                      f"expected {expected})")
  return data


def unpack(data: bytes) -> tuple[Header, list[bytes]]:
  """Header and sections of .gvae bytes; FormatError for anything malformed."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"expected bytes, got {type(data).__name__}")
  view = memoryview(data).cast("B")
  size = len(view)
  _check_prefix(view, size)
  fields = _FIXED.unpack_from(view)
  count, table_end = _table_bounds(fields, size)
  lengths = struct.unpack_from(f"<{count}I", view, _FIXED.size)
  _expected_size(lengths, table_end, size)
  (stored_crc,) = _U32.unpack_from(view, table_end)
  crc = zlib.crc32(view[table_end + 4:], zlib.crc32(view[:table_end]))
  if crc != stored_crc:
    raise FormatError("checksum mismatch: file is corrupt")

  header = _header_of(fields)
  problem = _header_problem(header)
  if problem:  # checksum fine: a broken writer or a crafted file
    raise FormatError(f"invalid header: {problem}")
  sections, pos = [], table_end + 4
  for length in lengths:
    sections.append(bytes(view[pos:pos + length]))
    pos += length
  return header, sections
