"""`gvae estimate`: a workdir's estimated RD, an exported model's real vs estimated
bits, and one `gvae: error:` line (never a traceback) for every bad input."""
import json

import pytest
from PIL import Image

from codec_helpers import GOLDEN_MODEL, golden_params, make_image, tiny_config
from gvae_jax import cli
from gvae_jax import config as config_lib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  import orbax.checkpoint as ocp

  workdir = tmp_path_factory.mktemp("estimate") / "work"
  workdir.mkdir()
  (workdir / "config.json").write_text(config_lib.to_json(tiny_config()))
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  manager.save(7, args=ocp.args.StandardSave({"params": golden_params(), "step": 7}))
  manager.wait_until_finished()
  return workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp("estimate_images")
  Image.fromarray(make_image(64, 80, 1)).save(folder / "a.png")
  # A suffix the old training-time lister skipped: every lister now sees it.
  Image.fromarray(make_image(64, 80, 2)[:, :, 0]).save(folder / "b.pgm")  # one shape: one compile
  return folder


def _error(argv, capsys) -> str:
  code = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code != 0 and len(err) == 1 and err[0].startswith("gvae: error: "), err
  return err[0]


def test_estimate_of_a_workdir(workdir, images, tmp_path, capsys):
  out = tmp_path / "report.json"
  assert cli.main(["estimate", "--workdir", str(workdir), "--images", str(images),
                   "--rates", "0", "1", "--out", str(out)]) == 0
  report = json.loads(out.read_text())
  assert report["step"] == 7 and [r["rate"] for r in report["rates"]] == [0.0, 1.0]
  assert sorted({row["image"] for row in report["images"]}) == ["a.png", "b.pgm"]
  assert "| 1.00 |" in capsys.readouterr().out


def test_estimate_of_an_exported_model(images, tmp_path, capsys):
  out = tmp_path / "real.json"
  assert cli.main(["estimate", "--model", str(GOLDEN_MODEL), "--images", str(images),
                   "--rates", "0.5", "--out", str(out)]) == 0
  report = json.loads(out.read_text())
  assert [r["rate"] for r in report["rates"]] == [0.5] and len(report["images"]) == 2
  for row in report["images"]:
    assert row["file_bytes"] == row["header_bytes"] + row["z_bytes"] + row["y_bytes"]
    assert row["header_bytes"] == 55  # 47 + 4 per section
    assert row["estimate_bits"] > 0 and row["table_bits_y"] > 0
    # No coder beats the ideal code length of its tables by more than its flush
    # bytes. (Above it, escaped values add bytes: this untrained model has many.)
    assert 8 * (row["z_bytes"] + row["y_bytes"]) >= row["table_bits_y"] + row["table_bits_z"] - 32
  assert "payload vs est." in capsys.readouterr().out


def test_estimate_errors_are_one_line(workdir, images, tmp_path, capsys):
  base = ["estimate", "--workdir", str(workdir), "--images", str(images)]
  # An unknown model name was a KeyError traceback from the model registry.
  assert "unknown model 'nope'" in _error(base + ["--config.model.name=nope"], capsys)
  assert "do not match" in _error(base + ["--config.model.n=16"], capsys)
  assert "out of range" in _error(base + ["--rates", "5"], capsys)
  assert "unknown config key" in _error(base + ["--config.model.nope=1"], capsys)
  assert "not a training workdir" in _error(
      ["estimate", "--workdir", str(images), "--images", str(images)], capsys)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "no images" in _error(["estimate", "--workdir", str(workdir), "--images",
                                str(empty)], capsys)
  assert "--workdir only" in _error(["estimate", "--model", str(GOLDEN_MODEL), "--images",
                                     str(images), "--config.model.n=4"], capsys)
  assert "out of range" in _error(["estimate", "--model", str(GOLDEN_MODEL), "--images",
                                   str(images), "--rates", "1.5"], capsys)
  with pytest.raises(SystemExit):  # argparse: not a number
    cli.main(base + ["--rates", "x"])
