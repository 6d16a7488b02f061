"""An issue's reference speed, re-measured on this machine, in turns with today's decoders.

Issue 10's speed target ("lossless decode of a Kodak image stays at or below
its current 1.10 s") is a figure of the machine and software of its day:
commit 50b65b3 (2026-11-30), jax 0.5.3, the float residual layer of
experiments/models/small_nearlossless at tau 0 on kodim01
(benchmarks/results/residual_speed_trained.json there). A 2-vCPU VM's speed
moves with its host, so that figure only compares with one measured on the
same machine in the same run. This script re-runs the reference with its own
code, model and software stack -- a detached git worktree of REF, its own
benchmarks/residual_speed.py run by another interpreter (default the tfc
profile's, .venv-tfc/bin/python: jax 0.5.3) -- and today's
`benchmarks/residual_speed.py --exact-vs-float` on the shipped scalable
model, one process after the other, round after round, so load from other
jobs hits both alike. Each process reports medians of its own warm calls.

The JSON has every round, the medians over rounds, today's variants over
the reference (decode and encode), and the target scaled to this machine:
target * (reference now / reference then).

  python benchmarks/reference_speed.py                        # 3 rounds, tau 0
  python benchmarks/reference_speed.py --rounds 3 --out benchmarks/results/reference_speed.json

Needs git (the worktree), the other interpreter and ../shared/data/kodak
(skips with a message otherwise).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KODIM01 = REPO.parent / "shared" / "data" / "kodak" / "kodim01.png"
# The reference of issue 10's target, and where its figure of the day is.
REFERENCE = "50b65b3"
REFERENCE_MODEL = "experiments/models/small_nearlossless"
REFERENCE_RESULT = "benchmarks/results/residual_speed_trained.json"
TARGET_SECONDS = 1.10


def _run(command: list[str], cwd: Path, env: dict) -> None:
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
  if result.returncode != 0:
    raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n"
                     f"{result.stderr[-3000:]}")


def _reference_results(path: Path) -> dict[int, dict]:
  """tau -> {encode_seconds, decode_seconds, residual_bytes} of a residual_speed JSON's
  exported run (the reference's own format)."""
  results = json.loads(path.read_text())["runs"]["exported"]["results"]
  return {r["tau"]: {key: r[key] for key in ("encode_seconds", "decode_seconds",
                                             "residual_bytes")} for r in results}


def _today_results(path: Path) -> dict[int, dict]:
  """tau -> variant -> {encode_seconds, decode_seconds, residual_bytes} of today's
  --exact-vs-float JSON (only the variants, not its ratios)."""
  taus = json.loads(path.read_text())["runs"]["exact_vs_float"]["taus"]
  return {int(tau): {name: v for name, v in variants.items() if "decode_seconds" in v}
          for tau, variants in taus.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference", default=REFERENCE, help="git ref of the reference")
  parser.add_argument("--reference-python", default=str(REPO / ".venv-tfc" / "bin" / "python"),
                      help="interpreter of the reference's software stack")
  parser.add_argument("--reference-model", default=REFERENCE_MODEL,
                      help="the reference's model, a path inside its tree")
  parser.add_argument("--model", default=str(REPO / "gvae_jax" / "default_models" / "scalable"),
                      help="today's converted scalable model")
  parser.add_argument("--image", default=str(KODIM01))
  parser.add_argument("--rate", type=float, default=1.5, help="base rate of both (the "
                      "reference's figure was measured at 1.5)")
  parser.add_argument("--taus", type=int, nargs="+", default=[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3, help="warm calls per process")
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/reference_speed.json"))
  args = parser.parse_args()
  for needed, what in ((Path(args.image), "the image"),
                       (Path(args.reference_python), "the reference's interpreter")):
    if not needed.exists():
      print(f"skipped: {what} ({needed}) not found")
      return

  work = Path(tempfile.mkdtemp(prefix="gvae_reference_"))
  tree = work / "reference"
  _run(["git", "worktree", "add", "--detach", str(tree), args.reference], REPO, dict(os.environ))
  try:
    then = _reference_results(tree / REFERENCE_RESULT) if (tree / REFERENCE_RESULT).is_file() \
        else {}
    common = ["--image", args.image, "--rate", str(args.rate), "--taus",
              *map(str, args.taus), "--repeats", str(args.repeats)]
    reference_env = {**os.environ, "PYTHONPATH": str(tree)}
    today_env = {**os.environ, "PYTHONPATH": str(REPO)}
    rounds = []
    for i in range(args.rounds):
      ref_json, today_json = work / f"reference_{i}.json", work / f"today_{i}.json"
      _run([args.reference_python, str(tree / "benchmarks" / "residual_speed.py"), "--model",
            str(tree / args.reference_model), *common, "--out", str(ref_json)], tree,
           reference_env)
      _run([sys.executable, str(REPO / "benchmarks" / "residual_speed.py"), "--model",
            args.model, "--exact-vs-float", *common, "--out", str(today_json)], REPO, today_env)
      rounds.append({"reference": _reference_results(ref_json),
                     "today": _today_results(today_json)})
      print(f"round {i + 1}: reference decode "
            + ", ".join(f"tau {t} {r['decode_seconds']:.3f} s"
                        for t, r in rounds[-1]["reference"].items()), flush=True)
  finally:
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
                   capture_output=True)

  summary = {}
  for tau in args.taus:
    ref = {key: statistics.median(r["reference"][tau][key] for r in rounds)
           for key in ("encode_seconds", "decode_seconds")}
    entry = {"reference": {**ref, "residual_bytes": rounds[0]["reference"][tau]["residual_bytes"]}}
    for name in rounds[0]["today"][tau]:
      seconds = {key: statistics.median(r["today"][tau][name][key] for r in rounds)
                 for key in ("encode_seconds", "decode_seconds")}
      entry[name] = {**seconds, "residual_bytes": rounds[0]["today"][tau][name]["residual_bytes"],
                     "decode_over_reference": seconds["decode_seconds"] / ref["decode_seconds"],
                     "encode_over_reference": seconds["encode_seconds"] / ref["encode_seconds"]}
    if tau in then:
      scale = ref["decode_seconds"] / then[tau]["decode_seconds"]
      entry["reference_then"] = then[tau]
      entry["machine_factor"] = scale  # reference now / then: this machine against its day's
      if tau == 0:
        entry["target_seconds_scaled"] = TARGET_SECONDS * scale
    summary[str(tau)] = entry
    print(f"tau {tau}: reference decode {ref['decode_seconds']:.3f} s; "
          + ", ".join(f"{n} {v['decode_seconds']:.3f} s ({v['decode_over_reference']:.2f}x)"
                      for n, v in entry.items() if isinstance(v, dict) and
                      "decode_over_reference" in v))

  report = {
      "benchmark": "reference_speed", "reference": args.reference,
      "reference_model": args.reference_model, "reference_python": args.reference_python,
      "model": args.model, "image": args.image, "rate": args.rate, "rounds": args.rounds,
      "repeats": args.repeats, "machine": platform.machine(), "cpus": os.cpu_count(),
      "target_seconds": TARGET_SECONDS,
      "note": "residual layer only (residual_speed.py's times), medians over rounds of each "
              "process's medians; the reference runs its own code, model and software stack "
              "(another interpreter); rounds alternate reference and today's processes",
      "summary": summary, "per_round": [{"reference": {str(t): v for t, v in r["reference"].items()},
                                         "today": {str(t): v for t, v in r["today"].items()}}
                                        for r in rounds]}
  Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
