"""The sweep runner: sweep files, stage commands, resuming, collation, the CLI."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gvae_jax import sweep as sweep_lib
from gvae_jax.sweep import Run, Sweep

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.py"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_provided_sweep_loads_and_names_existing_configs(path):
  sweep = sweep_lib.load_sweep(path)
  assert sweep.runs and sweep.description
  for run in sweep.runs:
    if run.config:
      assert (REPO / run.config).is_file(), run.config
  if sweep.reference:
    assert sweep.reference in {r.group or r.name for r in sweep.runs}


def test_the_listed_ablations_are_provided():
  names = {p.stem for p in SWEEPS}
  assert {"gain_levels", "interpolation", "gain_parameterization", "gained_vs_fixed",
          "mixture_components", "kernel_size", "bias_correction", "decoding_order"} <= names


def write_sweep(tmp_path, body: str) -> Path:
  path = tmp_path / "s.py"
  path.write_text("from gvae_jax.sweep import Run, Sweep\n" + body)
  return path


@pytest.mark.parametrize("body, message", [
    ("x = 1\n", "get_sweep"),
    ("def get_sweep():\n  return 3\n", "must return"),
    ("def get_sweep():\n  return Sweep('s', 'd', [Run('a', 'c.py'), Run('a', 'c.py')])\n",
     "unique"),
    ("def get_sweep():\n  return Sweep('s', 'd', [Run('a')])\n", "exactly one"),
    ("def get_sweep():\n  raise KeyError('boom')\n", "boom"),
    ("def get_sweep():\n  return Sweep('s', 'd', [Run('b', 'c.py', init_from='a'), "
     "Run('a', 'c.py')])\n", "listed before it"),
    ("def get_sweep():\n  return Sweep('s', 'd', [Run('a', 'c.py'), "
     "Run('b', model='/m', init_from='a')])\n", "trains nothing"),
])
def test_bad_sweep_files_are_refused(tmp_path, body, message):
  with pytest.raises(sweep_lib.SweepError, match=message):
    sweep_lib.load_sweep(write_sweep(tmp_path, body))


def test_stage_commands_carry_overrides_and_eval_options(tmp_path):
  run = Run("fixed", "experiments/configs/tiny.py",
            {"model.levels": 1, "train.lambdas": (0.01,), "model.residual.bias_correction": False},
            rates=(0, 0.5), taus=(1, 2), eval_overrides={"model.interpolation": "linear"},
            tau_rate=1.5)
  sweep = Sweep("s", "d", [run])
  stages = sweep_lib.stage_commands(run, sweep, tmp_path, "imgs", 3,
                                    ["--config.train.num_steps=7", "--config.model.levels=3"])
  assert [s[0] for s in stages] == ["train", "export", "eval"]
  train = stages[0][1]
  assert "--config.model.levels=1" in train and "--config.train.lambdas=(0.01,)" in train
  # Sweep-wide overrides come first, so the run's own (levels=1) wins.
  assert train.index("--config.model.levels=3") < train.index("--config.model.levels=1")
  assert "--config.train.num_steps=7" in train
  assert "--config.model.residual.bias_correction=false" in train
  evaluate = stages[2][1]
  i = evaluate.index("--rates")
  assert evaluate[i + 1:i + 3] == ["0", "0.5"]
  assert evaluate[evaluate.index("--override") + 1] == "model.interpolation=linear"
  assert evaluate[evaluate.index("--max-images") + 1] == "3"
  assert evaluate[evaluate.index("--tau-rate") + 1] == "1.5"
  # An eval-only run has one stage on the given model.
  only = sweep_lib.stage_commands(Run("e", model="/m"), sweep, tmp_path, "imgs", 0)
  assert [s[0] for s in only] == ["eval"] and "/m" in only[0][1]
  assert "--tau-rate" not in only[0][1]


def test_finished_stages_are_skipped(tmp_path, monkeypatch):
  run = Run("a", "experiments/configs/tiny.py")
  sweep = Sweep("s", "d", [run])
  (tmp_path / "a" / "model").mkdir(parents=True)
  (tmp_path / "a" / "model" / "manifest.json").write_text("{}")
  ran = []

  def fake_run(command, **kwargs):
    ran.append(command)
    (tmp_path / "a" / "eval").mkdir(parents=True, exist_ok=True)
    (tmp_path / "a" / "eval" / "results.json").write_text("{}")
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(sweep_lib.subprocess, "run", fake_run)
  images = tmp_path / "imgs"
  images.mkdir()
  statuses = sweep_lib.run_sweep(sweep, tmp_path, images=str(images), echo=lambda *_: None)
  assert len(ran) == 1 and "eval" in ran[0]  # train and export were done
  assert statuses[0]["stages"]["train"] == "done before"
  ran.clear()
  sweep_lib.run_sweep(sweep, tmp_path, images=str(images), echo=lambda *_: None)
  assert ran == []  # everything done


def test_a_failed_stage_stops_its_run_and_is_reported(tmp_path, monkeypatch):
  sweep = Sweep("s", "d", [Run("a", "experiments/configs/tiny.py"), Run("b", model="/m")])
  monkeypatch.setattr(sweep_lib.subprocess, "run",
                      lambda command, **kw: subprocess.CompletedProcess(command, 3))
  images = tmp_path / "imgs"
  images.mkdir()
  statuses = sweep_lib.run_sweep(sweep, tmp_path / "out", images=str(images), jobs=2,
                                 echo=lambda *_: None)
  assert statuses[0]["failed"] and list(statuses[0]["stages"]) == ["train"]
  assert statuses[1]["failed"]
  assert (tmp_path / "out" / "a" / "train.log").exists()


def test_a_run_warm_started_from_another_waits_for_it(tmp_path, monkeypatch):
  sweep = Sweep("s", "d", [Run("base", "experiments/configs/tiny.py"),
                           Run("slow", model="/m"),
                           Run("tuned", "experiments/configs/tiny.py", init_from="base")])
  train = sweep_lib.stage_commands(sweep.runs[2], sweep, tmp_path, "imgs", 0)[0][1]
  assert f"--config.train.init_from={tmp_path / 'base' / 'model'}" in train
  finished = []

  def fake_run(command, **kwargs):
    stage, name = command[3], Path(command[command.index("--workdir" if "--workdir" in command
                                                         else "--model") + 1]).parent.name
    if stage == "train" and name == "tuned":  # its base has exported by now
      assert (tmp_path / "base" / "model" / "manifest.json").exists()
    if stage == "export":
      (tmp_path / name / "model").mkdir(parents=True, exist_ok=True)
      (tmp_path / name / "model" / "manifest.json").write_text("{}")
    if stage == "train" and name == "base":
      time.sleep(0.5)  # the other worker is free to start "tuned" meanwhile
    finished.append((name, stage))
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(sweep_lib.subprocess, "run", fake_run)
  images = tmp_path / "imgs"
  images.mkdir()
  statuses = sweep_lib.run_sweep(sweep, tmp_path, images=str(images), jobs=2,
                                 echo=lambda *_: None)
  assert not any(s.get("failed") for s in statuses)
  assert finished.index(("base", "export")) < finished.index(("tuned", "train"))
  # A failed base: the dependent run is reported, not started.
  monkeypatch.setattr(sweep_lib.subprocess, "run",
                      lambda command, **kw: subprocess.CompletedProcess(command, 3))
  messages = []
  statuses = sweep_lib.run_sweep(sweep, tmp_path / "again", images=str(images), jobs=2,
                                 echo=messages.append)
  assert statuses[2] == {"name": "tuned", "stages": {}, "failed": True}
  assert any("not started" in m and "'base'" in m for m in messages)
  # Only the dependent run, its base not trained: refused the same way.
  statuses = sweep_lib.run_sweep(sweep, tmp_path / "third", images=str(images),
                                 only=["tuned"], echo=messages.append)
  assert statuses[0]["failed"] and "has no exported model" in messages[-1]


def fake_results(rows):
  return {"means": rows}


def test_collate_builds_one_table_with_bd_rates(tmp_path):
  rates = np.array([0.2, 0.4, 0.8, 1.6])
  psnr = 25 + 4 * np.log2(rates / 0.2)
  ssim = 0.9 + 0.02 * np.log2(rates / 0.2)

  def lossy(scale, indexes):
    return [{"codec": "gvae", "mode": "lossy", "rate": float(i), "bpp": float(rates[i] * scale),
             "psnr": float(psnr[i]), "ms_ssim": float(ssim[i])} for i in indexes]

  runs = [Run("gained", model="/m", group=None)]
  runs += [Run(f"fixed_{i}", model="/m", group="fixed") for i in range(4)]
  runs += [Run("missing", model="/m")]
  sweep = Sweep("s", "A test sweep.", runs, reference="fixed")
  for run in runs[:5]:
    folder = tmp_path / run.name / "eval"
    folder.mkdir(parents=True)
    rows = lossy(1.1, range(4)) if run.name == "gained" else lossy(1.0, [int(run.name[-1])])
    rows.append({"codec": "jpeg", "mode": "lossy", "bpp": 1.0, "psnr": 30.0})  # an anchor
    results = fake_results(rows)
    if run.name == "gained":  # trained by the sweep: its step and command are recorded
      # (the log as _run_one writes it: a blank line, then "$ command")
      results["model"] = {"step": 3000, "fingerprint": "f" * 32}
      (tmp_path / run.name / "train.log").write_text("\n$ python -m gvae_jax train --x=1\nstep 1\n")
    (folder / "results.json").write_text(json.dumps(results))
  summary = sweep_lib.collate(sweep, tmp_path)
  assert summary["missing_runs"] == ["missing"]
  assert summary["runs"][0] == {"run": "gained", "step": 3000, "fingerprint": "f" * 32,
                                "train_command": "python -m gvae_jax train --x=1"}
  assert summary["runs"][1]["train_command"] is None
  assert len(summary["rows"]) == 8  # anchors are not model rows
  bd = summary["bd_rate_vs_reference"]["gained"]
  assert bd["bd_rate_psnr_percent"] == pytest.approx(10.0, abs=0.01)
  assert bd["bd_rate_ms_ssim_percent"] == pytest.approx(10.0, abs=0.01)
  for suffix in ("json", "csv", "md"):
    assert (tmp_path / f"sweep_results.{suffix}").stat().st_size > 0
  markdown = (tmp_path / "sweep_results.md").read_text()
  assert "+10.00%" in markdown and "Not evaluated yet: missing" in markdown
  assert f"| gained | 3000 | {'f' * 32} |" in markdown
  assert (tmp_path / "sweep_psnr_bpp.png").read_bytes().startswith(b"\x89PNG")
  assert not (tmp_path / "sweep_bpsp_tau.png").exists()  # no residual rows in this sweep


def test_cli_refuses_a_missing_sweep_file(tmp_path):
  result = subprocess.run([sys.executable, "-m", "gvae_jax", "sweep", str(tmp_path / "no.py")],
                          capture_output=True, text=True)
  assert result.returncode != 0
  assert result.stderr.strip().startswith("gvae: error: sweep file not found")
  assert "Traceback" not in result.stderr


def test_cli_dry_run_passes_config_overrides_to_training(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "gvae_jax", "sweep", "experiments/sweeps/gained_vs_fixed.py",
       "--out", str(tmp_path / "out"), "--dry-run", "--config.train.num_steps=3000"],
      capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
  assert result.returncode == 0, result.stderr
  train_lines = [line for line in result.stdout.splitlines() if "] train: " in line]
  assert len(train_lines) == 4
  assert all("--config.train.num_steps=3000" in line for line in train_lines)
