"""The export / compress / decompress / info commands, run as a user runs them."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codec_helpers import (GOLDEN_MODEL, assert_tables_match, golden_params, make_image,
                           other_params, tiny_config)
from gvae_jax.coding import codec, export

MODEL = str(GOLDEN_MODEL)


def gvae(*args, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run([sys.executable, "-m", "gvae_jax", *map(str, args)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def assert_fails(result, message):
  assert result.returncode != 0, result.stdout
  assert "gvae: error:" in result.stderr and "Traceback" not in result.stderr, result.stderr
  assert message in result.stderr, result.stderr


def assert_ok(result):
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
  return result.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  folder = tmp_path_factory.mktemp("cli")
  Image.fromarray(make_image(70, 90, 1)).save(folder / "rgb.png")
  Image.fromarray(make_image(30, 20, 2)[:, :, 0]).save(folder / "gray.png")
  Image.fromarray(np.zeros((5, 5, 4), np.uint8)).save(folder / "rgba.png")
  return folder


@pytest.fixture(scope="module")
def model():
  return export.load_model(GOLDEN_MODEL)


def test_round_trip_info_and_force(work, model):
  out = assert_ok(gvae("compress", "rgb.png", "a.gvae", "--model", MODEL, "--rate", 0.5, cwd=work))
  data = (work / "a.gvae").read_bytes()
  assert f"{len(data)} bytes" in out and "bpp" in out and "rate 0.5" in out

  info = assert_ok(gvae("info", "a.gvae", cwd=work))
  assert "rate s:" in info and "90x70" in info and model.fingerprint.hex() in info

  out = assert_ok(gvae("decompress", "a.gvae", "a.png", "--model", MODEL, cwd=work))
  assert "90x70 RGB" in out
  decoded = np.asarray(Image.open(work / "a.png"))
  # Another process decoded exactly what this one decodes.
  np.testing.assert_array_equal(decoded, codec.decompress(model, data))

  # Existing outputs are never overwritten without --force, and stay as they were.
  assert_fails(gvae("compress", "rgb.png", "a.gvae", "--model", MODEL, "--rate", 1, cwd=work),
               "--force")
  assert_fails(gvae("decompress", "a.gvae", "a.png", "--model", MODEL, cwd=work), "--force")
  assert (work / "a.gvae").read_bytes() == data
  assert_ok(gvae("compress", "rgb.png", "a.gvae", "--model", MODEL, "--rate", 1, "--force",
                 cwd=work))
  assert codec.read_header((work / "a.gvae").read_bytes()).rate == 1.0

  # A failed run with --force leaves the existing output untouched.
  replaced = (work / "a.gvae").read_bytes()
  assert_fails(gvae("compress", "rgb.png", "a.gvae", "--model", MODEL, "--rate", 1.5, "--force",
                    cwd=work), "out of range")
  assert (work / "a.gvae").read_bytes() == replaced
  (work / "bad.gvae").write_bytes(replaced[:-3])
  png = (work / "a.png").read_bytes()
  assert_fails(gvae("decompress", "bad.gvae", "a.png", "--model", MODEL, "--force", cwd=work),
               "truncated")
  assert (work / "a.png").read_bytes() == png
  assert not [p.name for p in work.iterdir() if p.name.startswith(".")]  # no temp files


def test_bpp_target_and_grayscale(work, model):
  gray = np.asarray(Image.open(work / "gray.png"))
  sizes = [len(codec.compress(model, gray, rate)) for rate in (0.0, 1.0)]
  target = 8 * sum(sizes) / 2 / gray.size  # between the sizes at s = 0 and s = 1
  out = assert_ok(gvae("compress", "gray.png", "g.gvae", "--model", MODEL, "--bpp", target,
                       cwd=work))
  data = (work / "g.gvae").read_bytes()
  header = codec.read_header(data)
  assert 8 * len(data) / gray.size <= target and 0 < header.rate < 1 and header.channels == 1
  assert "grayscale" in out
  assert_ok(gvae("decompress", "g.gvae", "g.png", "--model", MODEL, cwd=work))
  image = Image.open(work / "g.png")
  assert image.mode == "L" and image.size == (20, 30)
  assert_fails(gvae("compress", "gray.png", "tiny.gvae", "--model", MODEL, "--bpp", 0.01,
                    cwd=work), "cannot reach")
  assert not (work / "tiny.gvae").exists()


def test_bad_gvae_files(work):
  data = codec.compress(export.load_model(GOLDEN_MODEL), make_image(8, 8), 0.0)
  cases = {"empty.gvae": (b"", "empty"), "short.gvae": (data[:30], "truncated"),
           "foreign.gvae": (b"\x89PNG\r\n\x1a\n" + bytes(60), "not a .gvae file"),
           "flipped.gvae": (data[:-5] + bytes([data[-5] ^ 4]) + data[-4:], "checksum")}
  for name, (content, message) in cases.items():
    (work / name).write_bytes(content)
    assert_fails(gvae("decompress", name, name + ".png", "--model", MODEL, cwd=work), message)
    assert_fails(gvae("info", name, cwd=work), message)
    assert not (work / (name + ".png")).exists()
  assert_fails(gvae("info", "missing.gvae", cwd=work), "no such file")


def test_model_problems(work, tmp_path):
  other = tmp_path / "other_model"
  export.export_params(tiny_config(), other_params(golden_params()), other)
  data = codec.compress(export.load_model(GOLDEN_MODEL), make_image(8, 8), 0.0)
  (work / "mine.gvae").write_bytes(data)
  assert_fails(gvae("decompress", "mine.gvae", "x.png", "--model", other, cwd=work),
               "made by a different model")
  assert_fails(gvae("decompress", "mine.gvae", "x.png", "--model", tmp_path / "nope", cwd=work),
               "model directory not found")
  assert_fails(gvae("compress", "rgb.png", "x.gvae", "--model", tmp_path, "--rate", 0, cwd=work),
               "not an exported model")
  assert not (work / "x.png").exists() and not (work / "x.gvae").exists()


def test_bad_images_and_arguments(work):
  assert_fails(gvae("compress", "rgba.png", "r.gvae", "--model", MODEL, "--rate", 0, cwd=work),
               "alpha")
  assert_fails(gvae("compress", "missing.png", "r.gvae", "--model", MODEL, "--rate", 0,
                    cwd=work), "no such file")
  assert_fails(gvae("compress", "rgb.png", "r.gvae", "--model", MODEL, "--rate", "nan",
                    cwd=work), "out of range")
  assert not (work / "r.gvae").exists()
  # argparse's own usage error: both targets at once.
  result = gvae("compress", "rgb.png", "r.gvae", "--model", MODEL, "--rate", 0, "--bpp", 1,
                cwd=work)
  assert result.returncode != 0 and "not allowed with" in result.stderr


def test_export_command(tmp_path):
  import orbax.checkpoint as ocp

  assert_fails(gvae("export", "--workdir", "missing", "--out", "m", cwd=tmp_path), "not found")
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  # The golden model's own config: the export must then reproduce its tables and
  # fingerprint (where the golden model was exported; codec_helpers.exported_here).
  (workdir / "config.json").write_text((GOLDEN_MODEL / "config.json").read_text())
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  manager.save(3, args=ocp.args.StandardSave({"params": golden_params(), "step": 3}))
  manager.wait_until_finished()
  out = assert_ok(gvae("export", "--workdir", workdir, "--out", "m", cwd=tmp_path))
  assert "step 3" in out
  assert_tables_match(export.load_model(GOLDEN_MODEL), export.load_model(tmp_path / "m"))
  assert_fails(gvae("export", "--workdir", workdir, "--out", "m", cwd=tmp_path), "--force")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "workdir"]


# --- Files of a coder backend this profile lacks (README, Install profiles). ---

def gvae_without(module: str, *args, cwd):
  """The CLI in a process where `module` cannot be imported, as in a profile without it."""
  code = (f"import sys; sys.modules[{module!r}] = None\n"
          "from gvae_jax.cli import main\nsys.exit(main(sys.argv[1:]))")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("coder,missing,hint", [
    ("tfc", "tensorflow_compression_ops", "constraints-tfc.txt"),
    ("constriction", "constriction", "pip install constriction"),
])
def test_a_file_of_a_missing_backend_gives_one_line_naming_the_profile(tmp_path, coder, missing,
                                                                       hint):
  from golden.regenerate import files_dir
  golden = files_dir(coder) / "gradient_48x80_s0.gvae"
  result = gvae_without(missing, "decompress", golden, tmp_path / "out.png", "--model", MODEL,
                        cwd=tmp_path)
  assert_fails(result, f"entropy coder {1 if coder == 'tfc' else 2} is not installed")
  assert hint in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not (tmp_path / "out.png").exists()
  # Asking to write with it fails the same way, before any work.
  Image.fromarray(make_image(8, 8, 1)).save(tmp_path / "x.png")
  result = gvae_without(missing, "compress", "x.png", "x.gvae", "--model", MODEL, "--rate", 0.5,
                        "--coder", coder, cwd=tmp_path)
  assert_fails(result, "is not installed")
  assert not (tmp_path / "x.gvae").exists()


@pytest.mark.parametrize("coder", ["constriction", "tfc"])
def test_compress_with_each_installed_coder_and_info_names_it(work, coder):
  from gvae_jax.coding.coder import CODER_NAMES, CodingError, get_coder
  try:
    get_coder(CODER_NAMES[coder])
  except CodingError:
    pytest.skip(f"the {coder} coder is not installed in this profile")
  name = f"with_{coder}.gvae"
  assert_ok(gvae("compress", "rgb.png", name, "--model", MODEL, "--rate", 0.5, "--coder", coder,
                 cwd=work))
  info = assert_ok(gvae("info", name, cwd=work))
  assert f"coder id:          {CODER_NAMES[coder]} ({coder})" in info
  assert_ok(gvae("decompress", name, f"{name}.png", "--model", MODEL, cwd=work))
