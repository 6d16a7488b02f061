"""Tiles for coding large images in bounded memory.

Above TILED_ABOVE padded pixels the codec runs g_a / h_a, the hyper
synthesis and g_s one tile at a time instead of on the whole image, so the
networks' activations take the memory of one tile window whatever the image
size (format mode LOSSY_TILED; gvae_jax.coding.codec). Smaller images keep
the whole-image path, so their files are unchanged.

A tile is computed on a window that extends it by a halo on every side
inside the array (never padded beyond it), and only the tile's part of the
output is kept. Each network is translation-equivariant with a finite
receptive field, and zero ("SAME") padding happens only at the array's
border in both the whole-array and the windowed computation, so with a halo
at least the receptive field the kept outputs are the whole-array outputs
mathematically. In float32 they may still differ in the last bits (another
summation order), which is why tiled files are their own mode: what decides
decoded bits, the hyper synthesis, is the same tiled function on both
sides.

The residual layer of flat-base files is tiled too, more simply
(RESIDUAL_TILE_PIXELS below).

Windows have one size per array (tile + 2 halo, or the whole axis if
shorter), shifted inward at the borders, so each network compiles once per
image size class. No JAX or NumPy import here (gvae_jax.coding.memory uses
the geometry).
"""
from __future__ import annotations

import dataclasses

# Images up to 2048 x 2048 padded pixels run whole (their bytes stay as the
# formats before tiling wrote them); larger ones in tiles of TILE_PIXELS.
TILED_ABOVE = 2048 * 2048
TILE_PIXELS = 1024  # tile side in image pixels (a multiple of the hyper latent's 64)

# Halos in each network's input units, at least its receptive-field radius:
# g_a then h_a (four stride-2 5x5 convolutions: radius 2 + 4 + 8 + 16 + ...
# = 61 px for y; then a 3x3 and two stride-2 5x5 ones, 1 + 2 + 4 = 7 y =
# 112 px more for z) -> 192 image pixels, a multiple of 64 so the windows
# keep the stride grid; h_s (two 3x3 upsampling convolutions
# and a 3x3, radius under 2 z) -> 3 z; g_s (four 3x3 upsampling
# convolutions, radius under 2 y) -> 4 y. tests/test_tiling.py checks them.
ANALYSIS_HALO_PIXELS = 192
HYPER_HALO = 3
SYNTHESIS_HALO = 4


def is_tiled(padded_height: int, padded_width: int) -> bool:
  """Whether an image of this padded size is coded in tiles (mode LOSSY_TILED)."""
  return padded_height * padded_width > TILED_ABOVE


@dataclasses.dataclass(frozen=True)
class Tile:
  """Along one axis: the window [start, start + size) computed, the tile [lo, hi) kept."""
  start: int
  size: int
  lo: int
  hi: int


def axis_tiles(length: int, tile: int, halo: int, align: int = 1) -> list[Tile]:
  """The tiles of one axis of `length` units: tiles of `tile` (the last may be
  shorter), windows of min(length, tile + 2 halo) units starting at multiples
  of `align` (tile and halo must be multiples of it, as must length)."""
  if tile <= 0 or halo < 0 or align <= 0 or tile % align or halo % align or length % align:
    raise ValueError(f"bad tiling: length {length}, tile {tile}, halo {halo}, align {align}")
  size = min(length, tile + 2 * halo)
  tiles = []
  for lo in range(0, length, tile):
    hi = min(lo + tile, length)
    start = min(max(lo - halo, 0), length - size)  # both multiples of align
    tiles.append(Tile(start, size, lo, hi))
  return tiles


# Near-lossless / lossless files on the flat base above TILED_ABOVE code their
# residual in tiles of this many pixels a side, each an independent residual
# layer (modes FLAT_RESIDUAL_TILED, EXACT_FLAT_RESIDUAL_TILED). The residual
# coder's 64x64 patches never see each other, so no halo is needed: a tile is
# a block of whole patches, and its pixels get the mixtures of the whole-image
# layer (only each tile's symbol ranges and coder streams are its own). A tile
# is at most the largest image coded whole.
RESIDUAL_TILE_PIXELS = 2048


def residual_tiles(height: int, width: int) -> list[tuple[int, int, int, int]]:
  """(top, bottom, left, right) of each residual tile of an image, in raster order."""
  step = RESIDUAL_TILE_PIXELS
  return [(top, min(top + step, height), left, min(left + step, width))
          for top in range(0, height, step) for left in range(0, width, step)]


def residual_tile_pixels() -> int:
  """Padded pixels of the largest residual tile (the memory bound)."""
  return RESIDUAL_TILE_PIXELS * RESIDUAL_TILE_PIXELS


def window_pixels(scale: float = 1.0) -> int:
  """Image pixels of the largest window any network runs on (the memory bound)."""
  side = TILE_PIXELS + 2 * ANALYSIS_HALO_PIXELS
  return int(side * side * scale)
