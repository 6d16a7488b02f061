"""Training throughput: step time (float32 vs bfloat16) and the input pipeline's rate.

1. Train step: the real data-parallel train step (jit over a device mesh:
   model, loss, Adam update, donated state) on synthetic batches, so it
   measures compute, not input. Each (config, devices) pair runs in its own
   process because the number of fake CPU devices
   (XLA_FLAGS=--xla_force_host_platform_device_count=N) is fixed at JAX
   start-up; each child times both compute dtypes. The global batch is fixed,
   so more devices split the same work.
2. Input pipeline: images/s the tf.data pipeline (decode, upscale if needed,
   random crop, flip, batch) delivers with its thread pool limited to 1 host
   core (and to every core), at the given crop size, on a real image folder.
   Divided into a step's consumption (global batch / step time, per device;
   a step timed at another crop is rescaled by its pixel count), it says how
   many host cores each device needs. On an accelerator, put its measured
   images/s per device over `pipeline_images_per_second_per_core`.

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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")


def measure_step(config_name: str, batch: int, crop: int, steps: int, dtype: str) -> dict:
  import jax

  from gvae_jax.config import load_config
  from gvae_jax.models import build_model
  from gvae_jax.train import parallel, train

  devices = jax.device_count()
  if batch % devices:
    raise SystemExit(f"batch {batch} does not split over {devices} devices")
  config = load_config(str(REPO / "experiments" / "configs" / f"{config_name}.py"))
  config.data.crop_size = crop
  config.train.distortion = "mse"
  config.train.compute_dtype = dtype
  model = build_model(config)
  mesh = parallel.make_mesh()
  state = parallel.replicate(train.create_train_state(jax.random.PRNGKey(0), config, model), mesh)
  step = train.make_train_step(config, model, mesh)
  images = jax.random.uniform(jax.random.PRNGKey(1), (batch, crop, crop, 3))
  batch_dict = {"image": jax.device_put(images, parallel.batch_sharded(mesh))}
  rng = parallel.replicate(jax.random.PRNGKey(2), mesh)

  start = time.perf_counter()
  state, m = step(state, batch_dict, rng)
  jax.block_until_ready(m)
  compile_seconds = time.perf_counter() - start
  state, m = step(state, batch_dict, rng)  # one more warm-up step
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, m = step(state, batch_dict, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  median = sorted(times)[len(times) // 2]
  return {
      "config": config_name, "compute_dtype": dtype, "devices": devices, "global_batch": batch,
      "crop": crop, "n": config.model.n, "m": config.model.m, "levels": config.model.levels,
      "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
      "compile_seconds": compile_seconds, "seconds_per_step_median": median,
      "seconds_per_step_all": times, "images_per_second": batch / median,
      "loss_finite": bool(jax.numpy.isfinite(m["loss"])),
  }


def measure_pipeline(folder: str, crop: int, batch: int, batches: int, threads: int,
                     cache_dir: str) -> dict:
  import ml_collections
  import tensorflow as tf

  from gvae_jax import data as data_lib

  config = ml_collections.ConfigDict(dict(
      name="folder", folder=folder, data_dir=cache_dir, crop_size=crop, shuffle_buffer=256,
      downscale=1, split="train"))
  ds = data_lib.create_train_dataset(config, per_device_batch=batch, num_local_devices=1, seed=0)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  iterator = data_lib.as_numpy_iterator(ds.with_options(options))
  for _ in range(3):  # fill the shuffle buffer and the prefetch queue
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return {"threads": threads, "crop": crop, "batch": batch, "batches": batches,
          "seconds": seconds, "images_per_second": batch * batches / seconds}


def _child(args) -> None:
  if args.child == "step":
    rows = [measure_step(args.configs[0], args.batch, args.crop, args.steps, dtype)
            for dtype in args.dtypes]
  else:
    rows = [measure_pipeline(args.pipeline_folder, args.pipeline_crop, args.batch,
                             args.pipeline_batches, threads, args.cache_dir)
            for threads in args.pipeline_threads]
  print(json.dumps(rows))


def _run_child(kind: str, args, devices: int = 1, config: str | None = None) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, __file__, "--child", kind, "--batch", str(args.batch),
         "--crop", str(args.crop), "--steps", str(args.steps), "--dtypes", *args.dtypes,
         "--pipeline-folder", args.pipeline_folder, "--pipeline-crop", str(args.pipeline_crop),
         "--pipeline-batches", str(args.pipeline_batches), "--cache-dir", args.cache_dir,
         "--pipeline-threads", *[str(t) for t in args.pipeline_threads]]
  if config:
    cmd += ["--configs", config]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode != 0:
    raise SystemExit(f"{kind} child failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="*", default=["small", "paper"],
                      help="configs to time the step of (none: only the pipeline)")
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 2])
  parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--crop", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--pipeline-folder", default=str(REPO.parent / "shared" / "data" / "train"),
                      help="image folder for the input-pipeline benchmark ('' to skip it)")
  parser.add_argument("--pipeline-crop", type=int, default=256, help="the paper's crop size")
  parser.add_argument("--pipeline-batches", type=int, default=20)
  parser.add_argument("--pipeline-threads", nargs="+", type=int,
                      default=sorted({1, os.cpu_count() or 1}))
  parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "gvae_bench_tfds"),
                      help="where the pipeline's TFDS copy of the folder is prepared (once)")
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/train_throughput.json"))
  parser.add_argument("--child", choices=("step", "pipeline"), help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child:
    _child(args)
    return

  results = []
  for name in args.configs:
    for devices in args.devices:
      for row in _run_child("step", args, devices, name):
        print(f"{name:6s} {row['compute_dtype']:8s} devices={devices} "
              f"{row['seconds_per_step_median']:.3f} s/step {row['images_per_second']:.2f} img/s "
              f"(compile {row['compile_seconds']:.1f} s)", flush=True)
        results.append(row)
      _write(args, results, [], complete=False)  # partial results survive an interruption
  pipeline = []
  if args.pipeline_folder and Path(args.pipeline_folder).is_dir():
    pipeline = _run_child("pipeline", args)
    for row in pipeline:
      print(f"pipeline threads={row['threads']} crop={row['crop']}: "
            f"{row['images_per_second']:.1f} img/s", flush=True)
  elif args.pipeline_folder:
    print(f"pipeline benchmark skipped: no folder {args.pipeline_folder}", flush=True)
  per_core = next((r["images_per_second"] for r in pipeline if r["threads"] == 1), None)
  demand = []
  for row in results:
    if per_core is None:
      break
    # A step at another crop is rescaled by pixels (convolution cost ~ pixels).
    pixel_ratio = (row["crop"] / args.pipeline_crop) ** 2
    per_device = row["images_per_second"] / row["devices"] * pixel_ratio
    demand.append({"config": row["config"], "compute_dtype": row["compute_dtype"],
                   "devices": row["devices"], "step_crop": row["crop"],
                   "pipeline_crop": args.pipeline_crop, "rescaled_by_pixels": pixel_ratio != 1,
                   "images_per_second_per_device": per_device,
                   "host_cores_per_device": per_device / per_core})
  _write(args, results, pipeline, complete=True, per_core=per_core, demand=demand)
  print(f"wrote {args.out}")


def _write(args, results, pipeline, complete, per_core=None, demand=()) -> None:
  import jax

  report = {"benchmark": "train_throughput", "complete": complete,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0], "python": platform.python_version(),
            "jax": jax.__version__, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "results": results, "pipeline": pipeline,
            "pipeline_images_per_second_per_core": per_core,
            "host_cores_per_device": list(demand)}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
