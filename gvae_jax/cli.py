"""The `gvae` command. Thin: parses arguments and calls the library.

Every user-facing failure is a gvae_jax.errors.UserError (or an OSError about
a path) and ends as one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from gvae_jax.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _train(args, overrides):
  from gvae_jax import config as config_lib
  from gvae_jax.train import train

  config = config_lib.load_config(args.config, overrides)
  train.train_and_evaluate(config, args.workdir, progress=not args.no_progress)


def _estimate(args, overrides):
  """Estimated RD of a training workdir's newest checkpoint on an image folder."""
  from gvae_jax import config as config_lib
  from gvae_jax.models import build_model
  from gvae_jax.train import checkpoints
  from gvae_jax.train import evaluate as evaluate_lib

  workdir = Path(args.workdir)
  config_path = workdir / checkpoints.CONFIG_FILE
  if not config_path.exists():
    raise UserError(f"{workdir} is not a training workdir (no {checkpoints.CONFIG_FILE})")
  import ml_collections
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  config_lib.apply_overrides(config, overrides)
  model = build_model(config)
  params, step = checkpoints.restore_params(workdir)
  images = evaluate_lib.load_folder(args.images, args.max_images)
  fractional = config.eval.fractional_rates if args.rates is None else []
  rates = (evaluate_lib.default_rates(config.model.levels, fractional)
           if args.rates is None else [float(r) for r in args.rates])
  report = evaluate_lib.estimate_rd(model, params, images, rates)
  report.update(step=step, folder=str(args.images), workdir=str(workdir))
  print(evaluate_lib.format_table(report))
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=2))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="gvae", description=__doc__.splitlines()[0])
  parser.add_argument("-v", "--verbose", action="store_true", help="log more")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train (or resume) a model in a workdir",
                     epilog="Override any config field with --config.section.key=value.")
  p.add_argument("--config", required=True, help="experiments/configs/NAME.py[:arg]")
  p.add_argument("--workdir", required=True, help="checkpoints, logs and evaluations go here")
  p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
  p.set_defaults(run=_train, takes_overrides=True)

  p = sub.add_parser("estimate", help="estimated bpp/PSNR/MS-SSIM of a workdir's model")
  p.add_argument("--workdir", required=True)
  p.add_argument("--images", required=True, help="folder of images, e.g. kodak")
  p.add_argument("--rates", nargs="+", help="rates s (default: every level + config fractional rates)")
  p.add_argument("--max-images", type=int, default=0)
  p.add_argument("--out", help="write the report as JSON here")
  p.set_defaults(run=_estimate, takes_overrides=True)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  overrides = [r for r in rest if r.startswith("--config.")]
  unknown = [r for r in rest if not r.startswith("--config.")]
  if unknown or (overrides and not getattr(args, "takes_overrides", False)):
    parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  try:
    args.run(args, overrides)
  except UserError as e:
    print(f"gvae: error: {e}", file=sys.stderr)
    return e.exit_code
  except OSError as e:  # missing paths, permissions, full disks
    print(f"gvae: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("gvae: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
