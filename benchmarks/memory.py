"""Peak memory and time of whole `gvae compress` / `gvae decompress` processes by image size.

For each size (megapixels, square images tiled from Kodak kodim01 when
../shared/data/kodak is present, else the shipped synthetic photo) and mode
(lossy --rate 2 with the shipped lossy model, --lossless with the shipped
scalable model) it runs compress then decompress under `/usr/bin/time -f %M`
(peak resident set: wait4 reports the largest of the supervising parent
and its coding child) and records seconds, peak bytes, and the estimate of
gvae_jax/coding/memory.py for the same image, so the documented bytes per
pixel can be checked against measurements:

  python benchmarks/memory.py --sizes 1 4 16 --modes lossy
  python benchmarks/memory.py --sizes 1 4 16 64 --modes lossless --out benchmarks/results/memory_lossless.json

Sizes past the memory cap are refused by gvae itself (recorded as refused);
pass --max-memory to raise it. Everything runs sequentially; a 16 Mpixel
lossless decode takes tens of minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gvae_jax.coding import memory, tiling  # noqa: E402
from gvae_jax.samples import SAMPLE_PHOTO  # noqa: E402

KODIM01 = Path(os.environ.get("GVAE_KODAK", REPO.parent / "shared" / "data" / "kodak")) / "kodim01.png"


def _image(megapixels: float, folder: Path) -> tuple[Path, int]:
  side = int(round(math.sqrt(megapixels * 1e6) / 64) * 64)
  source = np.asarray(Image.open(KODIM01 if KODIM01.is_file() else SAMPLE_PHOTO).convert("RGB"))
  reps = (-(-side // source.shape[0]), -(-side // source.shape[1]), 1)
  path = folder / f"{side}.png"
  Image.fromarray(np.tile(source, reps)[:side, :side]).save(path)
  return path, side


def _run(args: list[str], env: dict) -> dict:
  with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
    command = ["/usr/bin/time", "-o", report.name, "-f", "%M %e", sys.executable, "-m",
               "gvae_jax", *args]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    fields = report.read().split()
  peak_kb = int(fields[-2]) if len(fields) >= 2 and fields[-2].isdigit() else None
  return {"ok": result.returncode == 0, "seconds": round(elapsed, 2),
          "peak_bytes": None if peak_kb is None else peak_kb * 1024,
          "stderr": result.stderr.strip()[-300:]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16])
  parser.add_argument("--modes", nargs="+", default=["lossy", "lossless"])
  parser.add_argument("--max-memory", default=None)
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory.json"))
  args = parser.parse_args()
  work = Path(tempfile.mkdtemp(prefix="gvae_memory_"))
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  extra = ["--max-memory", args.max_memory] if args.max_memory else []
  rows = []
  for megapixels in args.sizes:
    image, side = _image(megapixels, work)
    for mode in args.modes:
      target = ["--rate", "2"] if mode == "lossy" else ["--lossless"]
      coded = work / f"{side}_{mode}.gvae"
      row = {"side": side, "megapixels": side * side / 1e6, "mode": mode}
      row["compress"] = _run(["compress", str(image), str(coded), "--force", *target, *extra],
                             env)
      if row["compress"]["ok"]:
        row["bytes"] = coded.stat().st_size
        row["decompress"] = _run(["decompress", str(coded), str(work / "out.png"), "--force",
                                  *extra], env)
      # The shipped scalable model codes large lossless images on the flat base
      # in tiles (its small ones on whichever base is smaller).
      kind = ("lossy" if mode == "lossy" else "exact_flat_residual_tiled"
              if side * side > tiling.TILED_ABOVE else "residual")
      row["estimated_peak_bytes"] = {
          op: memory.estimate_peak_bytes(side, side, kind, op) for op in ("compress", "decompress")}
      rows.append(row)
      print(json.dumps(row), flush=True)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({
      "rows": rows, "per_pixel": {f"{k[0]} {k[1]}": v for k, v in memory.PER_PIXEL.items()},
      "base_bytes": memory.BASE_BYTES, "command": " ".join(["python", *sys.argv])},
      indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
