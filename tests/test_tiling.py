"""Tiled lossy coding (gvae_jax.coding.tiling, mode LOSSY_TILED): the tile geometry,
tiled networks equal to whole-image ones, round trips, and the memory bound.

The real policy tiles only images above 2048x2048; the tests shrink the tiles
(monkeypatched module constants) so a few-hundred-pixel image has many tiles,
with the real halos.
"""
import numpy as np
import pytest
import jax.numpy as jnp

from codec_helpers import golden_params, make_image, tiny_config
from gvae_jax.coding import codec, container, export, memory, tiling
from gvae_jax.coding.container import FormatError, Mode


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = tmp_path_factory.mktemp("model") / "tiny"
  export.export_params(tiny_config(), golden_params(), out)
  return export.load_model(out)


@pytest.fixture
def small_tiles(monkeypatch):
  """Tiles of 128 image pixels, every image tiled."""
  monkeypatch.setattr(tiling, "TILE_PIXELS", 128)
  monkeypatch.setattr(tiling, "TILED_ABOVE", 0)


@pytest.mark.parametrize("length,tile,halo,align", [
    (64, 128, 128, 64), (640, 128, 128, 64), (10, 2, 3, 1), (7, 3, 0, 1), (33, 8, 4, 1)])
def test_axis_tiles_cover_the_axis_with_windows_inside_it(length, tile, halo, align):
  tiles = tiling.axis_tiles(length, tile, halo, align)
  assert tiles[0].lo == 0 and tiles[-1].hi == length
  assert all(a.hi == b.lo for a, b in zip(tiles, tiles[1:]))  # disjoint, no gap
  size = min(length, tile + 2 * halo)
  for t in tiles:
    assert t.size == size and 0 <= t.start and t.start + t.size <= length
    assert t.start % align == 0
    # The window holds the tile and `halo` units on each side, or up to the border.
    assert t.start <= max(t.lo - halo, 0) and t.start + t.size >= min(t.hi + halo, length)


@pytest.mark.parametrize("args", [(64, 0, 1, 1), (64, 96, 32, 64), (65, 64, 64, 64), (8, 2, -1, 1)])
def test_axis_tiles_refuse_a_bad_grid(args):
  with pytest.raises(ValueError):
    tiling.axis_tiles(*args)


def _stages(model, pixels, rate):
  s = jnp.full((1,), np.float32(rate), jnp.float32)
  lossy, params = model.lossy_model, model.lossy_params
  x_padded, _ = codec.pad_to_multiple(jnp.asarray(pixels)[None], int(lossy.stride))
  y, z = codec.analyze(lossy, params, x_padded, s)
  return s, x_padded, np.asarray(y), np.asarray(z)


def test_tiled_networks_give_the_whole_image_values(tiny, small_tiles):
  height, width = 300, 460  # padded 320x512: 3x4 tiles of 128 pixels
  pixels = make_image(height, width, seed=3)
  s, x_padded, y, z = _stages(tiny, pixels, 0.7)
  lossy, params = tiny.lossy_model, tiny.lossy_params
  y_tiled, z_tiled = codec._analyze_tiled(lossy, params, np.asarray(x_padded), s)
  np.testing.assert_allclose(y_tiled, y, rtol=1e-4, atol=1e-4)
  assert np.mean(z_tiled == z) > 0.999  # rounding may flip a value sitting on .5
  mean, index = codec.hyper(lossy, params, jnp.asarray(z), s, tiny.y_index_bounds)
  mean_tiled, index_tiled = codec.hyper_tiled(lossy, params, z, s, tiny.y_index_bounds)
  np.testing.assert_allclose(mean_tiled, np.asarray(mean), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(index_tiled, np.asarray(index))
  y_sym = np.asarray(codec.quantize_y(jnp.asarray(y), mean))
  whole, _ = codec.synthesize_image(tiny, y_sym, mean, s, height, width)
  tiled = codec._synthesize_tiled(tiny, y_sym, np.asarray(mean), s, height, width)
  assert np.abs(whole.astype(int) - tiled).max() <= 1 and np.mean(whole == tiled) > 0.999


def test_halos_smaller_than_the_receptive_field_change_the_values(tiny, small_tiles, monkeypatch):
  """Guards the test above: without halos, the tiles' seams show."""
  monkeypatch.setattr(tiling, "HYPER_HALO", 0)
  monkeypatch.setattr(tiling, "SYNTHESIS_HALO", 0)
  pixels = make_image(300, 460, seed=3)
  s, _, y, z = _stages(tiny, pixels, 0.7)
  lossy, params = tiny.lossy_model, tiny.lossy_params
  mean, _ = codec.hyper(lossy, params, jnp.asarray(z), s, tiny.y_index_bounds)
  mean_tiled, _ = codec.hyper_tiled(lossy, params, z, s, tiny.y_index_bounds)
  assert np.abs(mean_tiled - np.asarray(mean)).max() > 1e-3
  y_sym = np.asarray(codec.quantize_y(jnp.asarray(y), mean))
  whole, _ = codec.synthesize_image(tiny, y_sym, mean, s, 300, 460)
  tiled = codec._synthesize_tiled(tiny, y_sym, np.asarray(mean), s, 300, 460)
  assert np.abs(whole.astype(int) - tiled).max() > 1


@pytest.mark.parametrize("height,width,rate", [(300, 460, 0.7), (130, 70, 1.0), (257, 129, 0.0)])
def test_tiled_files_round_trip_bit_exactly(tiny, small_tiles, height, width, rate):
  pixels = make_image(height, width, seed=height)
  encoded = codec.encode(tiny, pixels, rate)
  header = codec.read_header(encoded.data)
  assert header.mode == Mode.LOSSY_TILED and encoded.data[4] == 4  # format version 4
  decoded = codec.decode(tiny, encoded.data)
  np.testing.assert_array_equal(decoded.y_symbols, encoded.y_symbols)
  np.testing.assert_array_equal(decoded.pixels, codec.reconstruct(tiny, encoded))
  # Near the whole-image codec's pixels (same model, other summation order).
  whole = codec.synthesize_image(tiny, encoded.y_symbols, encoded.mean,
                                 jnp.full((1,), np.float32(rate)), height, width)[0]
  assert np.abs(whole.astype(int) - decoded.pixels).max() <= 1


def test_a_tiled_header_for_an_image_coded_whole_is_refused(tiny, monkeypatch):
  with monkeypatch.context() as patch:
    patch.setattr(tiling, "TILE_PIXELS", 128)
    patch.setattr(tiling, "TILED_ABOVE", 0)
    data = codec.encode(tiny, make_image(100, 120), 0.5).data
  assert codec.read_header(codec.encode(tiny, make_image(100, 120), 0.5).data).mode == Mode.LOSSY
  with pytest.raises(FormatError, match="coded whole"):
    codec.decode(tiny, data)


def test_tiled_mode_needs_format_version_4():
  header = container.Header(fingerprint=bytes(16), mode=Mode.LOSSY_TILED, rate=0.5, tau=0,
                            height=4096, width=4096, channels=3, coder_id=1)
  data = bytearray(container.pack(header, [b"", b""]))
  assert data[4] == 4
  data[4] = 3
  with pytest.raises(FormatError):
    container.unpack(bytes(data))


def test_the_tiled_memory_bound_grows_only_with_the_whole_image_arrays():
  assert memory.MAX_TILED_PIXELS == codec.MAX_TILED_PIXELS
  side = 16384
  need = memory.estimate_peak_bytes(side, side, "lossy", "decompress")
  assert need == memory.estimate_peak_bytes(side, side, "lossy_tiled", "decompress")
  assert need < 12 << 30  # the default cap on a 24 GiB machine
  whole_slope = memory.PER_PIXEL["lossy", "decompress"]
  assert need < memory.BASE_BYTES + whole_slope * side * side / 4
  # Below the threshold the whole-image line is unchanged.
  assert memory.estimate_peak_bytes(1024, 1024, "lossy", "compress") == (
      memory.BASE_BYTES + memory.PER_PIXEL["lossy", "compress"] * 1024 * 1024)
  for cap in (3 << 30, 6 << 30, 12 << 30):
    fitting = memory.max_fitting_pixels(cap, "lossy", "compress")
    side = int(fitting ** 0.5) // 64 * 64
    assert memory.estimate_peak_bytes(side, side, "lossy", "compress") <= cap
    bigger = side + 256
    assert memory.estimate_peak_bytes(bigger, bigger, "lossy", "compress") > cap
