"""Ablation sweeps: train, export and evaluate a list of runs, then collate.

A sweep file (experiments/sweeps/*.py) defines `get_sweep()` returning a
`Sweep`. Each `Run` either trains a model (a config file plus
`--config.key=value` overrides) or reuses an exported model, and is then
evaluated on real files by `gvae eval` (optionally with eval-time overrides
such as linear interpolation or bias correction off).

Every stage is a `gvae` subprocess with its own log, so runs are isolated,
can go N at a time, and a killed sweep resumes: training resumes from its
checkpoints, and finished stages (an exported model, an eval results.json)
are skipped. `collate` reads every run's results.json into one table, with
BD-rates of each curve against the sweep's reference curve.

Engines: "local" (default) runs `jobs` runs at a time in threads on this
machine; "ray" submits each run as one Ray task with its resource request
(num_cpus, num_gpus: the run's, else the sweep's, else the CLI default), so a
Ray cluster schedules the runs over its machines; Ray gives a task's GPUs to
its stage subprocesses through CUDA_VISIBLE_DEVICES. The task runs the same
stages (the same `_run_one`), so resuming and collation are identical; on a
cluster the output folder must be on storage every node sees, and every node
needs the same checkout and environment.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from gvae_jax import config as config_lib
from gvae_jax import fileio
from gvae_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]


class SweepError(UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of a sweep.

  name: directory name under the sweep's output folder (unique).
  config: config file to train (relative to the repository root), or None
    with `model` set to evaluate an existing exported model.
  overrides: training config overrides {"model.levels": 1, ...}.
  eval_overrides: eval-time model overrides {"model.interpolation": "linear"}.
  group: runs sharing a group form one RD curve (e.g. fixed-rate models).
  tau_rate: fixed base rate for the taus (`gvae eval --tau-rate`); None = per
    image, the smallest file's (slower: several model passes per image).
  init_from: the name of an earlier training run of this sweep whose exported
    model warm-starts this one (`train.init_from`, e.g. gain units fine-tuned
    from a fixed-rate model); this run starts when that one has exported.
  """
  name: str
  config: str | None = None
  overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)
  model: str | None = None
  eval_overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)
  rates: Sequence[float] | None = None
  taus: Sequence[int] | None = None
  group: str | None = None
  tau_rate: float | None = None
  init_from: str | None = None
  # Ray engine: this run's resource request, e.g. {"num_cpus": 8, "num_gpus": 1}.
  resources: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  description: str
  runs: Sequence[Run]
  reference: str | None = None  # a run name or group: BD-rates are against its curve
  images: str = str(REPO.parent / "shared" / "data" / "kodak")
  max_images: int = 0  # 0 = all
  resources: Mapping[str, float] = dataclasses.field(default_factory=dict)  # runs' default


ENGINES = ("local", "ray")
RESOURCE_KEYS = ("num_cpus", "num_gpus")


def load_sweep(path: str | os.PathLike) -> Sweep:
  path = Path(path)
  sweep = config_lib.call_user_file(path, "get_sweep", "sweep", SweepError)
  if not isinstance(sweep, Sweep):
    raise SweepError(f"{path}: get_sweep() must return a gvae_jax.sweep.Sweep")
  names = [run.name for run in sweep.runs]
  if not names or len(set(names)) != len(names):
    raise SweepError(f"{path}: runs need unique, non-empty names; got {names}")
  for run in sweep.runs:
    if (run.config is None) == (run.model is None):
      raise SweepError(f"{path}: run {run.name!r} needs exactly one of config= and model=")
  trained_before = set()
  for run in sweep.runs:
    if run.init_from is not None:
      if run.config is None:
        raise SweepError(f"{path}: run {run.name!r} has init_from but trains nothing (no config=)")
      if run.init_from not in trained_before:
        raise SweepError(f"{path}: run {run.name!r}: init_from={run.init_from!r} must name a "
                         "training run listed before it")
    if run.config is not None:
      trained_before.add(run.name)
  for owner, resources in [("the sweep", sweep.resources)] + [
      (f"run {run.name!r}", run.resources) for run in sweep.runs]:
    _check_resources(resources, f"{path}: {owner}")
  return sweep


def _check_resources(resources: Mapping[str, float], where: str) -> None:
  for key, value in resources.items():
    if key not in RESOURCE_KEYS:
      raise SweepError(f"{where}: unknown resource {key!r}; use {', '.join(RESOURCE_KEYS)}")
    if not isinstance(value, (int, float)) or value < 0:
      raise SweepError(f"{where}: resource {key} must be a number >= 0, got {value!r}")


def run_resources(run: Run, sweep: Sweep, default: Mapping[str, float] = ()) -> dict:
  """A run's Ray resource request: its own, over the sweep's, over `default` (the CLI's)."""
  return {"num_cpus": 1, **dict(default), **dict(sweep.resources), **dict(run.resources)}


def _resolve(path: str) -> str:
  p = Path(path)
  return str(p if p.is_absolute() else REPO / p)


def _gvae(*args: str) -> list[str]:
  return [sys.executable, "-m", "gvae_jax", *args]


def _format_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def stage_commands(run: Run, sweep: Sweep, out: Path, images: str, max_images: int,
                   train_overrides: Sequence[str] = ()) -> list[tuple[str, list[str], Path]]:
  """(stage, command, the path whose existence means the stage is done).

  train_overrides ("--config.train.num_steps=3000", ...) go to every training
  run before the run's own overrides, which win on a clash.
  """
  run_dir = out / run.name
  stages = []
  model = run.model and _resolve(run.model)
  if run.config is not None:
    workdir = run_dir / "work"
    model = str(_trained_model(out, run.name))
    warm = ([f"--config.train.init_from={_trained_model(out, run.init_from)}"]
            if run.init_from else [])
    train = _gvae("train", "--config", _resolve(run.config), "--workdir", str(workdir),
                  "--no-progress", *train_overrides, *warm,
                  *[f"--config.{k}={_format_value(v)}" for k, v in run.overrides.items()])
    stages.append(("train", train, Path(model) / "manifest.json"))
    export = _gvae("export", "--workdir", str(workdir), "--out", model, "--force")
    stages.append(("export", export, Path(model) / "manifest.json"))
  evaluate = _gvae("eval", "--model", model, "--images", images, "--out", str(run_dir / "eval"),
                   "--no-progress")
  if max_images:
    evaluate += ["--max-images", str(max_images)]
  if run.rates is not None:
    evaluate += ["--rates", *[str(r) for r in run.rates]]
  if run.taus is not None:
    evaluate += ["--taus", *[str(t) for t in run.taus]]
  if run.tau_rate is not None:
    evaluate += ["--tau-rate", str(run.tau_rate)]
  for key, value in run.eval_overrides.items():
    evaluate += ["--override", f"{key}={_format_value(value)}"]
  stages.append(("eval", evaluate, run_dir / "eval" / "results.json"))
  return stages


def _trained_model(out: Path, name: str) -> Path:
  """Where a training run of the sweep exports its model."""
  return out / name / "model"


_COMMAND_PREFIX = "$ "  # a stage log's line that records the command it ran


def _run_one(run: Run, sweep: Sweep, out: Path, images: str, max_images: int,
             dry_run: bool, echo, train_overrides: Sequence[str] = ()) -> dict:
  run_dir = out / run.name
  status = {"name": run.name, "stages": {}}
  for stage, command, done_marker in stage_commands(run, sweep, out, images, max_images,
                                                    train_overrides):
    if done_marker.exists():
      status["stages"][stage] = "done before"
      continue
    if dry_run:
      echo(f"[{run.name}] {stage}: {' '.join(command)}")
      status["stages"][stage] = "dry run"
      continue
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{stage}.log"
    echo(f"[{run.name}] {stage} ... (log {log_path})")
    start = time.time()
    with open(log_path, "ab") as log:
      log.write(f"\n{_COMMAND_PREFIX}{' '.join(command)}\n".encode())
      log.flush()
      result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, cwd=REPO)
    seconds = time.time() - start
    if result.returncode != 0:
      tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
      echo(f"[{run.name}] {stage} FAILED (exit {result.returncode}): {tail[0]}")
      status["stages"][stage] = f"failed (exit {result.returncode})"
      status["failed"] = True
      return status
    status["stages"][stage] = f"ran in {seconds:.0f} s"
    echo(f"[{run.name}] {stage} done in {seconds:.0f} s")
  return status


def _run_after(dependency: dict | None, run: Run, sweep: Sweep, out: Path, images: str,
               max_images: int, dry_run: bool, echo, train_overrides: Sequence[str] = ()) -> dict:
  """`_run_one` once the run it warm-starts from has finished (its status given;
  None: that run is not part of this invocation, so its model must exist)."""
  if run.init_from:
    failed = bool(dependency and dependency.get("failed"))
    model = _trained_model(out, run.init_from) / "manifest.json"
    if failed or (not dry_run and not model.exists()):
      why = "failed" if failed else f"has no exported model ({model})"
      echo(f"[{run.name}] not started: run {run.init_from!r}, which it starts from, {why}")
      return {"name": run.name, "stages": {}, "failed": True}
  return _run_one(run, sweep, out, images, max_images, dry_run, echo, train_overrides)


def run_sweep(sweep: Sweep, out: str | os.PathLike, jobs: int = 1, images: str | None = None,
              max_images: int | None = None, only: Sequence[str] = (), dry_run: bool = False,
              echo=print, train_overrides: Sequence[str] = (), engine: str = "local",
              resources: Mapping[str, float] = (), ray_address: str | None = None) -> list[dict]:
  """Runs every unfinished stage of every run: `jobs` runs at a time with the
  local engine, or as Ray tasks (each with its resource request) with "ray".

  Use a new `out` folder when changing train_overrides: finished stages are
  recognised by their outputs, not by the settings that made them.
  """
  if engine not in ENGINES:
    raise SweepError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
  _check_resources(dict(resources), "--num-cpus/--num-gpus")
  out = Path(out).absolute()  # Ray tasks may run in another working directory
  images = images or sweep.images
  if not dry_run and not Path(images).is_dir():
    raise SweepError(f"image folder not found: {images} (pass --images)")
  max_images = sweep.max_images if max_images is None else max_images
  unknown = set(only) - {run.name for run in sweep.runs}
  if unknown:
    raise SweepError(f"unknown run names: {', '.join(sorted(unknown))}")
  runs = [run for run in sweep.runs if not only or run.name in only]
  if not dry_run:
    out.mkdir(parents=True, exist_ok=True)
  args = (sweep, out, str(Path(images).absolute()), max_images, dry_run)
  if engine == "ray":
    return _run_on_ray(runs, args, echo, train_overrides, resources, ray_address)
  with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    def after(dependency, run):
      return _run_after(dependency and dependency.result(), run, *args, echo, train_overrides)

    futures = {}
    for run in runs:  # a dependency is listed (so submitted) first: waiting on it cannot deadlock
      futures[run.name] = pool.submit(after, futures.get(run.init_from), run)
    return [futures[run.name].result() for run in runs]


def _run_on_ray(runs, args, echo, train_overrides, resources, ray_address) -> list[dict]:
  """One Ray task per run (`_run_one`, as the local engine), with its resources.

  Connects to the cluster at `ray_address` (or $RAY_ADDRESS); without either,
  starts a local one on this machine. The tasks' own messages reach this
  terminal through Ray's worker-log forwarding.
  """
  try:
    import ray
  except ImportError:
    raise SweepError("--engine ray needs Ray: pip install 'gvae-jax[ray]'") from None
  started_here = not ray.is_initialized()
  if started_here:
    try:
      ray.init(address=ray_address, include_dashboard=False, log_to_driver=True)
    except Exception as e:  # Ray raises bare Exceptions for a cluster that is not there
      where = ray_address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
      raise SweepError(f"cannot start or reach Ray ({where}): {str(e).splitlines()[0]}") from e
  try:
    task = ray.remote(_run_after)
    refs = {}
    for run in runs:
      request = run_resources(run, args[0], resources)
      echo(f"[{run.name}] submitted to Ray ({', '.join(f'{k}={v}' for k, v in request.items())})")
      # Ray starts the task once the dependency's status (an object ref argument) exists.
      refs[run.name] = task.options(**request).remote(
          refs.get(run.init_from), run, *args, print, tuple(train_overrides))
    return ray.get([refs[run.name] for run in runs])
  finally:
    if started_here:
      ray.shutdown()


# --- Collation ---------------------------------------------------------------

def _mean_rows(results: dict) -> list[dict]:
  """The per-setting mean rows of a gvae eval results.json."""
  return [row for row in results.get("means", []) if row.get("codec", "gvae") == "gvae"]


def collate(sweep: Sweep, out: str | os.PathLike) -> dict:
  """One table over runs: mean metrics per (run, setting), BD-rates vs the reference.

  BD-rates follow gvae_jax.eval.quality (as `gvae eval`): PSNR, and MS-SSIM
  on -10 log10(1 - MS-SSIM).
  """
  from gvae_jax.eval import quality

  out = Path(out)
  rows, missing, provenance = [], [], []
  for run in sweep.runs:
    path = out / run.name / "eval" / "results.json"
    if not path.exists():
      missing.append(run.name)
      continue
    results = json.loads(path.read_text())
    model = results.get("model", {})
    provenance.append({"run": run.name, "step": model.get("step"),
                       "fingerprint": model.get("fingerprint"),
                       "train_command": _logged_command(out / run.name / "train.log")})
    for row in _mean_rows(results):
      rows.append({"run": run.name, "group": run.group or run.name, **row})
  curves: dict[str, list[dict]] = {}
  for row in rows:
    if row.get("mode") == "lossy" and row.get("bpp") is not None:
      curves.setdefault(row["group"], []).append(row)
  bd = {}
  reference = sweep.reference
  if reference and reference in curves:
    # The harness's convention (gvae_jax.eval.quality): PSNR, and MS-SSIM in dB.
    bd = {group: quality.bd_entry(curves[reference], points)
          for group, points in curves.items() if group != reference}
  summary = {"sweep": sweep.name, "description": sweep.description, "reference": reference,
             "runs": provenance, "rows": rows, "bd_rate_vs_reference": bd,
             "missing_runs": missing}
  fileio.atomic_write_bytes(out / "sweep_results.json",
                            json.dumps(summary, indent=2, default=_json_default).encode(),
                            overwrite=True)
  fileio.atomic_write_bytes(out / "sweep_results.csv", _csv(rows).encode(), overwrite=True)
  fileio.atomic_write_bytes(out / "sweep_results.md", format_markdown(summary).encode(),
                            overwrite=True)
  from gvae_jax.eval import plots  # matplotlib only when collating

  for name, png in plots.sweep_plots(summary).items():
    fileio.atomic_write_bytes(out / name, png, overwrite=True)
  return summary


def _logged_command(log: Path) -> str | None:
  """The last command `_run_one` wrote to a stage log (a resumed stage appends
  its command again; the last one finished it), if the log is there."""
  try:
    lines = log.read_text(errors="replace").splitlines()
  except OSError:
    return None
  commands = [line[len(_COMMAND_PREFIX):] for line in lines if line.startswith(_COMMAND_PREFIX)]
  return commands[-1] if commands else None


def _json_default(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return str(value)


COLUMNS = ("run", "group", "mode", "rate", "tau", "bpp", "bpsp", "psnr", "ms_ssim",
           "max_error", "estimated_bpsp", "encode_seconds", "decode_seconds", "images")


def _csv(rows: list[dict]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  return buffer.getvalue()


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
  return str(value)


def format_markdown(summary: dict) -> str:
  lines = [f"# Sweep `{summary['sweep']}`", "", summary["description"], ""]
  lossy = [r for r in summary["rows"] if r.get("mode") == "lossy"]
  residual = [r for r in summary["rows"] if r.get("mode") != "lossy"]
  if lossy:
    lines += ["| run | rate s | bpp | PSNR (dB) | MS-SSIM |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {_cell(r.get('rate'))} | {_cell(r.get('bpp'))} | "
              f"{_cell(r.get('psnr'))} | {_cell(r.get('ms_ssim'))} |" for r in lossy]
    lines.append("")
  if residual:
    lines += ["| run | tau | bpsp (file) | bpsp (estimate) | max error |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {_cell(r.get('tau'))} | {_cell(r.get('bpsp'))} | "
              f"{_cell(r.get('estimated_bpsp'))} | {_cell(r.get('max_error'))} |"
              for r in residual]
    lines.append("")
  trained = [r for r in summary.get("runs", []) if r.get("step") is not None]
  if trained:  # which weights the rows come from (the commands are in the JSON)
    lines += ["| run | model step | fingerprint |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['step']} | {r['fingerprint']} |" for r in trained]
    lines.append("")
  if summary["bd_rate_vs_reference"]:
    lines += [f"BD-rate against `{summary['reference']}` (negative: fewer bits for the same "
              "quality; MS-SSIM on -10 log10(1 - MS-SSIM)):", "", "| curve | BD-rate PSNR | BD-rate MS-SSIM |", "|---|---|---|"]
    for group, entry in summary["bd_rate_vs_reference"].items():
      cells = []
      for metric in ("psnr", "ms_ssim"):
        value = entry.get(f"bd_rate_{metric}_percent")
        note = (entry.get(f"bd_rate_{metric}_note") or "").split("; got")[0]  # full note: JSON
        cells.append(f"{value:+.2f}%" if value is not None else f"n/a ({note})")
      lines.append(f"| {group} | {cells[0]} | {cells[1]} |")
    lines.append("")
  if summary["missing_runs"]:
    lines += [f"Not evaluated yet: {', '.join(summary['missing_runs'])}", ""]
  return "\n".join(lines)
