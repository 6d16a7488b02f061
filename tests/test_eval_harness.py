"""`gvae eval` (gvae_jax/eval/harness.py, plots.py): real files, outputs, overrides, errors.

Tiny generated images and the tiny golden lossy model / tiny scalable model
keep this file at well under a minute; anchors are PNG, JPEG and JPEG-LS only.
"""
import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codec_helpers import GOLDEN_MODEL, make_image, tiny_scalable_config, tiny_scalable_params
from gvae_jax import cli
from gvae_jax.coding import codec, export
from gvae_jax.eval import anchors, harness, rd

RATES = [0.0, 0.5, 1.0]
JPEG = dataclasses.replace(anchors.jpeg(), settings=(20, 50, 90))
OUTPUT_FILES = ("results.json", "results.csv", "summary.md", "psnr_bpp.png", "msssim_bpp.png",
                "bpsp_tau.png")


def strict_json(path):
  def refuse(constant):
    raise AssertionError(f"non-standard JSON constant {constant} in {path}")
  return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Two 48x40 RGB images, a grayscale one, and two files image_io refuses."""
  folder = tmp_path_factory.mktemp("images")
  Image.fromarray(make_image(40, 48, 1)).save(folder / "a.png")
  Image.fromarray(make_image(40, 48, 2)).save(folder / "b.png")
  Image.fromarray(make_image(40, 48, 3)[:, :, 1]).save(folder / "c_gray.png")
  Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(folder / "d_alpha.png")
  (folder / "e_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  (folder / "notes.txt").write_text("not an image, not listed")
  return folder


@pytest.fixture(scope="module")
def lossy_run(images, tmp_path_factory):
  out = tmp_path_factory.mktemp("lossy_out")
  results = harness.evaluate(GOLDEN_MODEL, images, RATES, anchors=["png", JPEG], warmup=False,
                             command="pytest lossy")
  harness.write_outputs(results, out)
  return results, out


def test_outputs_and_json_fields(lossy_run, images):
  results, out = lossy_run
  for name in OUTPUT_FILES:
    assert (out / name).stat().st_size > 0, name
  for name in OUTPUT_FILES[3:]:
    assert Image.open(out / name).format == "PNG"
  data = strict_json(out / "results.json")
  model = export.load_model(GOLDEN_MODEL)
  assert data["model"]["fingerprint"] == model.fingerprint.hex()
  assert data["model"]["dir"] == str(GOLDEN_MODEL) and data["overrides"] == {}
  assert data["images"]["folder"] == str(images) and data["command"] == "pytest lossy"
  assert data["versions"]["jax"] and data["versions"]["imagecodecs"] and data["timestamp"]
  assert [i["image"] for i in data["images"]["evaluated"]] == ["a.png", "b.png", "c_gray.png"]
  skipped = {s["image"]: s["reason"] for s in data["images"]["skipped"]}
  assert set(skipped) == {"d_alpha.png", "e_broken.png"} and "alpha" in skipped["d_alpha.png"]
  assert data["settings"]["rates"] == RATES and data["settings"]["taus"] == []
  assert data["failures"] == []
  # One row per (codec, setting, image); the same rows in the CSV.
  keys = [(r["codec"], r["setting"], r["image"]) for r in data["rows"]]
  assert len(keys) == len(set(keys)) == 3 * (len(RATES) + 1 + 3)
  with open(out / "results.csv", newline="") as f:
    csv_rows = list(csv.DictReader(f))
  assert [(r["codec"], r["image"]) for r in csv_rows] == [(k[0], k[2]) for k in keys]
  # Means per setting: mean of per-image values, PSNR of the mean MSE too.
  means = {(m["codec"], m["setting"]): m for m in data["means"]}
  for rate in RATES:
    rows = [r for r in data["rows"] if r["codec"] == "gvae" and r["setting"] == rate]
    mean = means[("gvae", rate)]
    assert mean["images"] == 3 and mean["mode"] == "lossy"
    assert mean["bpp"] == pytest.approx(np.mean([r["bpp"] for r in rows]))
    assert mean["psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows]))
    assert mean["psnr_of_mean_mse"] == pytest.approx(
        10 * np.log10(255**2 / np.mean([r["mse"] for r in rows])))
    assert mean["ms_ssim"] is None  # 48x40 is below MS-SSIM's 161 pixels
    assert mean["estimated_bits"] > 0 and "file_vs_estimate_percent" in mean
    assert mean["coded_estimated_bits"] == pytest.approx(
        np.mean([r["coded_estimated_bits"] for r in rows]))
    assert mean["file_vs_coded_estimate_percent"] == pytest.approx(
        100 * (8 * mean["bytes"] / mean["coded_estimated_bits"] - 1))
    # The coded estimate differs from the likelihood one (floor and escapes), and
    # the y and z sections are within 10 % of it (the 55-byte header aside).
    assert all(r["coded_estimated_bits"] != r["estimated_bits"] for r in rows)
    for r in rows:
      assert abs(r["lossy_bits"] / r["coded_estimated_bits"] - 1) < 0.10, r
  assert "MS-SSIM is undefined" in data["notes"][0]
  assert means[("png", None)]["max_error"] == 0 and means[("png", None)]["tau"] == 0
  (bd,) = data["bd_rates"]
  assert bd["anchor"] == "jpeg-420"
  for metric in ("psnr", "ms_ssim"):  # a number, or null with the reason
    assert (bd[f"bd_rate_{metric}_percent"] is None) == bool(bd[f"bd_rate_{metric}_note"])
  assert "MS-SSIM not available" in bd["bd_rate_ms_ssim_note"]
  summary = (out / "summary.md").read_text()
  for heading in ("## Lossy", "## Estimated vs real bits", "## Anchors", "## BD-rate",
                  "## Skipped images", "## Failures"):
    assert heading in summary


def test_rates_and_distortion_are_those_of_the_real_files(lossy_run, images):
  results, _ = lossy_run
  model = export.load_model(GOLDEN_MODEL)
  pixels = np.asarray(Image.open(images / "b.png"))
  for row in results["rows"]:
    h, w = row["height"], row["width"]
    assert row["bpp"] == pytest.approx(row["bytes"] * 8 / (h * w))
    assert row["bpsp"] == pytest.approx(row["bytes"] * 8 / (h * w * 3))
    if row["image"] != "b.png":
      continue
    if row["codec"] == "gvae":
      data = codec.compress(model, pixels, row["setting"])
      assert len(data) == row["bytes"] and row["rate"] == codec.read_header(data).rate
      decoded = codec.decompress(model, data)
      assert row["psnr"] == pytest.approx(rd.psnr(pixels, decoded))
      assert row["max_error"] == rd.max_abs_error(pixels, decoded)
    elif row["codec"] == "png":
      assert row["bytes"] == len(anchors.png()(pixels).data)


def test_ms_ssim_only_where_defined():
  image = make_image(161, 170, 4)
  assert harness.ms_ssim_or_none(image, image) == pytest.approx(1.0, abs=1e-5)
  assert harness.ms_ssim_or_none(image[:160], image[:160]) is None
  assert harness.ms_ssim_db(0.99) == pytest.approx(20.0)


def test_linear_interpolation_changes_fractional_rates_only(lossy_run, images):
  exponential, _ = lossy_run
  files = [images / "a.png", images / "b.png"]
  linear = harness.evaluate(GOLDEN_MODEL, files, [0.5, 1.0],
                            overrides=["model.interpolation=linear"], warmup=False)
  assert linear["overrides"] == {"model.interpolation": "linear"}
  assert linear["model"]["coding_fingerprint"] != linear["model"]["fingerprint"]
  assert linear["model"]["fingerprint"] == exponential["model"]["fingerprint"]
  before = {(r["image"], r["setting"]): r for r in exponential["rows"] if r["codec"] == "gvae"}
  after = {(r["image"], r["setting"]): r for r in linear["rows"]}
  assert linear["failures"] == [] and len(after) == 4
  for image in ("a.png", "b.png"):  # integer rate: the trained row either way
    same = (image, 1.0)
    assert (after[same]["bytes"], after[same]["psnr"]) == (before[same]["bytes"],
                                                           before[same]["psnr"])
  # Fractional rate: another gain, another file.
  assert any((after[(i, 0.5)]["bytes"], after[(i, 0.5)]["psnr"])
             != (before[(i, 0.5)]["bytes"], before[(i, 0.5)]["psnr"]) for i in ("a.png", "b.png"))


def test_overrides_outside_the_whitelist_are_refused():
  for bad in (["model.m=4"], ["model.interpolation"], {"train.lambdas": (1, 2)}):
    with pytest.raises(harness.EvalError):
      harness.parse_overrides(bad)
  model = export.load_model(GOLDEN_MODEL)
  with pytest.raises(harness.EvalError, match="one of"):
    harness.apply_overrides(model, ["model.interpolation=cubic"])
  with pytest.raises(harness.EvalError, match="lossy-only"):
    harness.apply_overrides(model, {"model.residual.bias_correction": False})


# --- Scalable model: near-lossless and lossless. ---

@pytest.fixture(scope="module")
def scalable(tmp_path_factory):
  folder = tmp_path_factory.mktemp("scalable")
  export.export_params(tiny_scalable_config(), tiny_scalable_params(), folder / "model")
  small = folder / "images"
  small.mkdir()
  for seed in (5, 6):
    Image.fromarray(make_image(20, 24, seed)).save(small / f"s{seed}.png")
  return folder / "model", small


def test_near_lossless_bound_sizes_estimates_and_jpegls(scalable, tmp_path):
  model_dir, folder = scalable
  results = harness.evaluate(model_dir, folder, rates=[], taus=[0, 2],
                             anchors=["png", "jpegls-hp1", "jpegls-near"], warmup=False)
  harness.write_outputs(results, tmp_path)
  assert results["failures"] == [] and results["model"]["scalable"]
  residual = [r for r in results["rows"] if r["codec"] == "gvae" and r["tau"] is not None]
  assert len(residual) == 4
  for row in residual:
    assert row["max_error"] <= row["tau"] and row["tau_ok"]
    assert row["mode"] == ("lossless" if row["tau"] == 0 else "near_lossless")
    assert row["bpsp"] == pytest.approx(row["bytes"] * 8 / (20 * 24 * 3))
    assert 0.0 <= row["rate"] <= 1.0 and row["choose_rate_seconds"] is not None
    assert row["estimate_residual_bits"] > 0 and row["residual_bits"] > 0
    assert row["estimated_bits"] == pytest.approx(row["estimate_lossy_bits"]
                                                  + row["estimate_residual_bits"])
    assert row["coded_estimated_bits"] > row["estimate_residual_bits"]
    assert row["bytes"] * 8 > row["lossy_bits"] + row["residual_bits"]  # + the header
  near = [m for m in results["means"] if m["codec"] == "jpegls-near"]
  assert [m["tau"] for m in near] == [2]  # JPEG-LS NEAR at the run's taus >= 1
  data = strict_json(tmp_path / "results.json")
  lossless = next(m for m in data["means"] if m["codec"] == "gvae" and m["setting"] == 0)
  assert lossless["max_error"] == 0 and lossless["psnr"] is None and lossless["mse"] == 0
  summary = (tmp_path / "summary.md").read_text()
  assert "## Near-lossless and lossless" in summary and "JPEG-LS bpsp" in summary


def test_tau_violation_is_a_failure_and_a_nonzero_exit(scalable, tmp_path, monkeypatch, capsys):
  model_dir, folder = scalable
  real = codec.decompress

  def off_by_one(model, data):
    pixels = real(model, data).copy()
    pixels[0, 0, 0] ^= 1
    return pixels

  monkeypatch.setattr(codec, "decompress", off_by_one)
  code = cli.main(["eval", "--model", str(model_dir), "--images", str(folder), "--out",
                   str(tmp_path), "--rates", "--taus", "0", "--tau-rate", "0.5",
                   "--max-images", "1", "--override", "model.residual.bias_correction=false",
                   "--no-progress", "--no-warmup"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code != 0 and len(err) == 1 and err[0].startswith("gvae: error: 1 failure")
  data = strict_json(tmp_path / "results.json")  # written before the exit
  (row,) = data["rows"]
  assert row["tau_ok"] is False and row["max_error"] == 1 and row["rate"] == 0.5
  assert data["overrides"] == {"model.residual.bias_correction": False}
  assert "exceeds tau" in data["failures"][0]["reason"]
  assert data["command"].startswith("gvae eval --model")


# --- The command line. ---

def test_cli_runs_and_records_the_command(images, tmp_path, capsys):
  out = tmp_path / "new" / "out"
  code = cli.main(["eval", "--model", str(GOLDEN_MODEL), "--images", str(images), "--out",
                   str(out), "--rates", "0", "1", "--anchors", "png", "--max-images", "2",
                   "--no-progress", "--no-warmup"])
  assert code == 0, capsys.readouterr().err
  assert "## Lossy" in capsys.readouterr().out
  data = strict_json(out / "results.json")
  assert data["command"].startswith("gvae eval --model") and "--anchors png" in data["command"]
  assert data["settings"]["rates"] == [0.0, 1.0] and data["settings"]["anchors"] == ["png"]
  assert len(data["images"]["evaluated"]) == 2


def cli_error(argv, capsys):
  code = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code != 0 and len(err) == 1 and err[0].startswith("gvae: error: "), err
  return err[0]


def test_cli_errors_are_one_line(images, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "x.png").write_bytes(b"not a png")
  model = str(GOLDEN_MODEL)
  out = str(tmp_path / "out")
  base = ["eval", "--model", model, "--out", out, "--no-progress", "--no-warmup"]
  assert "no images" in cli_error(base + ["--images", str(empty)], capsys)
  assert "no image could be evaluated" in cli_error(base + ["--images", str(bad)], capsys)
  assert "not an exported model" in cli_error(
      ["eval", "--model", str(images), "--images", str(images), "--out", out], capsys)
  assert "lossy-only" in cli_error(base + ["--images", str(images), "--taus", "1"], capsys)
  assert ">= 0" in cli_error(base + ["--images", str(images), "--taus", "-1"], capsys)
  assert "not allowed" in cli_error(base + ["--images", str(images), "--override",
                                            "model.n=4"], capsys)
  assert "out of range" in cli_error(base + ["--images", str(images), "--rates", "7"], capsys)
  assert "nothing to evaluate" in cli_error(base + ["--images", str(images), "--rates"], capsys)
  assert not (tmp_path / "out").exists()


def test_cli_error_in_a_real_process(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "gvae_jax", "eval", "--model", str(GOLDEN_MODEL), "--images",
       str(tmp_path), "--out", str(tmp_path / "out")],
      capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [f"gvae: error: no images "
                                                f"({', '.join(harness.IMAGE_SUFFIXES)}) in "
                                                f"{tmp_path}"]
