"""Which arithmetic gives the same convolution bits on every CPU kind, and at what cost.

The design question of platform-independent decoding (issue 10): a synthesis-sized
convolution on integer-valued inputs, computed as float32, as float64 (every
product and partial sum is an integer below 2^53, so exact in any order) and as
int32 (wrap-around addition is associative). Each dtype runs in a child process
per XLA CPU instruction set (native, AVX2, SSE4_2, via --xla_cpu_max_isa); the
JSON gives the best-of-N time, a SHA-256 of the output bytes (identical hashes
across instruction sets mean identical bits) and whether the same sum taken in
another order (two half-channel convolutions added) gives the same bits.

  python benchmarks/exact_conv.py --out benchmarks/results/exact_conv.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISAS = ("native", "AVX2", "SSE4_2")
DTYPES = ("float32", "float64", "int32")


def child(size: int, channels: int, kernel: int, activation_bits: int, weight_bits: int,
          repeats: int) -> dict:
  import jax
  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  rng = np.random.default_rng(0)
  x = rng.integers(-2**(activation_bits - 1), 2**(activation_bits - 1),
                   (1, size, size, channels))
  w = rng.integers(-2**(weight_bits - 1), 2**(weight_bits - 1),
                   (kernel, kernel, channels, channels))
  results = {}
  for name in DTYPES:
    dtype = jnp.dtype(name)
    pref = dtype if name == "int32" else None

    @jax.jit
    def conv(a, b, pref=pref):
      return lax.conv_general_dilated(a, b, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      preferred_element_type=pref)

    a, b = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    out = np.asarray(conv(a, b).block_until_ready())
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      conv(a, b).block_until_ready()
      times.append(time.perf_counter() - start)
    # The same sum in another order: two half-channel convolutions added, as a
    # different vector width, tiling or device split could compute it.
    half = channels // 2
    reordered = np.asarray(conv(a[..., :half], b[:, :, :half])
                           + conv(a[..., half:], b[:, :, half:]))
    results[name] = {"seconds_best": min(times),
                     "sha256": hashlib.sha256(out.astype(np.int64).tobytes()).hexdigest()[:16],
                     "same_bits_when_reordered": bool(np.array_equal(out, reordered))}
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=64, help="height = width of the input")
  parser.add_argument("--channels", type=int, default=128)
  parser.add_argument("--kernel", type=int, default=5)
  parser.add_argument("--activation-bits", type=int, default=16)
  parser.add_argument("--weight-bits", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/exact_conv.json"))
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.size, args.channels, args.kernel, args.activation_bits,
                           args.weight_bits, args.repeats)))
    return 0
  terms = args.kernel**2 * args.channels
  bound = 2**(args.activation_bits - 1) * 2**(args.weight_bits - 1) * terms
  runs = {}
  for isa in ISAS:
    flags = "" if isa == "native" else f"--xla_cpu_max_isa={isa}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    # The child parses the same arguments (jax starts there, with this ISA).
    result = subprocess.run([sys.executable, __file__, *argv, "--child"], env=env,
                            capture_output=True, text=True, check=True)
    runs[isa] = json.loads(result.stdout.strip().splitlines()[-1])
  same_bits = {name: len({runs[isa][name]["sha256"] for isa in ISAS}) == 1 for name in DTYPES}
  reorder_safe = {name: all(runs[isa][name]["same_bits_when_reordered"] for isa in ISAS)
                  for name in DTYPES}
  report = {
      "benchmark": "exact_conv",
      "machine": platform.machine(), "cpus": os.cpu_count(),
      "command": " ".join(["python benchmarks/exact_conv.py", *argv]),
      "input": {"size": args.size, "channels": args.channels, "kernel": args.kernel,
                "activation_bits": args.activation_bits, "weight_bits": args.weight_bits},
      "largest_possible_sum_log2": round(math.log2(bound), 2),
      "runs": runs,
      "same_bits_on_every_isa": same_bits,
      "same_bits_in_another_summation_order": reorder_safe,
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  for name in DTYPES:
    times = " ".join(f"{isa} {runs[isa][name]['seconds_best'] * 1e3:.1f} ms" for isa in ISAS)
    print(f"{name:8s} same bits on every ISA: {same_bits[name]!s:5s} in another order: "
          f"{reorder_safe[name]!s:5s}  {times}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
