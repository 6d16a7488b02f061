"""Thousands of corrupted .gvae files: every one ends in a UserError or a sane image.

Corruptions: bit flips, truncations, trailing bytes, random bytes, and header
fields or payload sections rewritten with a recomputed, valid CRC, so the
range decoder, the hyper synthesis and the synthesis all see garbage.
Accepted outcomes: a UserError subclass (FormatError, CodingError,
ModelMismatchError, ...) or, for files whose CRC is valid, a decoded uint8
image of the size and channels the header states. Anything else (another
exception, a wrong shape, a hang) fails the test; a watchdog ends the
process if a case hangs.
"""
import faulthandler
import struct
import time
import zlib

import numpy as np
import pytest

from codec_helpers import GOLDEN_MODEL, make_image
from gvae_jax.coding import codec, container, export
from gvae_jax.errors import UserError

CASES = 3000
HANG_LIMIT_S = 600

# Field offsets from the container's format table.
MODE, CODER, CHANNELS, FINGERPRINT, RATE, TAU, HEIGHT, WIDTH, COUNT = 5, 6, 7, 8, 24, 32, 34, 38, 42
SECTIONS_TABLE = 43


def fix_crc(data: bytearray) -> bytes:
  """Recomputes the CRC of a file whose section table is intact."""
  count = data[COUNT]
  crc_at = SECTIONS_TABLE + 4 * count
  if len(data) < crc_at + 4:
    return bytes(data)
  crc = zlib.crc32(bytes(data[crc_at + 4:]), zlib.crc32(bytes(data[:crc_at])))
  data[crc_at:crc_at + 4] = struct.pack("<I", crc)
  return bytes(data)


def with_sections(data: bytes, sections) -> bytes:
  """`data`'s header with new sections (and a valid CRC)."""
  head = bytearray(data[:SECTIONS_TABLE])
  head[COUNT] = len(sections)
  head += b"".join(struct.pack("<I", len(s)) for s in sections)
  return fix_crc(head + b"\0\0\0\0" + b"".join(sections))


def mutate(rng, base: bytes, sections) -> bytes:
  kind = rng.integers(12)
  data = bytearray(base)
  if kind == 0:  # flip 1-8 bits anywhere
    for position in rng.integers(0, len(data) * 8, rng.integers(1, 9)):
      data[position // 8] ^= 1 << (position % 8)
    return bytes(data)
  if kind == 1:  # truncate
    return bytes(data[:rng.integers(0, len(data))])
  if kind == 2:  # trailing bytes
    return bytes(data) + rng.bytes(int(rng.integers(1, 20)))
  if kind == 3:  # random bytes, sometimes behind a valid magic and version
    junk = rng.bytes(int(rng.integers(0, 400)))
    return (b"GVAE\x01" + junk) if rng.random() < 0.5 else junk
  if kind == 4:  # one header byte (fields but the size, section lengths) rewritten, CRC fixed
    positions = [p for p in range(5, SECTIONS_TABLE + 4 * data[COUNT])
                 if not HEIGHT <= p < WIDTH + 4]  # sizes: kind 5, within compile budget
    position = int(rng.choice(positions))
    data[position] = int(rng.integers(256))
    return fix_crc(data)
  if kind == 5:  # a meaningful header field rewritten, CRC fixed
    field = rng.integers(6)
    if field == 0:
      struct.pack_into("<d", data, RATE, rng.choice(
          [rng.uniform(0, 1), float(np.float32(rng.uniform(0, 1))), -1.0, 2.0, np.nan, np.inf,
           1e300, float(np.float32(1.0)), 0.0]))
    elif field == 1:  # a different size the decoder can still try
      struct.pack_into("<II", data, HEIGHT, *rng.integers(1, 129, 2))
    elif field == 2:
      struct.pack_into("<II", data, HEIGHT, *rng.choice([0, 1, 3000, 2**31, 2**32 - 1], 2))
    elif field == 3:
      data[CHANNELS] = int(rng.choice([0, 1, 2, 3, 4, 255]))
    elif field == 4:
      data[CODER] = int(rng.integers(256))
      data[MODE] = int(rng.choice([0, 0, 1, 2]))
    else:
      data[FINGERPRINT + int(rng.integers(16))] ^= 1 << int(rng.integers(8))
    return fix_crc(data)
  # Payload garbage behind a valid CRC: the decoders are reached.
  z, y = sections
  if kind == 6:  # flip bits inside the sections
    z, y = bytearray(z), bytearray(y)
    for _ in range(rng.integers(1, 6)):
      target = z if (rng.random() < 0.5 and z) else y
      target[rng.integers(len(target))] ^= 1 << int(rng.integers(8))
    return with_sections(base, [bytes(z), bytes(y)])
  if kind == 7:  # random sections
    return with_sections(base, [rng.bytes(int(rng.integers(0, 40))),
                                rng.bytes(int(rng.integers(0, 400)))])
  if kind == 8:  # truncated or extended sections
    cut_z = z[:rng.integers(0, len(z) + 1)] + rng.bytes(int(rng.integers(0, 3)))
    cut_y = y[:rng.integers(0, len(y) + 1)] + rng.bytes(int(rng.integers(0, 3)))
    return with_sections(base, [cut_z, cut_y])
  if kind == 9:  # swapped, missing or extra sections
    choice = rng.integers(4)
    return with_sections(base, [[y, z], [z], [], [z, y, y]][choice])
  if kind == 10:  # escape sections claiming many escapes: varint headers of garbage
    escape = rng.bytes(int(rng.integers(1, 30)))
    header = bytes([len(escape)])
    return with_sections(base, [header + escape + z[1:], header + escape + y[1:]])
  # kind 11: a valid file of another size, with this file's sections
  struct.pack_into("<II", data, HEIGHT, *rng.integers(1, 129, 2))
  return fix_crc(data)


@pytest.fixture(scope="module")
def model():
  return export.load_model(GOLDEN_MODEL)


def test_fuzzed_files_fail_cleanly(model):
  bases = [codec.compress(model, make_image(40, 50, 1), 0.5),
           codec.compress(model, make_image(1, 1, 2), 0.0),
           codec.compress(model, make_image(20, 20, 3)[:, :, 0], 1.0)]
  rng = np.random.default_rng(2024)
  outcomes = {"error": 0, "decoded": 0}
  errors = {}
  faulthandler.dump_traceback_later(HANG_LIMIT_S, exit=True)
  start = time.monotonic()
  try:
    for case in range(CASES):
      base = bases[case % len(bases)]
      sections = container.unpack(base)[1]
      data = mutate(rng, base, sections)
      try:
        pixels = codec.decompress(model, data)
      except UserError as e:
        outcomes["error"] += 1
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        continue
      except Exception as e:  # noqa: BLE001 - this is what the test is about
        pytest.fail(f"case {case}: {type(e).__name__}: {e} for {data[:64].hex()}...")
      header = container.unpack(data)[0]  # decoding implies a valid file structure
      shape = (header.height, header.width) + ((3,) if header.channels == 3 else ())
      assert pixels.shape == shape and pixels.dtype == np.uint8, case
      outcomes["decoded"] += 1
  finally:
    faulthandler.cancel_dump_traceback_later()
  elapsed = time.monotonic() - start
  print(f"{CASES} cases in {elapsed:.1f} s: {outcomes}, errors {errors}")
  assert outcomes["error"] > CASES // 2
  assert outcomes["decoded"] > 0  # garbage payloads did reach the decoders
