"""How much memory coding an image takes, checked before anything is allocated.

The codec runs its networks on the whole (padded) image at once, so its peak
memory grows linearly with the number of pixels. `estimate_peak_bytes` is
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
395 between 1 and 4 Mpixel (not measured larger: they get a 55 % margin
instead of 25 %). BASE_BYTES is the intercept of those lines (the process
with JAX, the coder and a model loaded): 0.77 GB lossy and 1.35 GB residual
measured, 1.5 GiB used; at 1 Mpixel a lossless compress measured 1.68 GB
(benchmarks/results/memory_lossless.json).) So at the default cap on a 24
GiB machine (12 GiB) the largest image is about 44 Mpixel lossy (e.g.
6600x6600) and 18 Mpixel near-lossless / lossless (4300x4300) for decoding;
a whole-image lossy decode at 8192x8192 would need about 17.3 GiB.

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
margin; not yet measured above 4 Mpixel (benchmarks/memory.py is the
check). At 16384x16384 (MAX_LOSSY_PIXELS) that is about 10.9 GiB. Wider
models scale the network terms with their channel counts (`model_scale`).

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

# The codec's own size limits (codec.MAX_CODEC_PIXELS / MAX_LOSSY_PIXELS; a test checks).
MAX_CODEC_PIXELS = 2**26
MAX_LOSSY_PIXELS = 2**28
# 2.5 GiB: measured intercepts 0.77 GB lossy, 1.35 GB residual (tfc profile);
# on the default profile (jax 0.12) one process decoding several crafted files
# peaked at 2.48 GB where 1.5 GiB + slope predicted 2.09 (tests/test_hostile_inputs).
BASE_BYTES = 5 << 29
# Measured slopes (bytes per pixel) x 1.25 or more, rounded up (module doc).
PER_PIXEL = {
    ("lossy", "compress"): 250,
    ("lossy", "decompress"): 252,
    ("lossy_tiled", "decompress"): 252,  # of the tile window only (TILED_PER_PIXEL below)
    ("residual", "compress"): 520,
    ("residual", "decompress"): 600,
    ("stored", "decompress"): 8,  # container mode STORED: inflating the pixels, no network
    # Flat-base residual files: the residual coder without the lossy layer's
    # networks; bounded by the lossy-base figure (not measured on its own).
    ("flat_residual", "decompress"): 600,
    ("exact_flat_residual", "decompress"): 600,  # the same coder in exact arithmetic
}
# Whole-image arrays of a tiled lossy file, bytes per padded pixel (module doc).
TILED_PER_PIXEL = 32
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


def _tiled(mode: str, pixels: int) -> bool:
  """Whether a lossy image of this many padded pixels runs its networks in tiles."""
  return mode == "lossy_tiled" or (mode == "lossy" and pixels > tiling.TILED_ABOVE)


def estimate_peak_bytes(height: int, width: int, mode: str, operation: str,
                        scale: float = 1.0, extra_bytes: int = 0) -> int:
  """Estimated peak memory of one compress/decompress (mode: a container mode's
  lower-case name; 'lossy' above tiling.TILED_ABOVE is coded tiled)."""
  pixels = padded_pixels(height, width)
  key = ("lossy" if mode == "lossy_tiled" else mode, operation)
  if _tiled(mode, pixels):
    networks = PER_PIXEL[key] * scale * tiling.window_pixels()
    return int(BASE_BYTES + networks + TILED_PER_PIXEL * pixels + extra_bytes)
  return int(BASE_BYTES + PER_PIXEL[key] * scale * pixels + extra_bytes)


def max_fitting_pixels(cap: int, mode: str, operation: str, scale: float = 1.0) -> int:
  """The most padded pixels whose estimated peak fits in `cap` ('lossy' or 'residual')."""
  whole = max(0, int((cap - BASE_BYTES) // (PER_PIXEL[mode, operation] * scale)))
  if mode != "lossy" or whole <= tiling.TILED_ABOVE:
    return whole
  networks = PER_PIXEL[mode, operation] * scale * tiling.window_pixels()
  return max(whole, int((cap - BASE_BYTES - networks) // TILED_PER_PIXEL))


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
