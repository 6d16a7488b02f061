"""Both install profiles in one run: train step and codec times, one JSON.

Runs benchmarks/train_throughput.py and benchmarks/codec_speed.py with each
profile's interpreter (a venv made with the README's install command), the
profiles in turns for every benchmark, so both see the same machine load as
far as a shared machine allows, and merges their JSON:

  python benchmarks/profiles.py --profile default=.venv/bin/python \
      --profile tfc=.venv-tfc/bin/python --out benchmarks/results/profiles.json

Train: small and paper configs at 1 and 2 fake CPU devices (the global batch
fixed, so 2 devices split the same work), float32 by default (--dtypes);
the input pipeline is left out (train_throughput.py measures it alone). Codec: compress / decompress of
kodim01 (768x512, a synthetic image without ../shared) with the exported
`small` model, each profile with its default coder.
"""
from __future__ import annotations

import argparse
import json
import platform
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(python: str, script: str, args: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as folder:
    out = Path(folder) / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    start = time.perf_counter()
    subprocess.run([python, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
                   cwd=REPO, env=env, check=True)
    report = json.loads(out.read_text())
    report["wall_seconds"] = time.perf_counter() - start
    return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--profile", action="append", required=True, metavar="NAME=PYTHON",
                      help="a profile's name and interpreter (give two or more)")
  parser.add_argument("--train-configs", nargs="+", default=["small", "paper"])
  parser.add_argument("--devices", nargs="+", default=["1", "2"])
  parser.add_argument("--batch", default="8")
  parser.add_argument("--crop", default="256")
  parser.add_argument("--steps", default="5")
  parser.add_argument("--dtypes", nargs="+", default=["float32"],
                      help="train step compute dtypes (train_throughput.py --dtypes)")
  parser.add_argument("--model", default=str(REPO / "experiments" / "models" / "small"))
  parser.add_argument("--repeats", default="3")
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/profiles.json"))
  args = parser.parse_args()
  profiles = dict(item.split("=", 1) for item in args.profile)

  benchmarks = {
      "train_throughput": ("train_throughput.py",
                           ["--configs", *args.train_configs, "--devices", *args.devices,
                            "--batch", args.batch, "--crop", args.crop, "--steps", args.steps,
                            "--dtypes", *args.dtypes, "--pipeline-folder", ""]),
      "codec_speed": ("codec_speed.py", ["--configs", "small", "--model", args.model,
                                         "--repeats", args.repeats]),
  }
  results = {name: {} for name in profiles}
  for benchmark, (script, script_args) in benchmarks.items():
    for name, python in profiles.items():
      print(f"== {benchmark} under {name} ({python})", flush=True)
      results[name][benchmark] = run(python, script, script_args)
  report = {"benchmark": "profiles", "machine": platform.machine(), "cpus": os.cpu_count(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "note": "each benchmark ran under every profile in turn, in one session; "
                    "the machine is shared, so compare rows of the same run",
            "profiles": results}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
