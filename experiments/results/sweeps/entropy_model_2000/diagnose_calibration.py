"""Calibration of a model's y entropy model: where its estimated bits go (issue 15).

For each Kodak image at rate s, runs the evaluation forward pass of
gvae_jax/models/hyperprior.py (`train=False`: pad, analyse, round z,
hyper-synthesise, v = round(y' - mean)) and takes the per-symbol estimated
bits -log_likelihood(v, scale) / ln 2 of the log-domain likelihood the model
is trained on. Reports the total estimated y bits; for buckets of per-symbol
bits [0,1), [1,5), [5,16), [16,30), [30,inf) the symbol count, share of the
bits, median |v| and median min(scale); and the fraction of symbols whose
(smaller) scale is at the floor gaussian.SCALE_MIN = 0.11 with |v| >= 1 (and
their share of the bits). Next to it: the real file bits against the
estimate (y + z) at that rate from the run's eval/results.json (codec
"gvae", setting == s); the same against the estimate with every y symbol
charged at most -log2(1e-9) bits (the likelihood floor before commit
d83f7bf); and the image's share of flat 8x8 blocks (grey-level std < 2), a
smoothness measure. Symbols many floor-scales from the mean cost tens to
thousands of bits in the estimate but a bounded amount in the file (table
minimum probability or escape), so they
show where and by how much the estimate overstates the file.

    PYTHONPATH=$PWD nice -n 10 python \
        experiments/results/sweeps/entropy_model_2000/diagnose_calibration.py \
        /work/runs/sweeps/entropy_model_2000/asymmetric/model \
        --images /work/shared/data/kodak --rate 2 \
        --out experiments/results/sweeps/entropy_model_2000/calibration_asymmetric.json

--results defaults to MODEL_DIR/../eval/results.json; --only kodim07,kodim19
restricts the images.
"""
import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.coding import export
from gvae_jax.entropy.gaussian import SCALE_MIN
from gvae_jax.eval import images as eval_images
from gvae_jax.ops import pad_to_multiple

OLD_FLOOR_BITS = -np.log2(1e-9)  # the likelihood floor of the estimate before d83f7bf
BUCKETS = [(0, 1), (1, 5), (5, 16), (16, 30), (30, float("inf"))]


def _hex(fingerprint):
  return fingerprint.hex() if isinstance(fingerprint, bytes) else fingerprint


def eval_pass(model, params, x, s):
  """(v, scales tuple, natural-log likelihoods) as the train=False forward pass."""
  variables = {"params": params} if "params" not in params else params

  def f(mdl, x, s):
    x_padded, _ = pad_to_multiple(x, mdl.stride)
    y, z = mdl.analyze(x_padded, s)
    mean, scale = mdl.hyper_synthesize(jnp.round(z), s)
    v = jnp.round(y - mean)
    return v, scale, mdl.y_log_likelihood(v, scale)

  v, scale, ll = jax.jit(lambda x, s: model.apply(variables, x, s, method=f))(x, s)
  scales = scale if isinstance(scale, tuple) else (scale,)
  return np.asarray(v), tuple(np.asarray(a) for a in scales), np.asarray(ll, np.float64)


def flat_block_fraction(pixels, block=8, std=2.0):
  """Share of the image's 8x8 blocks whose grey level (RGB mean) has std < 2: how smooth it is."""
  g = pixels.astype(np.float32).mean(-1)
  h, w = (g.shape[0] // block) * block, (g.shape[1] // block) * block
  blocks = g[:h, :w].reshape(h // block, block, w // block, block)
  return float((blocks.std(axis=(1, 3)) < std).mean())


def file_rows(results_path, rate):
  """image name -> (file bits, estimate_lossy_bits) of the gvae rows at `rate`."""
  if not results_path.exists():
    return {}
  rows = json.loads(results_path.read_text())["rows"]
  return {r["image"]: (8 * r["bytes"], r["estimate_lossy_bits"]) for r in rows
          if r["codec"] == "gvae" and r["setting"] is not None and abs(r["setting"] - rate) < 1e-9}


def diagnose(v, scales, ll):
  bits = -ll / np.log(2.0)
  total = float(bits.sum())
  absv = np.abs(v)
  smin = np.minimum(*scales) if len(scales) == 2 else scales[0]
  at_floor = smin <= np.float32(SCALE_MIN) * (1 + 1e-6)
  buckets = []
  for lo, hi in BUCKETS:
    sel = (bits >= lo) & (bits < hi)
    n = int(sel.sum())
    buckets.append({
        "bits": [lo, None if hi == float("inf") else hi],
        "symbols": n,
        "symbol_fraction": n / v.size,
        "bits_share": float(bits[sel].sum()) / total,
        "median_abs_v": float(np.median(absv[sel])) if n else None,
        "median_min_scale": float(np.median(smin[sel])) if n else None,
    })
  return {
      "y_symbols": int(v.size),
      "estimated_y_bits": total,
      "max_symbol_bits": float(bits.max()),
      "estimated_y_bits_floored_1e-9": float(np.minimum(bits, OLD_FLOOR_BITS).sum()),
      "buckets": buckets,
      "floor_scale_nonzero_fraction": float(np.mean(at_floor & (absv >= 1))),
      "floor_scale_nonzero_bits_share": float(bits[at_floor & (absv >= 1)].sum()) / total,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("model_dir")
  p.add_argument("--images", default="/work/shared/data/kodak")
  p.add_argument("--rate", type=float, default=2.0)
  p.add_argument("--results", default=None, help="eval results.json (default MODEL_DIR/../eval/results.json)")
  p.add_argument("--only", default="", help="comma-separated image stems, e.g. kodim07,kodim19")
  p.add_argument("--out", default=None, help="write the JSON here")
  a = p.parse_args()

  m = export.load_model(a.model_dir)
  model, params = m.lossy_model, m.lossy_params
  results = pathlib.Path(a.results) if a.results else pathlib.Path(a.model_dir).resolve().parent / "eval" / "results.json"
  files = file_rows(results, a.rate)
  only = {n for n in a.only.split(",") if n}
  s = jnp.full((1,), a.rate, jnp.float32)

  out = {"model": str(a.model_dir), "fingerprint": _hex(getattr(m, "fingerprint", None)),
         "entropy_model": getattr(model, "entropy_model", None), "rate": a.rate,
         "scale_min": SCALE_MIN, "results": str(results), "images": []}
  for name, pixels in eval_images.load_images(a.images):
    if only and pathlib.Path(name).stem not in only:
      continue
    x = jnp.asarray(pixels, jnp.float32)[None] / 255.0
    row = {"image": name, "flat_block_fraction": flat_block_fraction(pixels),
           **diagnose(*eval_pass(model, params, x, s))}
    if name in files:
      fb, eb = files[name]
      row.update(file_bits=fb, estimate_lossy_bits=eb, file_vs_estimate_percent=100 * (fb - eb) / eb)
      # The same estimate with each y symbol charged at most the old 1e-9 floor
      # (z bits taken as estimate_lossy_bits minus this pass's y bits).
      floored = eb - row["estimated_y_bits"] + row["estimated_y_bits_floored_1e-9"]
      row["file_vs_floored_estimate_percent"] = 100 * (fb - floored) / floored
    out["images"].append(row)
    b = row["buckets"]
    print(f"{name}: est y {row['estimated_y_bits']:.0f} bits"
          + (f", file {row['file_bits']:.0f} vs est {row['estimate_lossy_bits']:.0f}"
             f" ({row['file_vs_estimate_percent']:+.1f}%)" if "file_bits" in row else "")
          + f"; >=30-bit symbols {b[-1]['symbol_fraction']:.2%} carry {b[-1]['bits_share']:.1%}"
          f" (median |v| {b[-1]['median_abs_v']}, min scale {b[-1]['median_min_scale']});"
          f" floor & |v|>=1 {row['floor_scale_nonzero_fraction']:.2%}", flush=True)

  if out["images"]:
    tot = sum(r["estimated_y_bits"] for r in out["images"])
    n = sum(r["y_symbols"] for r in out["images"])
    out["pooled"] = {
        "estimated_y_bits": tot,
        "buckets": [{"bits": out["images"][0]["buckets"][i]["bits"],
                     "symbol_fraction": sum(r["buckets"][i]["symbols"] for r in out["images"]) / n,
                     "bits_share": sum(r["buckets"][i]["bits_share"] * r["estimated_y_bits"]
                                       for r in out["images"]) / tot} for i in range(len(BUCKETS))],
        "floor_scale_nonzero_fraction": sum(r["floor_scale_nonzero_fraction"] * r["y_symbols"]
                                            for r in out["images"]) / n,
    }
    print("pooled:", json.dumps(out["pooled"]))
  if a.out:
    pathlib.Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  main()
