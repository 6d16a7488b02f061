"""The kernels behind exact lossy decoding's speed (gvae_jax/coding/exact_lossy.py,
version 2), at kodim01's (768x512) largest synthesis layer, interleaved in one run.

  python benchmarks/exact_lossy_kernels.py --repeats 9 \
      --out benchmarks/results/exact_lossy_kernels.json

Each group times the candidates for one step in turns (medians of warm calls):
  conv      the 3x3, 64 -> 256 convolution on 128x192: float32, integer-valued
            float64 (version 1), int8 with int32 sums on two digits (version 2)
  gdn       one of the inverse GDN's two gamma matmuls on 256x384x64 (both
            versions take two): float64 (version 1), float32 (version 2)
  int_ops   one rounding shift over 256x384x64 values in int64 and in int32
            (the element-wise steps are memory-bound)
  scale_row the y table row of 48x32x96 log-scales against 63 thresholds:
            compare with all and count, or binary search (jnp.searchsorted)
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

REPO = Path(__file__).resolve().parents[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/exact_lossy_kernels.json"))
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from gvae_jax.entropy import exact_mixture as em

  rng = np.random.default_rng(0)
  dims = ("NHWC", "HWIO", "NHWC")
  highest = jax.lax.Precision.HIGHEST

  def conv(x, w, **kw):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims, **kw)

  with em.enable_x64():
    x16 = rng.integers(-32639, 32640, (1, 128, 192, 64))
    w8 = rng.integers(-127, 128, (3, 3, 64, 256))
    digits = np.concatenate([x16 >> 8, ((x16 + 128) & 255) - 128], axis=0)
    q = rng.integers(0, 1 << 11, (256 * 384, 64))
    g = rng.integers(0, 128, (64, 64))
    values = rng.integers(-2**26, 2**26, (1, 256, 384, 64))
    raw = rng.integers(-2**20, 2**20, (1, 48, 32, 96))
    thresholds = np.sort(rng.choice(np.arange(-2**20, 2**20), 63, replace=False))
    groups = {
        "conv": {
            "float32": (jax.jit(lambda a, b: conv(a, b, precision=highest)),
                        (jnp.asarray(x16, jnp.float32), jnp.asarray(w8, jnp.float32))),
            "float64": (jax.jit(conv), (jnp.asarray(x16, jnp.float64),
                                        jnp.asarray(w8, jnp.float64))),
            "int8_two_digits": (jax.jit(lambda a, b: conv(a, b,
                                                          preferred_element_type=jnp.int32)),
                                (jnp.asarray(digits, jnp.int8), jnp.asarray(w8, jnp.int8))),
        },
        "gdn": {
            "float64_one_matmul": (jax.jit(lambda a, b: a @ b),
                                   (jnp.asarray(q, jnp.float64), jnp.asarray(g, jnp.float64))),
            "float32_one_matmul": (jax.jit(lambda a, b: jnp.matmul(a, b, precision=highest)),
                                   (jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32))),
        },
        "int_ops": {
            "int64_round_shift": (jax.jit(lambda v: (v + 32) >> 6),
                                  (jnp.asarray(values, jnp.int64),)),
            "int32_round_shift": (jax.jit(lambda v: (v + 32) >> 6),
                                  (jnp.asarray(values, jnp.int32),)),
        },
        "scale_row": {
            "compare_all": (jax.jit(lambda r, t: jnp.sum((r[..., None] > t).astype(jnp.int32),
                                                         axis=-1)),
                            (jnp.asarray(raw), jnp.asarray(thresholds))),
            "searchsorted": (jax.jit(lambda r, t: jnp.searchsorted(t, r, side="left")),
                             (jnp.asarray(raw), jnp.asarray(thresholds))),
        },
    }
    same = {}
    a, b = groups["scale_row"]["compare_all"], groups["scale_row"]["searchsorted"]
    same["scale_row"] = bool(np.array_equal(np.asarray(a[0](*a[1])), np.asarray(b[0](*b[1]))))
    timings = {group: {name: [] for name in cands} for group, cands in groups.items()}
    for group, cands in groups.items():
      for fn, inputs in cands.values():
        jax.block_until_ready(fn(*inputs))  # compile
      for _ in range(args.repeats):
        for name, (fn, inputs) in cands.items():  # interleaved
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*inputs))
          timings[group][name].append(time.perf_counter() - t0)
  medians = {group: {name: statistics.median(v) for name, v in per.items()}
             for group, per in timings.items()}
  report = {"benchmark": "exact_lossy_kernels", "repeats": args.repeats,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                     "load_average": os.getloadavg(), "jax": jax.__version__},
            "same_integers": same, "median_seconds": medians, "seconds": timings}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  for group, per in medians.items():
    print(f"{group}: " + ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in per.items()))


if __name__ == "__main__":
  main()
