"""How much memory coding an image takes, checked before anything is allocated.

Up to tiling.TILED_ABOVE padded pixels the codec runs its networks on the
whole (padded) image at once, so its peak memory grows linearly with the
number of pixels; larger images are coded in tiles (below). `estimate_peak_bytes` is
that line, measured on this project's `small` models (N=64, M=96) with
`/usr/bin/time -f %M` (peak RSS of the whole `gvae` process) at 1024x1024
and 2048x2048 (benchmarks/memory.py re-measures it):

  peak = BASE_BYTES + bytes_per_pixel[operation] * padded pixels

  operation            bytes per padded pixel
  lossy compress       PER_PIXEL["lossy", "compress"]
  lossy decompress     PER_PIXEL["lossy", "decompress"]
  residual compress    PER_PIXEL["residual", "compress"]   (near-lossless, lossless)
  residual decompress  PER_PIXEL["residual", "decompress"]

(measured slopes, TFC coder, benchmarks/results/memory_lossy.json: lossy
compress 94 bytes per pixel between 1 and 4 Mpixel but 198 between 4 and 16
(the analysis transform's half-resolution activations dominate at large
sizes), lossy decompress 201 and 197; residual compress 333 and decompress
395 between 1 and 4 Mpixel on the lossy base. BASE_BYTES is the intercept of
those lines (the process with JAX, the coder and a model loaded): 0.77 GB
lossy and 1.35 GB residual measured. The shipped scalable model's
`--lossless` (both bases estimated, the smaller coded;
benchmarks/results/memory_lossless.json) measured compress 1.60 and 4.64 GB,
decompress 1.24 and 3.91 GB at 1 and 4 Mpixel, against a line of 3.31 and
5.04 GB.) Whole-image files only exist up to TILED_ABOVE for lossy and
flat-base files; near-lossless / lossless files on a lossy base (`--base
lossy`) are coded whole up to MAX_CODEC_PIXELS, about 17 Mpixel (4100x4100)
at the default cap on a 24 GiB machine (12 GiB).

Lossy files above tiling.TILED_ABOVE (2048x2048 padded) run their networks in
tiles (mode LOSSY_TILED, gvae_jax.coding.tiling), so only the whole-image
arrays grow with the image: the input or output pixels, y', its means and
table rows, the streams. Their peak is

  peak = BASE_BYTES + PER_PIXEL["lossy", op] * tiling.window_pixels()
         + TILED_PER_PIXEL * padded pixels

where the network term is one tile window's (1408x1408 pixels) and
TILED_PER_PIXEL is an upper bound counted from the arrays held at once
(about 16 bytes per pixel: 3 + 3 for the image and its padded copy, 3 x 1.5
for y', mean and rows at M=96, the streams, PNG buffers), doubled for
margin. Measured (benchmarks/results/memory_lossy_tiled.json, whole `gvae`
processes at 16, 64 and 268 Mpixel): compress 0.92, 2.24 and 7.99 GB,
decompress 0.78, 1.49 and 5.17 GB, i.e. 28 and 18 bytes per pixel between
64 and 268 Mpixel, under the bound's 32; at 16384x16384 (MAX_TILED_PIXELS)
the bound is 11.0 GiB.

Near-lossless and lossless files on the flat base above TILED_ABOVE code
their residual tile by tile (modes FLAT_RESIDUAL_TILED and
EXACT_FLAT_RESIDUAL_TILED, tiles of tiling.RESIDUAL_TILE_PIXELS): the same
line with the residual slope over one tile (2048x2048 pixels) as the
network term, plus TILED_RESIDUAL_PER_PIXEL per pixel (the image, the
decoded copy for the check, the streams). Measured
(benchmarks/results/memory_lossless.json, `--lossless` with the shipped
scalable model at 16 and 64 Mpixel): compress 5.20 and 5.69 GB, decompress
4.99 and 5.65 GB, against a bound of 5.51 and 6.48 GB for both; at
16384x16384 the bound is 9.8 GiB (not run: about 2 hours each way on 2
cores). Wider models scale the network terms with
their channel counts (`model_scale`).

The cap: `--max-memory` on the command line, else the GVAE_MAX_MEMORY
environment variable ("16G", "800M", a byte count, or "off"), else half of
the machine's physical memory, but not more than the process's address
space limit (RLIMIT_AS) if one is set (an explicit setting is used as given). compress checks the image's header
and decompress the .gvae header against it before decoding or allocating
anything, and refuse with one `gvae: error:` line saying how much the image
needs; an out-of-memory error that happens anyway (the estimate is a model,
other processes use memory too) is caught by the CLI and reported as one
line as well. No JAX or NumPy import here (tiling has none either).
"""
from __future__ import annotations

import os
import re

from gvae_jax.coding import tiling
from gvae_jax.errors import UserError

# The codec's own size limits (codec.MAX_CODEC_PIXELS / MAX_TILED_PIXELS; a test checks).
MAX_CODEC_PIXELS = 2**26
MAX_TILED_PIXELS = 2**28
# 2.5 GiB: measured intercepts 0.77 GB lossy, 1.35 GB residual (tfc profile);
# on the default profile (jax 0.12) one process decoding several crafted files
# peaked at 2.48 GB where 1.5 GiB + slope predicted 2.09 (tests/test_hostile_inputs).
BASE_BYTES = 5 << 29
# Measured slopes (bytes per pixel) x 1.25 or more, rounded up (module doc).
PER_PIXEL = {
    ("lossy", "compress"): 250,
    ("lossy", "decompress"): 252,
    ("lossy_tiled", "decompress"): 252,  # of the tile window only (TILED_PER_PIXEL below)
    ("residual", "compress"): 600,  # measured 1.60 / 4.64 GB at 1 / 4 Mpixel (lossless)
    ("residual", "decompress"): 600,
    # Exact lossy files (gvae_jax.coding.exact_lossy): int64 / float64 activations,
    # so twice the float slopes (not measured on their own yet).
    ("exact_lossy", "decompress"): 504,
    ("exact_lossy_tiled", "decompress"): 504,  # of the tile window only
    ("stored", "decompress"): 8,  # container mode STORED: inflating the pixels, no network
    # Flat-base residual files: the residual coder without the lossy layer's
    # networks; bounded by the lossy-base figure (not measured on its own).
    ("flat_residual", "decompress"): 600,
    ("exact_flat_residual", "decompress"): 600,  # the same coder in exact arithmetic
    # Lossy-base residual files in exact arithmetic: the residual figure plus the exact
    # synthesis' int64 activations beyond the float one's (not measured on their own).
    ("exact_residual", "decompress"): 900,
    # Tiled flat-base files: of one residual tile only (TILED_RESIDUAL_PER_PIXEL
    # below); compress as decompress: at 16 Mpixel its peak (5.20 GB) was above
    # what the whole-image compress slope gives for a tile.
    ("flat_residual_tiled", "compress"): 600,
    ("flat_residual_tiled", "decompress"): 600,
    ("exact_flat_residual_tiled", "compress"): 600,
    ("exact_flat_residual_tiled", "decompress"): 600,
}
# Whole-image arrays of a tiled file, bytes per padded pixel (module doc).
TILED_PER_PIXEL = 32
# Flat-base residual files coded tile by tile (container modes 6 and 7), and
# their whole-image arrays per padded pixel: measured 10 (compress) and 14
# (decompress) between 16 and 64 Mpixel, x 1.25 and rounded up (module doc).
TILED_RESIDUAL_MODES = ("flat_residual_tiled", "exact_flat_residual_tiled")
TILED_RESIDUAL_PER_PIXEL = 20
_REFERENCE_CHANNELS = 64 + 96  # the `small` models the slopes were measured on
ENV_VAR = "GVAE_MAX_MEMORY"
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class MemoryLimitError(UserError):
  """Coding this image would need more memory than the cap allows."""


def parse_size(text: str) -> int | None:
  """Bytes from '16G', '800M', '1.5g', '123456'; None for 'off' / 'none' / '0'."""
  value = str(text).strip().lower()
  if value in ("off", "none", "0", "unlimited", ""):
    return None
  match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", value)
  if not match:
    raise UserError(f"not a memory size: {text!r} (examples: 16G, 800M, 123456, off)")
  return int(float(match.group(1)) * _UNITS[match.group(2)])


def _physical_memory() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def _address_space_limit() -> int | None:
  try:
    import resource
  except ImportError:
    return None
  soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  return None if soft == resource.RLIM_INFINITY else int(soft)


def memory_cap(option: str | None = None) -> tuple[int | None, str]:
  """(cap in bytes or None for no cap, where it came from) — see the module doc."""
  if option is not None:
    cap, source = parse_size(option), "--max-memory"
  elif os.environ.get(ENV_VAR) is not None:
    cap, source = parse_size(os.environ[ENV_VAR]), ENV_VAR
  else:
    physical = _physical_memory()
    cap, source = (None if physical is None else physical // 2), "half the physical memory"
    limit = _address_space_limit()  # only the default is clamped: explicit settings win
    if limit is not None and (cap is None or limit < cap):
      cap, source = limit, "the process's address space limit (ulimit -v)"
  return cap, source


def model_scale(n: int, m: int) -> float:
  """Activation memory relative to the measured models (N=64, M=96): at least 1."""
  return max(1.0, (int(n) + int(m)) / _REFERENCE_CHANNELS)


def padded_pixels(height: int, width: int, multiple: int = 64) -> int:
  return (-(-height // multiple) * multiple) * (-(-width // multiple) * multiple)


def _per_pixel_key(mode: str, operation: str) -> tuple[str, str]:
  """The PER_PIXEL entry of a mode's networks (tiled modes: their whole-image form's)."""
  if mode in ("lossy_tiled", "exact_lossy_tiled"):
    return mode[:-len("_tiled")], operation
  return mode, operation


def _tiles(mode: str, pixels: int) -> tuple[int, int] | None:
  """(pixels of the window the networks run on at once, bytes per pixel of the
  whole-image arrays) if this file is tiled, else None."""
  if mode in ("lossy_tiled", "exact_lossy_tiled") or (
      mode in ("lossy", "exact_lossy") and pixels > tiling.TILED_ABOVE):
    return tiling.window_pixels(), TILED_PER_PIXEL
  if mode in TILED_RESIDUAL_MODES:
    return tiling.residual_tile_pixels(), TILED_RESIDUAL_PER_PIXEL
  return None


def estimate_peak_bytes(height: int, width: int, mode: str, operation: str,
                        scale: float = 1.0, extra_bytes: int = 0) -> int:
  """Estimated peak memory of one compress/decompress (mode: a container mode's
  lower-case name; 'lossy' above tiling.TILED_ABOVE is coded tiled)."""
  pixels = padded_pixels(height, width)
  key = _per_pixel_key(mode, operation)
  tiles = _tiles(mode, pixels)
  if tiles is not None:
    window, per_pixel = tiles
    networks = PER_PIXEL[key] * scale * window
    return int(BASE_BYTES + networks + per_pixel * pixels + extra_bytes)
  return int(BASE_BYTES + PER_PIXEL[key] * scale * pixels + extra_bytes)


def max_fitting_pixels(cap: int, mode: str, operation: str, scale: float = 1.0) -> int:
  """The most padded pixels whose estimated peak fits in `cap` (mode 'lossy',
  'residual', or a tiled residual mode: whole up to tiling.TILED_ABOVE, tiled above)."""
  key = _per_pixel_key(mode, operation)
  whole = max(0, int((cap - BASE_BYTES) // (PER_PIXEL[key] * scale)))
  if mode not in ("lossy",) + TILED_RESIDUAL_MODES or whole <= tiling.TILED_ABOVE:
    return whole
  window, per_pixel = _tiles(mode, tiling.TILED_ABOVE + 1)
  networks = PER_PIXEL[key] * scale * window
  return max(whole, int((cap - BASE_BYTES - networks) // per_pixel))


def _gib(value: int) -> str:
  return f"{value / (1 << 30):.1f} GiB"


def check(height: int, width: int, mode: str, operation: str, cap: int | None,
          source: str, scale: float = 1.0, extra_bytes: int = 0) -> int:
  """The estimated peak; MemoryLimitError if it exceeds `cap`."""
  need = estimate_peak_bytes(height, width, mode, operation, scale, extra_bytes)
  if cap is not None and need > cap:
    verb = "compressing" if operation == "compress" else "decoding"
    kind = {"lossy": "a lossy", "lossy_tiled": "a lossy", "stored": "a stored"}.get(
        mode, "a near-lossless/lossless")
    raise MemoryLimitError(
        f"{verb} {kind} image of {width}x{height} pixels needs about {_gib(need)} of memory "
        f"(about {need / max(1, padded_pixels(height, width)):.0f} bytes per pixel), more than the cap "
        f"of {_gib(cap)} ({source}); raise it with --max-memory SIZE or {ENV_VAR}=SIZE if "
        "the machine has the memory, or use a smaller image")
  return need
