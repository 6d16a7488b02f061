"""Training throughput: seconds per step and images per second on this machine.

Runs the real pmapped train_step (model, loss, Adam update) on synthetic
batches, so it measures compute, not the input pipeline. Each (config,
devices) pair runs in its own process because the number of fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) is fixed at JAX start-up.
The global batch is fixed, so more devices split the same work.

  python benchmarks/train_throughput.py --configs small paper --devices 1 2 \
      --batch 8 --crop 256 --out benchmarks/results/train_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(config_name: str, batch: int, crop: int, steps: int) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  from flax import jax_utils

  from gvae_jax.config import load_config
  from gvae_jax.models import build_model
  from gvae_jax.train import train

  devices = jax.local_device_count()
  if batch % devices:
    raise SystemExit(f"batch {batch} does not split over {devices} devices")
  config = load_config(str(REPO / "experiments" / "configs" / f"{config_name}.py"))
  config.data.crop_size = crop
  model = build_model(config)
  state = train.create_train_state(jax.random.PRNGKey(0), config, model)
  p_step = jax.pmap(
      functools.partial(train.train_step, model=model, levels=config.model.levels,
                        lambdas=tuple(config.train.lambdas), distortion="mse"),
      axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,))
  p_state = jax_utils.replicate(state)
  images = jax.random.uniform(jax.random.PRNGKey(1), (devices, batch // devices, crop, crop, 3))
  batch_dict = {"image": images}
  rng = jax.random.PRNGKey(2)

  start = time.perf_counter()
  p_state, m = p_step(p_state, batch_dict, rng)
  jax.block_until_ready(m)
  compile_seconds = time.perf_counter() - start
  p_state, m = p_step(p_state, batch_dict, rng)  # one more warm-up step
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    p_state, m = p_step(p_state, batch_dict, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  median = sorted(times)[len(times) // 2]
  return {
      "config": config_name, "devices": devices, "global_batch": batch, "crop": crop,
      "n": config.model.n, "m": config.model.m, "levels": config.model.levels,
      "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
      "compile_seconds": compile_seconds, "seconds_per_step_median": median,
      "seconds_per_step_all": times, "images_per_second": batch / median,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=["small", "paper"])
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 2])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--crop", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/train_throughput.json"))
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child:
    print(json.dumps(measure(args.configs[0], args.batch, args.crop, args.steps)))
    return

  results = []
  for name in args.configs:
    for devices in args.devices:
      env = dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
      cmd = [sys.executable, __file__, "--child", "--configs", name, "--batch", str(args.batch),
             "--crop", str(args.crop), "--steps", str(args.steps)]
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
      row = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"{name:6s} devices={devices} {row['seconds_per_step_median']:.3f} s/step "
            f"{row['images_per_second']:.2f} img/s (compile {row['compile_seconds']:.1f} s)",
            flush=True)
      results.append(row)
  report = {"benchmark": "train_throughput", "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "results": results}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
