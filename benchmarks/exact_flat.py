"""Exact against float flat-base files: bytes and seconds, interleaved, per image and tau.

One flat head (default: the committed experiments/models/flat_residual) is
attached twice to the shipped scalable model: as trained (float32, mode 2)
and converted by `gvae attach-flat --exact` (mode 4). For each image and tau
both are encoded and decoded in turns (float, exact, exact, float, ... so a
drift of the machine's load hits both alike), every file is decoded and
checked against the bound, and the file sizes and seconds are written:

  python benchmarks/exact_flat.py --images ../shared/data/kodak --limit 6 \
      --taus 0 1 2 3 4 5 --out benchmarks/results/exact_flat.json

The first image's first call of each mode includes compilation (reported on
its own line); the summary's seconds are medians over the other calls.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", required=True, help="folder of images (e.g. Kodak)")
  parser.add_argument("--limit", type=int, default=0, help="first N images (0: all)")
  parser.add_argument("--taus", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
  parser.add_argument("--head", default=str(REPO / "experiments" / "models" / "flat_residual"))
  parser.add_argument("--model", default=str(REPO / "gvae_jax" / "default_models" / "scalable"))
  parser.add_argument("--out", required=True, help="JSON file to write")
  args = parser.parse_args()

  import numpy as np

  from gvae_jax.coding import codec, export, flat_head
  from gvae_jax.eval.images import load_images

  head = flat_head.load_flat_head(args.head)
  base = export.detach(export.load_model(args.model))  # the head under test replaces its own
  models = {"float": export.attach(base, head),
            "exact": export.attach(base, flat_head.build_flat_head(head.config, head.params,
                                                                   head.manifest, exact=True))}
  images = load_images(args.images, args.limit)
  rows = []
  for number, (path, pixels) in enumerate(images):
    for tau in args.taus:
      row = {"image": Path(path).name, "tau": tau}
      order = ("float", "exact") if (number + tau) % 2 == 0 else ("exact", "float")
      for name in order:
        start = time.perf_counter()
        data = codec.compress(models[name], pixels, tau=tau, base="flat")
        encoded = time.perf_counter()
        decoded = codec.decompress(models[name], data)
        row[name] = {"bytes": len(data), "encode_seconds": encoded - start,
                     "decode_seconds": time.perf_counter() - encoded,
                     "max_error": int(np.abs(decoded.astype(np.int32) - pixels).max())}
        assert row[name]["max_error"] <= tau, (path, tau, name)
      row["exact_vs_float"] = row["exact"]["bytes"] / row["float"]["bytes"] - 1.0
      rows.append(row)
      print(json.dumps(row), flush=True)

  def median(name, key):
    values = [r[name][key] for r in rows[1:]] or [rows[0][name][key]]
    return statistics.median(values)

  per_tau = {}
  for tau in args.taus:
    mine = [r for r in rows if r["tau"] == tau]
    float_total = sum(r["float"]["bytes"] for r in mine)
    per_tau[str(tau)] = {
        "float_bytes": float_total, "exact_bytes": sum(r["exact"]["bytes"] for r in mine),
        "exact_vs_float": sum(r["exact"]["bytes"] for r in mine) / float_total - 1.0,
        "worst_image_exact_vs_float": max((r["exact_vs_float"] for r in mine), key=abs)}
  summary = {"images": len(images), "taus": args.taus, "per_tau": per_tau,
             "first_call_with_compile": rows[0] if rows else None,
             "median_seconds": {name: {key: median(name, key)
                                       for key in ("encode_seconds", "decode_seconds")}
                                for name in ("float", "exact")}}
  result = {"benchmark": "exact_flat", "host": platform.node(), "machine": platform.machine(),
            "load_average_at_end": os.getloadavg(), "head": args.head,
            "head_step": head.manifest.get("step"), "summary": summary, "rows": rows}
  Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
