import dataclasses
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvae_jax.coding.container import (FORMAT_VERSION, MAGIC, MAX_PIXELS, MAX_SECTIONS,
                                       MODE_VERSION, FormatError, Header, Mode,
                                       model_fingerprint, pack, unpack)
from gvae_jax.errors import UserError

HEADER = Header(fingerprint=model_fingerprint(b"model"), mode=Mode.RESIDUAL, rate=2.5,
                tau=3, height=512, width=768, channels=3, coder_id=1)
SECTIONS = [b"z-stream", b"", b"y-stream\x00\xff" * 3, b"residual"]
VALID = pack(HEADER, SECTIONS)


def test_round_trip_and_layout():
  header, sections = unpack(VALID)
  assert header == HEADER and sections == SECTIONS
  assert isinstance(header.mode, Mode)
  # Lossy and lossy-base residual files keep version 1 (their bytes did not change).
  assert VALID[:4] == MAGIC and VALID[4] == MODE_VERSION[Mode.RESIDUAL] == 1
  assert len(VALID) == 47 + 4 * len(SECTIONS) + sum(map(len, SECTIONS))
  assert unpack(bytearray(VALID)) == unpack(memoryview(VALID))


headers = st.builds(
    Header,
    fingerprint=st.binary(min_size=16, max_size=16),
    mode=st.just(Mode.LOSSY),
    rate=st.floats(0, 1e6),
    tau=st.just(0),
    height=st.integers(1, 2**14),
    width=st.integers(1, 2**14),
    channels=st.integers(1, 255),
    coder_id=st.integers(1, 255),
)


@settings(max_examples=150, deadline=None)
@given(headers, st.booleans(), st.integers(0, 65535),
       st.lists(st.binary(max_size=40), max_size=MAX_SECTIONS))
def test_round_trip_property(header, residual, tau, sections):
  if residual:
    header = dataclasses.replace(header, mode=Mode.RESIDUAL, tau=tau)
  assert unpack(pack(header, sections)) == (header, sections)
  flat = dataclasses.replace(header, mode=Mode.FLAT_RESIDUAL, tau=tau, rate=0.0)
  assert unpack(pack(flat, sections)) == (flat, sections)


FLAT = dataclasses.replace(HEADER, mode=Mode.FLAT_RESIDUAL, rate=0.0)


def test_exact_flat_mode_is_version_3():
  exact = dataclasses.replace(FLAT, mode=Mode.EXACT_FLAT_RESIDUAL)
  data = pack(exact, SECTIONS[:3])
  assert data[4] == 3 <= FORMAT_VERSION and data[5] == Mode.EXACT_FLAT_RESIDUAL
  assert unpack(data) == (exact, SECTIONS[:3])
  old = bytearray(data)
  old[4] = 2  # a version-2 file has no mode 4
  with pytest.raises(FormatError, match="mode 4 does not exist in format version 2"):
    unpack(with_fixed_crc(old))


def test_flat_base_mode_is_version_2():
  data = pack(FLAT, SECTIONS[:3])
  assert data[4] == 2 and data[5] == Mode.FLAT_RESIDUAL
  assert unpack(data) == (FLAT, SECTIONS[:3])
  old = bytearray(data)
  old[4] = 1  # a version-1 file has no mode 2
  with pytest.raises(FormatError, match="mode 2 does not exist in format version 1"):
    unpack(with_fixed_crc(old))
  with_rate = bytearray(data)
  struct.pack_into("<d", with_rate, 24, 1.5)
  with pytest.raises(FormatError, match="invalid header: rate must be 0 with a flat base"):
    unpack(with_fixed_crc(with_rate))
  with pytest.raises(ValueError, match="rate must be 0 with a flat base"):
    pack(dataclasses.replace(FLAT, rate=1.0), [])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_format_error(data):
  with pytest.raises(FormatError):
    unpack(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_prefix_raise_format_error(tail):
  for prefix in (MAGIC, MAGIC + bytes([FORMAT_VERSION]), VALID[:47]):
    with pytest.raises(FormatError):
      unpack(prefix + tail)


def test_every_truncation_raises_format_error():
  with pytest.raises(FormatError, match="^empty file$"):
    unpack(b"")
  for cut in range(1, len(VALID)):
    with pytest.raises(FormatError, match="truncated file: expected"):
      unpack(VALID[:cut])


def test_every_single_bit_flip_raises_format_error():
  for bit in range(8 * len(VALID)):
    flipped = bytearray(VALID)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FormatError):
      unpack(bytes(flipped))


def test_messages():
  with pytest.raises(FormatError, match=r"not a \.gvae file \(bad magic\)"):
    unpack(b"\x89PNG\r\n\x1a\n" + bytes(100))
  with pytest.raises(FormatError, match="unsupported format version 8"):
    unpack(MAGIC + b"\x08" + VALID[5:])
  payload = bytearray(VALID)
  payload[-1] ^= 0x10
  with pytest.raises(FormatError, match="checksum mismatch: file is corrupt"):
    unpack(bytes(payload))
  with pytest.raises(FormatError, match=f"trailing data: expected {len(VALID)} bytes"):
    unpack(VALID + b"\x00")
  message = f"truncated file: expected {len(VALID)} bytes, got {len(VALID) - 1}"
  with pytest.raises(FormatError, match=message):
    unpack(VALID[:-1])
  assert issubclass(FormatError, UserError)  # the CLI prints it as one line


def with_fixed_crc(data: bytearray) -> bytes:
  """Recomputes the CRC after editing a header field (crafted files)."""
  count = data[42]
  end = 43 + 4 * count
  crc = zlib.crc32(bytes(data[end + 4:]), zlib.crc32(bytes(data[:end])))
  data[end:end + 4] = struct.pack("<I", crc)
  return bytes(data)


@pytest.mark.parametrize("offset, fmt, value, message", [
    (5, "<B", 11, "unknown mode 11"),
    (6, "<B", 0, "coder id 0"),
    (7, "<B", 0, "channels 0"),
    (24, "<d", float("nan"), "rate nan"),
    (24, "<d", -1.0, "rate -1.0"),
    (34, "<I", 0, "image size 0x768"),
    (34, "<I", 2**20, "exceeds the limit"),
])
def test_crafted_headers_with_valid_crc_are_rejected(offset, fmt, value, message):
  data = bytearray(VALID)
  struct.pack_into(fmt, data, offset, value)
  with pytest.raises(FormatError, match=f"invalid header: .*{message}"):
    unpack(with_fixed_crc(data))


def test_lossy_with_tau_is_rejected():
  data = bytearray(VALID)
  data[5] = Mode.LOSSY
  with pytest.raises(FormatError, match="tau must be 0"):
    unpack(with_fixed_crc(data))


def test_section_count_limit():
  data = bytearray(pack(dataclasses.replace(HEADER), []))
  data[42] = MAX_SECTIONS + 1
  with pytest.raises(FormatError, match="sections exceed the limit"):
    unpack(bytes(data) + bytes(4 * (MAX_SECTIONS + 1)))
  with pytest.raises(ValueError):
    pack(HEADER, [b""] * (MAX_SECTIONS + 1))


def test_huge_declared_lengths_fail_fast():
  data = bytearray(pack(HEADER, [b"abc"]))
  struct.pack_into("<I", data, 43, 2**32 - 1)
  with pytest.raises(FormatError, match="truncated file"):
    unpack(bytes(data))


@pytest.mark.parametrize("change", [
    dict(fingerprint=b"short"),
    dict(mode=Mode.LOSSY),  # tau 3 with lossy
    dict(tau=70000),
    dict(rate=float("inf")),
    dict(height=2**14, width=2**14 + 1),
    dict(channels=0),
    dict(coder_id=256),
    dict(height=1.5),
])
def test_pack_rejects_invalid_headers(change):
  assert 2**14 * (2**14 + 1) > MAX_PIXELS
  with pytest.raises(ValueError, match="invalid header"):
    pack(dataclasses.replace(HEADER, **change), [])
