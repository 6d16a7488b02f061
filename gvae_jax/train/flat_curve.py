"""The training curve of a flat-head run: estimated bpsp on images against training time.

For every export of a gvae_jax.train.flat_residual workdir (exports/step_*),
the flat-base file's estimated bits per subpixel (codec.estimate_flat_size:
the head's one-pass likelihoods with the coder's contexts; real files are
within about 1 % of it, see the Kodak tables) at each tau, averaged over the
images, against the run's cumulative training seconds:

  python -m gvae_jax.train.flat_curve --workdir workdirs/flat_residual \\
      --images ../shared/data/kodak --taus 0 1 2 3 4 5 --out curve.json [--plot curve.png]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gvae_jax.errors import UserError, report_user_errors


def estimate_curve(workdir: str | Path, images: list[np.ndarray], taus: list[int],
                   every: int = 1) -> list[dict]:
  from gvae_jax.coding import codec, flat_head

  exports = sorted((Path(workdir) / "exports").glob("step_*"))[::-1][::every][::-1]
  if not exports:
    raise UserError(f"no exports in {workdir}/exports")
  rows = []
  for path in exports:
    head = flat_head.load_flat_head(path)
    row = {"step": head.manifest.get("step"), "train_seconds": head.manifest.get("train_seconds"),
           "train_bpsp_tau0": head.manifest.get("train_bpsp_tau0")}
    for tau in taus:
      bpsp = [8.0 * codec.estimate_flat_size(head, x, tau) / x.size for x in images]
      row[f"bpsp_tau{tau}"] = float(np.mean(bpsp))
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def plot(rows: list[dict], taus: list[int], out: str | Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  minutes = [r["train_seconds"] / 60.0 for r in rows]
  for tau in taus:
    ax.plot(minutes, [r[f"bpsp_tau{tau}"] for r in rows], marker="o", label=f"tau {tau}")
  ax.set_xlabel("training time (CPU-shared minutes)")
  ax.set_ylabel("estimated bpsp (flat base)")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def plot_training_log(workdir: str | Path, out: str | Path) -> None:
  """The run's own curve (curve.jsonl: bpsp of the sampled training pixels per log
  interval, per tau) against training time."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [json.loads(line) for line in (Path(workdir) / "curve.jsonl").read_text().splitlines()]
  fig, ax = plt.subplots(figsize=(6, 4))
  minutes = [r["train_seconds"] / 60.0 for r in rows]
  for tau in range(0, 6):
    key = f"bpsp_tau{tau}"
    if key in rows[-1]:
      ax.plot(minutes, [r.get(key) for r in rows], label=f"tau {tau}")
  ax.set_xlabel("training time (CPU-shared minutes)")
  ax.set_ylabel("bpsp, sampled training pixels")
  ax.set_ylim(0.5, 5.0)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gvae_jax.train.flat_curve",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--images", help="folder of evaluation images")
  parser.add_argument("--train-log-plot", help="only plot the run's curve.jsonl to this PNG")
  parser.add_argument("--max-images", type=int, default=0)
  parser.add_argument("--taus", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
  parser.add_argument("--every", type=int, default=1, help="every k-th export (newest kept)")
  parser.add_argument("--out", help="JSON file to write")
  parser.add_argument("--plot", help="PNG file to write")
  args = parser.parse_args(argv)
  if args.train_log_plot:
    plot_training_log(args.workdir, args.train_log_plot)
    return 0
  if not args.images:
    parser.error("--images is required")
  def run() -> None:
    from gvae_jax import image_io
    from gvae_jax.eval.harness import list_images

    images = [image_io.read_image(p)[0] for p in list_images(args.images, args.max_images)]
    rows = estimate_curve(args.workdir, images, args.taus, args.every)
    Path(args.out).write_text(json.dumps({"images": len(images), "taus": args.taus,
                                          "rows": rows}, indent=2) + "\n")
    if args.plot:
      plot(rows, args.taus, args.plot)

  return report_user_errors(run)


if __name__ == "__main__":
  sys.exit(main())
