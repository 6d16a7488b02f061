"""Whole-process time of `gvae compress` / `gvae decompress` on one Kodak image,
against JPEG-XL and AVIF encodes of the same image through imagecodecs.

Every measurement is a fresh process, timed from spawn to exit (what a user
waits for), so Python start-up, imports (JAX; TensorFlow for the TFC coder),
model loading, XLA compilation or the persistent compilation cache, coding
and writing are all included. The anchors are timed the same way
(`python -c "import imagecodecs; ...encode..."`, reading the PNG with
Pillow and writing the file), so both sides pay for an interpreter.

Runs are interleaved (gvae compress, gvae decompress, cjxl-class, avif, then
again) so that load from other processes hits all of them alike. The first
gvae run uses an empty compilation cache directory ("cold": compiles every
program and fills the cache); the rest reuse it ("warm").

  python benchmarks/startup.py                    # kodim01, 5 rounds
  python benchmarks/startup.py --rounds 3 --out benchmarks/results/startup.json

Needs ../shared/data/kodak (skips with a message otherwise). Uses the shipped
default model (no --model), lossy at --rate 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KODAK = REPO.parent / "shared" / "data" / "kodak"

_ANCHOR = """
import sys, numpy as np, imagecodecs
from PIL import Image
pixels = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
data = imagecodecs.{codec}_encode(pixels, level={level})
open(sys.argv[2], "wb").write(data)
"""


def _timed(command: list[str], env: dict) -> float:
  start = time.perf_counter()
  result = subprocess.run(command, env=env, capture_output=True, text=True)
  elapsed = time.perf_counter() - start
  if result.returncode != 0:
    raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
  if result.stderr.strip():
    print(f"stderr of {command[3] if len(command) > 3 else command}: {result.stderr.strip()}",
          file=sys.stderr)
  return elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--image", default=str(KODAK / "kodim01.png"))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--rate", type=float, default=1.0)
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "startup.json"))
  args = parser.parse_args()
  image = Path(args.image)
  if not image.is_file():
    print(f"skipped: {image} not found (needs the Kodak images)")
    return
  work = Path(tempfile.mkdtemp(prefix="gvae_startup_"))
  cache = work / "xla_cache"
  env = {**os.environ, "PYTHONPATH": str(REPO), "GVAE_COMPILATION_CACHE": str(cache)}
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  gvae = [sys.executable, "-m", "gvae_jax"]
  commands = {
      "gvae_compress": gvae + ["compress", str(image), str(work / "a.gvae"), "--rate",
                               str(args.rate), "--force"],
      "gvae_decompress": gvae + ["decompress", str(work / "a.gvae"), str(work / "a.png"),
                                 "--force"],
      "jpegxl_encode": [sys.executable, "-c", _ANCHOR.format(codec="jpegxl", level=90),
                        str(image), str(work / "a.jxl")],
      "avif_encode": [sys.executable, "-c", _ANCHOR.format(codec="avif", level=80),
                      str(image), str(work / "a.avif")],
  }
  times: dict[str, list[float]] = {name: [] for name in commands}
  cold = {}
  for round_index in range(args.rounds + 1):
    latest = {}
    for name, command in commands.items():
      elapsed = latest[name] = _timed(command, env)
      if round_index == 0 and name.startswith("gvae"):
        cold[name] = elapsed  # empty cache: compiles and fills it
      elif round_index > 0:
        times[name].append(elapsed)
    print(f"round {round_index}{' (cold cache, not counted)' if round_index == 0 else ''}: "
          + ", ".join(f"{n} {t:.2f}s" for n, t in latest.items()), flush=True)
  report = {
      "image": image.name,
      "rate": args.rate,
      "rounds": args.rounds,
      "python": sys.executable,
      "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                  "load_average_at_end": os.getloadavg()},
      "cold_cache_seconds": cold,
      "warm_cache_seconds": {n: {"median": statistics.median(t), "min": min(t), "all": t}
                             for n, t in times.items()},
      "bytes": {n: (work / f).stat().st_size for n, f in (
          ("gvae", "a.gvae"), ("jpegxl", "a.jxl"), ("avif", "a.avif"))},
      "command": " ".join([Path(sys.executable).name, *sys.argv]),
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps(report["warm_cache_seconds"], indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
