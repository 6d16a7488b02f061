"""`gvae eval`: rate-distortion of an exported model on real files, with anchors.

Every number comes from a real bitstream: each image is compressed with
gvae_jax.coding.codec, the bytes are counted and decoded again, and the
metrics are measured on the decoded pixels (never on the encoder's own
reconstruction or on the model's bit estimate, which is reported next to the
real size only for comparison).

    results = evaluate("models/small", "kodak", rates=[0, 0.5, 1], taus=None,
                       anchors=True, overrides={"model.interpolation": "linear"})
    write_outputs(results, "results/kodak_small")

What is measured, per image and setting (`rows`, also results.csv):

* lossy, per rate s: file bytes, bpp = bytes * 8 / (H * W), PSNR over RGB
  (8-bit), MS-SSIM (None with a note below 161 pixels a side, where it is
  undefined), max abs error, encode and decode seconds, and the model's
  estimated bits (bits_y + bits_z of the model at train=False, as
  gvae_jax.eval.estimate.lossy_bits), and the coded estimate (the same with
  y priced as the coder pays it: coded_estimated_bits; gvae_jax.entropy.coded_rate).
* near-lossless / lossless (scalable models), per tau: the base rate is
  codec.choose_rate's (the smallest estimated file) unless `tau_rate` fixes
  it; bpsp = bytes * 8 / (H * W * 3), bpp, max abs error (checked <= tau: a
  violation is a failure), PSNR, seconds (encode includes choosing the rate,
  also reported alone), and estimated bits = the lossy layer's estimate plus
  the residual layer's (residual_codec.estimate_bits, via the encoder).
* anchors (gvae_jax.eval.anchors), on the same pixels: the lossy sweeps, the
  lossless codecs, and JPEG-LS NEAR at every tau >= 1 of the run. Anchors
  this machine cannot run are listed with the reason.

Means per setting (`means`) average bpp, bpsp and PSNR over images (the mean
of per-image PSNR, as papers report Kodak; `psnr_of_mean_mse` as well),
MS-SSIM, seconds; `max_error` is the largest over images. BD-rates
(gvae_jax.eval.rd, pchip) compare the model's mean lossy curve with each
lossy anchor's mean curve, in PSNR and in MS-SSIM dB (-10 log10(1 - MS-SSIM));
a pair that cannot be compared (no overlap, non-monotone curve, no MS-SSIM)
is null with the reason.

Overrides change the loaded model's config in memory before coding: the flax
module is rebuilt from the changed config, parameters and CDF tables are
kept. Encoder and decoder use the same overridden model. Only settings that
do not change parameter shapes are allowed (OVERRIDABLE). The overridden
model gets its own fingerprint (recorded as `coding_fingerprint`) so its
files can never be mistaken for the exported model's.

Timings are wall-clock seconds of one call on a shared machine. With
`warmup` (the default) the first image of each shape is coded once untimed
(lossy, lossless and one near-lossless tau: their programs differ) before it
is timed, so most XLA compilation is not counted; programs met later
(residual CDF windows differ per image and tau) still are, so the medians are
reported too.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import functools
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gvae_jax import fileio, image_io
from gvae_jax.coding import settings
from gvae_jax.errors import UserError
from gvae_jax.eval import anchors as anchors_lib
from gvae_jax.eval import estimate, quality, rd
from gvae_jax.eval.images import IMAGE_SUFFIXES, list_images  # noqa: F401 (the harness's API)
from gvae_jax.eval.means import MODEL_CODEC, bd_rates, compute_means, lossy_curve  # noqa: F401
from gvae_jax.eval.quality import ms_ssim_db, ms_ssim_or_none  # noqa: F401

LOSSY, NEAR_LOSSLESS, LOSSLESS = anchors_lib.LOSSY, anchors_lib.NEAR_LOSSLESS, anchors_lib.LOSSLESS
DEFAULT_SCALABLE_TAUS = (0, 1, 2, 3, 4, 5)
# Eval-time overrides: config keys that change how the model codes, not its parameter shapes.
OVERRIDABLE = {
    "model.interpolation": "gain interpolation between trained levels: exponential | linear",
    "model.residual.bias_correction": "tau-conditioned bias-correction head: true | false "
                                      "(scalable models)",
}
RESULTS_JSON, RESULTS_CSV, SUMMARY_MD = "results.json", "results.csv", "summary.md"
RESULTS_VERSION = 1

CSV_COLUMNS = ("codec", "mode", "setting_name", "setting", "rate", "tau", "image", "height",
               "width", "bytes", "bpp", "bpsp", "psnr", "mse", "ms_ssim", "max_error", "tau_ok",
               "encode_seconds", "decode_seconds", "choose_rate_seconds", "estimated_bits",
               "estimated_bpp", "estimated_bpsp", "estimate_lossy_bits",
               "estimate_residual_bits", "coded_estimated_bits", "lossy_bits", "residual_bits",
               "base", "error")


class EvalError(UserError):
  """The evaluation cannot run (bad arguments or inputs) or found failures."""


# --- Arguments -----------------------------------------------------------------

def default_rates(levels: int) -> list[float]:
  """Every trained level and the midpoints between them: 0, 0.5, ..., levels - 1."""
  return [i / 2 for i in range(2 * int(levels) - 1)]


def check_taus(taus: Iterable) -> list[int]:
  """Whole numbers >= 0 (settings.check_tau's rules), without duplicates, in order."""
  checked = []
  for tau in taus:
    value = settings.check_tau(tau)
    if value not in checked:
      checked.append(value)
  return checked


def parse_overrides(overrides: Mapping[str, Any] | Sequence[str] | None) -> dict[str, str]:
  """{key: raw value} from "key=value" strings or a mapping; EvalError for other keys."""
  if not overrides:
    return {}
  if isinstance(overrides, Mapping):
    items = [(str(k), _raw_value(v)) for k, v in overrides.items()]
  else:
    items = []
    for item in overrides:
      key, sep, value = str(item).partition("=")
      if not sep or not key.strip():
        raise EvalError(f"bad override {item!r}: expected key=value, e.g. "
                        "model.interpolation=linear")
      items.append((key.strip(), value.strip()))
  parsed = {}
  for key, value in items:
    key = key[len("--config."):] if key.startswith("--config.") else key
    if key not in OVERRIDABLE:
      raise EvalError(f"override {key!r} is not allowed at evaluation time (it could change "
                      f"the parameters); allowed: {', '.join(sorted(OVERRIDABLE))}")
    parsed[key] = value
  return parsed


def _raw_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


def apply_overrides(exported, overrides: Mapping[str, Any] | Sequence[str] | None):
  """(the model coding with the overridden config, {key: parsed value}).

  The flax module is rebuilt from a changed copy of the config; params and
  tables are shared. The fingerprint is derived from the original and the
  overrides. No overrides: the model itself.
  """
  from gvae_jax import config as config_lib
  from gvae_jax import gain
  from gvae_jax.coding import container
  from gvae_jax.models import build_model

  raw = parse_overrides(overrides)
  if not raw:
    return exported, {}
  config = copy.deepcopy(exported.config)
  values = {}
  for key, value in raw.items():
    config_lib.set_by_path(config, key, value)
    node = config
    for part in key.split("."):
      node = node[part]
    values[key] = node
  if config.model.interpolation not in gain.INTERPOLATIONS:
    raise EvalError(f"model.interpolation must be one of {', '.join(gain.INTERPOLATIONS)}, "
                    f"got {config.model.interpolation!r}")
  if "model.residual.bias_correction" in values and not exported.is_scalable:
    raise EvalError(f"model.residual.bias_correction: model {exported.name} is lossy-only "
                    "(no residual layer to correct)")
  try:
    module = build_model(config)
  except (ValueError, KeyError) as e:
    raise EvalError(f"cannot build the model with overrides {values}: {e}") from e
  blob = exported.fingerprint + json.dumps(values, sort_keys=True, default=str).encode()
  fingerprint = container.model_fingerprint(b"gvae-eval-overrides/1\0" + blob)
  manifest = {**exported.manifest, "eval_overrides": values, "fingerprint": fingerprint.hex()}
  overridden = dataclasses.replace(exported, config=config, model=module,
                                   fingerprint=fingerprint, manifest=manifest)
  return overridden, values


def _anchor_by_name(name: str):
  registries = (anchors_lib.LOSSY_ANCHORS, anchors_lib.LOSSLESS_ANCHORS,
                anchors_lib.NEAR_LOSSLESS_ANCHORS)
  for registry in registries:
    if name in registry:
      return registry[name]
  known = sorted(n for registry in registries for n in registry)
  raise EvalError(f"unknown anchor {name!r}; known anchors: {', '.join(known)}")


def select_anchors(spec, taus: Sequence[int]) -> tuple[list, dict[str, str]]:
  """(anchors to run with their sweeps, {name: reason} of anchors skipped).

  spec: False/None (none), True (every registered anchor), or names and
  Anchor objects. JPEG-LS NEAR (any near-lossless anchor) runs at the
  run's taus >= 1.
  """
  if not spec:
    return [], {}
  if spec is True:
    chosen = [*anchors_lib.LOSSY_ANCHORS.values(), *anchors_lib.LOSSLESS_ANCHORS.values(),
              *anchors_lib.NEAR_LOSSLESS_ANCHORS.values()]
  else:
    chosen = [_anchor_by_name(a) if isinstance(a, str) else a for a in spec]
  usable, skipped = anchors_lib.split_available({a.name: a for a in chosen})
  selected = []
  near_taus = tuple(t for t in taus if t >= 1)
  for anchor in usable.values():
    if anchor.kind == NEAR_LOSSLESS:
      if not near_taus:
        skipped[anchor.name] = f"{anchor.name}: no tau >= 1 in this run to compare with"
        continue
      anchor = dataclasses.replace(anchor, settings=near_taus)
    selected.append(anchor)
  return selected, skipped


# --- Metrics ---------------------------------------------------------------------

def _distortion(reference: np.ndarray, decoded: np.ndarray, with_ms_ssim: bool) -> dict:
  out = {"psnr": rd.psnr(reference, decoded), "mse": rd.mse(reference, decoded),
         "max_error": rd.max_abs_error(reference, decoded)}
  out["ms_ssim"] = quality.ms_ssim_or_none(reference, decoded) if with_ms_ssim else None
  return out


# --- The model's estimates ------------------------------------------------------

def _lossy_estimate_bits(model, rgb: np.ndarray, rate: float,
                         y_rate: str | None = None) -> float:
  bits_y, bits_z = estimate.lossy_bits(model, rgb, rate, y_rate)
  return bits_y + bits_z


# --- One image ------------------------------------------------------------------

def _base_row(codec_name: str, mode: str, setting_name: str, setting, image: str,
              height: int, width: int) -> dict:
  return {"codec": codec_name, "mode": mode, "setting_name": setting_name, "setting": setting,
          "rate": None, "tau": None, "image": image, "height": height, "width": width}


def _sizes(row: dict, num_bytes: int) -> None:
  h, w = row["height"], row["width"]
  row.update(bytes=num_bytes, bpp=rd.bits_per_pixel(num_bytes, h, w),
             bpsp=rd.bits_per_subpixel(num_bytes, h, w, 3))


def _model_lossy(model, name: str, rgb: np.ndarray, rate: float) -> dict:
  from gvae_jax.coding import codec, container

  height, width = rgb.shape[:2]
  row = _base_row(MODEL_CODEC, LOSSY, "rate", rate, name, height, width)
  start = time.perf_counter()
  encoded = codec.encode(model, rgb, rate)
  encoded_at = time.perf_counter()
  decoded = codec.decompress(model, encoded.data)
  row.update(rate=float(encoded.header.rate), encode_seconds=encoded_at - start,
             decode_seconds=time.perf_counter() - encoded_at)
  _sizes(row, len(encoded.data))
  row.update(_distortion(rgb, decoded, with_ms_ssim=True))
  _, sections = container.unpack(encoded.data)
  estimate = _lossy_estimate_bits(model, rgb, encoded.header.rate)
  coded = _lossy_estimate_bits(model, rgb, encoded.header.rate, "coded")
  row.update(lossy_bits=8.0 * sum(len(x) for x in sections), estimate_lossy_bits=estimate,
             estimated_bits=estimate, coded_estimated_bits=coded, estimated_bpp=estimate / (height * width),
             estimated_bpsp=estimate / (3 * height * width))
  return row


def _model_residual(model, name: str, rgb: np.ndarray, tau: int, tau_rate,
                    base: str = "auto") -> dict:
  from gvae_jax.coding import codec, container

  height, width = rgb.shape[:2]
  mode = LOSSLESS if tau == 0 else NEAR_LOSSLESS
  row = _base_row(MODEL_CODEC, mode, "tau", tau, name, height, width)
  start = time.perf_counter()
  if model.flat is None and base == "auto":
    chosen = codec.choose_base(model, rgb, tau) if tau_rate is None else None
    chosen_at = time.perf_counter()
    encoded = codec.encode(model, rgb, tau_rate, tau, base=chosen)  # as gvae compress --tau
  else:  # the base (flat or lossy layer) is chosen inside, with the rate
    encoded = codec.encode_residual(model, rgb, tau, tau_rate, base)
    chosen_at = None
  encoded_at = time.perf_counter()
  flat = encoded.header.mode in container.FLAT_MODES
  row["base"] = "flat" if flat else "lossy"
  decoded = codec.decompress(model, encoded.data)
  row.update(rate=float(encoded.header.rate), tau=tau, encode_seconds=encoded_at - start,
             decode_seconds=time.perf_counter() - encoded_at,
             choose_rate_seconds=(chosen_at - start) if chosen_at and tau_rate is None
             else None)
  _sizes(row, len(encoded.data))
  row.update(_distortion(rgb, decoded, with_ms_ssim=tau > 0))
  if tau == 0:
    row["ms_ssim"] = 1.0 if row["max_error"] == 0 else row["ms_ssim"]
  row["tau_ok"] = row["max_error"] <= tau
  _, sections = container.unpack(encoded.data)
  lossy_estimate = 0.0 if flat else _lossy_estimate_bits(model, rgb, encoded.header.rate)
  lossy_coded = 0.0 if flat else _lossy_estimate_bits(model, rgb, encoded.header.rate, "coded")
  residual_estimate = (float("nan") if encoded.residual is None  # tiled: no whole layer
                       else float(np.sum(encoded.residual.estimated_bits)))
  estimate = lossy_estimate + residual_estimate
  lossy_sections = 0 if flat else 2
  row.update(lossy_bits=8.0 * sum(len(section) for section in sections[:lossy_sections]),
             residual_bits=8.0 * sum(len(section) for section in sections[lossy_sections:]),
             estimate_lossy_bits=lossy_estimate, estimate_residual_bits=residual_estimate,
             estimated_bits=estimate, estimated_bpp=estimate / (height * width),
             estimated_bpsp=estimate / (3 * height * width),
             coded_estimated_bits=lossy_coded + residual_estimate)
  return row


def _anchor_row(anchor, name: str, rgb: np.ndarray, setting) -> dict:
  height, width = rgb.shape[:2]
  row = _base_row(anchor.name, anchor.kind, anchor.setting_name, setting, name, height, width)
  if anchor.kind == LOSSLESS:
    row["tau"] = 0
  elif anchor.kind == NEAR_LOSSLESS:
    row["tau"] = int(setting)
  result = anchor(rgb, setting)
  row.update(encode_seconds=result.encode_seconds, decode_seconds=result.decode_seconds)
  _sizes(row, len(result.data))
  row.update(_distortion(rgb, result.decoded, with_ms_ssim=anchor.kind != LOSSLESS))
  if anchor.kind == LOSSLESS:
    row["ms_ssim"] = 1.0
  if row["tau"] is not None:
    row["tau_ok"] = row["max_error"] <= row["tau"]
  return row


def _warm_up(model, rgb: np.ndarray, rates: Sequence[float], taus: Sequence[int],
             tau_rate, base: str = "auto") -> None:
  """Untimed coding of one image so that compilation is not timed (module doc)."""
  from gvae_jax.coding import codec

  if rates:
    codec.decompress(model, codec.compress(model, rgb, rates[0]))
  rate = tau_rate if tau_rate is not None else (rates[0] if rates else 0.0)
  # Lossless and near-lossless use different heads (separately compiled): one of each.
  positive = [t for t in taus if t > 0]
  for tau in ([0] if 0 in taus else []) + positive[:1]:
    if base == "flat":
      codec.decompress(model, codec.compress(model, rgb, tau=tau, base="flat"))
    else:
      codec.decompress(model, codec.compress(model, rgb, rate, tau=tau, base=base))


# --- The evaluation ---------------------------------------------------------------

def _images(images, max_images: int) -> tuple[str | None, list]:
  """(folder or None, [(name, path or pixels)])."""
  if isinstance(images, (str, os.PathLike)):
    return str(images), [(p.name, p) for p in list_images(images, max_images)]
  items = []
  for item in images:
    if isinstance(item, (str, os.PathLike)):
      items.append((Path(item).name, Path(item)))
    else:
      name, pixels = item
      items.append((str(name), pixels))
  if not items:
    raise EvalError("no images to evaluate")
  return None, items[:max_images] if max_images and max_images > 0 else items


def _load_model(model_or_dir):
  from gvae_jax.coding import export

  if isinstance(model_or_dir, export.ExportedModel):
    return model_or_dir, None
  return export.load_model(model_or_dir), str(model_or_dir)


def _versions() -> dict:
  from importlib import metadata

  out = {"python": sys.version.split()[0]}
  for package in ("gvae-jax", "jax", "jaxlib", "flax", "numpy", "imagecodecs", "pillow",
                  "tensorflow-compression-ops", "matplotlib"):
    try:
      out[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      out[package] = None
  try:
    repo = Path(__file__).resolve().parents[2]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                            text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True, timeout=10)
    if commit.returncode == 0:
      out["git_commit"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return out


def _progress_bar(total: int, progress: bool | None):
  from tqdm import tqdm

  tty = sys.stderr.isatty()
  enabled = tty if progress is None else progress
  # Redirected to a log (a long background run): an update every 30 s, not every file.
  return tqdm(total=total, disable=not enabled, unit="file", desc="gvae eval",
              dynamic_ncols=tty, mininterval=0.1 if tty else 30.0)


def evaluate(model_dir_or_model, images, rates: Sequence[float] | None = None,
             taus: Sequence[int] | None = None, anchors=False,
             overrides: Mapping[str, Any] | Sequence[str] | None = None, *,
             tau_rate: float | None = None, max_images: int = 0, progress: bool | None = False,
             warmup: bool = True, command: str | None = None, base: str = "auto") -> dict:
  """Evaluates a model (an exported model directory or ExportedModel) on real files.

  images: a folder, or a list of image paths or (name, uint8 [H, W, 3]) pairs.
  rates: lossy rates s (None: every level and midpoint; [] for none).
  taus: near-lossless bounds (None: 0..5 for scalable models, none for
    lossy-only ones; any tau with a lossy-only model is an EvalError).
  anchors: False, True (all) or names / Anchor objects (select_anchors).
  overrides: {"model.interpolation": "linear"} or ["key=value", ...].
  tau_rate: the base rate of every residual file (None: choose per image).
  base: the residual files' base (codec.encode_residual): "auto" (the
    smaller; the lossy layer for a model without a flat head), "flat", "lossy".
  Returns the results dict (module doc; write it with write_outputs).
  Images image_io refuses are skipped with the reason; EvalError if none
  could be read.
  """
  from gvae_jax import metrics
  from gvae_jax.coding import codec

  started = datetime.datetime.now(datetime.timezone.utc)
  if taus is not None:
    taus = check_taus(taus)  # cheap checks before loading anything
  raw_overrides = parse_overrides(overrides)
  folder, items = _images(images, max_images)
  exported, model_dir = _load_model(model_dir_or_model)
  model, override_values = apply_overrides(exported, raw_overrides)
  if taus is None:
    taus = list(DEFAULT_SCALABLE_TAUS) if model.is_scalable else []
  elif taus and not model.is_scalable:
    raise EvalError(f"model {model.name} is lossy-only: --taus (near-lossless and lossless) "
                    "need a scalable model")
  rates = default_rates(model.levels) if rates is None else list(rates)
  for rate in rates:
    codec.check_rate(rate, model.levels)
  rates = list(dict.fromkeys(float(r) for r in rates))
  if tau_rate is not None:
    codec.check_rate(tau_rate, model.levels)
    tau_rate = float(tau_rate)
  if not rates and not taus:
    raise EvalError("nothing to evaluate: no rates and no taus")
  anchor_list, skipped_anchors = select_anchors(anchors, taus)

  rows, failures, skipped_images, image_info = [], [], [], []
  per_image = len(rates) + len(taus) + sum(max(len(a.settings), 1) for a in anchor_list)
  warmed = set()
  with _progress_bar(per_image * len(items), progress) as bar:
    for name, source in items:
      if isinstance(source, Path):
        try:
          rgb, info = image_io.read_image(source)
        except image_io.ImageError as e:
          skipped_images.append({"image": name, "reason": str(e)})
          bar.update(per_image)
          continue
        source_mode = info.source_mode.value
      else:
        try:
          rgb, _ = codec.as_rgb(source)
        except UserError as e:
          skipped_images.append({"image": name, "reason": str(e)})
          bar.update(per_image)
          continue
        source_mode = "array"
      height, width = rgb.shape[:2]
      image_info.append({"image": name, "height": height, "width": width,
                         "source": source_mode})
      if warmup and (height, width) not in warmed:
        warmed.add((height, width))
        try:
          _warm_up(model, rgb, rates, taus, tau_rate, base)
        except Exception:  # noqa: BLE001 - the timed run below records the failure
          pass
      jobs = [(MODEL_CODEC, LOSSY, "rate", r, functools.partial(_model_lossy, model, name, rgb, r))
              for r in rates]
      jobs += [(MODEL_CODEC, LOSSLESS if t == 0 else NEAR_LOSSLESS, "tau", t,
                functools.partial(_model_residual, model, name, rgb, t, tau_rate, base))
               for t in taus]
      for anchor in anchor_list:
        for setting in (anchor.settings or (None,)):
          jobs.append((anchor.name, anchor.kind, anchor.setting_name, setting,
                       functools.partial(_anchor_row, anchor, name, rgb, setting)))
      for codec_name, mode, setting_name, setting, job in jobs:
        bar.set_postfix_str(f"{name} {codec_name} {setting_name} {setting}", refresh=False)
        try:
          row = job()
        except (KeyboardInterrupt, SystemExit):
          raise
        except Exception as e:  # record, go on with the other files
          message = f"{type(e).__name__}: {str(e)[:500]}"
          row = _base_row(codec_name, mode, setting_name, setting, name, height, width)
          row["error"] = message
          failures.append({"codec": codec_name, "setting": setting, "image": name,
                           "reason": message})
        else:
          if row.get("tau_ok") is False:
            failures.append({"codec": codec_name, "setting": setting, "image": name,
                             "reason": f"max abs error {row['max_error']} exceeds tau "
                                       f"{row['tau']}"})
        rows.append(row)
        bar.update(1)

  if not image_info:
    reasons = "; ".join(s["reason"] for s in skipped_images[:2])
    raise EvalError(f"no image could be evaluated ({len(skipped_images)} skipped: {reasons})")
  means = compute_means(rows)
  notes = []
  small = [i["image"] for i in image_info
           if min(i["height"], i["width"]) < metrics.ms_ssim_min_side()]
  if small:
    notes.append(f"MS-SSIM is undefined below {metrics.ms_ssim_min_side()} pixels a side "
                 f"(5 scales, 11-tap filter): null for {len(small)} image(s) "
                 f"({', '.join(small[:5])}{', ...' if len(small) > 5 else ''}); "
                 "their MS-SSIM means are null")
  results = {
      "format": "gvae-eval-results", "version": RESULTS_VERSION,
      "timestamp": started.isoformat(timespec="seconds"),
      "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
      "command": command if command is not None else shlex.join(sys.argv),
      "model": {"dir": model_dir, "name": exported.name, "levels": exported.levels,
                "scalable": exported.is_scalable, "fingerprint": exported.fingerprint.hex(),
                "coding_fingerprint": model.fingerprint.hex(),
                "step": exported.manifest.get("step")},
      "overrides": override_values,
      "images": {"folder": folder, "evaluated": image_info, "skipped": skipped_images,
                 "max_images": max_images or None},
      "settings": {"rates": rates, "taus": taus, "tau_rate": tau_rate, "base": base,
                   "warmup": warmup,
                   "anchors": [a.name for a in anchor_list]},
      "anchors": {"run": {a.name: {"kind": a.kind, "description": a.description,
                                   "setting_name": a.setting_name,
                                   "settings": list(a.settings)} for a in anchor_list},
                  "skipped": skipped_anchors},
      "versions": _versions(),
      "means": means,
      "bd_rates": bd_rates(means),
      "failures": failures,
      "notes": notes,
      "rows": rows,
  }
  return results


# --- Outputs ----------------------------------------------------------------------------

def _json_safe(value):
  """NaN and +-inf -> None; numpy scalars -> Python; tuples -> lists."""
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (np.bool_, bool)):
    return bool(value)
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, np.ndarray):
    return _json_safe(value.tolist())
  return value


def results_json(results: dict) -> str:
  """The results as strict JSON (infinite PSNR of exact files is null; `mse` is 0 there)."""
  return json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n"


def results_csv(results: dict) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for row in results["rows"]:
    writer.writerow({k: ("inf" if isinstance(v, float) and math.isinf(v) else v)
                     for k, v in row.items() if k in CSV_COLUMNS})
  return buffer.getvalue()


def _fmt(value, digits: int = 4) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "NO"
  if isinstance(value, (int, np.integer)):
    return str(value)
  if isinstance(value, float):
    if math.isnan(value):
      return "-"
    if math.isinf(value):
      return "inf"
    return f"{value:.{digits}f}"
  return str(value)


def _pct(value) -> str:
  return "-" if value is None else f"{value:+.2f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines + [""]


def format_summary(results: dict) -> str:
  """summary.md: the tables of the run (module doc)."""
  means = results["means"]
  model = results["model"]
  lines = [f"# gvae eval: {model['name']}", ""]
  lines += [f"- model: `{model['dir'] or '(in memory)'}` (fingerprint {model['fingerprint']}, "
            f"{model['levels']} levels, {'scalable' if model['scalable'] else 'lossy-only'}, "
            f"step {model.get('step')})"]
  if results["overrides"]:
    lines += ["- overrides: " + ", ".join(f"`{k}={v}`" for k, v in results["overrides"].items())
              + f" (coding fingerprint {model['coding_fingerprint']})"]
  images = results["images"]
  lines += [f"- images: {len(images['evaluated'])} evaluated from "
            f"`{images['folder'] or '(given list)'}`"
            + (f", {len(images['skipped'])} skipped" if images["skipped"] else "")]
  lines += [f"- command: `{results['command']}`", f"- date: {results['timestamp']} "
            f"({results['seconds']:.0f} s)"]
  versions = results["versions"]
  lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)]
  lines += [f"- note: {note}" for note in results.get("notes", [])] + [""]
  warm = ("the first coding of each image shape was a warm-up, not timed"
          if results["settings"]["warmup"] else "compilation included (no warm-up)")
  lines += ["Every number is measured on real files, decoded again; PSNR over RGB (8-bit); "
            "means over images of per-image values. Seconds: wall clock of one call, "
            f"{warm}.", ""]

  model_lossy = lossy_curve(means, MODEL_CODEC)
  if model_lossy:
    lines += ["## Lossy", ""]
    lines += _table(
        ["rate s", "bpp", "PSNR (dB)", "PSNR of mean MSE", "MS-SSIM", "max error",
         "est. bpp", "file vs est.", "enc s", "dec s"],
        [[_fmt(m["setting"], 3), _fmt(m["bpp"]), _fmt(m["psnr"], 3),
          _fmt(m["psnr_of_mean_mse"], 3), _fmt(m["ms_ssim"]), _fmt(m["max_error"]),
          _fmt(m.get("estimated_bpp")), _pct(m.get("file_vs_estimate_percent")),
          _fmt(m["encode_seconds"], 3), _fmt(m["decode_seconds"], 3)]
         for m in sorted(model_lossy, key=lambda m: m["setting"])])

  residual = sorted((m for m in means if m["codec"] == MODEL_CODEC and m["mode"] != LOSSY
                     and m.get("bpsp") is not None), key=lambda m: m["setting"])
  if residual:
    jpegls = {m["tau"]: m for m in means if m["codec"] == "jpegls-near" and m.get("bpsp")}
    hp1 = next((m for m in means if m["codec"] == "jpegls-hp1" and m.get("bpsp")), None)
    if hp1 is not None:
      jpegls.setdefault(0, hp1)
    lines += ["## Near-lossless and lossless", "",
              "bits per subpixel (bpsp = file bits / (H x W x 3)) against tau, the largest "
              "allowed error per sample; JPEG-LS is NEAR=tau (tau 0: lossless with HP1).", ""]
    lines += _table(
        ["tau", "bpsp", "JPEG-LS bpsp", "vs JPEG-LS", "est. bpsp", "file vs est.", "max error",
         "bound held", "PSNR (dB)", "base rate s", "flat base", "enc s", "dec s"],
        [[_fmt(m["setting"]), _fmt(m["bpsp"]), _fmt(jpegls.get(m["setting"], {}).get("bpsp")),
          _pct(100.0 * (m["bpsp"] / jpegls[m["setting"]]["bpsp"] - 1.0)
               if m["setting"] in jpegls else None),
          _fmt(m.get("estimated_bpsp")), _pct(m.get("file_vs_estimate_percent")),
          _fmt(m["max_error"]), _fmt(m.get("tau_ok")), _fmt(m["psnr"], 3),
          _fmt(m.get("rate"), 3) + ("" if results["settings"]["tau_rate"] is not None
                                    else " (chosen, mean)"),
          (f"{m['flat_base_files']} of {m['images']}" if "flat_base_files" in m else "-"),
          _fmt(m["encode_seconds"], 3), _fmt(m["decode_seconds"], 3)] for m in residual])

  model_rows = [m for m in means if m["codec"] == MODEL_CODEC and m.get("estimated_bits")]
  if model_rows:
    lines += ["## Estimated vs real bits", "",
              "Estimate: the model's -log2 likelihoods (lossy layer: bits_y + bits_z; "
              "residual layer: residual_codec.estimate_bits with the coder's contexts). "
              "Coded estimate: the same with y priced as the range coder pays it under "
              "the exported tables (2^-16 floor, escapes; entropy/coded_rate.py). "
              "Real: 8 x bytes of the file (header and side information included).", ""]
    lines += _table(
        ["mode", "setting", "estimated bits", "coded est. bits", "file bits", "file vs est.",
         "file vs coded est.", "residual est. bits", "residual real bits", "residual vs est."],
        [[m["mode"], f"{m['setting_name']} {_fmt(m['setting'], 3)}",
          _fmt(m["estimated_bits"], 0), _fmt(m.get("coded_estimated_bits"), 0),
          _fmt(8.0 * m["bytes"], 0),
          _pct(m.get("file_vs_estimate_percent")),
          _pct(m.get("file_vs_coded_estimate_percent")),
          _fmt(m.get("estimate_residual_bits"), 0),
          _fmt(m.get("residual_bits"), 0), _pct(m.get("residual_vs_estimate_percent"))]
         for m in model_rows])

  anchor_means = [m for m in means if m["codec"] != MODEL_CODEC and m.get("bpp") is not None]
  if anchor_means or results["anchors"]["skipped"]:
    lines += ["## Anchors", ""]
    lossy = [m for m in anchor_means if m["mode"] == LOSSY]
    if lossy:
      lines += _table(["anchor", "setting", "bpp", "PSNR (dB)", "MS-SSIM", "enc s", "dec s"],
                      [[m["codec"], f"{m['setting_name']} {_fmt(m['setting'], 2)}",
                        _fmt(m["bpp"]), _fmt(m["psnr"], 3), _fmt(m["ms_ssim"]),
                        _fmt(m["encode_seconds"], 3), _fmt(m["decode_seconds"], 3)]
                       for m in lossy])
    exact = [m for m in anchor_means if m["mode"] != LOSSY]
    if exact:
      lines += _table(["anchor", "tau", "bpsp", "bpp", "max error", "enc s", "dec s"],
                      [[m["codec"], _fmt(m["tau"]), _fmt(m["bpsp"]), _fmt(m["bpp"]),
                        _fmt(m["max_error"]), _fmt(m["encode_seconds"], 3),
                        _fmt(m["decode_seconds"], 3)]
                       for m in sorted(exact, key=lambda m: (m["tau"], m["bpsp"]))])
    for name, reason in results["anchors"]["skipped"].items():
      lines.append(f"- skipped {name}: {reason}")
    if results["anchors"]["skipped"]:
      lines.append("")

  if results["bd_rates"]:
    lines += ["## BD-rate of the model against each lossy anchor", "",
              "Mean curves over the images, pchip interpolation (gvae_jax/eval/rd.py); "
              "negative = the model needs fewer bits for the same quality. MS-SSIM on "
              "-10 log10(1 - MS-SSIM).", ""]

    def cell(entry, metric):
      value = entry[f"bd_rate_{metric}_percent"]
      return _pct(value) if value is not None else f"n/a ({entry[f'bd_rate_{metric}_note']})"

    lines += _table(["anchor", "BD-rate PSNR", "BD-PSNR (dB)", "BD-rate MS-SSIM"],
                    [[e["anchor"], cell(e, "psnr"), _fmt(e["bd_psnr_db"], 3),
                      cell(e, "ms_ssim")] for e in results["bd_rates"]])

  if images["skipped"]:
    lines += ["## Skipped images", ""]
    lines += [f"- {s['image']}: {s['reason']}" for s in images["skipped"]] + [""]
  lines += ["## Failures", ""]
  if results["failures"]:
    lines += [f"- {f['codec']} {f['setting']} on {f['image']}: {f['reason']}"
              for f in results["failures"]]
  else:
    lines.append("None: every file decoded, every tau bound held.")
  return "\n".join(lines) + "\n"


def check_out_dir(out_dir: str | os.PathLike) -> Path:
  """out_dir must be a folder or not exist yet (checked before a long run)."""
  out_dir = Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise EvalError(f"{out_dir} exists and is not a folder")
  return out_dir


def write_outputs(results: dict, out_dir: str | os.PathLike, plots: bool = True) -> list[Path]:
  """results.json, results.csv, summary.md and the plots in out_dir (created), atomically.

  Files of an earlier run in out_dir are replaced; results.json is written last.
  """
  out_dir = check_out_dir(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for name, text in ((RESULTS_CSV, results_csv(results)), (SUMMARY_MD, format_summary(results))):
    fileio.atomic_write_bytes(out_dir / name, text.encode(), overwrite=True)
    written.append(out_dir / name)
  if plots:
    from gvae_jax.eval import plots as plots_lib

    for name, data in plots_lib.render_all(results).items():
      fileio.atomic_write_bytes(out_dir / name, data, overwrite=True)
      written.append(out_dir / name)
  # results.json last: its presence means the run is complete (gvae sweep resumes on it).
  fileio.atomic_write_bytes(out_dir / RESULTS_JSON, results_json(results).encode(),
                            overwrite=True)
  written.append(out_dir / RESULTS_JSON)
  return written


def load_results(path: str | os.PathLike) -> dict:
  """A results.json read back (exact files' PSNR, stored as null, is inf again)."""
  results = json.loads(Path(path).read_text())
  for row in results["rows"]:
    if row.get("psnr") is None and row.get("mse") == 0:
      row["psnr"] = math.inf
  return results


def merge_results(parts: Sequence[dict], command: str | None = None) -> dict:
  """One results dict from runs of the same model and settings on disjoint images
  (e.g. several processes on a shared machine); means and BD-rates recomputed.

  EvalError if the parts differ in model, settings or anchors, or share an image.
  """
  if not parts:
    raise EvalError("nothing to merge")
  first = parts[0]
  for part in parts[1:]:
    for key in ("model", "settings", "overrides"):
      if part[key] != first[key]:
        raise EvalError(f"cannot merge: the runs differ in {key}")
  names = [i["image"] for part in parts for i in part["images"]["evaluated"]]
  if len(names) != len(set(names)):
    raise EvalError("cannot merge: the runs share images")
  rows = [row for part in parts for row in part["rows"]]
  means = compute_means(rows)
  merged = dict(first)
  merged.update(
      timestamp=min(part["timestamp"] for part in parts),
      seconds=max(part["seconds"] for part in parts),
      command=command or " + ".join(dict.fromkeys(part["command"] for part in parts)),
      images={"folder": first["images"]["folder"],
              "evaluated": [i for part in parts for i in part["images"]["evaluated"]],
              "skipped": [i for part in parts for i in part["images"]["skipped"]],
              "max_images": None},
      means=means, bd_rates=bd_rates(means),
      failures=[f for part in parts for f in part["failures"]],
      notes=list(dict.fromkeys(n for part in parts for n in part["notes"])),
      rows=rows, merged_from=[part["command"] for part in parts])
  return merged


def check_failures(results: dict) -> None:
  """EvalError (non-zero exit) if any file failed or broke its tau bound."""
  failures = results["failures"]
  if failures:
    first = failures[0]
    raise EvalError(f"{len(failures)} failure(s), e.g. {first['codec']} {first['setting']} on "
                    f"{first['image']}: {first['reason']} (all listed in summary.md)")


# --- `gvae eval` (gvae_jax/cli.py parses the arguments) -----------------------------------

def check_command(args) -> None:
  """The checks that need no model (and no JAX): they fail fast."""
  if args.max_images is not None and args.max_images < 1:
    raise EvalError(f"--max-images must be at least 1, got {args.max_images}")
  check_out_dir(args.out)
  parse_overrides(args.override)
  if args.taus:
    check_taus(args.taus)


def command_line(args) -> str:
  """The `gvae eval` command of `args`, as typed (recorded in results.json)."""
  def text(value):
    return f"{value:.0f}" if isinstance(value, float) and value.is_integer() else str(value)

  command = ["gvae", "eval", "--model", args.model, "--images", args.images, "--out", args.out]
  for flag, values in (("--rates", args.rates), ("--taus", args.taus),
                       ("--anchors", args.anchors), ("--override", args.override)):
    if values is not None:
      command += [flag, *map(text, values)]
  for flag, value in (("--tau-rate", args.tau_rate), ("--max-images", args.max_images),
                      ("--base", None if args.base == "auto" else args.base)):
    if value is not None:
      command += [flag, text(value)]
  command += [flag for flag, on in (("--no-progress", args.no_progress),
                                    ("--no-warmup", args.no_warmup)) if on]
  return shlex.join(command)


def run_command(args) -> dict:
  """Evaluates, writes the outputs, prints the summary; EvalError after writing on failures."""
  anchors = False if args.anchors is None else (args.anchors or True)
  results = evaluate(args.model, args.images, rates=args.rates, taus=args.taus,
                     anchors=anchors, overrides=args.override, tau_rate=args.tau_rate,
                     max_images=args.max_images or 0, progress=not args.no_progress,
                     warmup=not args.no_warmup, command=command_line(args), base=args.base)
  write_outputs(results, args.out)
  print(format_summary(results))
  print(f"wrote {args.out}/{{{RESULTS_JSON},{RESULTS_CSV},{SUMMARY_MD},psnr_bpp.png,"
        "msssim_bpp.png,bpsp_tau.png}")
  check_failures(results)  # after writing: the failures are in the outputs
  return results
