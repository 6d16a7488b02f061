"""`gvae eval` in small parts, for a machine too loaded to finish one long run.

Worker k of n evaluates every n-th image (starting at the k-th) of a folder,
`--group` images per harness.evaluate call, and writes each group's outputs
to OUT/parts/<first image>/ as soon as it is done, so an interrupted run
keeps every finished group. `--merge` then writes OUT/ from all finished
parts (harness.merge_results: the same rows, means and BD-rates one run
would give). No warm-up: the first coding of each image shape in each
worker includes its compilation (the seconds columns say so).

  python experiments/scripts/eval_parts.py --model M --images kodak --out OUT \\
      --worker 0 --workers 2 -- --taus 0 1 2 3 4 5 --base flat --anchors jpegls-near ...
  python experiments/scripts/eval_parts.py --model M --images kodak --out OUT --merge
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gvae_jax.eval import harness  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True)
  parser.add_argument("--images", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--worker", type=int, default=0)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--group", type=int, default=2)
  parser.add_argument("--merge", action="store_true")
  parser.add_argument("--taus", type=int, nargs="*", default=[0, 1, 2, 3, 4, 5])
  parser.add_argument("--base", default="auto")
  parser.add_argument("--anchors", nargs="*", default=None)
  args = parser.parse_args()
  out = Path(args.out)
  command = shlex.join(["python", "experiments/scripts/eval_parts.py", *sys.argv[1:]])
  if args.merge:
    parts = [harness.load_results(p) for p in sorted(out.glob("parts/*/results.json"))]
    results = harness.merge_results(parts)
    harness.write_outputs(results, out)
    print(harness.format_summary(results))
    return 0
  images = harness.list_images(args.images)[args.worker::args.workers]
  anchors = False if args.anchors is None else (args.anchors or True)
  for start in range(0, len(images), args.group):
    group = images[start:start + args.group]
    part = out / "parts" / group[0].stem
    if (part / harness.RESULTS_JSON).is_file():
      continue  # done by an earlier run
    results = harness.evaluate(args.model, group, rates=[], taus=args.taus, anchors=anchors,
                               warmup=False, base=args.base, command=command)
    results["images"]["folder"] = str(args.images)
    harness.write_outputs(results, part, plots=False)
    print(f"wrote {part}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
