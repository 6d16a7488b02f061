"""Compression of images to `.gvae` bytes and back: lossy at any continuous
rate, and (with a scalable model) near-lossless or lossless.

    model = load_model("models/small")           # gvae_jax.coding.export
    data = compress(model, pixels, rate=2.5)     # uint8 [H, W, 3] -> bytes
    pixels = decompress(model, data)             # bytes -> uint8 [H, W, 3]
    data, rate = compress_to_bpp(model, pixels, target_bpp=0.5)
    data = compress(scalable, pixels, tau=2)     # every value within 2 of the input
    data = compress(scalable, pixels, tau=0)     # lossless

Pipeline (docs/decoding.md sections 1 and 5). The image is edge-padded to a multiple
of 64 and coded as one batch of 1:

  encoder: y', z = analyze(x, s); z_sym = round(z)
           mean, y_row = hyper(z_sym, s)         <- the one shared function
           y_sym = round(y' - mean)
           bytes: z_sym with the z table (row = channel),
                  y_sym with the y table (row = y_row: the table scale
                  nearest to the predicted scale in the log domain; for
                  an asymmetric model left_row * 64 + right_row, the
                  rows of its two scales)
  decoder: z_sym <- bytes; mean, y_row = hyper(z_sym, s)
           y_sym <- bytes; x = synthesize(y_sym + mean, s), cropped, clipped,
           rounded to uint8

Determinism: `hyper` (hyper synthesis, then scale -> integer table index) is
one jitted function that both sides call on identical integer inputs of the
same shape, so both get bit-identical means and indexes. Only integers and
the float32 rate s (stored exactly in the header) cross from encoder to
decoder; CDF tables are the exported integers. Decoding on another machine
(another CPU, XLA or jax version) is not guaranteed bit-exact: the hyper
synthesis in float32 may round differently there.

File layout: the `.gvae` container (gvae_jax.coding.container), mode LOSSY,
two sections: [z stream, y stream], each in the coder's stream format.

Near-lossless and lossless (mode RESIDUAL, header tau = the error bound):
the lossy layer at the header's rate, as above, is the base layer; the
decoder's uint8 image x_base and the residual prior u come from the same
jitted synthesis call on both sides (`synthesize_image` with with_prior), and
gvae_jax.coding.residual_codec codes x - x_base within tau. Five sections:
[z stream, y stream, residual side information, residual streams, check],
where check is the CRC-32 (u32) of the decoded RGB pixels as the encoder
reconstructed them. The residual probabilities come from float32 networks;
a machine whose float results differ (another ISA, XLA or oneDNN build) can
desynchronise the range decoder and produce pixels outside the bound. The
container CRC cannot see that (the bytes are intact), so the decoder checks
its output against this CRC and raises CodingError instead of returning a
wrong image. Needs a
scalable model (ExportedModel.is_scalable); with one, lossy files use its
lossy layer and are the same as a lossy-only model's. Without a rate,
`compress` picks the base rate with `choose_rate` (the smallest estimated
file: every trained level, then a golden-section refinement) and codes the
file with the chosen candidate's lossy layer as it was coded for the search
(`choose_base` and `encode(base=...)` do the same for callers that time the
two steps apart).

With a scalable model converted to exact arithmetic whose residual head
converted too (ExportedModel.exact_residual, gvae_jax.coding.exact_residual)
the same five sections are mode EXACT_RESIDUAL (format version 7): the lossy
layer as in EXACT_LOSSY, x_base and u from one exact synthesis call
(`exact_synthesize_with_prior`), the residual coded with the exact head,
so the file decodes to the same pixels on every platform.

Flat base (mode FLAT_RESIDUAL, format version 2; a scalable model with a
flat head, ExportedModel.flat): no lossy layer; x_base = 128 everywhere and
u = the tap availability flags of gvae_jax.models.flat_base, and the same
residual coder codes x - 128 within tau with the flat head. Header rate 0.
Three sections: [residual side information, residual streams, check].
With an exact flat head (gvae_jax.coding.exact_head) the same layer is coded
in exact integer arithmetic, as mode EXACT_FLAT_RESIDUAL (format version 3),
which decodes to the same pixels on every platform.
Above tiling.TILED_ABOVE padded pixels flat-base files code their residual
tile by tile (modes FLAT_RESIDUAL_TILED, EXACT_FLAT_RESIDUAL_TILED, format
version 5; tiling.residual_tiles): each tile an independent layer on its own
flat base, the side information of all tiles in one section, the check over
the whole image; base="auto" then always takes the flat base.
Choosing the base (`encode_residual`, base="auto"): the encoder estimates
both files (the flat one: the flat head's one-pass bits; the lossy-base one:
choose_rate's smallest estimate, or the estimate at the given rate) and
codes the smaller; when the two estimates are within BOTH_MARGIN of each
other, or the image has at most BOTH_PIXELS pixels, it codes both and keeps
the smaller real file (ties: flat). So a file is the smaller of the two
whenever the estimates are off by less than the margin (on Kodak-sized
images they are within about 1 %; on small images the side information,
which they leave out, can be several %, hence the second rule).

Colour: the codec codes 8-bit RGB. A grayscale (or bilevel) image is passed
as a 2-D [H, W] array (or by the CLI from a grayscale file): its value is
replicated into R, G and B, coded as RGB, and the header records channels=1;
decompress then returns [H, W], the average of the three decoded channels
rounded to the nearest integer. Palette images are coded as RGB (channels=3)
and decode to RGB.

Degenerate sizes: with allow_stored (the CLI), `compress` returns a STORED
file (container mode 2: the pixels deflated with zlib, lossless) instead
when that is smaller and the padding to 64 is at least 16x the image (1-4
pixels high or wide, or tiny), where the networks' cost is dominated by
padding: a 1x768 image costs 63 bpp coded and at most raw + a 51-byte
header stored. Decoding STORED files inflates at most the header's pixels.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import struct
import weakref
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.coding import container, residual_codec, residual_layout, tiling
from gvae_jax.coding.coder import CodingError, EntropyCoder, default_coder_id, get_coder
from gvae_jax.coding.container import FormatError, Header, Mode
from gvae_jax.coding.export import ExportedModel
from gvae_jax.coding.settings import RateError, TauError, check_rate, check_tau  # noqa: F401
from gvae_jax.entropy import asymmetric_gaussian
from gvae_jax.errors import UserError
from gvae_jax.models import flat_base
from gvae_jax.ops import pad_to_multiple

# The largest image (after padding) either side accepts with a residual
# layer on the lossy base: 8192 x 8192 (its networks and coder run on the
# whole image, tens of GB beyond that); lossy and flat-base files, which are
# coded in tiles above tiling.TILED_ABOVE, up to 16384 x 16384. The decoder
# also refuses a crafted header claiming more before it allocates anything.
MAX_CODEC_PIXELS = 2**26
MAX_TILED_PIXELS = 2**28
Z_SECTION, Y_SECTION = 0, 1
NUM_SECTIONS = 2
SIDE_INFO_SECTION, STREAMS_SECTION, CHECK_SECTION = 2, 3, 4  # residual mode only
NUM_RESIDUAL_SECTIONS = 5
# Flat-base residual files: the residual sections only.
FLAT_SIDE_INFO_SECTION, FLAT_STREAMS_SECTION, FLAT_CHECK_SECTION = 0, 1, 2
NUM_FLAT_SECTIONS = 3
BASES = ("auto", "flat", "lossy")
BOTH_MARGIN = 0.03  # base="auto" codes both bases when their estimates are this close
# ... and always for images up to this many pixels, where coding is cheap and the
# side information (not in the estimates) is a large part of the file.
BOTH_PIXELS = 256 * 256
_CHECK = struct.Struct("<I")
_SYMBOL_LIMIT = 2**30  # symbols are clamped here before the int32 cast


class ModelMismatchError(UserError):
  """The file was made by a different exported model."""


# --- The jitted network stages. The model is static (hashable flax Module). ---
# Public for benchmarks and tools that time or inspect one stage; compress and
# decompress are the API for coding.

@functools.partial(jax.jit, static_argnums=0)
def analyze(model, params, x_padded, s):
  """uint8 padded image -> (y' float32, z_sym int32)."""
  x = x_padded.astype(jnp.float32) / 255.0
  y, z = model.apply({"params": params}, x, s, method=model.analyze)
  z_sym = jnp.round(jnp.clip(jnp.nan_to_num(z), -_SYMBOL_LIMIT, _SYMBOL_LIMIT)).astype(jnp.int32)
  return y, z_sym


def scale_to_row(scale: jax.Array, bounds: jax.Array) -> jax.Array:
  """y table row of each scale: the nearest table scale in the log domain.

  `bounds` are the exported geometric midpoints of adjacent table scales, so
  this is comparisons only, no arithmetic on the scale. (The smallest table
  scale >= scale would always code with a wider Gaussian: several % of rate
  at low rates; see gvae_jax.coding.export.)
  """
  row = jnp.searchsorted(bounds, scale, side="left")
  return jnp.clip(row, 0, bounds.shape[0]).astype(jnp.int32)


def y_table_row(scale, bounds: jax.Array) -> jax.Array:
  """y table row for `scale` as hyper_synthesize returns it: the scale's row, or
  for an asymmetric model (a (left, right) pair) the row of the pair of rows."""
  if isinstance(scale, tuple):
    left, right = (scale_to_row(v, bounds) for v in scale)
    return asymmetric_gaussian.pair_rows(left, right, bounds.shape[0] + 1)
  return scale_to_row(scale, bounds)


@functools.partial(jax.jit, static_argnums=0)
def hyper(model, params, z_sym, s, y_index_bounds):
  """z_sym -> (mean, y table row). The encoder and the decoder both call this."""
  mean, scale = model.apply({"params": params}, z_sym.astype(jnp.float32), s,
                            method=model.hyper_synthesize)
  return mean, y_table_row(scale, y_index_bounds)


@jax.jit
def quantize_y(y, mean):
  residual = jnp.nan_to_num(y - mean)  # a NaN would otherwise cast to garbage
  return jnp.round(jnp.clip(residual, -_SYMBOL_LIMIT, _SYMBOL_LIMIT)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _synthesize(model, params, y_sym, mean, s, with_prior: bool):
  """(y_sym, mean) -> (uint8 image [1, H, W, 3], prior u [1, H, W, C] or None), padded size.

  Cropping happens outside (in numpy), so every image size within one padded
  size shares one compiled program. with_prior (residual mode) also returns
  the residual prior u from this same call, so the encoder's and the
  decoder's u are bit-identical, like their base images.
  """
  y_hat = y_sym.astype(jnp.float32) + mean
  x_tilde, u = model.apply({"params": params}, y_hat, s, method=model.synthesize)
  x = jnp.nan_to_num(x_tilde)  # garbage input must still give pixels
  # The same rounding as gvae_jax.eval.estimate: round(clip(x, 0, 1) * 255).
  pixels = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)
  return pixels, (jnp.nan_to_num(u) if with_prior else None)


def synthesize_image(model: ExportedModel, y_sym, mean, s, height: int, width: int,
                      with_prior: bool = False):
  """(cropped uint8 image [H, W, 3], padded prior u [1, Hp, Wp, C] or None)."""
  padded, u = _synthesize(model.lossy_model, model.lossy_params, jnp.asarray(y_sym), mean, s,
                          with_prior)
  return np.asarray(padded[0, :height, :width, :]), u


# --- The same stages tile by tile, for large lossy images (gvae_jax.coding.tiling). ---

def _run_tiled(fn, inputs, tile: int, halo: int, align: int = 1,
               window=jnp.asarray) -> list[np.ndarray]:
  """fn(*windows) on windows of `inputs` (arrays [1, H, W, C] of one H, W), each
  output cropped to its tile and placed in a numpy array of the whole output.
  `window` makes each window (default a device array; np.asarray keeps int64).

  Every output of fn is [1, h, w, C] with h / H = w / W a fixed ratio (upsampling
  or strided), so a tile's rows in it are the tile's rows times that ratio.
  """
  height, width = inputs[0].shape[1:3]
  rows = tiling.axis_tiles(height, tile, halo, align)
  cols = tiling.axis_tiles(width, tile, halo, align)
  outputs = None
  for r in rows:
    for c in cols:
      windows = [window(a[:, r.start:r.start + r.size, c.start:c.start + c.size])
                 for a in inputs]
      results = [np.asarray(o) for o in fn(*windows)]
      if outputs is None:
        outputs = [np.empty((1, height * o.shape[1] // r.size, width * o.shape[2] // c.size,
                             o.shape[3]), o.dtype) for o in results]
      for whole, part in zip(outputs, results):
        fy, fx = part.shape[1] / r.size, part.shape[2] / c.size  # exact: tile grid aligned
        y0, y1 = int((r.lo - r.start) * fy), int((r.hi - r.start) * fy)
        x0, x1 = int((c.lo - c.start) * fx), int((c.hi - c.start) * fx)
        whole[:, int(r.lo * fy):int(r.hi * fy), int(c.lo * fx):int(c.hi * fx)] = \
            part[:, y0:y1, x0:x1]
  return outputs


def _analyze_tiled(model, params, x_padded: np.ndarray, s):
  """analyze() in tiles: (y' float32, z_sym int32) as numpy. Encoder only, so the
  tiles need not reproduce the whole-image values bit for bit (nothing else does)."""
  return _run_tiled(lambda x: analyze(model, params, x, s), [x_padded],
                    tiling.TILE_PIXELS, tiling.ANALYSIS_HALO_PIXELS, align=int(model.stride))


def hyper_tiled(model, params, z_sym, s, y_index_bounds):
  """hyper() in tiles of z: (mean, y table row) as numpy. The encoder and the decoder
  of a LOSSY_TILED file both call this."""
  tile = tiling.TILE_PIXELS // int(model.stride)
  return _run_tiled(lambda z: hyper(model, params, z, s, y_index_bounds), [np.asarray(z_sym)],
                    tile, tiling.HYPER_HALO)


def _synthesize_tiled(model: ExportedModel, y_sym, mean, s, height: int,
                      width: int) -> np.ndarray:
  """synthesize_image() (without the prior) in tiles of y: cropped uint8 [H, W, 3]."""
  tile = tiling.TILE_PIXELS // (int(model.lossy_model.stride) // 4)  # y is 1/16 of x
  (pixels,) = _run_tiled(
      lambda y, m: _synthesize(model.lossy_model, model.lossy_params, y, m, s, False)[:1],
      [np.asarray(y_sym), np.asarray(mean)], tile, tiling.SYNTHESIS_HALO)
  return pixels[0, :height, :width, :]


# --- The same stages in exact integer arithmetic (gvae_jax.coding.exact_lossy). ---

def exact_hyper(model: ExportedModel, z_sym, s_value, tiled: bool = False):
  """(mean int64 in 2^-16 units, y table row int32) of an exact lossy file (modes
  EXACT_LOSSY, EXACT_LOSSY_TILED); the encoder and the decoder both call this."""
  exact, s = model.exact_lossy, float(s_value)
  if not tiled:
    return exact.hyper(np.asarray(z_sym), s)
  tile = tiling.TILE_PIXELS // int(model.lossy_model.stride)
  return _run_tiled(lambda z: exact.hyper(z, s), [np.asarray(z_sym)], tile, tiling.HYPER_HALO,
                    window=np.asarray)


def exact_synthesize(model: ExportedModel, y_sym, mean, s_value, height: int, width: int,
                     tiled: bool = False) -> np.ndarray:
  """The cropped uint8 image [H, W, 3] of an exact lossy file."""
  exact, s = model.exact_lossy, float(s_value)
  if not tiled:
    return exact.synthesize(np.asarray(y_sym), mean, s)[0, :height, :width, :]
  tile = tiling.TILE_PIXELS // (int(model.lossy_model.stride) // 4)  # y is 1/16 of x
  (pixels,) = _run_tiled(lambda y, m: (exact.synthesize(y, m, s),),
                         [np.asarray(y_sym), np.asarray(mean)], tile, tiling.SYNTHESIS_HALO,
                         window=np.asarray)
  return pixels[0, :height, :width, :]


def exact_synthesize_with_prior(model: ExportedModel, y_sym, mean, s_value, height: int,
                                width: int) -> tuple[np.ndarray, np.ndarray]:
  """(cropped uint8 image [H, W, 3], padded prior u int32 [1, Hp, Wp, C] in 2^-16 units)
  of an EXACT_RESIDUAL file, from one exact synthesis call (both sides call this)."""
  pixels, u = model.exact_lossy.synthesize_with_prior(np.asarray(y_sym), mean, float(s_value),
                                                      model.exact_residual.prior)
  return pixels[0, :height, :width, :], u


def _exact_quantize_y(y, mean: np.ndarray) -> np.ndarray:
  """round(y' - mean) with the exact mean (2^-16 units; encoder only, float64)."""
  residual = np.nan_to_num(np.asarray(y, np.float64) - mean / float(1 << 16))
  return np.round(np.clip(residual, -_SYMBOL_LIMIT, _SYMBOL_LIMIT)).astype(np.int32)


def _padded_size(height: int, width: int, stride: int) -> tuple[int, int]:
  return -(-height // stride) * stride, -(-width // stride) * stride


# --- Rates and images. ---

def as_rgb(pixels) -> tuple[np.ndarray, int]:
  """(uint8 [H, W, 3], channels for the header) from RGB or 2-D grayscale input."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8:
    raise UserError(f"pixels must be uint8, got {pixels.dtype}")
  if pixels.ndim == 2:
    return np.repeat(pixels[:, :, None], 3, axis=2), 1
  if pixels.ndim == 3 and pixels.shape[2] == 1:
    return np.repeat(pixels, 3, axis=2), 1
  if pixels.ndim != 3 or pixels.shape[2] != 3:
    raise UserError(f"pixels must be [H, W, 3] RGB or [H, W] grayscale, got {pixels.shape}")
  return pixels, 3


def _check_size(height: int, width: int, stride: int, error=UserError,
                tileable: bool = False) -> None:
  """The codec's size limits: MAX_TILED_PIXELS for a file that is coded in tiles
  when large (lossy, flat base), else MAX_CODEC_PIXELS."""
  if height < 1 or width < 1:
    raise error(f"image of {height}x{width} pixels has no pixels")
  padded_height, padded_width = _padded_size(height, width, stride)
  limit = MAX_TILED_PIXELS if tileable else MAX_CODEC_PIXELS
  if padded_height * padded_width > limit:
    what = ("lossy and flat-base files" if tileable
            else "near-lossless and lossless files coded whole (lossy base)")
    raise error(f"image of {height}x{width} pixels is too large for {what} of this codec "
                f"(limit {limit} pixels after padding to a multiple of {stride})")


def _latent_shapes(model, height: int, width: int) -> tuple[tuple, tuple]:
  """Shapes of z_sym and y_sym for an image of height x width."""
  stride = int(model.stride)
  hz, wz = -(-height // stride), -(-width // stride)
  return (1, hz, wz, int(model.n)), (1, hz * 4, wz * 4, int(model.m))


def z_indexes(shape) -> np.ndarray:
  return np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape)


# --- Encoding and decoding, with the intermediate integers exposed. ---

@dataclasses.dataclass(frozen=True)
class Encoded:
  """What compress produced, for tests and tools: the bytes and the integers in them."""
  data: bytes
  header: Header
  z_symbols: np.ndarray  # int32 [1, h/64, w/64, N]
  y_symbols: np.ndarray  # int32 [1, h/16, w/16, M]
  y_indexes: np.ndarray  # int32, like y_symbols
  mean: jax.Array  # float32, like y_symbols (device array, for reconstruct)
  residual: residual_codec.ResidualLayer | None = None  # residual mode only
  base: np.ndarray | None = None  # residual mode: the base layer x_base, uint8 [H, W, 3]


@dataclasses.dataclass(frozen=True)
class Decoded:
  pixels: np.ndarray  # uint8 [H, W, 3], or [H, W] for a grayscale file
  header: Header
  z_symbols: np.ndarray
  y_symbols: np.ndarray
  y_indexes: np.ndarray
  residual: residual_codec.ResidualLayer | None = None
  base: np.ndarray | None = None


def _encode_lossy(model: ExportedModel, rgb: np.ndarray, s_value: np.float32,
                  coder: EntropyCoder, tiled: bool = False, exact: bool = False):
  """(z_sym, y_sym, y_index, mean) of the lossy layer, and the z and y streams.

  tiled: the networks run in tiles (mode LOSSY_TILED). exact: the hyper synthesis in
  exact arithmetic (modes EXACT_LOSSY*; mean int64 in 2^-16 units).
  """
  s = jnp.full((1,), s_value, jnp.float32)
  lossy, params = model.lossy_model, model.lossy_params
  if tiled:
    stride = int(lossy.stride)
    ph, pw = (-rgb.shape[0]) % stride, (-rgb.shape[1]) % stride
    x_padded = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")[None]  # as pad_to_multiple
    y, z_sym = _analyze_tiled(lossy, params, x_padded, s)
    del x_padded
  else:
    x_padded, _ = pad_to_multiple(jnp.asarray(rgb)[None], int(lossy.stride))
    y, z_sym = analyze(lossy, params, x_padded, s)
  if exact:
    mean, y_index = exact_hyper(model, z_sym, s_value, tiled)
    y_sym = _exact_quantize_y(y, mean)
  else:
    hyper_fn = hyper_tiled if tiled else hyper
    mean, y_index = hyper_fn(lossy, params, z_sym, s, model.y_index_bounds)
    y_sym = quantize_y(y, mean)
  z_np, y_np, index_np = np.asarray(z_sym), np.asarray(y_sym), np.asarray(y_index)
  z_bytes = coder.encode(z_np, z_indexes(z_np.shape), model.z_table)
  y_bytes = coder.encode(y_np, index_np, model.y_table)
  return (z_np, y_np, index_np, mean), [z_bytes, y_bytes]


@dataclasses.dataclass(frozen=True)
class _LossyLayer:
  """The lossy layer coded at one rate; for a residual file also its base image and prior."""
  s_value: np.float32
  z_symbols: np.ndarray
  y_symbols: np.ndarray
  y_indexes: np.ndarray
  mean: jax.Array
  sections: list  # [z stream, y stream]
  coder_id: int  # the coder that wrote the sections
  base: np.ndarray | None = None  # uint8 [H, W, 3]
  u: jax.Array | None = None  # padded prior [1, Hp, Wp, C] (exact: int32, 2^-16 units)
  exact: bool = False  # coded in exact arithmetic (mode EXACT_RESIDUAL)


def _lossy_base_is_exact(model: ExportedModel) -> bool:
  """Whether the model codes lossy-base residual files exactly (mode EXACT_RESIDUAL)."""
  return model.exact_residual is not None


def _code_lossy(model: ExportedModel, rgb: np.ndarray, s_value: np.float32,
                with_base: bool, coder: EntropyCoder) -> _LossyLayer:
  """The lossy layer at s_value; with_base: also the base image and prior of a residual
  file (in exact arithmetic if the model codes lossy-base residual files exactly)."""
  exact = with_base and _lossy_base_is_exact(model)
  (z_np, y_np, index_np, mean), sections = _encode_lossy(model, rgb, s_value, coder,
                                                         exact=exact)
  base = u = None
  if exact:
    base, u = exact_synthesize_with_prior(model, y_np, mean, s_value, rgb.shape[0],
                                          rgb.shape[1])
  elif with_base:
    s = jnp.full((1,), s_value, jnp.float32)
    base, u = synthesize_image(model, y_np, mean, s, rgb.shape[0], rgb.shape[1],
                               with_prior=True)
  return _LossyLayer(s_value, z_np, y_np, index_np, mean, sections, coder.coder_id, base, u,
                     exact)


def _estimated_residual_bits(model: ExportedModel, rgb: np.ndarray, layer: _LossyLayer,
                             tau: int) -> float:
  """The float head's estimate of a lossy-base layer's residual bits (encoder only: it
  picks rates and bases, never a decoded bit); an exact layer's u in its float units."""
  u = layer.u
  if layer.exact:
    u = jnp.asarray(np.asarray(u, np.float32) / float(1 << 16))
  return float(np.sum(residual_codec.estimate_bits(model, rgb, layer.base, u, tau)))


_EXACT_RESIDUAL_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def lossy_base_view(model: ExportedModel):
  """What residual_codec reads for a lossy-base layer: the model, or for an exact one a
  view with its exact head (gvae_jax.coding.exact_residual)."""
  exact = model.exact_residual
  if exact is None:
    return model
  view = _EXACT_RESIDUAL_VIEWS.get(exact)
  if view is None:
    view = _FlatView(model.residual_model, model.residual_params, exact.head)
    _EXACT_RESIDUAL_VIEWS[exact] = view
  return view


def base_layer(model: ExportedModel, pixels, rate) -> tuple[np.ndarray, jax.Array]:
  """(x_base uint8 [H, W, 3], padded residual prior u) exactly as a residual file codes them."""
  rgb, _ = _checked_rgb(model, pixels)
  layer = _code_lossy(model, rgb, check_rate(rate, model.levels), with_base=True,
                      coder=_backend(None))
  return layer.base, layer.u


def residual_layer_inputs(model: ExportedModel, pixels, base: str, rate=None):
  """(what residual_codec reads of the model, x_base uint8 [H, W, 3], padded prior u) of
  a residual file on base "flat" or "lossy" (at `rate`), as the codec computes them:
  for benchmarks and tools that time or inspect the residual layer alone."""
  rgb, _ = _checked_rgb(model, pixels)
  if base == "flat":
    _require_flat(model)
    x_base, u = _flat_base(model, *rgb.shape[:2])
    return _flat_view(model), x_base, u
  if base != "lossy":
    raise UserError(f"base must be 'flat' or 'lossy', got {base!r}")
  layer = _code_lossy(model, rgb, check_rate(rate, model.levels), with_base=True,
                      coder=_backend(None))
  return lossy_base_view(model), layer.base, layer.u


def _backend(coder: int | None) -> EntropyCoder:
  """The entropy coder of id `coder`, by default the installed profile's."""
  return get_coder(default_coder_id() if coder is None else coder)


def _checked_rgb(model: ExportedModel, pixels, lossy: bool = False) -> tuple[np.ndarray, int]:
  rgb, channels = as_rgb(pixels)
  _check_size(rgb.shape[0], rgb.shape[1], int(model.lossy_model.stride), tileable=lossy)
  return rgb, channels


def is_tiled(model: ExportedModel, height: int, width: int) -> bool:
  """Whether a lossy or flat-base file of this image size is coded in tiles (modes
  LOSSY_TILED, FLAT_RESIDUAL_TILED, EXACT_FLAT_RESIDUAL_TILED)."""
  return tiling.is_tiled(*_padded_size(height, width, int(model.lossy_model.stride)))


def tiled_flat_mode(model: ExportedModel, height: int, width: int, base: str = "auto"
                    ) -> Mode | None:
  """The mode of a near-lossless / lossless file of this size whose residual is coded
  on the flat base in tiles (large images, base "auto" or "flat"), else None."""
  if base == "lossy" or model.flat is None or not is_tiled(model, height, width):
    return None
  return Mode.EXACT_FLAT_RESIDUAL_TILED if model.flat.exact is not None else (
      Mode.FLAT_RESIDUAL_TILED)


def encode(model: ExportedModel, pixels, rate, tau=None,
           profile: residual_codec.Profile | None = None, coder: int | None = None,
           base: "ChosenBase | None" = None) -> Encoded:
  """Compresses pixels at rate s; with tau, near-lossless (lossless at 0). Module doc.

  coder: the entropy coder id (gvae_jax.coding.coder); by default the
  installed profile's (coder.default_coder_id).
  base: choose_base's result for these pixels and tau (its rate is used and
  its coded lossy layer reused); rate is then ignored and may be None.
  """
  backend = _backend(coder)
  if tau is not None:
    tau = check_tau(tau, model)
  if base is not None:
    if tau is None:
      raise TauError("a chosen base layer is for a residual file: give tau")
    s_value, lossy = base.layer.s_value, base.layer
  else:
    s_value, lossy = check_rate(rate, model.levels), None
  rgb, channels = _checked_rgb(model, pixels, lossy=tau is None)
  return _encode(model, rgb, channels, s_value, tau, backend, profile, lossy)


def _encode(model: ExportedModel, rgb: np.ndarray, channels: int, s_value: np.float32,
            tau: int | None, coder: EntropyCoder,
            profile: residual_codec.Profile | None = None,
            lossy: _LossyLayer | None = None) -> Encoded:
  """encode() on checked arguments; `lossy`: the layer already coded at s_value."""
  height, width = rgb.shape[:2]
  tiled = tau is None and is_tiled(model, height, width)
  # Lossy files of a converted model are exact; residual files keep the float lossy layer.
  exact = tau is None and model.exact_lossy is not None
  if tau is None:
    (z_np, y_np, index_np, mean), sections = _encode_lossy(model, rgb, s_value, coder, tiled,
                                                           exact)
    lossy = _LossyLayer(s_value, z_np, y_np, index_np, mean, sections, coder.coder_id)
  elif (lossy is None or lossy.coder_id != coder.coder_id
        or lossy.exact != _lossy_base_is_exact(model)):
    lossy = _code_lossy(model, rgb, s_value, with_base=True, coder=coder)
  sections = list(lossy.sections)
  mode = {(False, False): Mode.LOSSY, (True, False): Mode.LOSSY_TILED,
          (False, True): Mode.EXACT_LOSSY, (True, True): Mode.EXACT_LOSSY_TILED}[tiled, exact]
  layer = None
  if tau is not None:
    layer = residual_codec.encode(lossy_base_view(model), coder, rgb, lossy.base, lossy.u,
                                  tau, profile)
    sections += [layer.side_info, layer.streams,
                 _pixel_check(_residual_pixels(lossy.base, layer.r_hat))]
    mode = Mode.EXACT_RESIDUAL if lossy.exact else Mode.RESIDUAL
  header = Header(fingerprint=model.fingerprint, mode=mode, rate=float(s_value),
                  tau=0 if tau is None else tau, height=height, width=width, channels=channels,
                  coder_id=coder.coder_id)
  data = container.pack(header, sections)
  return Encoded(data, header, lossy.z_symbols, lossy.y_symbols, lossy.y_indexes, lossy.mean,
                 layer, lossy.base)


def _residual_pixels(base: np.ndarray, r_hat: np.ndarray) -> np.ndarray:
  """What the decoder returns for a residual file (RGB): x_base + r_hat, clipped."""
  return np.clip(base.astype(np.int32) + r_hat, 0, 255).astype(np.uint8)


def _pixel_check(rgb: np.ndarray) -> bytes:
  """The residual file's check section: CRC-32 of uint8 RGB [H, W, 3] in C order."""
  return _CHECK.pack(zlib.crc32(np.ascontiguousarray(rgb, np.uint8).tobytes()))


def reconstruct(model: ExportedModel, encoded: Encoded) -> np.ndarray:
  """The encoder-side reconstruction (uint8 RGB [H, W, 3]) with the decoder's function.

  For a residual file: x_base + r_hat, clipped (what decode returns for RGB).
  """
  if encoded.residual is not None:
    return _residual_pixels(encoded.base, encoded.residual.r_hat)
  header = encoded.header
  if header.mode in container.EXACT_LOSSY_MODES:
    return exact_synthesize(model, encoded.y_symbols, encoded.mean, np.float32(header.rate),
                            header.height, header.width, header.mode == Mode.EXACT_LOSSY_TILED)
  s = jnp.full((1,), np.float32(encoded.header.rate), jnp.float32)
  if encoded.header.mode == Mode.LOSSY_TILED:
    return _synthesize_tiled(model, encoded.y_symbols, encoded.mean, s, encoded.header.height,
                             encoded.header.width)
  return synthesize_image(model, encoded.y_symbols, encoded.mean, s, encoded.header.height,
                           encoded.header.width)[0]


# --- The flat base (module doc). ---

@dataclasses.dataclass(frozen=True, eq=False)
class _FlatView:
  """What residual_codec reads of a model, for the flat head (hashable by identity)."""
  residual_model: object
  residual_params: object
  exact: object = None  # gvae_jax.coding.exact_head.ExactHead: exact arithmetic
  is_scalable: bool = True


_FLAT_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _flat_view(model) -> _FlatView:
  """The view of a model's flat head (an ExportedModel with one, or a FlatHead)."""
  head = getattr(model, "flat", None) or model
  view = _FLAT_VIEWS.get(head)
  if view is None:
    view = _FlatView(head.model, head.params, head.exact)
    _FLAT_VIEWS[head] = view
  return view


def _flat_base(model, height: int, width: int):
  """(x_base uint8 [H, W, 3] of 128, u [1, Hp, Wp, T]: tap availability flags) for
  a model with a flat head (or a FlatHead)."""
  patch = residual_codec.PATCH
  assert patch == flat_base.PATCH
  hp, wp = -(-height // patch) * patch, -(-width // patch) * patch
  flat = getattr(model, "flat", None) or model
  head = flat.model
  if flat.border_flags:
    offsets = flat_base.tap_offsets(head.kernel_size, head.order)
    u = flat_base.tap_availability(height, width, offsets, hp, wp)[None]
  else:
    u = np.zeros((1, hp, wp, 0), np.float32)
  base = np.full((height, width, 3), flat_base.FLAT_BASE_VALUE, np.uint8)
  return base, jnp.asarray(u)


def _require_flat(model: ExportedModel) -> None:
  if model.flat is None:
    raise UserError(f"model {model.name} has no flat head: a flat base needs one "
                    "(gvae_jax.coding.export.attach_flat_head)")


def encode_flat(model: ExportedModel, pixels, tau,
                profile: residual_codec.Profile | None = None,
                coder: int | None = None) -> Encoded:
  """A residual file on the flat base (mode FLAT_RESIDUAL): every value within tau."""
  tau = check_tau(tau, model)
  _require_flat(model)
  rgb, channels = as_rgb(pixels)
  height, width = rgb.shape[:2]
  _check_size(height, width, int(model.lossy_model.stride), tileable=True)
  coder = _backend(coder)
  empty = np.zeros((0,), np.int32)
  mode = tiled_flat_mode(model, height, width)
  if mode is not None:
    sections = _encode_flat_tiled(model, rgb, tau, profile, coder)
    layer = base = None  # whole-image arrays of the layer are what tiling avoids
  else:
    base, u = _flat_base(model, height, width)
    layer = residual_codec.encode(_flat_view(model), coder, rgb, base, u, tau, profile)
    sections = [layer.side_info, layer.streams,
                _pixel_check(_residual_pixels(base, layer.r_hat))]
    mode = Mode.FLAT_RESIDUAL if model.flat.exact is None else Mode.EXACT_FLAT_RESIDUAL
  header = Header(fingerprint=model.fingerprint, mode=mode, rate=0.0, tau=tau,
                  height=height, width=width, channels=channels, coder_id=coder.coder_id)
  return Encoded(container.pack(header, sections), header, empty, empty, empty, None, layer,
                 base)


def _encode_flat_tiled(model: ExportedModel, rgb: np.ndarray, tau: int, profile,
                       coder: EntropyCoder) -> list[bytes]:
  """The three sections of a tiled flat-base file: each tile (tiling.residual_tiles)
  an independent layer on its own flat base; the check covers the whole image."""
  view = _flat_view(model)
  sides, streams = [], []
  decoded = np.empty_like(rgb)
  for top, bottom, left, right in tiling.residual_tiles(*rgb.shape[:2]):
    tile = np.ascontiguousarray(rgb[top:bottom, left:right])
    base, u = _flat_base(model, bottom - top, right - left)
    layer = residual_codec.encode(view, coder, tile, base, u, tau, profile)
    sides.append(layer.side_info)
    streams.append(layer.streams)
    decoded[top:bottom, left:right] = _residual_pixels(base, layer.r_hat)
  side = residual_layout.write_tiled_side_info(sides, [len(x) for x in streams])
  return [side, b"".join(streams), _pixel_check(decoded)]


def estimate_flat_size(model, pixels, tau) -> float:
  """Estimated bytes of the flat-base file: the flat head's bits (one pass).

  model: an ExportedModel with a flat head, or a FlatHead on its own.
  """
  if isinstance(model, ExportedModel):
    tau = check_tau(tau, model)
    _require_flat(model)
  else:
    tau = check_tau(tau)
  rgb, _ = as_rgb(pixels)
  base, u = _flat_base(model, *rgb.shape[:2])
  bits = residual_codec.estimate_bits(_flat_view(model), rgb, base, u, tau)
  return float(np.sum(bits)) / 8.0


def encode_residual(model: ExportedModel, pixels, tau, rate=None, base: str = "auto",
                    profile: residual_codec.Profile | None = None,
                    coder: int | None = None) -> Encoded:
  """A near-lossless / lossless file on the base `base` ("auto": the smaller, module doc).

  rate: the lossy base's rate (None: choose_rate's); refused with base="flat".
  """
  if base not in BASES:
    raise UserError(f"base must be one of {', '.join(BASES)}, got {base!r}")
  tau = check_tau(tau, model)
  shape = np.shape(pixels)
  if base == "auto" and len(shape) >= 2 and tiled_flat_mode(model, shape[0], shape[1]):
    # Large images: the flat base, in tiles; a lossy base runs its layers whole
    # (asked for with base="lossy", up to MAX_CODEC_PIXELS).
    if rate is not None:
      raise UserError(f"an image of {shape[1]}x{shape[0]} pixels is coded on the flat base "
                      "in tiles, which has no rate; for a lossy base layer at this rate "
                      "choose it with --base lossy (coded whole, up to 8192x8192)")
    return encode_flat(model, pixels, tau, profile, coder)
  if base == "flat":
    if rate is not None:
      raise UserError("a flat base has no rate; --rate sets the lossy base layer")
    return encode_flat(model, pixels, tau, profile, coder)
  if (base == "auto" and rate is None and model.exact_lossy is not None
      and not _lossy_base_is_exact(model) and model.flat is not None
      and model.flat.exact is not None):
    # A model converted without its lossy-base head keeps its files portable: the exact
    # flat base (its lossy base's residual is float; asked for with base="lossy").
    return encode_flat(model, pixels, tau, profile, coder)
  backend = _backend(coder)
  rgb, channels = _checked_rgb(model, pixels)
  if base == "lossy" or model.flat is None:
    if rate is None:
      _, lossy, _ = _choose_rate(model, rgb, tau, 4, backend)
      return _encode(model, rgb, channels, lossy.s_value, tau, backend, profile, lossy)
    return _encode(model, rgb, channels, check_rate(rate, model.levels), tau, backend, profile)
  flat_size = estimate_flat_size(model, pixels, tau)
  if rate is None:
    _, lossy, lossy_size = _choose_rate(model, rgb, tau, 4, backend)
  else:
    lossy = _code_lossy(model, rgb, check_rate(rate, model.levels), with_base=True,
                        coder=backend)
    bits = _estimated_residual_bits(model, rgb, lossy, tau)
    lossy_size = sum(len(x) for x in lossy.sections) + bits / 8.0
  small = rgb.shape[0] * rgb.shape[1] <= BOTH_PIXELS
  if small or abs(flat_size - lossy_size) <= BOTH_MARGIN * min(flat_size, lossy_size):
    flat = encode_flat(model, pixels, tau, profile, coder)
    lossy_file = _encode(model, rgb, channels, lossy.s_value, tau, backend, profile, lossy)
    return flat if len(flat.data) <= len(lossy_file.data) else lossy_file
  if flat_size < lossy_size:
    return encode_flat(model, pixels, tau, profile, coder)
  return _encode(model, rgb, channels, lossy.s_value, tau, backend, profile, lossy)


def read_header(data: bytes) -> Header:
  """The header of .gvae bytes (FormatError if malformed); needs no model."""
  header, _ = container.unpack(data)
  return header


def _check_header_for_model(model: ExportedModel, header: Header,
                            sections: list[bytes]) -> np.float32:
  """Everything about the header that must hold before decoding; returns s."""
  if not model.accepts(header.fingerprint, header.mode):
    raise ModelMismatchError(
        f"this file was made by a different model (fingerprint {header.fingerprint.hex()}, "
        f"the loaded model is {model.fingerprint.hex()}); decode it with the model that "
        "compressed it")
  if header.mode in container.RESIDUAL_MODES and not model.is_scalable:
    raise FormatError(f"mode {header.mode.name} needs a scalable model; {model.name} is "
                      "lossy-only")
  if header.mode in container.FLAT_MODES and model.flat is None:
    raise FormatError("this file codes its residual on a flat base and needs a model with a "
                      f"flat head; {model.name} has none")
  if header.mode in container.FLAT_MODES and (
      (header.mode in container.EXACT_MODES) != (model.flat.exact is not None)):
    raise FormatError(f"invalid header: mode {header.mode.name} with a flat head that is "
                      f"{'not ' if model.flat.exact is None else ''}exact")
  if header.mode == Mode.EXACT_RESIDUAL and model.exact_residual is None:
    raise FormatError(f"mode {header.mode.name} needs a scalable model converted to exact "
                      f"arithmetic with its lossy-base head (gvae convert-exact); "
                      f"{model.name} is not")
  if header.mode in container.EXACT_LOSSY_MODES and model.exact_lossy is None:
    raise FormatError(f"mode {header.mode.name} needs a model converted to exact arithmetic "
                      f"(gvae convert-exact); {model.name} is not")
  if header.mode not in container.LOSSY_MODES + container.RESIDUAL_MODES:
    raise FormatError(f"mode {header.mode.name} is not supported by this decoder")
  # Whole flat files (written before format version 5) keep the whole-image limit.
  tileable = header.mode in container.LOSSY_MODES + container.TILED_FLAT_MODES
  _check_size(header.height, header.width, int(model.lossy_model.stride), FormatError,
              tileable)
  tiled = is_tiled(model, header.height, header.width)
  # Each lossy image size has one mode; refusing the other is also a memory guard
  # (a whole-image decode of a large image is beyond gvae_jax.coding.memory's bound).
  if header.mode in (Mode.LOSSY, Mode.EXACT_LOSSY) and tiled:
    raise FormatError(f"invalid header: a whole-image lossy file of {header.width}x"
                      f"{header.height} pixels (images this large are coded in tiles)")
  if header.mode in container.TILED_LOSSY_MODES + container.TILED_FLAT_MODES and not tiled:
    raise FormatError(f"invalid header: a tiled {header.mode.name} file of {header.width}x"
                      f"{header.height} pixels (images this small are coded whole)")
  if header.channels not in (1, 3):
    raise FormatError(f"invalid header: {header.channels} channels (expected 1 or 3)")
  expected, kind, check = {
      **{mode: (NUM_SECTIONS, "lossy", None) for mode in container.LOSSY_MODES},
      **{mode: (NUM_RESIDUAL_SECTIONS, "residual", CHECK_SECTION)
         for mode in container.LOSSY_BASE_MODES},
      **{mode: (NUM_FLAT_SECTIONS, "flat-base residual", FLAT_CHECK_SECTION)
         for mode in container.FLAT_MODES},
  }[header.mode]
  if len(sections) != expected:
    raise FormatError(f"a {kind} file has {expected} sections, this one {len(sections)}")
  if check is not None and len(sections[check]) != _CHECK.size:
    raise FormatError(f"the check section has {len(sections[check])} bytes, "
                      f"not {_CHECK.size}")
  try:
    s = check_rate(header.rate, model.levels)
  except RateError as e:
    raise FormatError(f"invalid header: {e}") from None
  if float(s) != header.rate:  # the encoder stores the float32 it used, exactly
    raise FormatError(f"invalid header: rate {header.rate!r} is not a float32 value")
  return s


# --- Stored files (mode STORED): the pixels themselves, for degenerate sizes. ---

def _stored_file(model: ExportedModel, rgb: np.ndarray, channels: int) -> bytes:
  """A lossless STORED file: the pixels (1 or 3 channels) deflated, one section."""
  samples = rgb[:, :, :1] if channels == 1 else rgb
  header = Header(fingerprint=model.fingerprint, mode=Mode.STORED, rate=0.0, tau=0,
                  height=rgb.shape[0], width=rgb.shape[1], channels=channels,
                  coder_id=default_coder_id())  # no entropy coding; any valid id
  return container.pack(header, [zlib.compress(np.ascontiguousarray(samples).tobytes(), 9)])


DEGENERATE_PADDING = 16  # padded area >= 16x the image: e.g. at most 4 pixels high


def _at_most_stored(model: ExportedModel, pixels, data: bytes) -> bytes:
  """`data`, or the STORED file if that is smaller (it is lossless, so it honours any
  rate or tau), for degenerate sizes only: images whose padding to a multiple of 64
  is at least DEGENERATE_PADDING times their area (1-4 pixels high or wide, tiny)."""
  rgb, channels = as_rgb(pixels)
  height, width = rgb.shape[:2]
  stride = int(model.lossy_model.stride)
  padded = (-(-height // stride) * stride) * (-(-width // stride) * stride)
  if padded < DEGENERATE_PADDING * height * width:
    return data
  stored = _stored_file(model, rgb, channels)
  return stored if len(stored) < len(data) else data


def _decode_stored(model: ExportedModel, header: Header, sections: list[bytes]) -> Decoded:
  if not model.accepts(header.fingerprint, header.mode):
    raise ModelMismatchError(
        f"this file was made by a different model (fingerprint {header.fingerprint.hex()}, "
        f"the loaded model is {model.fingerprint.hex()})")
  if header.channels not in (1, 3) or len(sections) != 1:
    raise FormatError("invalid stored file: expected 1 or 3 channels and one section")
  expected = header.height * header.width * header.channels
  inflater = zlib.decompressobj()
  try:  # bounded: never inflates more than the header's pixel count (+1 to see excess)
    raw = inflater.decompress(sections[0], expected + 1)
  except zlib.error as e:
    raise FormatError(f"invalid stored file: {e}") from None
  if len(raw) != expected or not inflater.eof or inflater.unused_data:
    raise FormatError("invalid stored file: the pixel data does not match the header's size")
  pixels = np.frombuffer(raw, np.uint8).reshape(header.height, header.width, header.channels)
  pixels = pixels[:, :, 0].copy() if header.channels == 1 else pixels.copy()
  empty = np.zeros((0,), np.int32)
  return Decoded(pixels, header, empty, empty, empty)


def decode(model: ExportedModel, data: bytes,
           profile: residual_codec.Profile | None = None) -> Decoded:
  """Decompresses .gvae bytes made with `model`; a UserError for any bad input."""
  header, sections = container.unpack(data)
  if header.mode == Mode.STORED:
    return _decode_stored(model, header, sections)
  s_value = _check_header_for_model(model, header, sections)
  model = model.for_file(header.fingerprint, header.mode)  # an earlier exact conversion?
  coder = get_coder(header.coder_id)
  if header.mode in container.FLAT_MODES:
    return _decode_flat(model, header, sections, coder, profile)
  s = jnp.full((1,), s_value, jnp.float32)
  z_shape, y_shape = _latent_shapes(model.lossy_model, header.height, header.width)

  z_np = coder.decode(sections[Z_SECTION], z_indexes(z_shape), model.z_table)
  if header.mode == Mode.EXACT_RESIDUAL:
    mean, index_np = exact_hyper(model, z_np, s_value)
    y_np = coder.decode(sections[Y_SECTION], index_np, model.y_table)
    base, u = exact_synthesize_with_prior(model, y_np, mean, s_value, header.height,
                                          header.width)
    pixels, layer = residual_codec.decode(lossy_base_view(model), coder,
                                          sections[SIDE_INFO_SECTION],
                                          sections[STREAMS_SECTION], base, u, header.tau,
                                          profile)
    _verify_pixels(pixels, sections[CHECK_SECTION], exact=True)
    return Decoded(_to_channels(pixels, header), header, z_np, y_np, index_np, layer, base)
  if header.mode in container.EXACT_LOSSY_MODES:
    tiled = header.mode == Mode.EXACT_LOSSY_TILED
    mean, index_np = exact_hyper(model, z_np, s_value, tiled)
    y_np = coder.decode(sections[Y_SECTION], index_np, model.y_table)
    pixels = exact_synthesize(model, y_np, mean, s_value, header.height, header.width, tiled)
    return Decoded(_to_channels(pixels, header), header, z_np, y_np, index_np)
  if header.mode == Mode.LOSSY_TILED:
    mean, index_np = hyper_tiled(model.lossy_model, model.lossy_params, z_np, s,
                                 model.y_index_bounds)
    y_np = coder.decode(sections[Y_SECTION], index_np, model.y_table)
    pixels = _synthesize_tiled(model, y_np, mean, s, header.height, header.width)
    return Decoded(_to_channels(pixels, header), header, z_np, y_np, index_np)
  mean, y_index = hyper(model.lossy_model, model.lossy_params, jnp.asarray(z_np), s,
                         model.y_index_bounds)
  index_np = np.asarray(y_index)
  y_np = coder.decode(sections[Y_SECTION], index_np, model.y_table)
  residual = header.mode == Mode.RESIDUAL
  pixels, u = synthesize_image(model, y_np, mean, s, header.height, header.width,
                                with_prior=residual)
  layer, base = None, None
  if residual:
    base = pixels
    pixels, layer = residual_codec.decode(model, coder, sections[SIDE_INFO_SECTION],
                                          sections[STREAMS_SECTION], base, u, header.tau,
                                          profile)
    _verify_pixels(pixels, sections[CHECK_SECTION])
  return Decoded(_to_channels(pixels, header), header, z_np, y_np, index_np, layer, base)


def _verify_pixels(pixels: np.ndarray, check: bytes, exact: bool = False) -> None:
  """CodingError saying what a mismatch can mean (the container's CRC already held,
  so the bytes are the ones written)."""
  if _pixel_check(pixels) == check:
    return
  if exact:
    raise CodingError(
        "the decoded pixels do not match the file's checksum, although the file's CRC holds "
        "and this mode decodes alike on every platform: the encoder that wrote it does not "
        "match this decoder (another gvae-jax version), or the file was crafted")
  raise CodingError(
      "the decoded pixels do not match the file's checksum, although the file's CRC holds: "
      "the file was written by another gvae-jax version, or on a machine whose "
      "floating-point results differ from this one's (this mode decodes only on the same "
      "kind of CPU and software; README, Portability; files in exact arithmetic do not "
      "have this limit)")


def _to_channels(pixels: np.ndarray, header: Header) -> np.ndarray:
  if header.channels == 1:
    # Average of the three channels, rounded to nearest (sum/3 never ties);
    # for a residual file each channel is within tau of the gray value, so is this.
    return ((pixels.astype(np.uint16).sum(axis=2) + 1) // 3).astype(np.uint8)
  return pixels


def _decode_flat(model: ExportedModel, header: Header, sections: list[bytes], coder,
                 profile) -> Decoded:
  empty = np.zeros((0,), np.int32)
  exact = header.mode in container.EXACT_MODES
  if header.mode in container.TILED_FLAT_MODES:
    tiles = tiling.residual_tiles(header.height, header.width)
    parts = residual_layout.split_tiled_side_info(sections[FLAT_SIDE_INFO_SECTION], len(tiles),
                                                  len(sections[FLAT_STREAMS_SECTION]))
    view = _flat_view(model)
    pixels = np.empty((header.height, header.width, 3), np.uint8)
    streams = sections[FLAT_STREAMS_SECTION]
    for (top, bottom, left, right), (side, start, end) in zip(tiles, parts):
      base, u = _flat_base(model, bottom - top, right - left)
      pixels[top:bottom, left:right], _ = residual_codec.decode(
          view, coder, side, streams[start:end], base, u, header.tau, profile)
    _verify_pixels(pixels, sections[FLAT_CHECK_SECTION], exact)
    return Decoded(_to_channels(pixels, header), header, empty, empty, empty)
  base, u = _flat_base(model, header.height, header.width)
  pixels, layer = residual_codec.decode(_flat_view(model), coder,
                                        sections[FLAT_SIDE_INFO_SECTION],
                                        sections[FLAT_STREAMS_SECTION], base, u, header.tau,
                                        profile)
  _verify_pixels(pixels, sections[FLAT_CHECK_SECTION], exact)
  return Decoded(_to_channels(pixels, header), header, empty, empty, empty, layer, base)


# --- Choosing the base rate of a residual file. ---

def choose_rate(model: ExportedModel, pixels, tau, refinements: int = 4,
                coder: int | None = None) -> float:
  """The base rate s that minimises the size of the residual file for tau.

  The size at a rate is the real lossy layer's bytes plus the model's
  estimate of the residual bits with the coder's contexts
  (residual_codec.estimate_bits; the coded size is within about 1 % of it),
  so no candidate needs the slow step-wise coder. Search: every trained
  level 0 .. levels-1, then `refinements` rounds of golden-section search
  between the best level's neighbours (the size is close to unimodal in s).
  Returns a float32-exact rate.
  """
  tau = check_tau(tau, model)
  rgb, _ = _checked_rgb(model, pixels)
  return _choose_rate(model, rgb, tau, refinements, _backend(coder))[0]


@dataclasses.dataclass(frozen=True)
class ChosenBase:
  """choose_base's result: the base rate and its coded lossy layer, for encode(base=...)."""
  rate: float
  layer: _LossyLayer


def choose_base(model: ExportedModel, pixels, tau, refinements: int = 4,
                coder: int | None = None) -> ChosenBase:
  """choose_rate, keeping the chosen candidate's coded lossy layer for `encode`."""
  tau = check_tau(tau, model)
  rgb, _ = _checked_rgb(model, pixels)
  return ChosenBase(*_choose_rate(model, rgb, tau, refinements, _backend(coder))[:2])


def _choose_rate(model: ExportedModel, rgb: np.ndarray, tau: int, refinements: int,
                 coder: EntropyCoder) -> tuple[float, _LossyLayer, float]:
  """choose_rate on checked arguments: the rate, its coded lossy layer (reused by
  compress) and its estimated file size."""
  sizes = {}
  best = None  # (size, rate, lossy layer): the smallest size, then the lowest rate

  def size(rate):
    nonlocal best
    rate = float(np.float32(rate))
    if rate not in sizes:
      layer = _code_lossy(model, rgb, check_rate(rate, model.levels), with_base=True,
                          coder=coder)
      bits = _estimated_residual_bits(model, rgb, layer, tau)
      sizes[rate] = sum(len(x) for x in layer.sections) + bits / 8.0
      if best is None or (sizes[rate], rate) < best[:2]:
        best = (sizes[rate], rate, layer)
    return sizes[rate]

  top = model.levels - 1
  best_level = min(range(model.levels), key=lambda level: (size(level), level))
  lo, hi = float(max(best_level - 1, 0)), float(min(best_level + 1, top))
  ratio = (math.sqrt(5) - 1) / 2
  a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
  for _ in range(refinements):
    if hi - lo < 1e-3:
      break
    if size(a) <= size(b):
      hi, b = b, a
      a = hi - ratio * (hi - lo)
    else:
      lo, a = a, b
      b = lo + ratio * (hi - lo)
  return best[1], best[2], best[0]


# --- The public API. ---

def compress(model: ExportedModel, pixels, rate: float | None = None, tau=None,
             coder: int | None = None, base: str = "auto", allow_stored: bool = False) -> bytes:
  """uint8 [H, W, 3] (or [H, W] grayscale) -> .gvae bytes.

  Lossy at rate s in [0, levels-1]; with tau (an int >= 0; 0 is lossless) a
  residual file whose every decoded value is within tau of the input, with
  the base layer at `rate`, or, if rate is None, at choose_rate's rate (whose
  coded lossy layer is reused, not coded again).
  coder: entropy coder id, None for the default (`encode`).
  base: "auto", "flat" or "lossy": the base of a residual file (`encode_residual`;
  a model with a flat head may use a flat base).
  allow_stored (the CLI sets it): for a degenerate size, a STORED file
  instead when that is smaller (module doc).
  """
  finish = (lambda data: _at_most_stored(model, pixels, data)) if allow_stored else (
      lambda data: data)
  if tau is None:
    if rate is None:
      raise RateError("a lossy file needs a rate")
    if base == "flat":
      raise UserError("a flat base is for near-lossless and lossless files (give tau)")
    return finish(encode(model, pixels, rate, coder=coder).data)
  return finish(encode_residual(model, pixels, tau, rate, base, coder=coder).data)


def decompress(model: ExportedModel, data: bytes) -> np.ndarray:
  """.gvae bytes -> uint8 [H, W, 3] ([H, W] for grayscale files)."""
  return decode(model, data).pixels


def bits_per_pixel(data: bytes, header: Header) -> float:
  return 8.0 * len(data) / (header.height * header.width)


def compress_to_bpp(model: ExportedModel, pixels, target_bpp: float,
                    tolerance: float = 1e-3, coder: int | None = None) -> tuple[bytes, float]:
  """The file of the largest rate s whose real size is <= target_bpp, and s.

  Bisection on s (file size grows with s; where it does not quite, the
  largest feasible s seen is kept). Stops when the bracket is narrower than
  `tolerance`. UserError if even s = 0 gives a bigger file.
  """
  try:
    target = float(target_bpp)
  except (TypeError, ValueError):
    raise UserError(f"target bpp must be a number, got {target_bpp!r}") from None
  if not math.isfinite(target) or target <= 0:
    raise UserError(f"target bpp must be a positive number, got {target_bpp}")
  rgb, channels = _checked_rgb(model, pixels, lossy=True)
  backend = _backend(coder)
  budget = target * rgb.shape[0] * rgb.shape[1] / 8.0  # bytes

  def attempt(s):
    return _encode(model, rgb, channels, check_rate(s, model.levels), None, backend).data

  top = float(model.levels - 1)
  best = attempt(0.0)
  if len(best) > budget:
    bpp = 8.0 * len(best) / (rgb.shape[0] * rgb.shape[1])
    raise UserError(f"cannot reach {target} bpp: even the lowest rate (s=0) needs "
                    f"{bpp:.4f} bpp ({len(best)} bytes) for this image")
  best_rate = 0.0
  data = attempt(top)
  if len(data) <= budget:
    return data, top
  lo, hi = 0.0, top
  while hi - lo > tolerance:
    mid = float(np.float32((lo + hi) / 2))
    if mid <= lo or mid >= hi:  # float32 resolution reached
      break
    data = attempt(mid)
    if len(data) <= budget:
      lo = mid
      if mid > best_rate:
        best, best_rate = data, mid
    else:
      hi = mid
  return best, best_rate
