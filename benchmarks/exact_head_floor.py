"""How fast exact residual decoding could be with a given head: the float64 matmul floor.

The exact residual head (gvae_jax.coding.exact_head) evaluates every layer
as a float64 matmul of integers, step by step (gvae_jax.coding.residual_plan:
190 dependent steps for a 768x512 image). Whatever else is made faster (the
CDF rows, the coder calls, the bookkeeping), a decode cannot take less than
the time of those matmuls alone. This script measures that floor on one
image, next to a profiled exact decode of the same image in the same run:

  floor_seconds     sum over the plan's steps of one jitted call doing only
                    the head's matmuls at the step's padded batch (random
                    integer-valued float64 operands of the layers' shapes;
                    the same shapes and batches as the decoder's)
  decode_seconds    median of `--repeats` exact decodes (residual_codec.decode)
  profile           one more profiled decode: network / cdf / coder / context seconds
  macs_per_pixel    the head's multiply-accumulates per coded pixel

for the flat-base head and the lossy-base head of a converted scalable model
(default: the shipped one), at the taus given (tau 0 runs the main head; a
corrected tau adds the correction's three layers).

  python benchmarks/exact_head_floor.py --taus 0 2 --out benchmarks/results/exact_head_floor.json

A floor above a speed target means the target needs a cheaper head or
cheaper exact arithmetic (a format change), not a faster decoder loop.
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

from residual_speed import KODIM01, load_image  # noqa: E402  (this directory's script)


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=str(REPO / "gvae_jax" / "default_models" / "scalable"))
  parser.add_argument("--image", type=Path, default=KODIM01)
  parser.add_argument("--rate", type=float, default=1.5, help="the lossy base's rate")
  parser.add_argument("--taus", type=int, nargs="+", default=[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from gvae_jax.coding import codec, export, residual_codec
  from gvae_jax.coding.coder import default_coder_id, get_coder
  from gvae_jax.coding.residual_cdfs import head_tau
  from gvae_jax.entropy import exact_mixture as em

  pixels, image_name = load_image(args.image)  # synthetic without ../shared
  model = export.load_model(args.model)
  bases = {"lossy_base": codec.residual_layer_inputs(model, pixels, "lossy", args.rate)}
  if model.flat is not None:
    bases["flat_base"] = codec.residual_layer_inputs(model, pixels, "flat")
  coder = get_coder(default_coder_id())

  @jax.jit
  def matmuls(xs, ws):  # the matmuls of a step's layers only, in one call as the decoder's
    return [x @ w for x, w in zip(xs, ws)]

  def floor_operands(view, tau: int):
    """Per bucket of the plan, the step's matmul operands (made and compiled once); the
    steps' buckets; the head's MACs a pixel."""
    corrected, tau_h = head_tau(view.residual_model, tau)
    weights = [w for w, _, _ in view.exact.layers(tau_h, corrected)]
    plan = residual_codec._plan(view, *pixels.shape[:2])
    rng = np.random.default_rng(0)
    operands = {}
    with em.enable_x64():
      ws = [jnp.asarray(w) for w in weights]
      for bucket in plan.buckets:
        xs = [jnp.asarray(rng.integers(-2**20, 2**20, (bucket, w.shape[0])).astype(np.float64))
              for w in weights]
        jax.block_until_ready(matmuls(xs, ws))  # compile
        operands[bucket] = (xs, ws)
    return operands, [s.bucket for s in plan.steps], sum(w.size for w in weights)

  def floor_seconds(operands, step_buckets, calls: int = 5) -> float:
    """Sum over the steps of the median time of their bucket's matmuls."""
    per_bucket = {}
    with em.enable_x64():
      for bucket, (xs, ws) in operands.items():
        times = []
        for _ in range(calls):
          start = time.perf_counter()
          jax.block_until_ready(matmuls(xs, ws))
          times.append(time.perf_counter() - start)
        per_bucket[bucket] = statistics.median(times)
    return sum(per_bucket[b] for b in step_buckets)

  results = {}
  for name, (view, base, u) in bases.items():
    for tau in args.taus:
      layer = residual_codec.encode(view, coder, pixels, base, u, tau)
      decode = lambda profile=None: residual_codec.decode(
          view, coder, layer.side_info, layer.streams, base, u, tau, profile)
      decoded, _ = decode()  # compiles
      if np.abs(decoded.astype(np.int32) - pixels).max() > tau:
        raise AssertionError(f"{name}: error bound {tau} violated")
      operands, step_buckets, macs = floor_operands(view, tau)
      times, floors = [], []
      for _ in range(args.repeats):  # decode and floor in turns: the same machine load
        start = time.perf_counter()
        decode()
        times.append(time.perf_counter() - start)
        floors.append(floor_seconds(operands, step_buckets))
      profile = residual_codec.Profile()
      decode(profile)
      row = {"decode_seconds": statistics.median(times),
             "floor_seconds": statistics.median(floors), "macs_per_pixel": macs,
             "floor_over_decode": statistics.median(floors) / statistics.median(times),
             "profile": {part: round(getattr(profile, part), 4)
                         for part in ("network", "cdf", "coder", "context")}}
      results.setdefault(name, {})[str(tau)] = row
      print(f"{name} tau {tau}: decode {row['decode_seconds']:.3f} s, matmul floor "
            f"{row['floor_seconds']:.3f} s ({macs} MACs a pixel); profile {row['profile']}",
            flush=True)
  out = {"benchmark": "exact_head_floor", "model": os.path.relpath(args.model, REPO),
         "image": image_name,
         "machine": platform.machine(), "processor": _cpu_model(),
         "cpus": os.cpu_count(), "jax": jax.__version__, "rate": args.rate,
         "repeats": args.repeats, "results": results}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
