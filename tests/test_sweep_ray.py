"""`gvae sweep --engine ray`: the same stages and collated table as the local engine.

Runs a 2-run sweep (the tiny config trained for 2 steps, then exported and
evaluated; and the golden tiny model evaluated with linear interpolation)
once with each engine, Ray on a local 2-CPU cluster, and compares the
collated tables without the timing columns.
"""
import subprocess
import sys

import pytest
from PIL import Image

from codec_helpers import GOLDEN_MODEL, make_image
from gvae_jax import sweep as sweep_lib
from gvae_jax.sweep import Run, Sweep

TIMINGS = ("encode_seconds", "decode_seconds")


def _sweep() -> Sweep:
  return Sweep("ray_vs_local", "Two runs, one trained.", [
      Run("trained", "experiments/configs/tiny.py", {"train.num_steps": 2}, rates=(0, 1),
          resources={"num_cpus": 1}),
      Run("golden_linear", model=str(GOLDEN_MODEL), rates=(0, 0.5, 1),
          eval_overrides={"model.interpolation": "linear"}),
  ], reference="trained")


def _table(summary: dict) -> list[dict]:
  return [{k: v for k, v in row.items() if not k.startswith(TIMINGS)} for row in summary["rows"]]


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine(tmp_path, monkeypatch):
  ray = pytest.importorskip("ray", reason="the Ray engine needs ray (pip install 'gvae-jax[ray]')")
  images = tmp_path / "images"
  images.mkdir()
  for i in range(2):
    Image.fromarray(make_image(40, 48, i)).save(images / f"{i}.png")
  train_images = [f"--config.data.folder={images}", "--config.eval.folder="]
  sweep = _sweep()
  local = sweep_lib.run_sweep(sweep, tmp_path / "local", images=str(images),
                              train_overrides=train_images, echo=lambda *_: None)
  ray.init(num_cpus=2, include_dashboard=False)
  try:
    on_ray = sweep_lib.run_sweep(sweep, tmp_path / "ray", images=str(images), engine="ray",
                                 train_overrides=train_images, echo=lambda *_: None)
    # Run again: every stage is recognised as done, as with the local engine.
    again = sweep_lib.run_sweep(sweep, tmp_path / "ray", images=str(images), engine="ray",
                                train_overrides=train_images, echo=lambda *_: None)
  finally:
    ray.shutdown()
  assert not any(s.get("failed") for s in local + on_ray), (local, on_ray)
  assert [list(s["stages"]) for s in on_ray] == [list(s["stages"]) for s in local] == [
      ["train", "export", "eval"], ["eval"]]
  assert all(v.startswith("ran in") for s in on_ray for v in s["stages"].values())
  assert all(v == "done before" for s in again for v in s["stages"].values())
  expected = sweep_lib.collate(sweep, tmp_path / "local")
  actual = sweep_lib.collate(sweep, tmp_path / "ray")
  assert len(expected["rows"]) == 5
  assert _table(actual) == _table(expected)
  assert actual["bd_rate_vs_reference"] == expected["bd_rate_vs_reference"]
  assert [r["step"] for r in actual["runs"]] == [r["step"] for r in expected["runs"]]


def test_resources_resolve_run_over_sweep_over_cli():
  sweep = Sweep("s", "d", [Run("a", model="/m", resources={"num_gpus": 1}), Run("b", model="/m")],
                resources={"num_cpus": 4})
  assert sweep_lib.run_resources(sweep.runs[0], sweep, {"num_cpus": 2, "num_gpus": 0.5}) == {
      "num_cpus": 4, "num_gpus": 1}
  assert sweep_lib.run_resources(sweep.runs[1], Sweep("s", "d", []), {"num_gpus": 0.5}) == {
      "num_cpus": 1, "num_gpus": 0.5}


def test_bad_engine_and_resources_are_refused(tmp_path):
  sweep = Sweep("s", "d", [Run("a", model="/m")])
  with pytest.raises(sweep_lib.SweepError, match="unknown engine"):
    sweep_lib.run_sweep(sweep, tmp_path, engine="slurm", dry_run=True)
  with pytest.raises(sweep_lib.SweepError, match="unknown resource"):
    sweep_lib.run_sweep(sweep, tmp_path, engine="ray", resources={"gpus": 1}, dry_run=True)
  path = tmp_path / "s.py"
  path.write_text("from gvae_jax.sweep import Run, Sweep\n"
                  "def get_sweep():\n  return Sweep('s', 'd', [Run('a', model='/m', "
                  "resources={'num_gpus': -1})])\n")
  with pytest.raises(sweep_lib.SweepError, match="num_gpus must be a number >= 0"):
    sweep_lib.load_sweep(path)


def test_cli_engine_ray_without_ray_is_one_error_line(tmp_path, repo_root):
  try:
    import ray  # noqa: F401
    pytest.skip("ray is installed here; the missing-Ray message is tested where it is not")
  except ImportError:
    pass
  images = tmp_path / "images"
  images.mkdir()
  result = subprocess.run(
      [sys.executable, "-m", "gvae_jax", "sweep", "experiments/sweeps/gained_vs_fixed.py",
       "--out", str(tmp_path / "out"), "--images", str(images), "--engine", "ray"],
      capture_output=True, text=True, cwd=repo_root)
  assert result.returncode != 0
  assert result.stderr.strip() == ("gvae: error: --engine ray needs Ray: "
                                   "pip install 'gvae-jax[ray]'")
