"""Flat-base residual files coded tile by tile (modes FLAT_RESIDUAL_TILED,
EXACT_FLAT_RESIDUAL_TILED): tile geometry, tiles that see exactly what the
whole image's layer sees, round trips, malformed tile tables, the memory bound.

The real policy tiles only images above 2048x2048 padded pixels in tiles of
2048; the tests shrink both (monkeypatched module constants) so a
few-hundred-pixel image has several tiles.
"""
import numpy as np
import pytest

from codec_helpers import (make_image, tiny_flat_model, tiny_scalable_config,
                           tiny_scalable_params)
from gvae_jax.coding import codec, container, export, memory, residual_codec, residual_layout
from gvae_jax.coding import tiling, varint
from gvae_jax.coding.container import FormatError, Mode
from gvae_jax.models import flat_base


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  out = tmp_path_factory.mktemp("model") / "scalable"
  export.export_params(tiny_scalable_config(), tiny_scalable_params(), out)
  return tiny_flat_model(export.load_model(out))


@pytest.fixture(scope="module")
def exact_model():
  from golden.regenerate_exact import GOLDEN_EXACT_MODEL
  return export.load_model(GOLDEN_EXACT_MODEL)


@pytest.fixture
def small_tiles(monkeypatch):
  """Residual tiles of 128 pixels; every image above 128x128 padded pixels tiled."""
  monkeypatch.setattr(tiling, "RESIDUAL_TILE_PIXELS", 128)
  monkeypatch.setattr(tiling, "TILED_ABOVE", 128 * 128)


@pytest.mark.parametrize("height,width,step", [(300, 460, 128), (128, 128, 128), (5, 700, 64),
                                               (4096, 4100, 2048)])
def test_residual_tiles_cover_the_image_once_in_raster_order(monkeypatch, height, width, step):
  monkeypatch.setattr(tiling, "RESIDUAL_TILE_PIXELS", step)
  covered = np.zeros((height, width), np.int32)
  tiles = tiling.residual_tiles(height, width)
  for top, bottom, left, right in tiles:
    assert top % step == 0 and left % step == 0  # whole 64x64 patches of the image's grid
    assert 0 < bottom - top <= step and 0 < right - left <= step
    covered[top:bottom, left:right] += 1
  assert np.all(covered == 1)
  assert tiles == sorted(tiles)


def test_a_tiles_tap_flags_are_the_whole_images_flags_there(model):
  """Why tiles need no halo: the coder's patches never see each other, so a tile's
  own flat base gives every pixel the prior u it has in the whole image."""
  offsets = flat_base.tap_offsets(model.flat.model.kernel_size, model.flat.model.order)
  height, width = 300, 460
  whole = flat_base.tap_availability(height, width, offsets, 320, 512)
  for top, bottom, left, right in [(0, 128, 0, 128), (128, 256, 384, 460), (256, 300, 128, 256)]:
    h, w = bottom - top, right - left
    tile = flat_base.tap_availability(h, w, offsets, -(-h // 64) * 64, -(-w // 64) * 64)
    np.testing.assert_array_equal(tile[:h, :w], whole[top:bottom, left:right])


def test_tiles_cost_the_whole_images_estimated_bits(model, small_tiles):
  """Each tile's pixels get the whole-image layer's mixtures: the model's bits add up."""
  pixels = make_image(300, 460, seed=3)
  view = codec._flat_view(model)
  base, u = codec._flat_base(model, 300, 460)
  whole = residual_codec.encode(view, codec._backend(None), pixels, base, u, 0).estimated_bits
  tiled = np.zeros(3)
  for top, bottom, left, right in tiling.residual_tiles(300, 460):
    base, u = codec._flat_base(model, bottom - top, right - left)
    tile = np.ascontiguousarray(pixels[top:bottom, left:right])
    tiled += residual_codec.encode(view, codec._backend(None), tile, base, u, 0).estimated_bits
  np.testing.assert_allclose(tiled, whole, rtol=1e-4)


@pytest.mark.parametrize("tau", [0, 2])
@pytest.mark.parametrize("which", ["float", "exact"])
def test_tiled_flat_files_round_trip_within_tau(model, exact_model, small_tiles, tau, which):
  chosen = model if which == "float" else exact_model
  pixels = make_image(200, 300, seed=tau)
  encoded = codec.encode_residual(chosen, pixels, tau)  # base "auto": flat, in tiles
  expected = Mode.FLAT_RESIDUAL_TILED if which == "float" else Mode.EXACT_FLAT_RESIDUAL_TILED
  assert encoded.header.mode == expected and encoded.data[4] == 5  # format version 5
  decoded = codec.decompress(chosen, encoded.data)
  assert np.abs(decoded.astype(int) - pixels).max() <= tau
  if tau == 0:
    np.testing.assert_array_equal(decoded, pixels)
  # Six tiles of layers and their sizes, in one side section: a few bytes more than whole.
  whole = codec.encode_flat(chosen, pixels, tau)
  assert whole.header.mode in (Mode.FLAT_RESIDUAL_TILED, Mode.EXACT_FLAT_RESIDUAL_TILED)
  assert len(whole.data) == len(encoded.data)


def test_grayscale_tiled_files_decode_to_grayscale(model, small_tiles):
  gray = make_image(150, 300, seed=5)[:, :, 1]
  data = codec.compress(model, gray, tau=0)
  assert codec.read_header(data).mode == Mode.FLAT_RESIDUAL_TILED
  np.testing.assert_array_equal(codec.decompress(model, data), gray)


def test_images_coded_whole_keep_their_mode_and_bytes(model, monkeypatch):
  pixels = make_image(200, 300, seed=1)
  before = codec.encode_flat(model, pixels, 1).data
  assert codec.read_header(before).mode == Mode.FLAT_RESIDUAL and before[4] == 2
  monkeypatch.setattr(tiling, "RESIDUAL_TILE_PIXELS", 128)  # tiles, but not above TILED_ABOVE
  assert codec.encode_flat(model, pixels, 1).data == before


def _tiled_file(model, monkeypatch, tau=1):
  with monkeypatch.context() as patch:
    patch.setattr(tiling, "RESIDUAL_TILE_PIXELS", 128)
    patch.setattr(tiling, "TILED_ABOVE", 128 * 128)
    return codec.encode_flat(model, make_image(200, 300, seed=2), tau).data


def test_a_tiled_header_for_an_image_coded_whole_is_refused(model, monkeypatch):
  data = _tiled_file(model, monkeypatch)
  with pytest.raises(FormatError, match="coded whole"):
    codec.decode(model, data)


def _repacked(data: bytes, side: bytes, streams: bytes | None = None) -> bytes:
  header, sections = container.unpack(data)
  return container.pack(header, [side, sections[1] if streams is None else streams,
                                 sections[2]])


def test_malformed_tile_tables_are_format_errors(model, monkeypatch, small_tiles):
  data = _tiled_file(model, monkeypatch)
  _, (side, streams, _) = container.unpack(data)
  tiles = len(tiling.residual_tiles(200, 300))
  parts = residual_layout.split_tiled_side_info(side, tiles, len(streams))
  assert len(parts) == tiles and parts[-1][2] == len(streams)
  table = []
  for part in parts:
    table += [len(part[0]), part[2] - part[1]]
  body = b"".join(part[0] for part in parts)
  bad_tables = {
      "side information declared": table[:1] + [table[1]] + [table[2] + 1] + table[3:],
      "streams declared": table[:1] + [table[1] + 1] + table[2:],
  }
  for message, bad in bad_tables.items():
    with pytest.raises(FormatError, match=message):
      codec.decode(model, _repacked(data, varint.encode(bad) + body))
  with pytest.raises(FormatError, match="tiled residual side information"):
    codec.decode(model, _repacked(data, side[:3]))  # the table itself cut short
  # A tile's streams moved to another tile: sizes add up, the tiles' layers do not.
  swapped = table[:1] + [table[3]] + table[2:3] + [table[1]] + table[4:]
  with pytest.raises((FormatError, codec.CodingError)):
    codec.decode(model, _repacked(data, varint.encode(swapped) + body))


def test_tiled_flat_modes_need_format_version_5():
  for mode in container.TILED_FLAT_MODES:
    header = container.Header(fingerprint=bytes(16), mode=mode, rate=0.0, tau=0,
                              height=4096, width=4096, channels=3, coder_id=1)
    data = bytearray(container.pack(header, [b"", b"", bytes(4)]))
    assert data[4] == 5
    data[4] = 4
    with pytest.raises(FormatError):
      container.unpack(bytes(data))


def test_the_tiled_residual_memory_bound_grows_only_with_the_whole_image_arrays():
  side = 16384
  for mode in memory.TILED_RESIDUAL_MODES:
    for operation in ("compress", "decompress"):
      need = memory.estimate_peak_bytes(side, side, mode, operation)
      assert need < 12 << 30  # the default cap on a 24 GiB machine
      tile = memory.PER_PIXEL[mode, operation] * tiling.residual_tile_pixels()
      assert need == memory.BASE_BYTES + tile + memory.TILED_RESIDUAL_PER_PIXEL * side * side
  for cap in (8 << 30, 12 << 30):
    fitting = memory.max_fitting_pixels(cap, "exact_flat_residual_tiled", "compress")
    side = int(fitting ** 0.5) // 64 * 64
    assert side > 8192  # beyond the whole-image residual limit
    assert memory.estimate_peak_bytes(side, side, "exact_flat_residual_tiled", "compress") <= cap
    bigger = side + 256
    assert memory.estimate_peak_bytes(bigger, bigger, "exact_flat_residual_tiled",
                                      "compress") > cap
  # A cap below one tile's needs: only what fits whole.
  assert memory.max_fitting_pixels(3 << 30, "exact_flat_residual_tiled", "compress") == (
      memory.max_fitting_pixels(3 << 30, "residual", "compress"))


@pytest.mark.parametrize("results", ["memory_lossless.json", "memory_lossy_tiled.json"])
def test_the_committed_memory_measurements_are_within_todays_bound(results):
  """benchmarks/memory.py's peaks (whole processes) never exceed the estimate the
  memory module gives today for the mode the shipped models write at that size."""
  import json
  from codec_helpers import REPO

  rows = json.loads((REPO / "benchmarks" / "results" / results).read_text())["rows"]
  for row in rows:
    side = row["side"]
    tiled = side * side > tiling.TILED_ABOVE
    mode = ("lossy" if row["mode"] == "lossy" else
            "exact_flat_residual_tiled" if tiled else "residual")
    for operation in ("compress", "decompress"):
      measured = row[operation]["peak_bytes"]
      assert measured <= memory.estimate_peak_bytes(side, side, mode, operation), (
          side, operation)


def test_the_chunked_estimate_is_the_one_pass_estimate(model, monkeypatch):
  """estimate_bits runs the patches in chunks (bounded memory): any chunk size,
  one that does not divide the patch count too, gives the same bits."""
  pixels = make_image(200, 300, seed=4)  # 4 x 5 = 20 patches
  base, u = codec._flat_base(model, 200, 300)
  view = codec._flat_view(model)
  results = []
  for chunk in (1000, 7, 1):
    monkeypatch.setattr(residual_codec, "ESTIMATE_CHUNK_PATCHES", chunk)
    results.append(residual_codec.estimate_bits(view, pixels, base, u, 1))
  for other in results[1:]:
    np.testing.assert_allclose(other, results[0], rtol=1e-5)
  assert np.all(results[0] > 0)
