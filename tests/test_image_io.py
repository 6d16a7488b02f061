"""Image reading/writing for the CLI and the atomic file writer, on tiny generated files."""
import errno
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from gvae_jax import fileio
from gvae_jax.image_io import ImageError, SourceMode, read_image, write_png


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(pixels: np.ndarray, color_type: int, bit_depth: int, extra_chunks: bytes = b"",
             size: tuple[int, int] | None = None) -> bytes:
  """A PNG written by hand, for layouts Pillow cannot save (48/64-bit colour, 16-bit LA)."""
  height, width = pixels.shape[:2] if size is None else size
  raw = pixels.astype(">u2" if bit_depth == 16 else np.uint8).tobytes()
  row = len(raw) // height if height else 0
  scanlines = b"".join(b"\x00" + raw[i * row:(i + 1) * row] for i in range(height))
  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra_chunks
          + _png_chunk(b"IDAT", zlib.compress(scanlines)) + _png_chunk(b"IEND", b""))


def _raw_tiff_rgb48(pixels: np.ndarray) -> bytes:
  """An uncompressed 16-bit-per-sample RGB TIFF by hand (Pillow cannot save one)."""
  height, width = pixels.shape[:2]
  data = pixels.astype("<u2").tobytes()
  entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, None), (259, 3, 1, 1),
             (262, 3, 1, 2), (273, 4, 1, None), (277, 3, 1, 3), (278, 4, 1, height),
             (279, 4, 1, len(data)), (284, 3, 1, 1)]
  ifd_size = 2 + 12 * len(entries) + 4
  bits_offset = 8 + ifd_size
  data_offset = bits_offset + 6
  ifd = struct.pack("<H", len(entries))
  for tag, kind, count, value in entries:
    value = {258: bits_offset, 273: data_offset}.get(tag, value)
    short = kind == 3 and count == 1  # a single SHORT sits left-justified in the 4 bytes
    packed = struct.pack("<HH", value, 0) if short else struct.pack("<I", value)
    ifd += struct.pack("<HHI", tag, kind, count) + packed
  ifd += struct.pack("<I", 0)
  return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<3H", 16, 16, 16) + data


@pytest.fixture
def rgb():
  return np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)


def _save(tmp_path, name, image, **kwargs):
  path = tmp_path / name
  image.save(path, **kwargs)
  return path


def _write(tmp_path, name, data: bytes):
  path = tmp_path / name
  path.write_bytes(data)
  return path


# --- reading what the codec accepts -------------------------------------------------------


def test_rgb_png_round_trip(tmp_path, rgb):
  path = tmp_path / "out.png"
  write_png(path, rgb)
  pixels, info = read_image(path)
  assert pixels.dtype == np.uint8 and pixels.shape == (7, 11, 3)
  np.testing.assert_array_equal(pixels, rgb)
  assert info.source_mode is SourceMode.RGB and info.format == "PNG" and not info.converted
  assert "used as is" in info.describe()


def test_jpeg_reads_as_pillow_decodes_it(tmp_path, rgb):
  path = _save(tmp_path, "a.jpg", Image.fromarray(rgb), quality=90)
  pixels, info = read_image(str(path))
  with Image.open(path) as reference:
    np.testing.assert_array_equal(pixels, np.asarray(reference.convert("RGB")))
  assert info.format == "JPEG" and info.source_mode is SourceMode.RGB


@pytest.mark.parametrize("name", ["a.bmp", "a.ppm", "a.tif", "a.webp"])
def test_other_lossless_formats_round_trip(tmp_path, rgb, name):
  kwargs = {"lossless": True} if name.endswith("webp") else {}
  path = _save(tmp_path, name, Image.fromarray(rgb), **kwargs)
  pixels, info = read_image(path)
  np.testing.assert_array_equal(pixels, rgb)
  assert info.source_mode is SourceMode.RGB


@pytest.mark.parametrize("name", ["g.png", "g.jpg"])
def test_grayscale_is_replicated_into_three_channels(tmp_path, rgb, name):
  path = _save(tmp_path, name, Image.fromarray(rgb[:, :, 0]))
  pixels, info = read_image(path)
  with Image.open(path) as reference:
    gray = np.asarray(reference)
  assert pixels.shape == (7, 11, 3)
  for channel in range(3):
    np.testing.assert_array_equal(pixels[:, :, channel], gray)
  assert info.source_mode is SourceMode.GRAYSCALE and info.converted
  assert "grayscale" in info.describe()


def test_palette_is_expanded(tmp_path, rgb):
  image = Image.fromarray(rgb).quantize(colors=16)
  path = _save(tmp_path, "p.png", image)
  pixels, info = read_image(path)
  np.testing.assert_array_equal(pixels, np.asarray(image.convert("RGB")))
  assert info.source_mode is SourceMode.PALETTE


def test_bilevel_becomes_black_and_white_rgb(tmp_path, rgb):
  path = _save(tmp_path, "b.png", Image.fromarray(rgb[:, :, 0] > 127))
  pixels, info = read_image(path)
  assert info.source_mode is SourceMode.BILEVEL
  np.testing.assert_array_equal(pixels[:, :, 1], np.where(rgb[:, :, 0] > 127, 255, 0))


def test_exif_orientation_is_reported_not_applied(tmp_path, rgb):
  exif = Image.Exif()
  exif[0x0112] = 6
  path = _save(tmp_path, "o.jpg", Image.fromarray(rgb), exif=exif)
  pixels, info = read_image(path)
  assert info.exif_orientation == 6 and pixels.shape == (7, 11, 3)


# --- refusals -------------------------------------------------------------------------------


def _refused(path, *fragments):
  with pytest.raises(ImageError) as caught:
    read_image(path)
  message = str(caught.value)
  assert str(path) in message
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_alpha_and_transparency_are_refused(tmp_path, rgb):
  rgba = np.concatenate([rgb, rgb[:, :, :1]], axis=2)
  _refused(_save(tmp_path, "rgba.png", Image.fromarray(rgba)), "alpha channel", "magick")
  _refused(_save(tmp_path, "la.png", Image.fromarray(rgba[:, :, 2:])), "alpha channel")
  palette = Image.fromarray(rgb).quantize(colors=8)
  _refused(_save(tmp_path, "pt.png", palette, transparency=0), "transparency")
  _refused(_save(tmp_path, "pt.gif", palette, transparency=0), "transparency")
  colour_key = _png_chunk(b"tRNS", b"\x00\x00" * 3)  # RGB PNG with a transparent colour
  _refused(_write(tmp_path, "key.png", _raw_png(rgb, 2, 8, colour_key)), "transparency")


def test_fully_opaque_alpha_is_refused_with_a_hint(tmp_path, rgb):
  opaque = np.concatenate([rgb, np.full((7, 11, 1), 255, np.uint8)], axis=2)
  _refused(_save(tmp_path, "opaque.png", Image.fromarray(opaque)), "fully opaque")


def test_more_than_8_bits_is_refused(tmp_path, rgb):
  deep = rgb.astype(np.uint16) * 257
  # Pillow itself would decode these silently as 8-bit 'RGB'/'RGBA': the header check catches them.
  _refused(_write(tmp_path, "rgb48.png", _raw_png(deep, 2, 16)), "16 bits per sample")
  rgba64 = np.concatenate([deep, deep[:, :, :1]], axis=2)
  _refused(_write(tmp_path, "rgba64.png", _raw_png(rgba64, 6, 16)), "16 bits per sample")
  _refused(_write(tmp_path, "la32.png", _raw_png(deep[:, :, :2], 4, 16)), "16 bits per sample")
  _refused(_write(tmp_path, "gray16.png", _raw_png(deep[:, :, 0], 0, 16)), "16 bits per sample")
  ppm16 = b"P6\n# a comment\n11 7\n65535\n" + deep.astype(">u2").tobytes()
  _refused(_write(tmp_path, "rgb48.ppm", ppm16), "maxval 65535")
  _refused(_save(tmp_path, "gray16.tif", Image.fromarray(deep[:, :, 0])), "more than 8 bits")
  _refused(_write(tmp_path, "rgb48.tif", _raw_tiff_rgb48(deep)), "TIFF with 16 bits per sample")
  _refused(_save(tmp_path, "float.tif", Image.fromarray(deep[:, :, 0].astype(np.float32))),
           "floating-point")


def test_other_colour_models_and_animations_are_refused(tmp_path, rgb):
  _refused(_save(tmp_path, "cmyk.jpg", Image.fromarray(rgb).convert("CMYK")), "CMYK")
  frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
  _refused(_save(tmp_path, "anim.gif", frames[0], save_all=True, append_images=frames[1:]),
           "2 frames")


def test_broken_files_are_refused_clearly(tmp_path, rgb):
  _refused(tmp_path / "missing.png", "no such file")
  _refused(tmp_path, "is a directory")
  _refused(_write(tmp_path, "empty.png", b""), "empty")
  _refused(_write(tmp_path, "notes.png", b"just some text, not an image\n" * 4), "not an image")
  png = _raw_png(rgb, 2, 8)
  _refused(_write(tmp_path, "cut_header.png", png[:20]), "looks like a PNG")
  _refused(_write(tmp_path, "cut_data.png", png[:len(png) - 30]), "truncated")
  path = _save(tmp_path, "full.jpg", Image.fromarray(np.repeat(np.repeat(rgb, 8, 0), 8, 1)))
  jpeg = path.read_bytes()
  _refused(_write(tmp_path, "cut.jpg", jpeg[:len(jpeg) // 2]), "truncated")
  empty_png = _raw_png(np.zeros((0, 0, 3)), 2, 8, size=(0, 5))
  # Invalid by the PNG specification (IHDR sizes are >= 1): Pillow cannot identify it.
  _refused(_write(tmp_path, "zero.png", empty_png), "looks like a PNG file but its header")
  _refused(_write(tmp_path, "zero.ppm", b"P6 0 5 255\n"), "no pixels")


# --- writing --------------------------------------------------------------------------------


def test_write_png_refuses_to_overwrite_unless_asked(tmp_path, rgb):
  path = tmp_path / "out.png"
  path.write_bytes(b"precious")
  with pytest.raises(FileExistsError, match="overwrite"):
    write_png(path, rgb)
  assert path.read_bytes() == b"precious"
  write_png(path, rgb, overwrite=True)
  np.testing.assert_array_equal(read_image(path)[0], rgb)
  assert os.listdir(tmp_path) == ["out.png"]


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                 np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_write_png_rejects_wrong_arrays(tmp_path, bad):
  with pytest.raises(ImageError, match="pixels must"):
    write_png(tmp_path / "out.png", bad)
  assert os.listdir(tmp_path) == []


def test_write_png_into_missing_directory(tmp_path, rgb):
  with pytest.raises(ImageError, match="cannot write"):
    write_png(tmp_path / "nope" / "out.png", rgb)


@pytest.mark.parametrize("failing, overwrite", [("fsync", False), ("fsync", True),
                                                ("replace", True), ("link", False)])
def test_failed_write_leaves_no_partial_file(tmp_path, rgb, monkeypatch, failing, overwrite):
  path = tmp_path / "out.png"
  if overwrite:
    path.write_bytes(b"old")

  def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  # fsync fails after the data went to the temporary file; replace/link at publication.
  monkeypatch.setattr(fileio.os, failing, disk_full)
  if failing == "link":  # the no-hard-link fallback then renames: fail that too
    monkeypatch.setattr(fileio.os, "replace", disk_full)
  with pytest.raises(ImageError, match="No space left"):
    write_png(path, rgb, overwrite=overwrite)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == (["out.png"] if overwrite else [])
  if overwrite:
    assert path.read_bytes() == b"old"


def test_atomic_write_bytes(tmp_path):
  path = tmp_path / "a.gvae"
  previous_umask = os.umask(0o022)
  try:
    fileio.atomic_write_bytes(path, b"\x00bits")
  finally:
    os.umask(previous_umask)
  assert path.read_bytes() == b"\x00bits"
  assert (path.stat().st_mode & 0o777) == 0o644  # umask honoured, not tempfile's 0o600
  with pytest.raises(FileExistsError):
    fileio.atomic_write_bytes(path, b"new")
  fileio.atomic_write_bytes(path, bytearray(b"new"), overwrite=True)
  assert path.read_bytes() == b"new"
  with pytest.raises(IsADirectoryError):
    fileio.atomic_write_bytes(tmp_path, b"x", overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["a.gvae"]


def test_atomic_write_bytes_never_clobbers_a_file_created_meanwhile(tmp_path, monkeypatch):
  path = tmp_path / "race.gvae"
  path.write_bytes(b"theirs")
  # Pretend the early existence check ran before someone else created the file.
  monkeypatch.setattr(fileio.os.path, "lexists", lambda p: False)
  with pytest.raises(FileExistsError):
    fileio.atomic_write_bytes(path, b"ours")
  monkeypatch.undo()
  assert path.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["race.gvae"]


def test_atomic_write_bytes_without_hard_links(tmp_path, monkeypatch):
  def no_links(*args):
    raise OSError(errno.EPERM, "Operation not permitted")

  monkeypatch.setattr(fileio.os, "link", no_links)
  fileio.atomic_write_bytes(tmp_path / "x", b"data")
  with pytest.raises(FileExistsError):
    fileio.atomic_write_bytes(tmp_path / "x", b"other")
  monkeypatch.undo()
  assert (tmp_path / "x").read_bytes() == b"data" and os.listdir(tmp_path) == ["x"]
