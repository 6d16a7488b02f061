"""Residual-layer speed: encode and decode seconds for one image per tau.

Times gvae_jax.coding.residual_codec (the step-wise residual coder of
near-lossless and lossless files) on one 768x512 image: Kodak kodim01 from
../shared/data/kodak when present, else a synthetic image of that size. The
base layer (lossy layer, x_base and the prior u) is computed once per rate
and is not part of the times; the lossy layer's own speed is
benchmarks/codec_speed.py.

For each tau (default 0 1 2 3 5) it reports, after a warm-up call that
compiles (reported on its own as compile_seconds):

  encode_seconds / decode_seconds   median of `--repeats` warm calls (wall)
  encode_cpu_seconds / ...          the process CPU time of the same calls
                                    (less sensitive to other jobs on the machine)
  steps, coder_calls, symbols       per image; symbols = coded values (pixels
                                    times coded channels); symbols_per_second =
                                    symbols / seconds
  breakdown (one more profiled call each way; the profiler waits for each
  JAX result, which costs a little, so its parts sum to slightly more):
    context    writing each step's decoded values into the context buffer (JAX)
    network    gathering a step's context taps and running the heads (JAX)
    stats      encoder: the first pass's bits and escapes per window (JAX)
    cdf        integer CDF rows (coarse and fine) and their copy to the host (JAX)
    coder      entropy coder calls (the profile's backend, gvae_jax.coding.coder)
    python     the rest of the loop (bookkeeping, dispatch, array writes)
  compiled     executables per jitted function after the run (each bucket
               size, window and head compiles once per process)
  exact_vs_float (with --exact-vs-float and a converted scalable --model): the
               float and the exact residual layer on the lossy base (the float
               model's x_base and u, and the converted model's) and on the flat
               base (the float flat head and its exact form), each call timed
               in turns in the same process: the issue's before / after;
               with --baseline REF also REF's residual_codec.py on the exact
               layers (baseline_exact_*, its bytes checked equal to today's).
  interleaved_with_baseline (with --baseline REF): residual_codec.py as of
               git REF and the current one, each call timed in turns in the
               same process (medians of `--repeats` rounds), with the
               speedups: on a shared machine, whose speed drifts by 2x or
               more within minutes, the fair before/after. Both use today's
               coder backend (the profile's), so the baseline's coder calls
               are already today's.

The model is experiments/configs/small_nearlossless.py with random init
(flax init at seed 0) unless --model names an exported scalable model (e.g.
experiments/models/small_nearlossless once trained). With random init the
base layer is poor (the residual range is nearly the full [-255, 255] at
tau 0) and the untrained residual head predicts arbitrary spreads, so
neither the CDF windows nor the escapes are what a trained model gives. So,
until a trained near-lossless model exists, a second run ("trained_lossy")
takes the lossy layer from the exported trained lossy model
experiments/models/small (or --lossy-from; the prior head stays random) and
sets the residual head's log-scale bias (--residual-log-scale, default 2.0:
logistic scale ~7 grey levels, about what the residual of that base layer
needs): a realistic residual range, realistic CDF windows and few escapes,
though not a trained residual model's compression. The JSON holds both.

  python benchmarks/residual_speed.py [--model DIR] [--taus 0 1 2 3 5] [--repeats 3]
      [--baseline GIT_REF] [--cpus N]
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
CONFIG = REPO / "experiments" / "configs" / "small_nearlossless.py"
TRAINED_SMALL = REPO / "experiments" / "models" / "small"  # the exported lossy `small`


def load_image(path: Path | None):
  import numpy as np

  from gvae_jax import image_io

  if path is not None and path.exists():
    return image_io.read_image(path)[0], str(path)
  yy, xx = np.mgrid[0:512, 0:768]
  noise = np.random.default_rng(0).integers(-16, 17, (512, 768, 3))
  base = np.stack([xx * 255 // 767, yy * 255 // 511, ((xx // 32 + yy // 32) % 2) * 200 + 20], -1)
  return np.clip(base + noise, 0, 255).astype(np.uint8), "synthetic 768x512"


def random_init_model(lossy_from: str | None, residual_log_scale: float | None):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from gvae_jax.coding import export
  from gvae_jax.config import load_config
  from gvae_jax.entropy import logistic_mixture as lm
  from gvae_jax.models import build_model

  config = load_config(str(CONFIG))
  model = build_model(config)
  init = jax.jit(functools.partial(model.init, train=False, tau=jnp.ones((1,), jnp.int32)))
  params = init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,)))["params"]
  params = jax.tree_util.tree_map(np.array, params)  # writable copies
  if lossy_from:
    trained = export.load_model(lossy_from)
    if trained.is_scalable or trained.config.model.n != config.model.n or (
        trained.config.model.m != config.model.m or trained.levels != config.model.levels):
      raise SystemExit(f"{lossy_from} must be a lossy model with n={config.model.n}, "
                       f"m={config.model.m}, {config.model.levels} levels")
    flat = {jax.tree_util.keystr(k): v
            for k, v in jax.tree_util.tree_flatten_with_path(trained.params)[0]}
    params["lossy"] = jax.tree_util.tree_map_with_path(
        lambda k, v: np.asarray(flat.get(jax.tree_util.keystr(k), v)), params["lossy"])
  if residual_log_scale is not None:
    r = config.model.residual
    weights = r.components if r.share_weights else 3 * r.components
    scales = slice(weights + 3 * r.components, weights + 6 * r.components)
    assert lm.num_raw_params(r.components, r.share_weights) == weights + 9 * r.components
    params["residual"]["head_2"]["bias"][scales] = residual_log_scale
    params["residual"]["bc_head_2"]["shift"]["bias"][scales] = residual_log_scale
  return export.build_exported_model(config, params)


def base_layer(model, pixels, rate: float):
  """(x_base uint8 [H, W, 3], padded prior u) exactly as the codec computes them."""
  from gvae_jax.coding import codec

  return codec.base_layer(model, pixels, rate)


def load_baseline(ref: str):
  """gvae_jax/coding/residual_codec.py as of git `ref`, imported as its own module."""
  import importlib.util
  import subprocess
  import sys
  import tempfile

  command = ["git", "-C", str(REPO), "show", f"{ref}:gvae_jax/coding/residual_codec.py"]
  source = subprocess.run(command, check=True, capture_output=True).stdout
  path = Path(tempfile.mkdtemp(prefix="residual_baseline_")) / "baseline_residual_codec.py"
  path.write_bytes(source)
  spec = importlib.util.spec_from_file_location("baseline_residual_codec", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def interleaved(model, pixels, base, u, tau: int, repeats: int, baseline) -> dict:
  """Medians of the current and the baseline coder timed in turns (module doc)."""
  from gvae_jax.coding import residual_codec
  from gvae_jax.coding.coder import default_coder_id, get_coder

  coder = get_coder(default_coder_id())
  modules = {"current": residual_codec, "baseline": baseline}
  layers = {name: m.encode(model, coder, pixels, base, u, tau) for name, m in modules.items()}
  for name, m in modules.items():  # warm up (compiles) before timing
    m.decode(model, coder, layers[name].side_info, layers[name].streams, base, u, tau)
  times = {(name, kind): [] for name in modules for kind in ("encode", "decode")}
  for _ in range(repeats):
    for name, m in modules.items():
      layer = layers[name]
      for kind, fn in (("encode", lambda: m.encode(model, coder, pixels, base, u, tau)),
                       ("decode", lambda: m.decode(model, coder, layer.side_info, layer.streams,
                                                   base, u, tau))):
        start = time.perf_counter()
        fn()
        times[name, kind].append(time.perf_counter() - start)
  out = {name: {f"{kind}_seconds": statistics.median(times[name, kind])
                for kind in ("encode", "decode")} | {
                    "residual_bytes": len(layers[name].side_info) + len(layers[name].streams)}
         for name in modules}
  for kind in ("encode", "decode"):
    out[f"{kind}_speedup"] = out["baseline"][f"{kind}_seconds"] / out["current"][f"{kind}_seconds"]
  return out


def exact_vs_float(model, pixels, rate: float, taus, repeats: int, baseline=None,
                   baseline_ref: str | None = None) -> dict:
  """The converted model's exact residual layers against the float ones they came from,
  timed in turns (module doc): per tau, medians of `repeats` rounds. With a baseline
  (`load_baseline`), its exact layers too ("baseline_exact_*", the same bytes checked)."""
  import dataclasses

  import numpy as np

  from gvae_jax.coding import codec, export, residual_codec
  from gvae_jax.coding.coder import default_coder_id, get_coder

  if model.exact_residual is None:
    raise SystemExit("--exact-vs-float needs a scalable model converted with its lossy-base "
                     "head (gvae convert-exact)")
  float_model = export.to_float(model)
  variants = {"float_lossy_base": codec.residual_layer_inputs(float_model, pixels, "lossy", rate),
              "exact_lossy_base": codec.residual_layer_inputs(model, pixels, "lossy", rate)}
  if model.flat is not None:
    float_flat = export.attach(float_model, dataclasses.replace(model.flat, exact=None))
    variants["float_flat_base"] = codec.residual_layer_inputs(float_flat, pixels, "flat")
    variants["exact_flat_base"] = codec.residual_layer_inputs(model, pixels, "flat")
  modules = dict.fromkeys(variants, residual_codec)
  if baseline is not None:
    for name in [n for n in variants if n.startswith("exact_")]:
      variants["baseline_" + name] = variants[name]
      modules["baseline_" + name] = baseline
  coder = get_coder(default_coder_id())
  out = {}
  for tau in taus:
    layers = {}
    for name, (view, base, u) in variants.items():  # warm up (compiles) before timing
      codec_module = modules[name]
      layers[name] = codec_module.encode(view, coder, pixels, base, u, tau)
      decoded, _ = codec_module.decode(view, coder, layers[name].side_info,
                                       layers[name].streams, base, u, tau)
      if np.abs(decoded.astype(np.int32) - pixels).max() > tau:
        raise AssertionError(f"{name}: error bound {tau} violated")
      if codec_module is baseline:  # after its current variant (the order of `variants`)
        current = layers[name.removeprefix("baseline_")]
        if (current.streams, current.side_info) != (layers[name].streams,
                                                    layers[name].side_info):
          raise AssertionError(f"{name}: the baseline writes other bytes than the current code")
    times = {(name, kind): [] for name in variants for kind in ("encode", "decode")}
    for _ in range(repeats):
      for name, (view, base, u) in variants.items():
        layer, codec_module = layers[name], modules[name]
        for kind, fn in (
            ("encode", lambda: codec_module.encode(view, coder, pixels, base, u, tau)),
            ("decode", lambda: codec_module.decode(view, coder, layer.side_info,
                                                   layer.streams, base, u, tau))):
          start = time.perf_counter()
          fn()
          times[name, kind].append(time.perf_counter() - start)
    row = {name: {f"{kind}_seconds": statistics.median(times[name, kind])
                  for kind in ("encode", "decode")}
           | {"residual_bytes": len(layers[name].side_info) + len(layers[name].streams)}
           for name in variants}
    for base_name in ("lossy_base", "flat_base"):
      if f"exact_{base_name}" in row:
        exact, floating = row[f"exact_{base_name}"], row[f"float_{base_name}"]
        row[f"{base_name}_exact_over_float"] = {
            kind: exact[f"{kind}_seconds"] / floating[f"{kind}_seconds"]
            for kind in ("encode", "decode")} | {
            "bytes": exact["residual_bytes"] / floating["residual_bytes"]}
      if f"baseline_exact_{base_name}" in row:
        row[f"{base_name}_exact_current_over_baseline"] = {
            kind: exact[f"{kind}_seconds"]
            / row[f"baseline_exact_{base_name}"][f"{kind}_seconds"]
            for kind in ("encode", "decode")}
    out[str(tau)] = row
    print(f"tau {tau}: " + ", ".join(
        f"{name} encode {r['encode_seconds']:.3f} s decode {r['decode_seconds']:.3f} s "
        f"({r['residual_bytes']} B)" for name, r in row.items() if "seconds" in str(r)),
        flush=True)
  return {"rate": rate, "baseline": baseline_ref, "taus": out}


def measure(model, pixels, base, u, tau: int, repeats: int) -> dict:
  import numpy as np

  from gvae_jax.coding import residual_codec, residual_plan
  from gvae_jax.coding.coder import default_coder_id, get_coder

  coder = get_coder(default_coder_id())
  encode = lambda profile=None: residual_codec.encode(model, coder, pixels, base, u, tau, profile)
  decode = lambda layer, profile=None: residual_codec.decode(
      model, coder, layer.side_info, layer.streams, base, u, tau, profile)

  start = time.perf_counter()
  layer = encode()
  first_encode = time.perf_counter() - start
  start = time.perf_counter()
  decoded, _ = decode(layer)
  first_decode = time.perf_counter() - start
  if np.abs(decoded.astype(np.int32) - pixels).max() > tau:
    raise AssertionError(f"error bound {tau} violated")

  def median_seconds(fn):
    times, cpu = [], []
    for _ in range(repeats):
      start, start_cpu = time.perf_counter(), time.process_time()
      fn()
      times.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), statistics.median(cpu)

  encode_seconds, encode_cpu = median_seconds(encode)
  decode_seconds, decode_cpu = median_seconds(lambda: decode(layer))

  def breakdown(run):
    profile = residual_codec.Profile()
    start = time.perf_counter()
    run(profile)
    total = time.perf_counter() - start
    parts = {"context": profile.context, "network": profile.network, "stats": profile.stats,
             "cdf": profile.cdf, "coder": profile.coder}
    parts["python"] = max(0.0, total - sum(parts.values()))
    return profile, {"total_profiled": total, **parts}

  profile, encode_parts = breakdown(lambda p: encode(p))
  _, decode_parts = breakdown(lambda p: decode(layer, p))
  height, width = pixels.shape[:2]
  residual_bytes = len(layer.side_info) + len(layer.streams)
  return {
      "tau": tau,
      "encode_seconds": encode_seconds,
      "decode_seconds": decode_seconds,
      "encode_cpu_seconds": encode_cpu,
      "decode_cpu_seconds": decode_cpu,
      "compile_seconds": {"encode": max(0.0, first_encode - encode_seconds),
                          "decode": max(0.0, first_decode - decode_seconds)},
      "steps": profile.steps,
      "coder_calls": profile.coder_calls,
      "symbols": profile.symbols,
      "encode_symbols_per_second": profile.symbols / encode_seconds,
      "decode_symbols_per_second": profile.symbols / decode_seconds,
      "symbol_range": [int(h - l + 1) for l, h in zip(layer.q_low, layer.q_high)],
      "cdf_windows": [int(w) for w in layer.windows],
      "cdf_group_sizes": [residual_plan.group_size(int(w)) if w else 0 for w in layer.windows],
      "escapes": int(layer.escapes),
      "residual_bytes": residual_bytes,
      "residual_bpsp": 8.0 * residual_bytes / (3 * height * width),
      "stream_count": len(layer.stream_lengths),
      "encode_breakdown": encode_parts,
      "decode_breakdown": decode_parts,
      "compiled": compiled_counts(),
  }


def compiled_counts() -> dict:
  """Executables in each jitted function's cache (one per shape and static arguments)."""
  from gvae_jax.coding import residual_codec

  names = ("_network", "_scatter", "_coarse_cdf", "_fine_cdf", "_step_stats")
  return {name: int(getattr(residual_codec, name)._cache_size()) for name in names
          if hasattr(getattr(residual_codec, name, None), "_cache_size")}


def scenarios(args) -> list[tuple[str, str | None, float | None]]:
  """(name, lossy_from, residual_log_scale) for each random-init model to time."""
  runs = [("random", None, None)]
  lossy_from = args.lossy_from or (str(TRAINED_SMALL) if TRAINED_SMALL.is_dir() else None)
  if lossy_from and not args.random_only:
    runs.append(("trained_lossy", lossy_from, args.residual_log_scale))
  return runs


def run(model, source: str, pixels, args) -> dict:
  residual = model.residual_model
  rate = args.rate if args.rate is not None else (model.levels - 1) / 2
  base, u = base_layer(model, pixels, rate)
  results = []
  for tau in args.taus:
    row = measure(model, pixels, base, u, tau, args.repeats)
    if args.baseline_module is not None:
      row["interleaved_with_baseline"] = {
          "baseline": args.baseline,
          **interleaved(model, pixels, base, u, tau, args.repeats, args.baseline_module)}
      comparison = row["interleaved_with_baseline"]
      print(f"tau {tau}: interleaved with {args.baseline}: encode "
            f"{comparison['baseline']['encode_seconds']:.3f} -> "
            f"{comparison['current']['encode_seconds']:.3f} s, decode "
            f"{comparison['baseline']['decode_seconds']:.3f} -> "
            f"{comparison['current']['decode_seconds']:.3f} s", flush=True)
    results.append(row)
    print(f"tau {tau}: encode {row['encode_seconds']:.3f} s, decode {row['decode_seconds']:.3f} s "
          f"(cpu {row['encode_cpu_seconds']:.3f} / {row['decode_cpu_seconds']:.3f} s) "
          f"({row['steps']} steps, {row['coder_calls']} coder calls, "
          f"{row['decode_symbols_per_second'] / 1e6:.2f} M symbols/s decoding, ranges "
          f"{row['symbol_range']}, windows {row['cdf_windows']}, {row['escapes']} escapes, "
          f"{row['residual_bpsp']:.3f} bpsp), decode parts " + ", ".join(
              f"{k} {v:.3f}" for k, v in row["decode_breakdown"].items()), flush=True)
  return {
      "params_from": source, "rate": rate,
      "residual_model": {"context_channels": int(residual.context_channels),
                         "kernel_size": int(residual.kernel_size), "order": int(residual.order),
                         "hidden": int(residual.hidden), "components": int(residual.components),
                         "prior_channels": int(model.config.model.prior_channels)},
      "results": results,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", help="exported scalable model directory (else random init)")
  parser.add_argument("--image", default=str(KODIM01))
  parser.add_argument("--rate", type=float, default=None,
                      help="base rate s (default: the middle of the model's range)")
  parser.add_argument("--taus", type=int, nargs="+", default=[0, 1, 2, 3, 5])
  parser.add_argument("--lossy-from", help="random init: also time a model whose lossy layer "
                      "comes from this exported lossy model (default: experiments/models/small "
                      "if present)")
  parser.add_argument("--residual-log-scale", type=float, default=2.0,
                      help="with --lossy-from: the residual head's log-scale bias")
  parser.add_argument("--random-only", action="store_true", help="only the plain random init")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--baseline", metavar="GIT_REF", default=None,
                      help="also time residual_codec.py as of this git ref, in turns with the "
                      "current one in the same process (a fair before/after on a shared machine)")
  parser.add_argument("--exact-vs-float", action="store_true",
                      help="with a converted scalable --model: only its exact residual layers "
                      "against the float ones, timed in turns (module doc)")
  parser.add_argument("--cpus", type=int, default=None,
                      help="pin the process to this many CPUs before JAX and TF start (their "
                      "thread pools follow); default: all")
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/residual_speed.json"))
  args = parser.parse_args()
  if args.cpus:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
  args.baseline_module = load_baseline(args.baseline) if args.baseline else None

  import jax

  from gvae_jax.coding import export
  from gvae_jax.coding.coder import default_coder_id, get_coder

  pixels, image_name = load_image(Path(args.image))
  runs = {}
  if args.model:
    model = export.load_model(args.model)
    if not model.is_scalable:
      raise SystemExit(f"{args.model} is lossy-only; the residual layer needs a scalable model")
    if args.exact_vs_float:
      rate = args.rate if args.rate is not None else (model.levels - 1) / 2
      runs["exact_vs_float"] = exact_vs_float(model, pixels, rate, args.taus, args.repeats,
                                              args.baseline_module, args.baseline)
    else:
      runs["exported"] = run(model, f"exported model {args.model}", pixels, args)
  else:
    for name, lossy_from, log_scale in scenarios(args):
      start = time.perf_counter()
      model = random_init_model(lossy_from, log_scale)
      source = "random init (seed 0)"
      if lossy_from:
        source += (f", lossy layer from {lossy_from}, residual log-scale bias {log_scale}"
                   " (a realistic residual range, spread and escape count; not a trained "
                   "residual model)")
      print(f"{name}: {source}", flush=True)
      runs[name] = run(model, source, pixels, args)
      runs[name]["model_setup_seconds"] = time.perf_counter() - start
  report = {
      "benchmark": "residual_speed", "image": image_name, "image_size": list(pixels.shape[:2]),
      "config": None if args.model else str(CONFIG.relative_to(REPO)),
      "machine": platform.machine(), "cpus": os.cpu_count(),
      "cpus_used": len(os.sched_getaffinity(0)),
      "python": platform.python_version(), "jax": jax.__version__,
      "coder": get_coder(default_coder_id()).name,
      "note": ("residual layer only (the base layer is computed once, outside the times); "
               "seconds are medians of warm calls; compile_seconds is the first call's extra; "
               "the machine is a shared 2-vCPU VM: other jobs and the host's steal time move "
               "these times by 2x or more between runs, so compare runs made together"),
      "repeats": args.repeats, "baseline": args.baseline, "runs": runs,
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
