"""Exact lossy decoding against float: end-to-end compress / decompress seconds and
the two converted stages (hyper synthesis, synthesis), interleaved in one run.

  python benchmarks/exact_lossy_speed.py --model gvae_jax/default_models/lossy \
      --rates 0 1.5 3 --repeats 5 --out benchmarks/results/exact_lossy_speed.json

The float model, its conversion (gvae_jax.coding.export.to_exact, in memory,
today's exact_lossy version) and, if --model holds an older conversion, that
one as stored, code the same image (Kodak kodim01 when ../shared is present, else a synthetic
768x512 image) in turns, each after a warm-up call; the JSON
has every timing and the medians. File sizes of both are recorded too.
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
KODIM01 = REPO.parent / "shared" / "data" / "kodak" / "kodim01.png"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=str(REPO / "gvae_jax/default_models/lossy"))
  parser.add_argument("--image", default=str(KODIM01))
  parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 1.5, 3.0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/exact_lossy_speed.json"))
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from gvae_jax.coding import codec, export
  from gvae_jax.ops import pad_to_multiple

  if Path(args.image).is_file():
    from PIL import Image
    pixels, source = np.asarray(Image.open(args.image).convert("RGB")), args.image
  else:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    source = "random 768x512"
  loaded = export.load_model(args.model)
  float_model = export.to_float(loaded)
  exact_model, _ = export.to_exact(float_model)
  models = {"float": float_model, "exact": exact_model}
  if loaded.exact_lossy is not None and loaded.exact_lossy.version < exact_model.exact_lossy.version:
    models[f"exact_v{loaded.exact_lossy.version}"] = loaded  # an older conversion, as stored

  def stages(model, rate):
    """(hyper seconds, synthesis seconds) of the decoder's two network stages."""
    s = jnp.full((1,), rate, jnp.float32)
    lossy, params = model.lossy_model, model.lossy_params
    x, _ = pad_to_multiple(jnp.asarray(pixels)[None], 64)
    y, z = codec.analyze(lossy, params, x, s)
    z = np.asarray(z)
    h, w = pixels.shape[:2]
    t0 = time.perf_counter()
    if model.exact_lossy is not None:
      mean, _ = codec.exact_hyper(model, z, np.float32(rate))
      t1 = time.perf_counter()
      y_sym = codec._exact_quantize_y(y, mean)
      t1b = time.perf_counter()
      codec.exact_synthesize(model, y_sym, mean, np.float32(rate), h, w)
    else:
      mean, row = codec.hyper(lossy, params, jnp.asarray(z), s, model.y_index_bounds)
      np.asarray(row)
      t1 = time.perf_counter()
      y_sym = np.asarray(codec.quantize_y(y, mean))
      t1b = time.perf_counter()
      codec.synthesize_image(model, y_sym, mean, s, h, w)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1b

  timings = {name: {str(r): {"compress": [], "decompress": [], "hyper": [], "synthesis": []}
                    for r in args.rates} for name in models}
  sizes = {name: {} for name in models}
  for rate in args.rates:
    for name, model in models.items():  # warm-up: compile every shape once
      data = codec.compress(model, pixels, rate=rate)
      codec.decompress(model, data)
      stages(model, rate)
      sizes[name][str(rate)] = len(data)
    for _ in range(args.repeats):
      for name, model in models.items():  # interleaved
        t = timings[name][str(rate)]
        t0 = time.perf_counter()
        data = codec.compress(model, pixels, rate=rate)
        t1 = time.perf_counter()
        codec.decompress(model, data)
        t2 = time.perf_counter()
        t["compress"].append(t1 - t0)
        t["decompress"].append(t2 - t1)
        hyper, synthesis = stages(model, rate)
        t["hyper"].append(hyper)
        t["synthesis"].append(synthesis)
  medians = {name: {rate: {k: statistics.median(v) for k, v in per.items()}
                    for rate, per in rates.items()} for name, rates in timings.items()}
  ratios = {name: {rate: {k: medians[name][rate][k] / medians["float"][rate][k]
                         for k in medians["float"][rate]} for rate in medians["float"]}
            for name in models if name != "float"}
  report = {"benchmark": "exact_lossy_speed", "model": args.model, "image": source,
            "size": list(pixels.shape[:2]), "repeats": args.repeats,
            "host": {"machine": platform.machine(), "processor": platform.processor(),
                     "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                     "jax": jax.__version__},
            "exact_version": exact_model.exact_lossy.version, "bytes": sizes,
            "median_seconds": medians, "over_float": ratios,
            "seconds": timings}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  for name, per_rate in ratios.items():
    for rate, per in per_rate.items():
      print(f"{name} rate {rate}: " + ", ".join(
          f"{k} {medians['float'][rate][k]:.3f} -> {medians[name][rate][k]:.3f} s "
          f"({per[k]:.2f}x)" for k in per))


if __name__ == "__main__":
  main()
