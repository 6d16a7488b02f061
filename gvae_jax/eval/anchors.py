"""Classical codecs as anchors: lossless, near-lossless and lossy, decoded for real.

An `Anchor` compresses one RGB uint8 [H, W, 3] image and returns an
`AnchorResult` (encoded bytes, decoded uint8 image, encode seconds, decode
seconds). Sizes are the real files; the decoded image comes from the
decoder, never from the encoder's own reconstruction, and is checked: a
lossless anchor must give back the input exactly and JPEG-LS NEAR=tau must stay
within tau of every sample, or the call raises `AnchorCheckError`.

Registries, name -> Anchor, with the settings of the published comparisons (docs/decoding.md section 6):

* `LOSSLESS_ANCHORS`: PNG (Pillow, optimize), JPEG-LS with the HP1 colour
  transform coded planar, WebP lossless (method 6, effort 100), JPEG 2000
  reversible (5/3 wavelet + RCT), JPEG-XL lossless (effort 7).
* `NEAR_LOSSLESS_ANCHORS`: JPEG-LS NEAR=tau on RGB, tau 1..5.
* `LOSSY_ANCHORS`: JPEG (Pillow, 4:2:0), WebP, AVIF (speed 6), JPEG-XL
  (effort 7, by distance) and JPEG 2000 (9/7 wavelet, by target PSNR), each
  with a default sweep spanning about 0.1 to 2 bpp on Kodak.

The factories (`webp_lossless(method=4)`, `jpegxl_lossy(effort=...)`, ...)
build variants; `dataclasses.replace(anchor, settings=...)` changes a sweep.
Codecs that the installed imagecodecs lacks stay in the registries but report
`unavailable_reason()`; `split_available` separates them so callers skip
them with the reason instead of crashing. Timings are wall-clock seconds of
one call on whatever else the machine is doing; use them as rough figures.
"""
from __future__ import annotations

import dataclasses
import io
import struct
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image, features

from gvae_jax.eval import rd

try:
  import imagecodecs
except ImportError:  # the Pillow anchors still work without it
  imagecodecs = None

LOSSLESS = "lossless"
NEAR_LOSSLESS = "near_lossless"
LOSSY = "lossy"
KINDS = (LOSSLESS, NEAR_LOSSLESS, LOSSY)

_JPEGLS_MAX_NEAR = 127  # CharLS decodes NEAR up to min(255, MAXVAL / 2) only
HP1_BIAS = 128  # CharLS's HP1 centres R-G and B-G at half the range (mod 256)


class AnchorResult(NamedTuple):
  data: bytes
  decoded: np.ndarray
  encode_seconds: float
  decode_seconds: float


class AnchorUnavailable(RuntimeError):
  """The codec behind an anchor is not in this installation."""


class AnchorCheckError(AssertionError):
  """The decoded image broke the anchor's promise (exactness or the NEAR bound).

  Raised explicitly, so `python -O` cannot turn the check off.
  """


@dataclasses.dataclass(frozen=True)
class Anchor:
  """One classical codec configuration. Call it: anchor(image, setting) -> AnchorResult."""

  name: str
  kind: str  # LOSSLESS, NEAR_LOSSLESS or LOSSY
  description: str
  encode_fn: Callable[[np.ndarray, Any], bytes]
  decode_fn: Callable[[bytes], np.ndarray]
  settings: tuple = ()  # the default sweep; empty for lossless anchors
  setting_name: str = ""  # what a setting means: "quality", "distance", "tau", "psnr_db"
  more_bits_with_larger_setting: bool = True  # False for JPEG-XL distance, NEAR tau
  requires: tuple[str, ...] = ()  # imagecodecs codec classes, e.g. ("JPEGXL",)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"anchor {self.name}: unknown kind {self.kind!r}; choose one of {KINDS}")

  def unavailable_reason(self) -> str | None:
    """None if the anchor can run here, else why not."""
    if self.requires and imagecodecs is None:
      return f"{self.name}: imagecodecs is not installed"
    for codec in self.requires:
      constants = getattr(imagecodecs, codec, None)
      if constants is None or not getattr(constants, "available", False):
        return (f"{self.name}: this imagecodecs ({imagecodecs.__version__}) was built "
                f"without the {codec} codec")
    return None

  @property
  def available(self) -> bool:
    return self.unavailable_reason() is None

  def __call__(self, image: np.ndarray, setting: Any = None) -> AnchorResult:
    reason = self.unavailable_reason()
    if reason is not None:
      raise AnchorUnavailable(reason)
    image = _checked_rgb(image)
    if self.kind == LOSSLESS:
      if setting is not None:
        raise ValueError(f"{self.name} is lossless and takes no setting, got {setting!r}")
    elif setting is None:
      raise ValueError(f"{self.name} needs a {self.setting_name} (defaults: {self.settings})")

    start = time.perf_counter()
    data = bytes(self.encode_fn(image, setting))
    encoded = time.perf_counter()
    decoded = np.asarray(self.decode_fn(data))
    decode_seconds = time.perf_counter() - encoded

    if decoded.shape != image.shape or decoded.dtype != np.uint8:
      raise AnchorCheckError(f"{self.name} decoded a {decoded.dtype} image of shape "
                             f"{decoded.shape}, expected uint8 {image.shape}")
    if self.kind == LOSSLESS and not np.array_equal(decoded, image):
      raise AnchorCheckError(f"{self.name} is not lossless on this image: max abs error "
                             f"{rd.max_abs_error(image, decoded)}")
    if self.kind == NEAR_LOSSLESS:
      error = rd.max_abs_error(image, decoded)
      if error > setting:
        raise AnchorCheckError(f"{self.name} NEAR={setting}: max abs error {error} exceeds it")
    return AnchorResult(data, decoded, encoded - start, decode_seconds)


class Measurement(NamedTuple):
  """One anchor on one image at one setting, with its rate and distortion."""
  anchor: str
  setting: Any
  num_bytes: int
  bpp: float
  bpsp: float
  psnr: float  # dB over RGB, +inf when exact
  max_abs_error: int
  encode_seconds: float
  decode_seconds: float


def measure(anchor: Anchor, image: np.ndarray, setting: Any = None) -> Measurement:
  """Run one anchor on one image and reduce the result to rate and distortion numbers."""
  result = anchor(image, setting)
  height, width, channels = image.shape
  return Measurement(
      anchor=anchor.name, setting=setting, num_bytes=len(result.data),
      bpp=rd.bits_per_pixel(len(result.data), height, width),
      bpsp=rd.bits_per_subpixel(len(result.data), height, width, channels),
      psnr=rd.psnr(image, result.decoded), max_abs_error=rd.max_abs_error(image, result.decoded),
      encode_seconds=result.encode_seconds, decode_seconds=result.decode_seconds)


def split_available(anchors: Mapping[str, Anchor]) -> tuple[dict[str, Anchor], dict[str, str]]:
  """(the anchors that can run here, {name: reason} for those that cannot)."""
  usable, skipped = {}, {}
  for name, anchor in anchors.items():
    reason = anchor.unavailable_reason()
    if reason is None:
      usable[name] = anchor
    else:
      skipped[name] = reason
  return usable, skipped


def _checked_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"anchors take RGB uint8 images of shape [H, W, 3]; got {image.dtype} "
                     f"{image.shape}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"empty image of shape {image.shape}")
  return np.ascontiguousarray(image)  # the imagecodecs encoders refuse strided views


# --- Pillow: PNG and JPEG -------------------------------------------------------------

def _pillow_encode(image: np.ndarray, format_name: str, **options) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image, "RGB").save(buffer, format_name, **options)
  return buffer.getvalue()


def _pillow_decode(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as decoded:
    if decoded.mode != "RGB":  # a silent conversion here would hide a codec problem
      raise AnchorCheckError(f"decoded {decoded.format} image has mode {decoded.mode}, not RGB")
    return np.asarray(decoded)


@dataclasses.dataclass(frozen=True)
class _PillowAnchor(Anchor):
  pillow_feature: str = ""  # a name for PIL.features.check: "zlib", "jpg"

  def unavailable_reason(self) -> str | None:
    if features.check(self.pillow_feature):
      return None
    return f"{self.name}: this Pillow was built without {self.pillow_feature}"


def png() -> Anchor:
  return _PillowAnchor(
      name="png", kind=LOSSLESS, description="PNG, Pillow optimize=True (zlib level 9)",
      encode_fn=lambda image, _: _pillow_encode(image, "PNG", optimize=True),
      decode_fn=_pillow_decode, pillow_feature="zlib")


_JPEG_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def jpeg(qualities: Sequence[int] = (5, 10, 20, 30, 40, 50, 60, 75, 85, 90),
         subsampling: str = "4:2:0", optimize: bool = False) -> Anchor:
  """Baseline JPEG through Pillow (libjpeg-turbo), standard tables, default Huffman codes."""
  if subsampling not in _JPEG_SUBSAMPLING:
    raise ValueError(f"subsampling must be one of {tuple(_JPEG_SUBSAMPLING)}, got {subsampling!r}")
  chroma = _JPEG_SUBSAMPLING[subsampling]
  return _PillowAnchor(
      name=f"jpeg-{subsampling.replace(':', '')}" + ("-opt" if optimize else ""), kind=LOSSY,
      description=f"JPEG, Pillow, {subsampling}, optimize={optimize}",
      encode_fn=lambda image, quality: _pillow_encode(
          image, "JPEG", quality=int(quality), subsampling=chroma, optimize=optimize),
      decode_fn=_pillow_decode, settings=tuple(qualities), setting_name="quality",
      pillow_feature="jpg")


# --- imagecodecs ------------------------------------------------------------------------

def webp_lossless(method: int = 6, effort: int = 100) -> Anchor:
  """WebP lossless. method 6 with effort (libwebp's lossless "quality") 100 is
  cwebp -z 9, the strongest: ~10-17 s per Kodak image here. method 6 with
  effort 75 takes ~0.7 s for about 0.1 % more bits."""
  return Anchor(
      name=f"webp-lossless-m{method}" + ("" if effort == 100 else f"-e{effort}"), kind=LOSSLESS,
      description=f"WebP lossless, method {method}, effort {effort} (libwebp via imagecodecs)",
      encode_fn=lambda image, _: imagecodecs.webp_encode(
          image, level=effort, lossless=True, method=method),
      decode_fn=lambda data: imagecodecs.webp_decode(data), requires=("WEBP",))


def webp(qualities: Sequence[int] = (5, 15, 30, 50, 70, 80, 85, 90), method: int = 6) -> Anchor:
  """WebP lossy (VP8 intra, always 4:2:0); method 6 is cheap for lossy."""
  return Anchor(
      name=f"webp-m{method}", kind=LOSSY, description=f"WebP lossy, method {method}",
      encode_fn=lambda image, quality: imagecodecs.webp_encode(
          image, level=quality, lossless=False, method=method),
      decode_fn=lambda data: imagecodecs.webp_decode(data), settings=tuple(qualities),
      setting_name="quality", requires=("WEBP",))


def jpeg2000_reversible() -> Anchor:
  """JPEG 2000, 5/3 wavelet with the reversible colour transform, raw J2K codestream."""
  # The JP2 box wrapper adds ~90 bytes and nothing a decoder of RGB needs.
  return Anchor(
      name="jpeg2000-reversible", kind=LOSSLESS,
      description="JPEG 2000 reversible (5/3 + RCT), OpenJPEG, J2K codestream",
      encode_fn=lambda image, _: imagecodecs.jpeg2k_encode(
          image, codecformat="J2K", reversible=True, mct=True),
      decode_fn=lambda data: imagecodecs.jpeg2k_decode(data), requires=("JPEG2K",))


def jpeg2000(psnr_targets: Sequence[float] = (26, 28, 30, 32, 34, 36, 38, 40, 42)) -> Anchor:
  """JPEG 2000 lossy, 9/7 wavelet + ICT, OpenJPEG fixed-quality mode.

  The setting is OpenJPEG's target PSNR (dB, 1..1000): a knob, not the PSNR you
  get, which is measured on the decoded RGB like every other anchor.
  """
  def encode(image: np.ndarray, psnr_db: float) -> bytes:
    if not 1 <= psnr_db <= 1000:
      raise ValueError(f"JPEG 2000 target PSNR must be within 1..1000 dB (else it is lossless), "
                       f"got {psnr_db}")
    return imagecodecs.jpeg2k_encode(image, level=psnr_db, codecformat="J2K",
                                   reversible=False, mct=True)

  return Anchor(
      name="jpeg2000", kind=LOSSY, description="JPEG 2000 lossy (9/7 + ICT), target PSNR",
      encode_fn=encode, decode_fn=lambda data: imagecodecs.jpeg2k_decode(data),
      settings=tuple(psnr_targets), setting_name="psnr_db", requires=("JPEG2K",))


def jpegxl_lossless(effort: int = 7) -> Anchor:
  return Anchor(
      name=f"jpegxl-lossless-e{effort}", kind=LOSSLESS,
      description=f"JPEG-XL lossless (modular), effort {effort}, libjxl",
      encode_fn=lambda image, _: imagecodecs.jpegxl_encode(image, lossless=True, effort=effort),
      decode_fn=lambda data: imagecodecs.jpegxl_decode(data), requires=("JPEGXL",))


def jpegxl_lossy(distances: Sequence[float] = (16.0, 12.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.8),
                 effort: int = 7) -> Anchor:
  """JPEG-XL VarDCT by Butteraugli distance: smaller distance = more bits."""
  return Anchor(
      name=f"jpegxl-e{effort}", kind=LOSSY, description=f"JPEG-XL lossy, effort {effort}",
      encode_fn=lambda image, distance: imagecodecs.jpegxl_encode(
          image, distance=float(distance), effort=effort),
      decode_fn=lambda data: imagecodecs.jpegxl_decode(data), settings=tuple(distances),
      setting_name="distance", more_bits_with_larger_setting=False, requires=("JPEGXL",))


def avif(qualities: Sequence[int] = (15, 20, 30, 40, 50, 60, 70, 80, 85), speed: int = 6) -> Anchor:
  """AVIF (libavif + AV1), 4:4:4, quality 0..99 (100 would switch to lossless)."""
  def encode(image: np.ndarray, quality: int) -> bytes:
    if not 0 <= quality < 100:
      raise ValueError(f"AVIF quality must be within 0..99 for lossy coding, got {quality}")
    return imagecodecs.avif_encode(image, level=int(quality), speed=speed)

  return Anchor(
      name=f"avif-s{speed}", kind=LOSSY, description=f"AVIF, speed {speed}, YUV 4:4:4",
      encode_fn=encode, decode_fn=lambda data: imagecodecs.avif_decode(data),
      settings=tuple(qualities), setting_name="quality", requires=("AVIF",))


# --- JPEG-LS ----------------------------------------------------------------------------

def hp1_forward(image: np.ndarray, bias: int = HP1_BIAS) -> np.ndarray:
  """HP1 colour transform, [H, W, 3] RGB -> planes (R-G+bias, G, B-G+bias) mod 256, [3, H, W].

  The differences are what JPEG-LS needs to reach its published Kodak rate
  (3.15 bpsp vs 4.36 on plain RGB). The bias of 128 is CharLS's HP1: it keeps
  small differences away from the 0/255 wrap, where neighbouring pixels would
  look like hard edges to the predictor. It saves 0.4 % on Kodak (3.150 vs
  3.163 bpsp with bias 0, the variant of the published 3.16).
  """
  planes = np.moveaxis(np.asarray(image).astype(np.int16), -1, 0)
  red, green, blue = planes
  return np.stack([(red - green + bias) % 256, green,
                   (blue - green + bias) % 256]).astype(np.uint8)


def hp1_inverse(planes: np.ndarray, bias: int = HP1_BIAS) -> np.ndarray:
  """Exact inverse of `hp1_forward`: [3, H, W] planes -> [H, W, 3] RGB."""
  red_minus_green, green, blue_minus_green = np.asarray(planes).astype(np.int16)
  red = (red_minus_green + green - bias) % 256
  blue = (blue_minus_green + green - bias) % 256
  return np.stack([red, green, blue], axis=-1).astype(np.uint8)


_PLANE_LENGTH = struct.Struct(">I")


def jpegls_hp1(bias: int = HP1_BIAS) -> Anchor:
  """JPEG-LS lossless on the HP1 planes, each plane its own one-component stream.

  imagecodecs codes 3 channels sample-interleaved and has no colour-transform
  option, so the transform is done here and each plane is coded on its own
  (what interleave mode "none" does inside one file). The container is the
  byte lengths of the first two streams (8 bytes, counted) and the 3 streams.
  """
  if not 0 <= bias <= 255:
    raise ValueError(f"HP1 bias must be within 0..255, got {bias}")

  def encode(image: np.ndarray, _) -> bytes:
    streams = [bytes(imagecodecs.jpegls_encode(np.ascontiguousarray(plane)))
               for plane in hp1_forward(image, bias)]
    header = b"".join(_PLANE_LENGTH.pack(len(stream)) for stream in streams[:2])
    return header + b"".join(streams)

  def decode(data: bytes) -> np.ndarray:
    first, second = (_PLANE_LENGTH.unpack_from(data, offset)[0]
                     for offset in (0, _PLANE_LENGTH.size))
    start = 2 * _PLANE_LENGTH.size
    bounds = [start, start + first, start + first + second, len(data)]
    planes = [imagecodecs.jpegls_decode(data[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return hp1_inverse(np.stack(planes), bias)

  return Anchor(
      name="jpegls-hp1" + ("" if bias == HP1_BIAS else f"-bias{bias}"), kind=LOSSLESS,
      description=f"JPEG-LS lossless (CharLS), HP1 colour transform (bias {bias}), planar",
      encode_fn=encode, decode_fn=decode, requires=("JPEGLS",))


def jpegls_rgb() -> Anchor:
  """JPEG-LS lossless on plain RGB, sample-interleaved: the weak variant, for comparison."""
  return Anchor(
      name="jpegls-rgb", kind=LOSSLESS, description="JPEG-LS lossless (CharLS), RGB interleaved",
      encode_fn=lambda image, _: imagecodecs.jpegls_encode(image),
      decode_fn=lambda data: imagecodecs.jpegls_decode(data), requires=("JPEGLS",))


def jpegls_near(taus: Sequence[int] = (1, 2, 3, 4, 5)) -> Anchor:
  """JPEG-LS near-lossless on RGB (sample-interleaved): every sample within tau."""
  def encode(image: np.ndarray, tau: int) -> bytes:
    if int(tau) != tau or not 1 <= tau <= _JPEGLS_MAX_NEAR:
      raise ValueError(f"JPEG-LS NEAR must be an integer within 1..{_JPEGLS_MAX_NEAR} "
                       f"(0 is lossless), got {tau}")
    return imagecodecs.jpegls_encode(image, level=int(tau))

  return Anchor(
      name="jpegls-near", kind=NEAR_LOSSLESS, description="JPEG-LS NEAR=tau (CharLS), RGB",
      encode_fn=encode, decode_fn=lambda data: imagecodecs.jpegls_decode(data),
      settings=tuple(taus), setting_name="tau", more_bits_with_larger_setting=False,
      requires=("JPEGLS",))


def _registry(*anchors: Anchor) -> dict[str, Anchor]:
  return {anchor.name: anchor for anchor in anchors}


LOSSLESS_ANCHORS = _registry(png(), jpegls_hp1(), webp_lossless(), jpeg2000_reversible(),
                             jpegxl_lossless())
NEAR_LOSSLESS_ANCHORS = _registry(jpegls_near())
LOSSY_ANCHORS = _registry(jpeg(), webp(), avif(), jpegxl_lossy(), jpeg2000())
