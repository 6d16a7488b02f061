"""Reading and writing images for the codec CLI, with errors a user can act on.

The codec compresses 8-bit RGB. `read_image` returns exactly that: RGB as is,
grayscale, bilevel and palette images converted losslessly (and reported, so
the CLI can say so), and everything it could only handle by throwing
information away refused with an `ImageError`: alpha or transparency, more
than 8 bits per sample, multi-frame files, other colour models. Pillow does
the decoding; for PNG (Pillow's raw mode), PPM and TIFF the sample depth is
checked as well because Pillow silently reduces 16-bit RGB in those formats
to 8 bits, and for BMP because Pillow reads a 32-bit BMP's alpha bytes as
unused padding.

Only regular files are read (fileio.open_regular_file: no devices, FIFOs).
`max_pixels` is checked on the size in the file's header, before any pixel
is decoded. Colour metadata:
- EXIF orientation is APPLIED: the pixels are rotated / mirrored upright
  (Pillow's exif_transpose), so the decoded PNG, which carries no EXIF,
  shows what a viewer showed for the original; ImageInfo.exif_orientation
  records the tag and the CLI reports the transposition. (A lossless file is
  then lossless with respect to the upright image.)
- An embedded ICC profile is DROPPED: the codec codes the numbers as they
  are and the decoded PNG carries no profile, so viewers will show them as
  sRGB. ImageInfo.icc_profile says there was one and the CLI warns.

No TensorFlow or JAX here.
"""
from __future__ import annotations

from gvae_jax.errors import UserError

import dataclasses
import enum
import io
import os
import re
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gvae_jax.fileio import UnsafePathError, atomic_write_bytes, open_regular_file

_HEADER_BYTES = 4096  # enough for the PNG IHDR and a PPM header with comments
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAGIC_NUMBERS = (  # to tell "corrupt PNG" from "not an image" when Pillow gives up
    (_PNG_SIGNATURE, "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"RIFF", "RIFF/WebP"))
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_MODES_PREFIXES = ("I", "F")  # I, I;16, I;16B, I;16L, I;16N, F
_TO_8BIT_RGB = "convert it to 8-bit RGB first, e.g. `magick IN -depth 8 -type TrueColor OUT.png`"


class ImageError(UserError):
  """An image file that cannot be read or written; the message says why."""


class SourceMode(str, enum.Enum):
  """How the file stored its pixels, i.e. what `read_image` did to get RGB."""
  RGB = "rgb"              # returned unchanged
  GRAYSCALE = "grayscale"  # the one channel replicated into R, G and B
  BILEVEL = "bilevel"      # 1-bit black/white, mapped to 0/255 and replicated
  PALETTE = "palette"      # indices expanded through the colour table


_CONVERSION_NOTES = {
    SourceMode.RGB: "8-bit RGB, used as is",
    SourceMode.GRAYSCALE: "8-bit grayscale, replicated into 3 identical RGB channels",
    SourceMode.BILEVEL: "1-bit black and white, converted to RGB (0 or 255 in every channel)",
    SourceMode.PALETTE: "palette (indexed colour), expanded to RGB",
}


_ORIENTATION_NOTES = {
    2: "mirrored left-right", 3: "rotated 180 degrees", 4: "mirrored top-bottom",
    5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
    8: "rotated 90 degrees counter-clockwise"}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  source_mode: SourceMode
  format: str  # Pillow's format name: "PNG", "JPEG", ...
  # EXIF orientation tag (1 = upright) or None. read_image APPLIES it: the
  # pixels returned are upright (rotated / mirrored as the tag says).
  exif_orientation: int | None = None
  icc_profile: bool = False  # the file had an ICC profile; it was dropped

  @property
  def transposed(self) -> bool:
    """True if read_image rotated or mirrored the stored pixels (EXIF orientation 2-8)."""
    return self.exif_orientation is not None and 2 <= self.exif_orientation <= 8

  def warnings(self) -> list[str]:
    """What the CLI should tell the user about metadata the codec does not keep."""
    notes = []
    if self.transposed:
      notes.append(f"EXIF orientation {self.exif_orientation} applied: the pixels were "
                   f"{_ORIENTATION_NOTES[self.exif_orientation]} to show upright, and the "
                   "decoded image is stored upright without EXIF")
    if self.icc_profile:
      notes.append("the image's ICC colour profile was dropped: the decoded PNG has none, so "
                   "viewers show its values as sRGB (convert to sRGB first to keep the look: "
                   "`magick IN -profile sRGB.icc OUT.png`)")
    return notes

  @property
  def converted(self) -> bool:
    return self.source_mode is not SourceMode.RGB

  def describe(self) -> str:
    """One line for the CLI, e.g. 'PNG, 8-bit grayscale, replicated into ...'."""
    return f"{self.format}, {_CONVERSION_NOTES[self.source_mode]}"


def _refuse(path: str, problem: str, advice: str) -> ImageError:
  return ImageError(f"{path}: {problem}; {advice}")


def _pnm_header(header: bytes) -> tuple[int, int, int] | None:
  """(width, height, maxval) of a P2/P3/P5/P6 (PGM/PPM) header, if it is one."""
  if header[:2] not in (b"P2", b"P3", b"P5", b"P6"):
    return None
  # Comments run from '#' to the end of the line and may sit between any tokens.
  tokens = re.sub(rb"#[^\r\n]*", b" ", header[2:]).split()[:3]
  try:
    width, height, maxval = (int(token) for token in tokens)
  except ValueError:  # fewer than 3 tokens or not numbers: let Pillow report it
    return None
  return width, height, maxval


def _png_size(header: bytes) -> tuple[int, int] | None:
  """(width, height) from a PNG's IHDR chunk, if the header is a PNG's."""
  if header.startswith(_PNG_SIGNATURE) and header[12:16] == b"IHDR" and len(header) >= 24:
    return struct.unpack(">II", header[16:24])
  return None


def _bmp_header(header: bytes) -> tuple[int, int, int, int, int] | None:
  """(pixel data offset, width, height, bits per pixel, compression) of a BMP, if one."""
  if not header.startswith(b"BM") or len(header) < 34:
    return None
  offset, info_size = struct.unpack_from("<II", header, 10)
  if info_size < 40:  # an OS/2 BITMAPCOREHEADER: no 32-bit pixels
    return None
  width, height, _, bits, compression = struct.unpack_from("<iiHHI", header, 18)
  return offset, width, height, bits, compression


def _bmp_alpha_bytes_used(file, header: bytes) -> bool:
  """True if a 32-bit BI_RGB BMP has a non-zero fourth byte in any pixel.

  Pillow reads that byte as padding (mode RGB), but writers (Pillow itself,
  for RGBA) store alpha there; all-zero means there is none.
  """
  bmp = _bmp_header(header)
  if bmp is None:
    return False
  offset, width, height, bits, compression = bmp
  if bits != 32 or compression != 0 or width <= 0 or height == 0:
    return False
  file.seek(offset)
  remaining = 4 * width * abs(height)
  while remaining > 0:
    chunk = file.read(min(remaining, 1 << 22) // 4 * 4 or 4)
    if not chunk:
      break
    if np.frombuffer(chunk[:len(chunk) // 4 * 4], np.uint8)[3::4].any():
      return True
    remaining -= len(chunk)
  return False


def _check_header(path: str, header: bytes) -> None:
  """Refusals Pillow would not raise itself: it decodes these files silently at 8 bits."""
  pnm = _pnm_header(header)
  if pnm is not None:
    width, height, maxval = pnm
    if width == 0 or height == 0:
      raise _refuse(path, f"PPM/PGM of {width}x{height} pixels has no pixels",
                    "nothing to compress")
    if maxval > 255:
      raise _refuse(path, f"PPM/PGM with maxval {maxval} (more than 8 bits per sample); "
                    "the codec takes 8 bits and would silently lose precision", _TO_8BIT_RGB)


def _frame_count(image: Image.Image) -> int:
  try:
    return int(getattr(image, "n_frames", 1))
  except Exception:  # counting GIF frames parses the file; corruption is reported by load()
    return 1


def _check_opened(path: str, image: Image.Image) -> SourceMode:
  """Refuses what cannot be turned into 8-bit RGB without loss; returns the source mode."""
  width, height = image.size
  if width == 0 or height == 0:
    raise _refuse(path, f"image of {width}x{height} pixels has no pixels", "nothing to compress")
  if image.format == "PNG" and image.tile and ";16" in str(image.tile[0][3]):
    # Pillow opens 48/64-bit PNGs as 8-bit RGB(A); the decoder's raw mode ("RGB;16B") tells.
    raise _refuse(path, "PNG with 16 bits per sample (48/64-bit colour or 16-bit gray); "
                  "the codec takes 8 bits and would silently lose precision", _TO_8BIT_RGB)
  frames = _frame_count(image)
  if frames > 1:
    raise _refuse(path, f"{image.format} holds {frames} frames or pages",
                  "the codec compresses single images: extract one frame first, "
                  "e.g. `magick 'IN[0]' OUT.png`")
  mode = image.mode
  if mode.startswith(_HIGH_DEPTH_MODES_PREFIXES):
    depth = "floating-point samples" if mode == "F" else "more than 8 bits per sample"
    raise _refuse(path, f"{image.format} image with {depth} (Pillow mode {mode}); the codec "
                  "takes 8 bits", _TO_8BIT_RGB)
  bits = getattr(image, "tag_v2", {}).get(258)  # TIFF BitsPerSample; 16-bit RGB decodes as 'RGB'
  if bits is not None and max(np.atleast_1d(bits)) > 8:
    raise _refuse(path, f"TIFF with {max(np.atleast_1d(bits))} bits per sample; the codec takes 8 "
                  "bits and would silently lose precision", _TO_8BIT_RGB)
  _check_transparency(path, image)
  modes = {"RGB": SourceMode.RGB, "L": SourceMode.GRAYSCALE, "1": SourceMode.BILEVEL,
           "P": SourceMode.PALETTE}
  if mode not in modes:
    raise _refuse(path, f"colour mode {mode} is not supported (the codec takes RGB, grayscale "
                  "or palette images)", "convert it to sRGB first, e.g. "
                  "`magick IN -colorspace sRGB -type TrueColor OUT.png`")
  return modes[mode]


def _check_transparency(path: str, image: Image.Image) -> None:
  has_alpha = image.mode in _ALPHA_MODES
  palette_alpha = image.mode == "P" and image.palette is not None and "A" in image.palette.mode
  if not (has_alpha or palette_alpha or "transparency" in image.info):
    return
  what = "an alpha channel" if has_alpha else "transparency"
  hint = ""
  if has_alpha and image.mode in ("RGBA", "LA"):
    try:
      opaque = np.asarray(image.getchannel("A")).min() == 255
    except Exception:  # undecodable: the refusal stands without the hint
      opaque = False
    if opaque:
      hint = " (its alpha is fully opaque, so dropping it loses nothing)"
  raise _refuse(path, f"{image.format} image with {what} (Pillow mode {image.mode}); the codec "
                "stores no transparency and would drop it",
                f"remove it first{hint}, e.g. `magick IN -background white -alpha remove "
                "-alpha off OUT.png`")


def _describe_unreadable(path: str, header: bytes) -> str:
  for magic, name in _MAGIC_NUMBERS:
    if header.startswith(magic):
      return f"{path}: looks like a {name} file but its header is corrupt or truncated"
  return (f"{path}: not an image file in a format Pillow can read "
          "(expected PNG, JPEG, BMP, TIFF, PPM/PGM, WebP, GIF, ...)")


def _exif_orientation(image: Image.Image) -> int | None:
  try:
    orientation = image.getexif().get(0x0112)
  except Exception:  # a malformed EXIF block must not stop us from reading the pixels
    return None
  return int(orientation) if isinstance(orientation, int) else None


def _check_pixel_count(path: str, width: int, height: int, max_pixels: int | None,
                       limit_note: str) -> None:
  if max_pixels is not None and width * height > max_pixels:
    raise ImageError(f"{path}: image of {width}x{height} pixels exceeds {limit_note or 'the limit'}"
                     f" ({max_pixels} pixels); refused before decoding it")


def _apply_orientation(path: str, image: Image.Image, orientation: int | None) -> Image.Image:
  """The image rotated / mirrored upright as its EXIF orientation says (itself if upright)."""
  if orientation is None or not 2 <= orientation <= 8:
    return image
  try:
    return ImageOps.exif_transpose(image)
  except Exception as error:
    raise ImageError(f"{path}: cannot apply its EXIF orientation {orientation} ({error})") from error


def read_image(path: str | os.PathLike, max_pixels: int | None = None,
               limit_note: str = "") -> tuple[np.ndarray, ImageInfo]:
  """Reads an image file as uint8 RGB [H, W, 3], upright, plus how it was stored.

  Raises ImageError (with the path, the reason and a suggested fix) for a
  missing, empty, truncated, corrupt or non-image file, a directory or other
  non-regular file, and for images that would lose information:
  alpha/transparency (also in a 32-bit BMP), more than 8 bits per sample,
  floating point, multiple frames, CMYK and other colour models. With
  max_pixels, an image of more pixels is refused from its header, before its
  pixels are decoded (limit_note says whose limit it is). EXIF orientation
  is applied and an ICC profile dropped (module doc; ImageInfo records both).
  """
  path = os.fspath(path)
  try:
    file = open_regular_file(path, "image file")
  except FileNotFoundError:
    raise ImageError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise ImageError(f"{path}: is a directory, not an image file") from None
  except PermissionError:
    raise ImageError(f"{path}: permission denied") from None
  except UnsafePathError as error:
    raise ImageError(str(error)) from None
  except OSError as error:
    raise ImageError(f"{path}: cannot open ({error.strerror or error})") from error
  with file:
    header = file.read(_HEADER_BYTES)
    if not header:
      raise ImageError(f"{path}: file is empty (0 bytes)")
    _check_header(path, header)
    png = _png_size(header)
    if png is not None:  # before Pillow: it refuses huge PNGs as "decompression bombs"
      _check_pixel_count(path, png[0], png[1], max_pixels, limit_note)
    if _bmp_alpha_bytes_used(file, header):
      raise _refuse(path, "32-bit BMP with alpha (a fourth byte per pixel that is not all "
                    "zero); the codec stores no transparency and would drop it",
                    "remove it first, e.g. `magick IN -background white -alpha remove "
                    "-alpha off OUT.png`")
    file.seek(0)
    # Pillow's own bomb limit (a warning on stderr above it, an error above twice it)
    # would cut below max_pixels, which is already checked: raise it to max_pixels.
    bomb_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and bomb_limit is not None and max_pixels > bomb_limit:
      Image.MAX_IMAGE_PIXELS = max_pixels
    try:
      image = Image.open(file)
    except UnidentifiedImageError:
      raise ImageError(_describe_unreadable(path, header)) from None
    except Image.DecompressionBombError as error:
      raise ImageError(f"{path}: {error}") from None
    except Exception as error:  # Pillow raises many types for bad bytes; all mean "corrupt"
      raise ImageError(f"{_describe_unreadable(path, header)} ({error})") from error
    finally:
      Image.MAX_IMAGE_PIXELS = bomb_limit
    with image:
      _check_pixel_count(path, image.size[0], image.size[1], max_pixels, limit_note)
      source_mode = _check_opened(path, image)
      try:
        image.load()
      except Exception as error:  # OSError "image file is truncated", zlib, struct, EOF...
        raise ImageError(f"{path}: cannot decode the {image.format} data, the file is truncated "
                         f"or corrupt ({error})") from error
      _check_transparency(path, image)  # some formats only report it once decoded
      orientation = _exif_orientation(image)
      icc = bool(image.info.get("icc_profile"))
      upright = _apply_orientation(path, image, orientation)
      if source_mode is SourceMode.RGB:
        pixels = np.array(upright, dtype=np.uint8)
      elif source_mode is SourceMode.PALETTE:
        pixels = np.array(upright.convert("RGB"), dtype=np.uint8)
      else:  # grayscale or bilevel: exact replication, no luma weighting to undo
        gray = np.array(upright.convert("L"), dtype=np.uint8)
        pixels = np.repeat(gray[:, :, None], 3, axis=2)
      info = ImageInfo(source_mode, image.format or "unknown", orientation, icc)
  if pixels.ndim != 3 or pixels.shape[2] != 3:  # defensive: a Pillow plugin misreporting its mode
    raise ImageError(f"{path}: decoded to an unexpected shape {pixels.shape}")
  return pixels, info


def write_png(path: str | os.PathLike, pixels: np.ndarray, overwrite: bool = False) -> None:
  """Writes uint8 RGB [H, W, 3] as a PNG, atomically (see fileio.atomic_write_bytes).

  Raises FileExistsError if `path` exists and overwrite is False, ImageError
  for a wrong array or any other failure; never leaves a partial file.
  """
  path = os.fspath(path)
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8:
    raise ImageError(f"{path}: pixels must be uint8, got {pixels.dtype}; clip to 0..255, round "
                     "and cast before writing")
  if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
    raise ImageError(f"{path}: pixels must have shape [H, W, 3] with H, W > 0, got {pixels.shape}")
  # Encode in memory first: an encoder failure then never touches the disk.
  encoded = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(pixels)).save(encoded, format="PNG")
  try:
    atomic_write_bytes(path, encoded.getbuffer(), overwrite=overwrite)
  except FileExistsError:
    raise
  except UnsafePathError as error:
    raise ImageError(str(error)) from None
  except OSError as error:
    raise ImageError(f"{path}: cannot write ({error.strerror or error})") from error
