"""The residual layer's side information: its byte layout, written and parsed here.

Sections (inside a residual .gvae file; gvae_jax.coding.container):
  side information: LEB128 varints: for R, G, B: zigzag(min q), max q - min q,
                    W / 16 (0 for a single-value range); then the byte length
                    of every stream; then every escaped value (its index
                    q - min q), in coding order
  streams:          the streams (range-coder bytes only) back to back

Tiled files (modes FLAT_RESIDUAL_TILED, EXACT_FLAT_RESIDUAL_TILED) hold one
such layer per tile (gvae_jax.coding.tiling.residual_tiles, raster order),
in the same two sections:
  side information: LEB128 varints: for every tile, the byte length of its
                    side information and of its streams; then every tile's
                    side information (the layout above), back to back
  streams:          every tile's streams, back to back

Stream lengths: one per coder call for a coder with a stream per call (TFC),
one for the whole layer for a one-stream coder (constriction), none if no
channel is coded (gvae_jax.coding.coder, sessions).
"""
from __future__ import annotations

import numpy as np

from gvae_jax.coding import varint
from gvae_jax.coding.container import FormatError
from gvae_jax.coding.residual_plan import (CHANNELS, WINDOW_STEP, WINDOWS, StepPlan, max_symbol,
                                           streams_per_channel, window_size)

_SIDE_FIELDS = 3  # per channel: min, range, window


def parse_side_info(side: bytes, plan: StepPlan, tau: int, streams_size: int,
                    one_stream: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], np.ndarray]:
  """(q_low, q_high, windows, stream lengths, escaped values), checked (FormatError).

  one_stream: the coder puts every coder call into one stream (EntropyCoder.ONE_STREAM).
  """
  try:
    values = varint.decode(side).tolist()
  except varint.VarintError as e:
    raise FormatError(f"invalid residual side information: {e}") from None
  if len(values) < _SIDE_FIELDS * CHANNELS:
    raise FormatError("invalid residual side information: symbol ranges missing")
  fields = np.asarray(values[:_SIDE_FIELDS * CHANNELS], object).reshape(CHANNELS, _SIDE_FIELDS)
  q_low = varint.unzigzag(fields[:, 0].astype(np.int64))
  q_high = q_low + np.asarray(fields[:, 1], np.int64)
  windows = np.asarray(fields[:, 2], np.int64) * WINDOW_STEP
  limit = max_symbol(tau)
  if np.any(q_low < -limit) or np.any(q_high > limit):
    raise FormatError(f"invalid residual side information: symbol range "
                      f"{q_low.tolist()} .. {q_high.tolist()} exceeds +-{limit} for tau {tau}")
  counts = q_high - q_low + 1
  for count, window in zip(counts, windows):
    valid = (window == 0 if count == 1
             else window in WINDOWS and window <= window_size(int(count)))
    if not valid:
      raise FormatError(f"invalid residual side information: window {window} for a range of "
                        f"{count} values")
  first = _SIDE_FIELDS * CHANNELS
  calls = len(plan.steps) * sum(streams_per_channel(int(w))
                                for count, w in zip(counts, windows) if count > 1)
  expected = min(calls, 1) if one_stream else calls
  lengths = values[first:first + expected]
  if len(lengths) != expected:
    raise FormatError(f"invalid residual side information: {len(lengths)} stream lengths, "
                      f"{expected} streams expected")
  if sum(lengths) != streams_size:
    raise FormatError(f"invalid residual side information: streams of {sum(lengths)} bytes "
                      f"declared, {streams_size} present")
  # Escaped values are indexes into the range; garbage must not overflow int64 later.
  escaped = np.asarray(values[first + expected:], np.int64)
  return q_low.astype(np.int32), q_high.astype(np.int32), windows, lengths, escaped



def write_side_info(q_low: np.ndarray, counts: np.ndarray, windows: np.ndarray,
                    lengths, escaped: np.ndarray) -> bytes:
  """The side information of a layer (module doc); `parse_side_info` reads it."""
  fields = np.stack([varint.zigzag(q_low), counts - 1, windows // WINDOW_STEP], axis=1)
  return varint.encode(np.concatenate([fields.ravel(), np.asarray(lengths, np.int64), escaped]))


def write_tiled_side_info(sides: list[bytes], stream_sizes: list[int]) -> bytes:
  """The side information section of a tiled layer (module doc)."""
  sizes = np.stack([[len(side) for side in sides], stream_sizes], axis=1).ravel()
  return varint.encode(sizes) + b"".join(sides)


def split_tiled_side_info(section: bytes, tiles: int, streams_size: int
                          ) -> list[tuple[bytes, int, int]]:
  """(side information, streams start, streams end) of each of `tiles` tiles,
  the sizes checked against the sections (FormatError)."""
  sizes, pos = [], 0
  try:
    for _ in range(2 * tiles):
      value, pos = varint.read_one(section, pos)
      sizes.append(value)
  except varint.VarintError as e:
    raise FormatError(f"invalid tiled residual side information: {e}") from None
  side_sizes, stream_sizes = sizes[0::2], sizes[1::2]
  if pos + sum(side_sizes) != len(section):
    raise FormatError(f"invalid tiled residual side information: {sum(side_sizes)} bytes "
                      f"of tile side information declared, {len(section) - pos} present")
  if sum(stream_sizes) != streams_size:
    raise FormatError(f"invalid tiled residual side information: {sum(stream_sizes)} bytes "
                      f"of tile streams declared, {streams_size} present")
  parts, stream_pos = [], 0
  for side_size, stream_size in zip(side_sizes, stream_sizes):
    parts.append((section[pos:pos + side_size], stream_pos, stream_pos + stream_size))
    pos += side_size
    stream_pos += stream_size
  return parts
