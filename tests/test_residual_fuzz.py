"""Hundreds of corrupted near-lossless / lossless files: each ends in a UserError
or a sane image, never another exception or a hang.

As tests/test_codec_fuzz.py, aimed at the residual layer: bit flips and
garbage in the residual side information and streams behind a valid CRC (so
the side-information parser and the step-wise range decoder see garbage),
truncated, extended, swapped or missing sections, header fields rewritten
(tau, rate, size, mode) with a recomputed CRC, and random bytes.
"""
import faulthandler
import struct
import time

import numpy as np
import pytest

from codec_helpers import make_image, tiny_scalable_config, tiny_scalable_params
from gvae_jax.coding import codec, container, export
from gvae_jax.errors import UserError
from test_codec_fuzz import HEIGHT, MODE, RATE, TAU, fix_crc, with_sections

CASES = 600
HANG_LIMIT_S = 1200


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  out = tmp_path_factory.mktemp("model") / "scalable"
  export.export_params(tiny_scalable_config(), tiny_scalable_params(), out)
  return export.load_model(out)


def varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def mutate(rng, base: bytes) -> bytes:
  sections = container.unpack(base)[1]
  z, y, side, streams, check = sections
  kind = rng.integers(10)
  if kind == 0:  # flip bits in the side information
    side = bytearray(side)
    for _ in range(rng.integers(1, 4)):
      side[rng.integers(len(side))] ^= 1 << int(rng.integers(8))
    return with_sections(base, [z, y, bytes(side), streams, check])
  if kind == 1:  # flip bits in the streams
    streams = bytearray(streams)
    for _ in range(rng.integers(1, 6)):
      streams[rng.integers(len(streams))] ^= 1 << int(rng.integers(8))
    return with_sections(base, [z, y, side, bytes(streams), check])
  if kind == 2:  # random residual sections
    return with_sections(base, [z, y, rng.bytes(int(rng.integers(0, 200))),
                                rng.bytes(int(rng.integers(0, 2000))), check])
  if kind == 3:  # truncated or extended residual sections
    side = side[:rng.integers(0, len(side) + 1)] + rng.bytes(int(rng.integers(0, 3)))
    streams = streams[:rng.integers(0, len(streams) + 1)] + rng.bytes(int(rng.integers(0, 3)))
    return with_sections(base, [z, y, side, streams, check])
  if kind == 4:  # plausible side information: ranges, windows and lengths rewritten
    fields = [varint(int(v)) for v in rng.integers(0, 600, 9)]
    lengths = [varint(int(v)) for v in rng.integers(0, 40, int(rng.integers(0, 500)))]
    escapes = [varint(int(v)) for v in rng.integers(0, 2**34, int(rng.integers(0, 20)))]
    return with_sections(base, [z, y, b"".join(fields + lengths + escapes), streams,
                                check])
  if kind == 5:  # the streams shuffled in blocks (lengths still add up)
    cut = int(rng.integers(0, len(streams) + 1))
    return with_sections(base, [z, y, side, streams[cut:] + streams[:cut], check])
  if kind == 6:  # missing, extra or swapped sections
    choice = rng.integers(5)
    return with_sections(base, [[z, y, side, streams], [z, y, streams, side, check],
                                [z, y, side, streams, check, side], [y, z, side, streams, check],
                                [z, y, side, streams, check[:3]]][choice])
  data = bytearray(base)
  if kind == 7:  # another tau
    struct.pack_into("<H", data, TAU, int(rng.choice([0, 1, 2, 3, 7, 200, 254, 255, 65535])))
  elif kind == 8:  # another size (small: within the compile budget), rate or mode
    field = rng.integers(3)
    if field == 0:
      struct.pack_into("<II", data, HEIGHT, *rng.integers(1, 65, 2))
    elif field == 1:
      struct.pack_into("<d", data, RATE, float(np.float32(rng.uniform(0, 1))))
    else:
      data[MODE] = int(rng.choice([0, 1, 2]))
  else:  # bit flips anywhere, CRC left wrong
    for position in rng.integers(0, len(data) * 8, rng.integers(1, 5)):
      data[position // 8] ^= 1 << (position % 8)
    return bytes(data)
  return fix_crc(data)


def test_fuzzed_residual_files_fail_cleanly(model):
  bases = [codec.compress(model, make_image(24, 30, 1), 0.5, tau=0),
           codec.compress(model, make_image(17, 9, 2), 0.2, tau=2),
           codec.compress(model, make_image(12, 20, 3)[:, :, 0], 1.0, tau=5)]
  rng = np.random.default_rng(2025)
  outcomes, errors = {"error": 0, "decoded": 0, "checksum": 0}, {}
  faulthandler.dump_traceback_later(HANG_LIMIT_S, exit=True)
  start = time.monotonic()
  try:
    for case in range(CASES):
      data = mutate(rng, bases[case % len(bases)])
      try:
        pixels = codec.decompress(model, data)
      except UserError as e:
        outcomes["error"] += 1
        outcomes["checksum"] += "checksum" in str(e)  # decoded in full, then refused
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        continue
      except Exception as e:  # noqa: BLE001 - this is what the test is about
        pytest.fail(f"case {case}: {type(e).__name__}: {e} for {data[:64].hex()}...")
      header = container.unpack(data)[0]
      shape = (header.height, header.width) + ((3,) if header.channels == 3 else ())
      assert pixels.shape == shape and pixels.dtype == np.uint8, case
      outcomes["decoded"] += 1
  finally:
    faulthandler.cancel_dump_traceback_later()
  print(f"{CASES} cases in {time.monotonic() - start:.1f} s: {outcomes}, errors {errors}")
  assert outcomes["error"] > CASES // 3
  # Garbage did run through the whole step-wise decoder.
  assert outcomes["decoded"] + outcomes["checksum"] > 0
