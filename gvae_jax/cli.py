"""The `gvae` command. Thin: parses arguments and calls the library.

Every user-facing failure is a gvae_jax.errors.UserError (or an OSError about
a path) and ends as one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path

from gvae_jax.errors import UserError

# Before anything imports TensorFlow: level 3 also hides the three "Unable to
# register cuDNN/cuFFT/cuBLAS factory" ERROR lines TF prints on a CPU-only
# machine where jaxlib registered them first (stderr carries our messages only).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _train(args, overrides):
  from gvae_jax import config as config_lib
  from gvae_jax.train import train

  config = config_lib.load_config(args.config, overrides)
  if train.persistent_cache_is_safe_for_training():
    _enable_compilation_cache()  # a restarted run reuses the compiled train step
  if args.coordinator_address:
    from gvae_jax.train import parallel
    # Multi-host (pods, or several local processes): every process runs this
    # same command with its own --process-id.
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)
  train.train_and_evaluate(config, args.workdir, progress=not args.no_progress)


def _estimate(args, overrides):
  """The model's estimates on an image folder: of a workdir's newest checkpoint
  (estimated RD), or of an exported model (estimate vs real file sizes)."""
  from gvae_jax.eval import images as images_lib

  if args.out:  # before the slow part: an existing or unwritable --out fails now
    _check_output(args.out, args.force)
  if args.model is not None and overrides:
    raise UserError("--config overrides apply to --workdir only (an exported model is "
                    "evaluated as exported)")
  rates = list(args.rates) if args.rates is not None else None
  images_lib.list_images(args.images, args.max_images)  # fail before the slow imports
  if args.model is not None:
    return _estimate_exported(args, rates)
  from gvae_jax.coding import settings
  from gvae_jax.eval import estimate
  from gvae_jax.train import checkpoints

  config, model, params, step = checkpoints.load_workdir(args.workdir, overrides)
  levels = int(config.model.levels)
  if rates is None:
    rates = estimate.default_rates(levels, config.eval.fractional_rates)
  rates = [float(settings.check_rate(r, levels)) for r in rates]
  images = images_lib.load_images(args.images, args.max_images)
  report = estimate.estimate_rd(model, params, images, rates)
  report.update(step=step, folder=str(args.images), workdir=str(args.workdir))
  print(estimate.format_table(report))
  _write_report(args.out, report, args.force)


def _estimate_exported(args, rates):
  from gvae_jax.coding import export, settings
  from gvae_jax.eval import images as images_lib
  from gvae_jax.eval import report as report_lib

  model = export.load_model(args.model)
  rates = [float(i) for i in range(model.levels)] if rates is None else rates
  for rate in rates:
    settings.check_rate(rate, model.levels)
  images = images_lib.load_images(args.images, args.max_images)
  report = report_lib.real_vs_estimate(model, images, rates)
  print(report_lib.format_table(report))
  _write_report(args.out, report, args.force)


def _write_report(out: str | None, report: dict, force: bool) -> None:
  if out:  # atomically; an existing file only with --force (checked before the work too)
    _write_output(out, (json.dumps(report, indent=2) + "\n").encode(), force)


def _export(args, overrides):
  from gvae_jax.train import checkpoints

  exported = checkpoints.export_workdir(args.workdir, args.out, step=args.step, force=args.force)
  print(f"exported {exported.name} (step {exported.manifest['step']}, "
        f"{exported.levels} levels) to {args.out}: fingerprint {exported.fingerprint.hex()}")


def _attach_flat(args, overrides):
  from gvae_jax.coding import export

  out = export.attach_flat_head(args.model, args.flat_head, args.out, force=args.force,
                                exact=args.exact)
  model = export.load_model(out)
  kind = "exact flat head" if model.flat.exact is not None else "flat head"
  print(f"{out}: {model.name} with {kind} (step {model.flat.manifest.get('step')}): "
        f"fingerprint {model.fingerprint.hex()}")


def _convert_exact(args, overrides):
  from gvae_jax.coding import export

  out = export.convert_exact(args.model, args.out, force=args.force)
  model = export.load_model(out)
  kinds = ["lossy"]
  if model.exact_residual is not None:
    kinds.append("lossy-base near-lossless and lossless")
  if model.flat is not None and model.flat.exact is not None:
    kinds.append("flat-base")
  print(f"{out}: {model.name} converted to exact integer arithmetic ({', '.join(kinds)} files "
        f"decode alike on every platform): fingerprint {model.fingerprint.hex()}")
  if model.is_scalable and model.exact_residual is None:
    _warn(f"{out}: its lossy-base residual head did not convert (only the 'delta' bias "
          "correction does): its lossy-base near-lossless files stay float, platform-bound")


def _eval(args, overrides):
  """Rate-distortion on real files, with anchors (gvae_jax/eval/harness.py)."""
  from gvae_jax.eval import harness

  harness.check_command(args)  # cheap checks before JAX loads
  _enable_compilation_cache()
  harness.run_command(args)


def _check_output(path: str, force: bool) -> None:
  """Fails now, before any slow work, if `path` cannot be written (fileio.check_output_path)."""
  from gvae_jax import fileio

  try:
    fileio.check_output_path(path, overwrite=force)
  except FileExistsError:
    raise UserError(f"{path} already exists; pass --force to overwrite it") from None
  except IsADirectoryError:
    raise UserError(f"{path} is a directory; give a file name") from None


def _write_output(path: str, data, force: bool) -> None:
  from gvae_jax import fileio

  try:
    fileio.atomic_write_bytes(path, data, overwrite=force)
  except FileExistsError:
    raise UserError(f"{path} already exists; pass --force to overwrite it") from None
  except IsADirectoryError:
    raise UserError(f"{path} is a directory; give a file name") from None


def _memory_cap(args):
  from gvae_jax.coding import memory

  return memory.memory_cap(getattr(args, "max_memory", None))


def _model_scale(model) -> float:
  from gvae_jax.coding import memory

  lossy = model.lossy_model
  return memory.model_scale(lossy.n, lossy.m)


def _warn(message: str) -> None:
  print(f"gvae: warning: {message}", file=sys.stderr)


def _enable_compilation_cache() -> None:
  """Keeps XLA's compiled programs on disk between runs of compress / decompress.

  A residual (near-lossless) file needs ~20 programs (step batch sizes x
  functions); compiling them takes longer than coding a 768x512 image, and
  the next run reuses them. Directory: $GVAE_COMPILATION_CACHE, default
  ~/.cache/gvae-jax/xla; set it to "off" to disable. Cached programs are the
  same programs, so outputs do not change.
  """
  location = os.environ.get("GVAE_COMPILATION_CACHE",
                            str(Path.home() / ".cache" / "gvae-jax" / "xla"))
  if location.strip().lower() in ("", "off", "0", "none"):
    return
  import jax

  try:
    Path(location).mkdir(parents=True, exist_ok=True)
  except OSError:
    return  # an unwritable cache only costs time
  jax.config.update("jax_compilation_cache_dir", location)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _compress(args, overrides):
  from gvae_jax import fileio, image_io
  from gvae_jax.coding import settings

  # Cheap checks first: JAX (and later TensorFlow) take seconds to import.
  tau = 0 if args.lossless else args.tau
  if args.lossless and args.tau is not None:
    raise UserError("--lossless is --tau 0; give one of them")
  if tau is None and args.rate is None and args.bpp is None:
    raise UserError("give --rate or --bpp (lossy), or --tau / --lossless (near-lossless, "
                    "lossless)")
  if tau is not None and args.bpp is not None:
    raise UserError("--bpp is for lossy files; with --tau / --lossless give --rate for the "
                    "base layer, or nothing to pick the rate of the smallest file")
  if tau is not None:
    tau = settings.check_tau(tau)  # the number, before anything slow; the model's kind later
  if tau is None and args.base != "auto":
    raise UserError("--base is for near-lossless and lossless files (--tau / --lossless)")
  _check_output(args.output, args.force)
  from gvae_jax.coding import memory
  # Large images are coded in tiles when lossy, and on the flat base in tiles
  # when near-lossless / lossless (unless --base lossy); the model may refine it.
  mode = ("lossy" if tau is None else "residual" if args.base == "lossy"
          else "exact_flat_residual_tiled")
  cap, source = _memory_cap(args)
  # The largest image the cap allows (for the reference model size), checked on
  # the file's header before a pixel is decoded; refined below for the model.
  max_pixels = memory.MAX_CODEC_PIXELS if mode == "residual" else memory.MAX_TILED_PIXELS
  note = "the codec's limit"
  if cap is not None:
    fitting = memory.max_fitting_pixels(cap, mode, "compress")
    if fitting < max_pixels:
      max_pixels, note = fitting, f"what the memory cap of {cap / 2**30:.1f} GiB ({source}) allows"
  pixels, info = image_io.read_image(args.input, max_pixels=max_pixels, limit_note=note)
  for warning in info.warnings():
    _warn(f"{args.input}: {warning}")
  from gvae_jax.coding import codec, export
  _enable_compilation_cache()
  model = export.load_model(args.model or _default_model(tau is not None))
  if tau is not None:
    tiled = codec.tiled_flat_mode(model, pixels.shape[0], pixels.shape[1], args.base)
    mode = "residual" if tiled is None else tiled.name.lower()
  memory.check(pixels.shape[0], pixels.shape[1], mode, "compress", cap, source,
               _model_scale(model))
  if info.source_mode in (image_io.SourceMode.GRAYSCALE, image_io.SourceMode.BILEVEL):
    pixels = pixels[:, :, 0]  # coded as RGB, decoded back to grayscale (codec doc)
  from gvae_jax.coding.coder import CODER_NAMES, get_coder
  coder = None if args.coder is None else CODER_NAMES[args.coder]
  if coder is not None:
    get_coder(coder)  # a missing backend fails before the work
  if tau is not None:
    data = codec.compress(model, pixels, args.rate, tau=tau, coder=coder, base=args.base,
                          allow_stored=True)
  elif args.bpp is not None:
    data, _ = codec.compress_to_bpp(model, pixels, args.bpp, coder=coder)
  else:
    data = codec.compress(model, pixels, args.rate, coder=coder, allow_stored=True)
  _write_output(args.output, data, args.force)
  header = codec.read_header(data)
  note = "" if not info.converted else f" ({info.describe()})"
  print(f"{args.output}: {len(data)} bytes, {codec.bits_per_pixel(data, header):.4f} bpp, "
        f"rate {header.rate:.6g}{_tau_note(header)}, {header.width}x{header.height}{note}")


def _default_model(near_lossless: bool) -> str:
  from gvae_jax.coding import defaults

  path = defaults.default_model(near_lossless)
  logging.info("no --model: using the shipped model %s", path)
  return str(path)


def _tau_note(header) -> str:
  from gvae_jax.coding import container
  from gvae_jax.coding.container import Mode

  if header.mode == Mode.STORED:
    return ", lossless (pixels stored: smaller than coding them)"
  if header.mode not in container.RESIDUAL_MODES:
    return ""
  return ", lossless" if header.tau == 0 else f", tau {header.tau} (near-lossless)"


def _base_note(header) -> str:
  from gvae_jax.coding.container import Mode

  return {Mode.LOSSY: "none (lossy file)",
          Mode.LOSSY_TILED: "none (lossy file, networks run in tiles)",
          Mode.EXACT_LOSSY: "none (lossy file in exact integer arithmetic: decodes alike on "
                            "every platform)",
          Mode.EXACT_LOSSY_TILED: "none (lossy file, networks run in tiles in exact integer "
                                  "arithmetic: decodes alike on every platform)",
          Mode.RESIDUAL: f"lossy layer at rate s {header.rate:.9g}",
          Mode.EXACT_RESIDUAL: f"lossy layer at rate s {header.rate:.9g}, layers and residual "
                               "in exact integer arithmetic (decodes alike on every platform)",
          Mode.FLAT_RESIDUAL: "flat (every value 128; no lossy layer)",
          Mode.EXACT_FLAT_RESIDUAL: "flat (every value 128; no lossy layer), coded in "
                                    "exact integer arithmetic (decodes alike on every "
                                    "platform)",
          Mode.FLAT_RESIDUAL_TILED: "flat (every value 128; no lossy layer), residual "
                                    "coded in tiles",
          Mode.EXACT_FLAT_RESIDUAL_TILED: "flat (every value 128; no lossy layer), residual "
                                          "coded in tiles in exact integer arithmetic "
                                          "(decodes alike on every platform)"}[header.mode]


def _write_png(path: str, pixels, overwrite: bool) -> None:
  """RGB through image_io; grayscale [H, W] as an 8-bit gray PNG, equally atomic."""
  import io

  import numpy as np
  from PIL import Image

  from gvae_jax import fileio, image_io

  if pixels.ndim == 3:
    image_io.write_png(path, pixels, overwrite=overwrite)
    return
  encoded = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(pixels, np.uint8)).save(encoded, format="PNG")
  fileio.atomic_write_bytes(path, encoded.getbuffer(), overwrite=overwrite)


def _decompress(args, overrides):
  from gvae_jax.coding import container, memory

  _check_output(args.output, args.force)
  cap, source = _memory_cap(args)

  def fits(header, size):  # on the header alone, before the body is read
    mode = header.mode.name.lower()
    memory.check(header.height, header.width, mode, "decompress", cap, source, 1.0, size)

  data = container.read_file(args.input, check=fits)
  header, _ = container.unpack(data)  # a broken file fails before JAX even loads
  model_dir = args.model
  if model_dir is None:
    from gvae_jax.coding import defaults
    found = defaults.model_for_fingerprint(header.fingerprint)
    if found is None:
      raise UserError(f"{args.input} was not made by a shipped model (fingerprint "
                      f"{header.fingerprint.hex()}); give the model that made it with --model")
    model_dir = str(found)
  from gvae_jax.coding import codec, export
  _enable_compilation_cache()
  model = export.load_model(model_dir)
  mode = header.mode.name.lower()
  memory.check(header.height, header.width, mode, "decompress", cap, source,
               _model_scale(model), len(data))
  pixels = codec.decompress(model, data)
  try:
    _write_png(args.output, pixels, overwrite=args.force)
  except FileExistsError:
    raise UserError(f"{args.output} already exists; pass --force to overwrite it") from None
  except IsADirectoryError:
    raise UserError(f"{args.output} is a directory; give a file name") from None
  kind = "grayscale" if header.channels == 1 else "RGB"
  print(f"{args.output}: {header.width}x{header.height} {kind} from {len(data)} bytes "
        f"({codec.bits_per_pixel(data, header):.4f} bpp, rate {header.rate:.6g}"
        f"{_tau_note(header)})")


def _info(args, overrides):
  from gvae_jax.coding import container

  data = container.read_file(args.input)
  header, sections = container.unpack(data)
  pixels = header.height * header.width
  rows = [
      ("file", args.input),
      ("bytes", len(data)),
      ("bpp", f"{8.0 * len(data) / pixels:.4f}"),
      ("format version", data[4]),
      ("mode", header.mode.name.lower() + _tau_note(header)),
      ("base", _base_note(header)),
      ("rate s", f"{header.rate:.9g}"),
      ("tau", f"{header.tau} (every decoded value within tau of the original)"
       if header.mode in container.RESIDUAL_MODES else
       f"{header.tau} (stored pixels: lossless)" if header.mode == container.Mode.STORED
       else f"{header.tau} (lossy: no bound)"),
      ("size", f"{header.width}x{header.height} (width x height)"),
      ("channels", header.channels),
      ("coder id", f"{header.coder_id} ({_coder_name(header.coder_id)})"),
      ("model fingerprint", header.fingerprint.hex()),
      ("sections", ", ".join(
          f"{name} {len(s)} bytes" if name else f"{len(s)} bytes"
          for name, s in zip(_section_names(header, len(sections)), sections)) or "none"),
  ]
  for key, value in rows:
    print(f"{key + ':':<19}{value}")


def _coder_name(coder_id: int) -> str:
  from gvae_jax.coding.coder import CODER_NAMES
  names = {v: k for k, v in CODER_NAMES.items()}
  return names.get(coder_id, "unknown")


def _section_names(header, count: int) -> list[str]:
  from gvae_jax.coding import container
  from gvae_jax.coding.container import Mode

  if header.mode == Mode.STORED:
    return ["pixels (zlib)"] if count == 1 else [""] * count
  residual = ["residual side info", "residual streams", "pixel check"]
  if header.mode in container.FLAT_MODES:
    names = residual
  else:
    names = ["z", "y"] + (residual if header.mode in container.LOSSY_BASE_MODES else [])
  return names if len(names) == count else [""] * count


def _sweep(args, overrides):
  from gvae_jax import sweep as sweep_lib

  sweep = sweep_lib.load_sweep(args.sweep)
  out = Path(args.out or Path("runs") / "sweeps" / sweep.name)
  if not args.collate_only:
    statuses = sweep_lib.run_sweep(sweep, out, jobs=args.jobs, images=args.images,
                                   max_images=args.max_images, only=args.only or (),
                                   dry_run=args.dry_run, train_overrides=overrides,
                                   engine=args.engine, resources=_resource_args(args),
                                   ray_address=args.ray_address)
    if args.dry_run:
      return
  summary = sweep_lib.collate(sweep, out)
  print(sweep_lib.format_markdown(summary))
  print(f"collated into {out}/sweep_results.{{json,csv,md}}")
  failed = [] if args.collate_only else [s["name"] for s in statuses if s.get("failed")]
  if failed:
    raise sweep_lib.SweepError(f"runs failed: {', '.join(failed)} (see their logs in {out})")


def _resource_args(args) -> dict:
  return {key: value for key, value in (("num_cpus", args.num_cpus), ("num_gpus", args.num_gpus))
          if value is not None}


def _rate_arg(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


_MAX_MEMORY_HELP = ("refuse images whose estimated peak memory exceeds SIZE (16G, 800M, off; "
                    "default $GVAE_MAX_MEMORY, else half the physical memory)")


def _add_codec_files(p: argparse.ArgumentParser, input_help: str, output_help: str,
                     model_help: str) -> None:
  p.add_argument("input", help=input_help)
  p.add_argument("output", help=output_help)
  p.add_argument("--model", help=model_help)


def _add_output_options(p: argparse.ArgumentParser) -> None:
  """The options compress and decompress share for what they write and may use."""
  p.add_argument("--force", action="store_true", help="overwrite an existing output")
  p.add_argument("--max-memory", metavar="SIZE", help=_MAX_MEMORY_HELP)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="gvae", description="gvae-jax: variable-rate learned image compression (train, export, "
      "compress, decompress).")
  parser.add_argument("-v", "--verbose", action="store_true", help="log more")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train (or resume) a model in a workdir",
                     epilog="Override any config field with --config.section.key=value.")
  p.add_argument("--config", required=True, help="experiments/configs/NAME.py[:arg]")
  p.add_argument("--workdir", required=True, help="checkpoints, logs and evaluations go here")
  p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
  p.add_argument("--coordinator-address", help="multi-host: HOST:PORT of process 0, or 'auto' "
                 "(Cloud TPU VMs, SLURM: JAX finds the cluster)")
  p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
  p.add_argument("--process-id", type=int, help="multi-host: this process's index")
  p.set_defaults(run=_train, takes_overrides=True)

  p = sub.add_parser("estimate", help="the model's bit estimates: estimated bpp/PSNR/MS-SSIM of "
                     "a workdir's checkpoint, or estimated vs real bits of an exported model")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training workdir: estimated rate-distortion")
  source.add_argument("--model", help="exported model: real file sizes against the estimates")
  p.add_argument("--images", required=True, help="folder of images, e.g. kodak")
  p.add_argument("--rates", nargs="+", type=_rate_arg, metavar="S",
                 help="rates s (default: every level, with --workdir also the config's "
                 "fractional rates)")
  p.add_argument("--max-images", type=int, default=0)
  p.add_argument("--out", help="write the report as JSON here (atomically)")
  p.add_argument("--force", action="store_true", help="overwrite an existing --out")
  p.set_defaults(run=_estimate, takes_overrides=True)

  p = sub.add_parser("export", help="export a workdir's checkpoint as a codec model directory")
  p.add_argument("--workdir", required=True, help="training workdir (config.json, checkpoints/)")
  p.add_argument("--out", required=True, help="model directory to create")
  p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
  p.add_argument("--force", action="store_true", help="replace an existing exported model")
  p.set_defaults(run=_export)

  p = sub.add_parser("eval", help="rate-distortion of an exported model on real files, with "
                     "classical anchors and BD-rates")
  p.add_argument("--model", required=True, help="exported model directory")
  p.add_argument("--images", required=True, help="folder of images, e.g. kodak")
  p.add_argument("--out", required=True, help="output folder (results.json/.csv, summary.md, "
                 "plots); created, earlier outputs replaced")
  p.add_argument("--rates", nargs="*", type=_rate_arg, metavar="S",
                 help="lossy rates s (default: every level and midpoint; none if empty)")
  p.add_argument("--taus", nargs="*", metavar="T", help="near-lossless bounds, 0 = lossless "
                 "(default: 0..5 for scalable models, none for lossy-only ones)")
  p.add_argument("--tau-rate", type=_rate_arg, metavar="S", help="base rate of every "
                 "near-lossless file (default: chosen per image, as gvae compress --tau)")
  p.add_argument("--base", choices=("auto", "flat", "lossy"), default="auto",
                 help="base of the near-lossless files (as gvae compress --base)")
  p.add_argument("--anchors", nargs="*", metavar="NAME", help="also run classical codecs on "
                 "the same images: all of them, or the named ones (e.g. png jpeg-420)")
  p.add_argument("--max-images", type=int, help="evaluate the first N images only")
  p.add_argument("--override", nargs="+", action="extend", metavar="KEY=VALUE",
                 help="eval-time model setting: model.interpolation=linear, "
                 "model.residual.bias_correction=false")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--no-warmup", action="store_true",
                 help="time the first coding of each image shape too (compilation included)")
  p.set_defaults(run=_eval)

  p = sub.add_parser("compress", help="compress an image to a .gvae file")
  _add_codec_files(p, "image file (PNG, JPEG, ...; 8-bit RGB, grayscale or palette)",
                   ".gvae file to write", "exported model directory (default: the shipped "
                   "model, lossy or, with --tau / --lossless, scalable)")
  target = p.add_mutually_exclusive_group()
  target.add_argument("--rate", type=_rate_arg,
                      help="rate s in [0, levels-1], continuous (with --tau: of the base layer)")
  target.add_argument("--bpp", type=_rate_arg,
                      help="largest rate whose file is at most this many bits per pixel")
  p.add_argument("--tau", help="near-lossless: every decoded value within tau (an integer "
                 ">= 0) of the original; needs a scalable model. Without --rate the base rate "
                 "of the smallest file is chosen")
  p.add_argument("--lossless", action="store_true", help="lossless: the same as --tau 0")
  p.add_argument("--coder", choices=("constriction", "tfc"),
                 help="entropy coder backend (default: tfc where installed, the tfc profile; "
                      "constriction otherwise)")
  p.add_argument("--base", choices=("auto", "flat", "lossy"), default="auto",
                 help="with --tau / --lossless: the base layer; auto (default) takes the "
                 "smaller file of the lossy layer and, if the model has a flat head, the "
                 "flat base")
  _add_output_options(p)
  p.set_defaults(run=_compress)

  p = sub.add_parser("attach-flat", help="copy a scalable model with a flat-base residual "
                     "head attached (near-lossless / lossless files without a lossy layer)")
  p.add_argument("--model", required=True, help="exported scalable model directory")
  p.add_argument("--flat-head", required=True, help="flat head directory (written by "
                 "python -m gvae_jax.train.flat_residual)")
  p.add_argument("--out", required=True, help="model directory to create")
  p.add_argument("--exact", action="store_true", help="convert the head to exact integer "
                 "arithmetic: its files decode to the same pixels on every platform "
                 "(docs/decoding.md, Exact decoding)")
  p.add_argument("--force", action="store_true", help="replace an existing exported model")
  p.set_defaults(run=_attach_flat)

  p = sub.add_parser("convert-exact", help="copy an exported model converted to exact "
                     "integer arithmetic: its lossy files (and, with a flat head, its "
                     "near-lossless and lossless files) decode to the same pixels on every "
                     "platform (docs/decoding.md, Exact decoding)")
  p.add_argument("--model", required=True, help="exported model directory")
  p.add_argument("--out", required=True, help="model directory to create")
  p.add_argument("--force", action="store_true", help="replace an existing exported model")
  p.set_defaults(run=_convert_exact)

  p = sub.add_parser("decompress", help="decompress a .gvae file to PNG")
  _add_codec_files(p, ".gvae file", "PNG file to write", "the exported model that compressed "
                   "it (default: the shipped model whose fingerprint the file carries)")
  _add_output_options(p)
  p.set_defaults(run=_decompress)

  p = sub.add_parser("sweep", help="run an ablation sweep (train, export, eval) and collate it",
                     epilog="--config.section.key=value overrides go to every training run "
                     "(before each run's own); use a new --out when changing them.")
  p.add_argument("sweep", help="experiments/sweeps/NAME.py")
  p.add_argument("--out", help="output folder (default runs/sweeps/NAME)")
  p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
  p.add_argument("--images", help="evaluation images (default: the sweep's, Kodak)")
  p.add_argument("--max-images", type=int, help="evaluate on the first N images only")
  p.add_argument("--only", nargs="+", help="run only these run names")
  p.add_argument("--dry-run", action="store_true", help="print the commands of unfinished stages")
  p.add_argument("--collate-only", action="store_true", help="only collate finished runs")
  p.add_argument("--engine", choices=("local", "ray"), default="local",
                 help="local: --jobs runs at a time on this machine (default); ray: one Ray "
                 "task per run on a Ray cluster (pip install 'gvae-jax[ray]')")
  p.add_argument("--num-cpus", type=float, help="ray: CPUs per run unless the sweep file says "
                 "(default 1)")
  p.add_argument("--num-gpus", type=float, help="ray: GPUs per run unless the sweep file says "
                 "(default 0)")
  p.add_argument("--ray-address", help="ray: cluster address (default $RAY_ADDRESS, else a new "
                 "local cluster)")
  p.set_defaults(run=_sweep, takes_overrides=True)

  p = sub.add_parser("info", help="print the header of a .gvae file (no model needed)")
  p.add_argument("input", help=".gvae file")
  p.set_defaults(run=_info)
  return parser


_SUPERVISED_COMMANDS = ("compress", "decompress")
_SUPERVISED_ENV = "GVAE_SUPERVISED"
# What a C++ allocation failure prints before abort(): not for the user's terminal.
_ABORT_LINES = ("terminate called after throwing an instance of 'std::bad_alloc'",
                "what():  std::bad_alloc", "what(): std::bad_alloc")


def _run_supervised(argv: list[str]) -> int:
  """Runs the command in a child process and turns its death by OOM into one line.

  XLA and TensorFlow allocate in C++: when an allocation fails there (a
  memory limit, a full machine) they throw std::bad_alloc and abort the
  process, which Python cannot catch; the kernel's OOM killer sends SIGKILL.
  So compress / decompress run in a child (the same command with
  GVAE_SUPERVISED=1); this parent only imports the standard library, passes
  stdout through, filters the C++ abort lines from stderr, forwards SIGTERM
  and SIGINT, and reports an abort or kill as `gvae: error: out of memory`.
  """
  import subprocess

  env = {**os.environ, _SUPERVISED_ENV: "1"}
  # Its own process group: a terminal's Ctrl-C reaches only this parent, which passes
  # it on once (twice would interrupt the child's cleanup of its temporary file).
  child = subprocess.Popen([sys.executable, "-m", "gvae_jax", *argv], env=env,
                           stderr=subprocess.PIPE, text=True, errors="replace",
                           process_group=0)

  def forward(signum, frame):
    child.send_signal(signum)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
  bad_alloc = False
  try:
    for line in child.stderr:
      if line.strip() in _ABORT_LINES:
        bad_alloc = True
        continue
      sys.stderr.write(line)
      sys.stderr.flush()
    code = child.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if code in (-signal.SIGABRT, -signal.SIGKILL, -signal.SIGSEGV, -signal.SIGBUS) and (
      bad_alloc or code == -signal.SIGKILL):
    print(f"gvae: error: {_OUT_OF_MEMORY}", file=sys.stderr)
    return 3
  if code in (-signal.SIGSEGV, -signal.SIGBUS) and _address_space_limited():
    # C++ code that does not check its allocations (LLVM while XLA compiles) crashes
    # instead of throwing when an address-space limit is reached.
    print(f"gvae: error: {_OUT_OF_MEMORY} (the coder crashed with signal {-code} under "
          "this process's address-space limit, ulimit -v)", file=sys.stderr)
    return 3
  if code == -signal.SIGTERM:
    return 143
  if code == -signal.SIGINT:
    return 130
  if code < 0:
    print(f"gvae: error: the coder process died with signal {-code}", file=sys.stderr)
    return 1
  return code


def _address_space_limited() -> bool:
  import resource

  soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  return soft != resource.RLIM_INFINITY


def main(argv: list[str] | None = None) -> int:
  command_line = argv is None
  argv = sys.argv[1:] if argv is None else argv
  if (command_line and not os.environ.get(_SUPERVISED_ENV)
      and any(a in _SUPERVISED_COMMANDS for a in argv[:3])
      and not any(a in ("-h", "--help") for a in argv)):
    return _run_supervised(argv)
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  overrides = [r for r in rest if r.startswith("--config.")]
  unknown = [r for r in rest if not r.startswith("--config.")]
  if unknown or (overrides and not getattr(args, "takes_overrides", False)):
    parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  previous_sigterm = _terminate_with_cleanup()
  try:
    args.run(args, overrides)
  except _Terminated:
    print("gvae: terminated", file=sys.stderr)
    return 143
  except MemoryError:
    print(f"gvae: error: {_OUT_OF_MEMORY}", file=sys.stderr)
    return 3
  except UserError as e:
    print(f"gvae: error: {e}", file=sys.stderr)
    return e.exit_code
  except OSError as e:  # missing paths, permissions, full disks
    print(f"gvae: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("gvae: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - only out-of-memory errors become a message
    if not _is_out_of_memory(e):
      raise
    print(f"gvae: error: {_OUT_OF_MEMORY}", file=sys.stderr)
    return 3
  finally:
    if previous_sigterm is not None:
      signal.signal(signal.SIGTERM, previous_sigterm)
  return 0


_OUT_OF_MEMORY = ("out of memory: the image needs more memory than this machine or process "
                  "has (see --max-memory; try a smaller image or free memory)")


def _is_out_of_memory(error: BaseException) -> bool:
  """XLA's / TensorFlow's allocation failures, recognised without importing them."""
  name = type(error).__name__
  if isinstance(error, OSError) and error.errno == errno.ENOMEM:
    return True
  text = str(error)[:2000]
  # e.g. XlaRuntimeError "RESOURCE_EXHAUSTED: Out of memory ...", TF's
  # ResourceExhaustedError, a shared library that cannot be mapped under ulimit -v.
  return any(marker in text for marker in (
      "RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "bad_alloc",
      "Allocation failure", "failed to allocate", "failed to map segment",
      "Cannot allocate memory"))


class _Terminated(BaseException):
  """SIGTERM, raised as an exception so that `finally` blocks remove temporary files."""


def _terminate_with_cleanup():
  def handler(signum, frame):
    raise _Terminated()

  try:
    return signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread (main() called from a library)
    return None


if __name__ == "__main__":
  sys.exit(main())
