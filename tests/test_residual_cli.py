"""`gvae compress --tau / --lossless`, decompress and info on residual files, as a user runs them."""
import numpy as np
import pytest
from PIL import Image

from codec_helpers import GOLDEN_MODEL, make_image, tiny_scalable_config, tiny_scalable_params
from gvae_jax.coding import codec, export
from test_codec_cli import assert_fails, assert_ok, gvae


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  folder = tmp_path_factory.mktemp("residual_cli")
  Image.fromarray(make_image(40, 70, 1)).save(folder / "rgb.png")
  Image.fromarray(make_image(21, 13, 2)[:, :, 0]).save(folder / "gray.png")
  export.export_params(tiny_scalable_config(), tiny_scalable_params(), folder / "scalable")
  return folder


def test_near_lossless_and_lossless_round_trips(work):
  model = export.load_model(work / "scalable")
  original = np.asarray(Image.open(work / "rgb.png"))
  out = assert_ok(gvae("compress", "rgb.png", "t2.gvae", "--model", "scalable", "--tau", 2,
                       "--rate", 0.5, cwd=work))
  assert "tau 2 (near-lossless)" in out and "rate 0.5" in out
  info = assert_ok(gvae("info", "t2.gvae", cwd=work))
  assert "residual" in info and "2 (every decoded value within tau" in info
  assert "residual streams" in info
  out = assert_ok(gvae("decompress", "t2.gvae", "t2.png", "--model", "scalable", cwd=work))
  assert "70x40 RGB" in out and "tau 2" in out
  decoded = np.asarray(Image.open(work / "t2.png"))
  assert np.abs(decoded.astype(np.int32) - original).max() <= 2
  np.testing.assert_array_equal(decoded, codec.decompress(model, (work / "t2.gvae").read_bytes()))

  # --lossless without --rate: the base rate of the smallest file, bit-exact output.
  out = assert_ok(gvae("compress", "gray.png", "l.gvae", "--model", "scalable", "--lossless",
                       cwd=work))
  assert "lossless" in out
  data = (work / "l.gvae").read_bytes()
  gray = np.asarray(Image.open(work / "gray.png"))
  assert codec.read_header(data).rate == codec.choose_rate(model, gray, 0)
  assert_ok(gvae("decompress", "l.gvae", "l.png", "--model", "scalable", cwd=work))
  image = Image.open(work / "l.png")
  assert image.mode == "L"
  np.testing.assert_array_equal(np.asarray(image), gray)


def test_bad_tau_and_arguments(work):
  for tau, message in [("-1", "must be >= 0"), ("1.5", "whole number"), ("abc", "whole number"),
                       ("70000", "too large")]:
    assert_fails(gvae("compress", "rgb.png", "x.gvae", "--model", "scalable", "--tau", tau,
                      cwd=work), message)
  assert_fails(gvae("compress", "rgb.png", "x.gvae", "--model", GOLDEN_MODEL, "--tau", 1,
                    "--rate", 0, cwd=work), "lossy-only")
  assert_fails(gvae("compress", "rgb.png", "x.gvae", "--model", "scalable", "--tau", 1,
                    "--bpp", 2, cwd=work), "--bpp is for lossy files")
  assert_fails(gvae("compress", "rgb.png", "x.gvae", "--model", "scalable", "--tau", 1,
                    "--lossless", cwd=work), "--lossless is --tau 0")
  assert_fails(gvae("compress", "rgb.png", "x.gvae", "--model", "scalable", cwd=work),
               "give --rate or --bpp")
  assert not (work / "x.gvae").exists()
