"""Codec speed: encode and decode seconds for one image, network vs entropy coding.

For each config it times, after a warm-up call that compiles (compile time is
reported on its own), each stage of gvae_jax.coding.codec:

  network:  analysis (g_a, h_a, gains), hyper synthesis (h_s, with the scale
            -> table index lookup inside the same jitted function), y
            quantisation, synthesis (g_s, clip, round)
  tables:   the scale -> table row lookup alone (searchsorted on the bounds)
  coding:   range encode / decode of z and y with the profile's coder (or
            --coder), including the escape sections
  transfer: device -> host copies of the integers the coder needs

plus end-to-end compress() / decompress() calls. With --exact-vs-float and a
model converted with `gvae convert-exact` it instead times end-to-end
compress() / decompress() of the converted model and of the float model it
came from (export.to_float), each call in turns in the same process: the
deterministic decoder's before / after on a noisy machine. The image is Kodak kodim01
(768x512) from ../shared/data/kodak when present, else a synthetic image of
that size. `small` uses a trained exported model if --model is given, else
random init; `paper` always uses random init (its tables then come from the
untrained density, which does not change the network time).

  python benchmarks/codec_speed.py --model /path/to/exported_small
  python benchmarks/codec_speed.py --configs small --repeats 5

`paper` is slow on a CPU: run it once, not in a loop.
"""
from __future__ import annotations

import argparse
import functools
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


def load_image(path: Path | None):
  import numpy as np

  from gvae_jax import image_io

  if path is not None and path.exists():
    return image_io.read_image(path)[0], str(path)
  yy, xx = np.mgrid[0:512, 0:768]
  noise = np.random.default_rng(0).integers(-16, 17, (512, 768, 3))
  base = np.stack([xx * 255 // 767, yy * 255 // 511, ((xx // 32 + yy // 32) % 2) * 200 + 20], -1)
  return np.clip(base + noise, 0, 255).astype(np.uint8), "synthetic 768x512"


def random_init_model(config_name: str):
  import jax
  import jax.numpy as jnp

  from gvae_jax.coding import export
  from gvae_jax.config import load_config
  from gvae_jax.models import build_model

  config = load_config(str(REPO / "experiments" / "configs" / f"{config_name}.py"))
  model = build_model(config)
  init = jax.jit(functools.partial(model.init, train=False))
  params = init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,)))["params"]
  return export.build_exported_model(config, params)


def timed(fn, repeats: int):
  """(first-call seconds, median of `repeats` further calls, last result)."""
  import jax

  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), result


def measure(model, pixels, rate: float, repeats: int, coder_id: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from gvae_jax.coding import codec
  from gvae_jax.coding.coder import get_coder
  from gvae_jax.ops import pad_to_multiple

  m, params = model.lossy_model, model.lossy_params  # the model itself unless scalable
  coder = get_coder(coder_id)
  start = time.perf_counter()  # the coder's start-up (TFC: TensorFlow import), once per process
  coder.encode(np.zeros(4, np.int32), np.zeros(4, np.int32), model.y_table)
  tf_start_seconds = time.perf_counter() - start

  s = jnp.full((1,), np.float32(rate), jnp.float32)
  height, width = pixels.shape[:2]
  x_padded, _ = pad_to_multiple(jnp.asarray(pixels)[None], int(m.stride))
  x_padded = jax.block_until_ready(x_padded)

  stages, compile_seconds = {}, {}

  def stage(name, fn, jitted=True):
    first, median, result = timed(fn, repeats)
    stages[name] = median
    if jitted:
      compile_seconds[name] = max(0.0, first - median)
    return result

  y, z_sym = stage("analysis", lambda: codec.analyze(m, params, x_padded, s))
  mean, y_index = stage("hyper_synthesis", lambda: codec.hyper(m, params, z_sym, s,
                                                                model.y_index_bounds))
  y_sym = stage("quantize_y", lambda: codec.quantize_y(y, mean))
  _, scale = m.apply({"params": params}, z_sym.astype(jnp.float32), s,
                     method=m.hyper_synthesize)
  lookup = jax.jit(codec.y_table_row)
  bounds = jnp.asarray(model.y_index_bounds)
  stage("scale_to_row_alone", lambda: lookup(scale, bounds))
  z_np, y_np, index_np = stage(
      "device_to_host", lambda: (np.asarray(z_sym), np.asarray(y_sym), np.asarray(y_index)),
      jitted=False)
  z_indexes = codec.z_indexes(z_np.shape)
  z_bytes = stage("encode_z", lambda: coder.encode(z_np, z_indexes, model.z_table), False)
  y_bytes = stage("encode_y", lambda: coder.encode(y_np, index_np, model.y_table), False)
  stage("decode_z", lambda: coder.decode(z_bytes, z_indexes, model.z_table), False)
  stage("decode_y", lambda: coder.decode(y_bytes, index_np, model.y_table), False)
  stage("synthesis", lambda: codec.synthesize_image(model, y_sym, mean, s, height, width)[0])

  # End to end, after everything above compiled.
  _, compress_seconds, data = timed(lambda: codec.compress(model, pixels, rate, coder=coder_id),
                                   repeats)
  _, decompress_seconds, decoded = timed(lambda: codec.decompress(model, data), repeats)
  assert np.array_equal(decoded,
                        codec.synthesize_image(model, y_sym, mean, s, height, width)[0])

  network_encode = stages["analysis"] + stages["hyper_synthesis"] + stages["quantize_y"]
  network_decode = stages["hyper_synthesis"] + stages["synthesis"]
  return {
      "rate": rate, "bytes": len(data), "bpp": 8.0 * len(data) / (height * width),
      "symbols": {"z": int(z_np.size), "y": int(y_np.size)},
      "encode_seconds": compress_seconds, "decode_seconds": decompress_seconds,
      "encode_breakdown": {
          "network": network_encode,
          "entropy_coding": stages["encode_z"] + stages["encode_y"],
          "device_to_host": stages["device_to_host"],
      },
      "decode_breakdown": {
          "network": network_decode,
          "entropy_coding": stages["decode_z"] + stages["decode_y"],
      },
      "stage_seconds": stages,
      "compile_seconds": compile_seconds,
      "compile_seconds_total": sum(compile_seconds.values()),
      "coder_start_seconds": tf_start_seconds, "coder": coder.name,
  }


def exact_vs_float(model, pixels, rate: float, repeats: int, coder_id: int) -> dict:
  """Medians of compress() / decompress() of the converted model and its float model,
  timed in turns (module doc)."""
  from gvae_jax.coding import codec, export

  if model.exact_lossy is None:
    raise SystemExit("--exact-vs-float needs a model converted with gvae convert-exact")
  models = {"float": export.to_float(model), "exact": model}
  data = {name: codec.compress(m, pixels, rate=rate, coder=coder_id)
          for name, m in models.items()}  # warm-up: compiles
  for name, m in models.items():
    codec.decompress(m, data[name])
  times = {(name, kind): [] for name in models for kind in ("encode", "decode")}
  for _ in range(repeats):
    for name, m in models.items():
      for kind, fn in (("encode", lambda: codec.compress(m, pixels, rate=rate, coder=coder_id)),
                       ("decode", lambda: codec.decompress(m, data[name]))):
        start = time.perf_counter()
        fn()
        times[name, kind].append(time.perf_counter() - start)
  out = {name: {f"{kind}_seconds": statistics.median(times[name, kind])
                for kind in ("encode", "decode")} | {
                    "bytes": len(data[name]), "mode": codec.read_header(data[name]).mode.name}
         for name in models}
  out["exact_over_float"] = {kind: out["exact"][f"{kind}_seconds"] / out["float"][f"{kind}_seconds"]
                             for kind in ("encode", "decode")}
  print(f"float encode {out['float']['encode_seconds']:.3f} s decode "
        f"{out['float']['decode_seconds']:.3f} s; exact encode {out['exact']['encode_seconds']:.3f}"
        f" s decode {out['exact']['decode_seconds']:.3f} s", flush=True)
  return {"rate": rate, "repeats": repeats, **out}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=["small", "paper"],
                      choices=["tiny", "small", "paper"])
  parser.add_argument("--model", help="exported model directory for `small` (else random init)")
  parser.add_argument("--image", default=str(KODIM01))
  parser.add_argument("--rate", type=float, default=None,
                      help="rate s (default: the middle of each model's range)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--paper-repeats", type=int, default=1, help="paper is slow")
  parser.add_argument("--coder", choices=["constriction", "tfc"],
                      help="entropy coder (default: the profile's, gvae_jax.coding.coder)")
  parser.add_argument("--exact-vs-float", action="store_true",
                      help="with a converted --model: only its end-to-end times against the "
                      "float model's, in turns (module doc)")
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/codec_speed.json"))
  args = parser.parse_args()

  import jax

  from gvae_jax.coding import export
  from gvae_jax.coding.coder import CODER_NAMES, default_coder_id
  coder_id = CODER_NAMES[args.coder] if args.coder else default_coder_id()

  pixels, image_name = load_image(Path(args.image))
  results = []
  if args.exact_vs_float:
    if not args.model:
      raise SystemExit("--exact-vs-float needs --model")
    model = export.load_model(args.model)
    rate = args.rate if args.rate is not None else (model.levels - 1) / 2
    results.append({"exact_vs_float": exact_vs_float(model, pixels, rate, args.repeats,
                                                     coder_id), "params_from": args.model})
    args.configs = []
  for name in args.configs:
    start = time.perf_counter()
    if name == "small" and args.model:
      model, source = export.load_model(args.model), f"exported model {args.model}"
    else:
      model, source = random_init_model(name), "random init"
    setup_seconds = time.perf_counter() - start
    rate = args.rate if args.rate is not None else (model.levels - 1) / 2
    repeats = args.paper_repeats if name == "paper" else args.repeats
    row = measure(model, pixels, rate, repeats, coder_id)
    row.update(config=name, params_from=source, model_setup_seconds=setup_seconds,
               n=int(model.config.model.n), m=int(model.config.model.m),
               levels=model.levels, step=model.manifest.get("step"), repeats=repeats)
    print(f"{name:6s} encode {row['encode_seconds']:.3f} s (network "
          f"{row['encode_breakdown']['network']:.3f}, coding "
          f"{row['encode_breakdown']['entropy_coding']:.3f}), decode "
          f"{row['decode_seconds']:.3f} s (network {row['decode_breakdown']['network']:.3f}, "
          f"coding {row['decode_breakdown']['entropy_coding']:.3f}), compile "
          f"{row['compile_seconds_total']:.1f} s, {row['bpp']:.4f} bpp", flush=True)
    results.append(row)
  report = {"benchmark": "codec_speed", "image": image_name,
            "image_size": list(pixels.shape[:2]), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "note": "seconds are medians of warm calls; the machine may be shared",
            "results": results}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
