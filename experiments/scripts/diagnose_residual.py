"""Issue 13 diagnosis: the learned residual model against classical predictors on
the same residual, and the bits split of real files.

For each image and tau it
  a) codes a real file the way `gvae compress` does (codec.encode_residual with a
     lossy base at choose_rate's rate, or codec.encode_flat for a flat head),
     decodes it again at tau 0 (lossless check), and splits the file into its
     container sections: header (fixed fields + section table + CRC), z, y,
     residual side information, residual streams, pixel check;
  b) takes the integers the residual coder codes, q = r_hat / (2 tau + 1) with
     r_hat = quantize(x - x_base, tau) (encoded.residual.r_hat), and computes the
     ideal sequential adaptive code length of q under classical models:
       zero    : prediction 0, context = activity of the neighbours (the sum of
                 |a|, |b|, |c|, |d| of the errors, bucketed into 16 contexts)
       med     : LOCO-I median edge detector on each q plane, same context model
       med64   : med with every 64x64 patch coded on its own (zero outside it,
                 the learned coder's parallel-decoding restriction)
       *_hp    : the planes G, R - G, B - G (JPEG-LS's HP1 colour transform) in
                 that order; R - G and B - G also put 2 |error of G| at the
                 current pixel into their activity (inter-channel context)
     and, as a JPEG-LS-like baseline without any lossy layer, the same models on
     q_x = quantize(x - 128, tau) / (2 tau + 1) (the flat base's integers):
       x_med, x_med_hp
     Each method is coded with two adaptive models (per channel and context):
       hist    : adaptive histogram (KT counts, alpha = 1/2) of the error
                 clipped to +-CLIP, with an escape symbol; escaped errors coded by
                 a second adaptive KT histogram (per channel) over +-2047
       laplace : discretised Laplacian with adaptive location (running mean of
                 the previous errors of the context) and scale (running mean of
                 their absolute deviation), LOCO-I-like but with ideal code lengths
     Both are strictly sequential (raster order, every symbol's probability uses
     only the counts of earlier symbols of its context) and computed exactly in
     numpy by per-key cumulative counts. `best` = the smaller of the two per
     image (one flag bit per image, left out).
  c) compares with the learned model: its real residual bits (side information +
     streams) and its ideal code length (the encoder's -log2 of the float
     mixture, encoded.residual.estimated_bits).

bpsp = bits / (H * W * 3) everywhere.

  PYTHONPATH=$PWD nice -n 10 .venv/bin/python experiments/scripts/diagnose_residual.py \\
      --model experiments/models/small_nearlossless_delta --taus 0 1 2
  PYTHONPATH=$PWD nice -n 10 .venv/bin/python experiments/scripts/diagnose_residual.py \\
      --model experiments/models/small_nearlossless_delta \\
      --flat-head experiments/models/flat_residual --taus 0
  ... --validate     only the synthetic check of the code-length functions
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CLIP = 48  # hist: |error| <= CLIP coded directly, beyond it an escape
ESCAPE_RANGE = 2047  # escaped errors: |e| <= this (MED errors on 8-bit data are < 1024)
KT = 0.5  # Krichevsky-Trofimov count offset
# Activity (sum of |neighbour errors|) bucket thresholds: 16 contexts.
THRESHOLDS = np.array([1, 2, 3, 4, 6, 8, 11, 15, 20, 27, 36, 48, 64, 90, 128])
LAPLACE_PRIOR_SCALE = 2.0  # initial mean |deviation| (one pseudo-observation)
PATCH = 64
OUT_JSON = Path("experiments/results/diagnosis/residual_predictors.json")
METHODS = ("zero", "zero_hp", "med", "med64", "med_hp", "med_hp64", "x_med", "x_med_hp")
MODELS = ("hist", "laplace", "best")
RESIDUAL_METHODS = tuple(m for m in METHODS if not m.startswith("x_"))


# --- The adaptive models: ideal sequential code lengths, vectorised. ---

def previous_counts(keys: np.ndarray) -> np.ndarray:
  """For each position i, how many j < i have keys[j] == keys[i] (exact, O(n log n))."""
  keys = np.asarray(keys, np.int64).ravel()
  order = np.argsort(keys, kind="stable")  # stable: raster order within a key
  sorted_keys = keys[order]
  starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
  group_start = np.repeat(starts, np.diff(np.concatenate([starts, [keys.size]])))
  out = np.empty(keys.size, np.int64)
  out[order] = np.arange(keys.size) - group_start
  return out


def previous_sums(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
  """For each i, the sum of values[j] over j < i with keys[j] == keys[i]."""
  keys = np.asarray(keys, np.int64).ravel()
  values = np.asarray(values, np.float64).ravel()
  order = np.argsort(keys, kind="stable")
  sorted_keys, sorted_values = keys[order], values[order]
  prefix = np.concatenate([[0.0], np.cumsum(sorted_values)])  # prefix[k]: sum of the first k
  starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
  group_start = np.repeat(starts, np.diff(np.concatenate([starts, [keys.size]])))
  out = np.empty(keys.size, np.float64)
  out[order] = prefix[:-1] - prefix[group_start]
  return out


def hist_bits(errors: np.ndarray, contexts: np.ndarray) -> float:
  """Ideal code length (bits) of integer errors under an adaptive KT histogram per
  context over [-CLIP, CLIP] + escape; escapes by an adaptive KT histogram over
  [-ESCAPE_RANGE, ESCAPE_RANGE] shared by the contexts. Raster order."""
  e = np.asarray(errors, np.int64).ravel()
  ctx = np.asarray(contexts, np.int64).ravel()
  size = 2 * CLIP + 2  # values and escape
  escaped = np.abs(e) > CLIP
  symbol = np.where(escaped, size - 1, e + CLIP)
  n_sym = previous_counts(ctx * size + symbol)
  n_ctx = previous_counts(ctx)
  bits = -np.log2((n_sym + KT) / (n_ctx + KT * size))
  total = float(bits.sum())
  if escaped.any():
    if np.abs(e).max() > ESCAPE_RANGE:
      raise ValueError("an error beyond the escape range")
    v = e[escaped] + ESCAPE_RANGE
    esc_size = 2 * ESCAPE_RANGE + 1
    n_v = previous_counts(v)
    n_all = np.arange(v.size)
    total += float(-np.log2((n_v + KT) / (n_all + KT * esc_size)).sum())
  return total


def _log2_laplace_bin(x: np.ndarray, mu: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """log2 P(integer x) for a Laplacian(mu, scale) integrated over [x - 1/2, x + 1/2]."""
  lo, hi = x - 0.5 - mu, x + 0.5 - mu
  inv = 1.0 / scale
  out = np.empty(x.shape, np.float64)
  above = lo >= 0  # bin wholly above the mean
  below = hi <= 0
  mid = ~(above | below)
  # above: 0.5 (exp(-lo/s) - exp(-hi/s)) = 0.5 exp(-lo/s) (1 - exp(-1/s))
  out[above] = (np.log(0.5) - lo[above] * inv[above] + np.log(-np.expm1(-inv[above])))
  out[below] = (np.log(0.5) + hi[below] * inv[below] + np.log(-np.expm1(-inv[below])))
  out[mid] = np.log(1.0 - 0.5 * np.exp(-hi[mid] * inv[mid]) - 0.5 * np.exp(lo[mid] * inv[mid]))
  return out / np.log(2.0)


def laplace_bits(errors: np.ndarray, contexts: np.ndarray) -> float:
  """Ideal code length (bits) of integer errors under a discretised Laplacian per
  context whose location is the running mean of the context's previous errors and
  whose scale is the running mean of their absolute deviations from the location
  each had when it was coded (one pseudo-observation of LAPLACE_PRIOR_SCALE)."""
  e = np.asarray(errors, np.float64).ravel()
  ctx = np.asarray(contexts, np.int64).ravel()
  n = previous_counts(ctx).astype(np.float64)
  mu = previous_sums(ctx, e) / np.maximum(n, 1.0)
  mu = np.where(n > 0, mu, 0.0)
  dev = np.abs(e - mu)
  scale = (previous_sums(ctx, dev) + LAPLACE_PRIOR_SCALE) / (n + 1.0)
  # A Laplacian's scale is its mean absolute deviation; floor it for all-zero contexts.
  scale = np.maximum(scale, 0.05)
  return float(-_log2_laplace_bin(e, mu, scale).sum())


# --- Predictors and contexts on one integer plane. ---

def neighbours(plane: np.ndarray, patch: int = 0):
  """(a left, b up, c up-left, d up-right) of every pixel, 0 outside the image (and,
  with patch > 0, outside the pixel's patch x patch tile)."""
  p = np.pad(plane, 1)
  h, w = plane.shape
  a, b = p[1:-1, :-2], p[:-2, 1:-1]
  c, d = p[:-2, :-2], p[:-2, 2:]
  if patch:
    i, j = np.mgrid[0:h, 0:w]
    top, left, right = i % patch == 0, j % patch == 0, j % patch == patch - 1
    a = np.where(left, 0, a)
    b = np.where(top, 0, b)
    c = np.where(top | left, 0, c)
    d = np.where(top | right, 0, d)
  return a, b, c, d


def med(plane: np.ndarray, patch: int = 0) -> np.ndarray:
  a, b, c, _ = neighbours(plane, patch)
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  return np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))


def bucket(activity: np.ndarray) -> np.ndarray:
  return np.searchsorted(THRESHOLDS, activity, side="right")


def method_bits(q: np.ndarray, method: str) -> dict:
  """Bits per plane of q [H, W, 3] (int) under a method (module doc), both models.

  "_hp" methods code the planes G, R - G, B - G (JPEG-LS's HP1 colour transform,
  without the modulo) in that order, and the activity of R - G and B - G also
  counts 2 |error of G| at the current pixel (coded before them).
  """
  q = np.asarray(q, np.int64)
  predictor = method.split("_")[0]
  patch = PATCH if method.endswith("64") else 0
  hp = "_hp" in method
  planes = ([q[:, :, 1], q[:, :, 0] - q[:, :, 1], q[:, :, 2] - q[:, :, 1]] if hp
            else [q[:, :, c] for c in range(q.shape[2])])
  out = {"hist": [], "laplace": []}
  first = None
  for index, plane in enumerate(planes):
    pred = np.zeros_like(plane) if predictor == "zero" else med(plane, patch)
    err = plane - pred
    na, nb, nc, nd = neighbours(np.abs(err), patch)
    activity = na + nb + nc + nd
    if hp and index > 0:
      activity = activity + 2 * np.abs(first)
    ctx = bucket(activity)
    out["hist"].append(hist_bits(err, ctx))
    out["laplace"].append(laplace_bits(err, ctx))
    if index == 0:
      first = err
  return out


def static_entropy_bits(q: np.ndarray) -> float:
  """Zeroth-order empirical entropy of q per channel, times the count (not a code:
  it looks ahead; a reference only)."""
  total = 0.0
  for ch in range(q.shape[2]):
    _, counts = np.unique(q[:, :, ch], return_counts=True)
    p = counts / counts.sum()
    total += float(-(counts * np.log2(p)).sum())
  return total


# --- Validation on synthetic data. ---

def validate(seed: int = 0) -> dict:
  """The code lengths of i.i.d. discretised Laplacian samples against their entropy."""
  rng = np.random.default_rng(seed)
  rows = []
  for scale in (0.7, 3.0, 12.0):
    n = 400_000
    x = np.round(rng.laplace(0.0, scale, n)).astype(np.int64)
    support = np.arange(-400, 401)
    lo, hi = support - 0.5, support + 0.5
    cdf = lambda t: np.where(t < 0, 0.5 * np.exp(t / scale), 1 - 0.5 * np.exp(-t / scale))
    p = cdf(hi) - cdf(lo)
    p = p[p > 0]
    entropy = float(-(p * np.log2(p)).sum())
    one = np.zeros(n, np.int64)
    many = rng.integers(0, 16, n)  # 16 random contexts: the cost of learning 16 models
    rows.append({
        "scale": scale, "samples": n, "entropy_bits": entropy,
        "hist_1ctx": hist_bits(x, one) / n, "laplace_1ctx": laplace_bits(x, one) / n,
        "hist_16ctx": hist_bits(x, many) / n, "laplace_16ctx": laplace_bits(x, many) / n,
    })
  # Exactness: a direct sequential loop on a small sample gives the same totals.
  x = np.round(rng.laplace(0.0, 5.0, 3000)).astype(np.int64)
  ctx = rng.integers(0, 4, x.size)
  counts, ctx_n, esc, esc_n, bits_h = {}, {}, {}, 0, 0.0
  sums, devs, bits_l = {}, {}, 0.0
  size = 2 * CLIP + 2
  for v, c in zip(x.tolist(), ctx.tolist()):
    s = size - 1 if abs(v) > CLIP else v + CLIP
    bits_h -= np.log2((counts.get((c, s), 0) + KT) / (ctx_n.get(c, 0) + KT * size))
    if abs(v) > CLIP:
      bits_h -= np.log2((esc.get(v, 0) + KT) / (esc_n + KT * (2 * ESCAPE_RANGE + 1)))
      esc[v] = esc.get(v, 0) + 1
      esc_n += 1
    counts[(c, s)] = counts.get((c, s), 0) + 1
    k = ctx_n.get(c, 0)
    mu = sums.get(c, 0.0) / k if k else 0.0
    scale = max((devs.get(c, 0.0) + LAPLACE_PRIOR_SCALE) / (k + 1.0), 0.05)
    bits_l -= float(_log2_laplace_bin(np.array([float(v)]), np.array([mu]),
                                      np.array([scale]))[0])
    sums[c] = sums.get(c, 0.0) + v
    devs[c] = devs.get(c, 0.0) + abs(v - mu)
    ctx_n[c] = k + 1
  loop = {"hist_loop": float(bits_h), "hist_vectorised": hist_bits(x, ctx),
          "laplace_loop": float(bits_l), "laplace_vectorised": laplace_bits(x, ctx)}
  return {"laplacian": rows, "exactness": loop}


# --- The learned codec. ---

def section_split(encoded, flat: bool) -> dict:
  from gvae_jax.coding import container
  header, sections = container.unpack(encoded.data)
  names = (["side", "streams", "check"] if flat
           else ["z", "y", "side", "streams", "check"])
  assert len(sections) == len(names), (len(sections), names)
  bits = {name: 8.0 * len(s) for name, s in zip(names, sections)}
  bits.setdefault("z", 0.0)
  bits.setdefault("y", 0.0)
  bits["header"] = 8.0 * (len(encoded.data) - sum(len(s) for s in sections))
  bits["file"] = 8.0 * len(encoded.data)
  return bits


def run_image(model, name, pixels, taus, flat, verify):
  from gvae_jax.coding import codec
  h, w = pixels.shape[:2]
  subpixels = h * w * 3
  rows = []
  for tau in taus:
    t0 = time.time()
    if flat:
      encoded = codec.encode_flat(model, pixels, tau)
    else:
      encoded = codec.encode_residual(model, pixels, tau, rate=None, base="lossy")
    encode_s = time.time() - t0
    ok = None
    if verify and tau == 0:
      ok = bool(np.array_equal(codec.decompress(model, encoded.data), pixels))
    layer = encoded.residual
    b = 2 * tau + 1
    r_hat = np.asarray(layer.r_hat, np.int64)
    assert np.all(r_hat % b == 0)
    q = r_hat // b
    split = section_split(encoded, flat)
    x = pixels.astype(np.int64)
    r_flat = np.sign(x - 128) * b * ((np.abs(x - 128) + tau) // b)
    q_x = r_flat // b
    t1 = time.time()
    methods = {}
    for method in METHODS:
      per = method_bits(q_x if method.startswith("x_") else q, method.removeprefix("x_"))
      hist, lap = float(sum(per["hist"])), float(sum(per["laplace"]))
      methods[method] = {"hist": hist / subpixels, "laplace": lap / subpixels,
                         "best": min(hist, lap) / subpixels,
                         "hist_per_channel": [v / (h * w) for v in per["hist"]],
                         "laplace_per_channel": [v / (h * w) for v in per["laplace"]]}
    classical_s = time.time() - t1
    lossy_bits = split["z"] + split["y"] + split["header"] + split["check"]
    learned_ideal = float(np.sum(layer.estimated_bits))
    row = {
        "image": name, "tau": tau, "height": h, "width": w,
        "rate": float(encoded.header.rate), "mode": encoded.header.mode.name,
        "lossless_ok": ok, "escapes": int(layer.escapes),
        "split_bpsp": {k: v / subpixels for k, v in split.items()},
        "learned_residual_bpsp": (split["side"] + split["streams"]) / subpixels,
        "learned_residual_ideal_bpsp": learned_ideal / subpixels,
        "learned_residual_ideal_per_channel_bpp": [float(v) / (h * w)
                                                   for v in layer.estimated_bits],
        "q_static_entropy_bpsp": static_entropy_bits(q) / subpixels,
        "classical": methods,
        # The file with the learned residual replaced by the best classical code of q.
        "lossy_layer_plus_best_classical_bpsp": (
            lossy_bits / subpixels + min(methods[m]["best"] for m in RESIDUAL_METHODS)),
        "seconds": {"encode": encode_s, "classical": classical_s},
    }
    rows.append(row)
    print(f"{name} tau {tau}: file {row['split_bpsp']['file']:.4f} "
          f"(y {row['split_bpsp']['y']:.4f} z {row['split_bpsp']['z']:.4f} "
          f"res {row['learned_residual_bpsp']:.4f}) | "
          + " ".join(f"{m} {methods[m]['best']:.4f}" for m in METHODS)
          + f" | ok {ok} | {encode_s:.0f}s + {classical_s:.0f}s", flush=True)
  return rows


def _lstsq_slope(target: np.ndarray, pred: np.ndarray) -> float:
  """Least-squares slope of target on pred (with intercept)."""
  p = pred - pred.mean()
  return float((p * (target - target.mean())).sum() / max((p * p).sum(), 1e-12))


def learned_mean_analysis(model, pixels: np.ndarray, flat: bool, rate: float | None) -> dict:
  """What the learned residual model predicts at tau 0, one full-image pass with the
  coder's contexts (64x64 patches, zero outside): the mixture mean (the weights times
  the component means) per channel against the true residual, next to MED's
  prediction; and the channel-autoregression coefficients against the least-squares
  slope of the residual of G (B) on R (G)."""
  import jax.numpy as jnp

  from gvae_jax.coding import codec, residual_codec
  from gvae_jax.entropy import logistic_mixture as lm
  if flat:
    view = codec._flat_view(model)
    base, u = codec._flat_base(model, *pixels.shape[:2])
  else:
    view = model
    base, u = codec.base_layer(model, pixels, rate)
  residual, params = view.residual_model, view.residual_params
  h, w = pixels.shape[:2]
  hp, wp = u.shape[1:3]
  r = pixels.astype(np.int64) - base.astype(np.int64)
  padded = np.zeros((hp, wp, 3), np.float32)
  padded[:h, :w] = r
  patches = residual_codec._patches
  mix = residual.apply({"params": params}, patches(jnp.asarray(u[0])),
                       patches(jnp.asarray(padded)), jnp.zeros((1,), jnp.int32), False)
  rr = patches(jnp.asarray(padded))
  weights = np.array(jnp.exp(mix["logits"] - jnp.max(mix["logits"], -1, keepdims=True)))
  weights /= weights.sum(-1, keepdims=True)
  spatial = (weights * np.asarray(mix["means"])).sum(-1)  # before channel AR
  conditional = (weights * np.asarray(lm.conditional_means(mix, rr))).sum(-1)
  scale = (weights * np.exp(np.asarray(mix["log_scales"]))).sum(-1)
  a = np.asarray(mix["coeffs"])  # [..., 3, K]: alpha (G on R), beta (B on R), gamma (B on G)
  alpha = (weights[..., 1, :] * a[..., 0, :]).sum(-1)
  gamma = (weights[..., 2, :] * a[..., 2, :]).sum(-1)
  beta = (weights[..., 2, :] * a[..., 1, :]).sum(-1)

  def unpatch(v):  # [P, 64, 64, ...] -> image [H, W, ...] cropped
    pr, pc = hp // 64, wp // 64
    v = np.asarray(v).reshape((pr, pc, 64, 64) + v.shape[3:])
    v = v.transpose((0, 2, 1, 3) + tuple(range(4, v.ndim))).reshape((hp, wp) + v.shape[4:])
    return v[:h, :w]

  spatial, conditional, scale = unpatch(spatial), unpatch(conditional), unpatch(scale)
  alpha, beta, gamma = unpatch(alpha), unpatch(beta), unpatch(gamma)
  out = {"channels": {}}
  for ch, cname in enumerate("RGB"):
    target = r[:, :, ch].astype(np.float64)
    m_pred = med(r[:, :, ch]).astype(np.float64)
    out["channels"][cname] = {
        "mean_abs_r": float(np.abs(target).mean()),
        "mean_abs_r_minus_learned_spatial_mean": float(np.abs(target - spatial[:, :, ch]).mean()),
        "mean_abs_r_minus_learned_conditional_mean": float(
            np.abs(target - conditional[:, :, ch]).mean()),
        "mean_abs_r_minus_med": float(np.abs(target - m_pred).mean()),
        "slope_r_on_learned_spatial_mean": _lstsq_slope(target, spatial[:, :, ch]),
        "slope_r_on_med": _lstsq_slope(target, m_pred),
        "corr_r_learned_spatial_mean": float(np.corrcoef(target.ravel(),
                                                         spatial[:, :, ch].ravel())[0, 1]),
        "corr_r_med": float(np.corrcoef(target.ravel(), m_pred.ravel())[0, 1]),
        "std_learned_spatial_mean": float(spatial[:, :, ch].std()),
        "std_r": float(target.std()),
        "mean_mixture_scale": float(scale[:, :, ch].mean()),
    }
  # The learned conditional mean (rounded) as the predictor of the classical context
  # models: separates the model's prediction from its probability (scale, shape) model.
  per = {"hist": [], "laplace": []}
  for ch in range(3):
    err = r[:, :, ch] - np.round(conditional[:, :, ch]).astype(np.int64)
    na, nb, nc, nd = neighbours(np.abs(err))
    ctx = bucket(na + nb + nc + nd)
    per["hist"].append(hist_bits(err, ctx) / (h * w))
    per["laplace"].append(laplace_bits(err, ctx) / (h * w))
  out["learned_mean_plus_classical"] = {
      "hist_per_channel_bpp": per["hist"], "laplace_per_channel_bpp": per["laplace"],
      "best_bpsp": min(sum(per["hist"]), sum(per["laplace"])) / 3}
  rf = r.astype(np.float64)
  out["channel_ar"] = {
      "mean_alpha_G_on_R": float(alpha.mean()), "mean_beta_B_on_R": float(beta.mean()),
      "mean_gamma_B_on_G": float(gamma.mean()),
      "lstsq_slope_rG_on_rR": _lstsq_slope(rf[:, :, 1], rf[:, :, 0]),
      "lstsq_slope_rB_on_rG": _lstsq_slope(rf[:, :, 2], rf[:, :, 1]),
  }
  return out


def causality_check(model, flat: bool, seed: int = 0) -> dict:
  """Perturbs the residual at one pixel (all channels) of a random 64x64 patch and
  compares the network's raw mixture parameters (before the channel AR) everywhere:
  they may only change at pixels decoded at a later step (step = a*i + j), never at
  the pixel itself or earlier steps. Also lists the masked-conv taps and their steps."""
  import jax.numpy as jnp

  from gvae_jax.coding import codec
  from gvae_jax.layers.masked import causal_mask
  view = codec._flat_view(model) if flat else model
  residual, params = view.residual_model, view.residual_params
  rng = np.random.default_rng(seed)
  r = jnp.asarray(rng.integers(-20, 21, (1, 64, 64, 3)).astype(np.float32))
  if flat:
    u = codec._flat_base(model, 64, 64)[1]
  else:
    u = jnp.asarray(rng.normal(size=(1, 64, 64, int(residual_prior_channels(model)))),
                    jnp.float32)
  order = int(residual.order)
  results = []
  for (pi, pj) in [(10, 10), (0, 5), (30, 63)]:
    r2 = r.at[0, pi, pj, :].add(7.0)
    a = residual.apply({"params": params}, u, r, jnp.zeros((1,), jnp.int32), False)
    b = residual.apply({"params": params}, u, r2, jnp.zeros((1,), jnp.int32), False)
    changed = np.zeros((64, 64), bool)
    for key in ("logits", "means", "log_scales", "coeffs"):
      changed |= np.any(np.abs(np.asarray(a[key]) - np.asarray(b[key])) > 0, axis=(-1, -2))[0]
    step = order * np.arange(64)[:, None] + np.arange(64)[None, :]
    bad = changed & (step <= order * pi + pj)
    results.append({"pixel": [pi, pj], "changed_pixels": int(changed.sum()),
                    "changed_at_or_before_its_step": int(bad.sum())})
  k = int(residual.kernel_size)
  mask = causal_mask(k, order)
  offsets = (np.argwhere(mask) - k // 2).tolist()
  return {"kernel_size": k, "order": order, "taps": len(offsets),
          "tap_steps_relative": sorted({order * di + dj for di, dj in offsets}),
          "perturbations": results,
          "ok": all(x["changed_at_or_before_its_step"] == 0 for x in results)}


def residual_prior_channels(model) -> int:
  from gvae_jax.coding import codec
  pixels = np.zeros((64, 64, 3), np.uint8)
  return codec.base_layer(model, pixels, 0.0)[1].shape[-1]


def means(rows: list[dict]) -> dict:
  """Per tau: the mean over images of every bpsp."""
  out = {}
  for tau in sorted({r["tau"] for r in rows}):
    sel = [r for r in rows if r["tau"] == tau]
    m = {"images": len(sel),
         "split_bpsp": {k: float(np.mean([r["split_bpsp"][k] for r in sel]))
                        for k in sel[0]["split_bpsp"]},
         "learned_residual_bpsp": float(np.mean([r["learned_residual_bpsp"] for r in sel])),
         "learned_residual_ideal_bpsp": float(np.mean([r["learned_residual_ideal_bpsp"]
                                                       for r in sel])),
         "q_static_entropy_bpsp": float(np.mean([r["q_static_entropy_bpsp"] for r in sel])),
         "lossy_layer_plus_best_classical_bpsp": float(np.mean(
             [r["lossy_layer_plus_best_classical_bpsp"] for r in sel])),
         "rate": float(np.mean([r["rate"] for r in sel])),
         "classical": {meth: {mod: float(np.mean([r["classical"][meth][mod] for r in sel]))
                              for mod in MODELS} for meth in METHODS}}
    out[str(tau)] = m
  return out


def markdown_tables(report: dict) -> str:
  """The README's tables of means from the JSON."""
  lines = []
  for label, run in report.get("runs", {}).items():
    for tau, m in run.get("means", {}).items():
      sp = m["split_bpsp"]
      c = m["classical"]
      lines += [f"**{label}, tau {tau}** ({m['images']} images, mean base rate {m['rate']:.3f})",
                "", "| part | bpsp |", "|---|---|"]
      for key in ("header", "z", "y", "side", "streams", "check", "file"):
        lines.append(f"| {key} | {sp[key]:.4f} |")
      lines += ["", "| residual coded with | bpsp (hist) | bpsp (laplace) | bpsp (best) |",
                "|---|---|---|---|",
                f"| learned model, real (side + streams) | | | {m['learned_residual_bpsp']:.4f} |",
                f"| learned model, ideal (-log2 p) | | | {m['learned_residual_ideal_bpsp']:.4f} |"]
      for meth in METHODS:
        lines.append(f"| {meth} | {c[meth]['hist']:.4f} | {c[meth]['laplace']:.4f} "
                     f"| {c[meth]['best']:.4f} |")
      lines += [f"| (q static entropy, not a code) | | | {m['q_static_entropy_bpsp']:.4f} |",
                "", f"lossy layer + header + check + best classical residual: "
                f"{m['lossy_layer_plus_best_classical_bpsp']:.4f} bpsp (file: {sp['file']:.4f})",
                ""]
    analysis = run.get("mean_analysis")
    if analysis:
      names = sorted(analysis)
      lm_best = np.mean([analysis[n]["learned_mean_plus_classical"]["best_bpsp"] for n in names])
      lines += [f"**{label}: learned mean analysis, tau 0** ({len(names)} images)", "",
                "| channel | mean abs r | abs r - learned mean | abs r - MED | "
                "corr(r, learned spatial mean) | corr(r, MED) |", "|---|---|---|---|---|---|"]
      for ch in "RGB":
        v = {k: np.mean([analysis[n]["channels"][ch][k] for n in names])
             for k in analysis[names[0]]["channels"][ch]}
        lines.append(f"| {ch} | {v['mean_abs_r']:.3f} | "
                     f"{v['mean_abs_r_minus_learned_conditional_mean']:.3f} | "
                     f"{v['mean_abs_r_minus_med']:.3f} | {v['corr_r_learned_spatial_mean']:.3f} "
                     f"| {v['corr_r_med']:.3f} |")
      ar = {k: np.mean([analysis[n]["channel_ar"][k] for n in names])
            for k in analysis[names[0]]["channel_ar"]}
      lines += ["", "channel AR: " + ", ".join(f"{k} {v:.3f}" for k, v in ar.items()), "",
                f"learned conditional mean (rounded) + classical context model: "
                f"{lm_best:.4f} bpsp", ""]
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="experiments/models/small_nearlossless_delta")
  parser.add_argument("--flat-head", default=None,
                      help="flat head directory: code on the flat base (x - 128) with it")
  parser.add_argument("--images", default="/work/shared/data/kodak")
  parser.add_argument("--num-images", type=int, default=6, help="0: all")
  parser.add_argument("--taus", type=int, nargs="*", default=[0])
  parser.add_argument("--out", default=str(OUT_JSON))
  parser.add_argument("--no-verify", action="store_true")
  parser.add_argument("--validate", action="store_true", help="only the synthetic check")
  parser.add_argument("--table", action="store_true", help="only print the tables")
  parser.add_argument("--mean-analysis", action="store_true",
                      help="only learned_mean_analysis at tau 0 (rates from an earlier run)")
  args = parser.parse_args()
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  report = json.loads(out.read_text()) if out.is_file() else {}
  if args.table:
    print(markdown_tables(report))
    return 0
  report["validation"] = validate()
  print(json.dumps(report["validation"], indent=1))
  report.setdefault("settings", {})
  report["settings"] = {"clip": CLIP, "escape_range": ESCAPE_RANGE, "kt": KT,
                        "activity_thresholds": THRESHOLDS.tolist(),
                        "laplace_prior_scale": LAPLACE_PRIOR_SCALE, "patch": PATCH}
  if args.validate:
    out.write_text(json.dumps(report, indent=1) + "\n")
    return 0

  from gvae_jax.coding import export, flat_head
  from gvae_jax.eval.images import load_images
  model = export.load_model(args.model)
  label = Path(args.model).name
  if args.flat_head:
    model = export.attach(model, flat_head.load_flat_head(args.flat_head))
    label = f"{label}+flat_head:{Path(args.flat_head).name}"
  images = load_images(args.images, args.num_images)
  label += f" taus={','.join(map(str, args.taus))} images={len(images)}"
  command = shlex.join(["PYTHONPATH=$PWD", "nice", "-n", "10", ".venv/bin/python",
                        "experiments/scripts/diagnose_residual.py", *sys.argv[1:]])
  runs = report.setdefault("runs", {})
  run = runs.get(label)
  if run is None or run.get("taus") != args.taus or run.get("images_folder") != args.images:
    run = {"model": args.model, "flat_head": args.flat_head, "taus": args.taus,
           "images_folder": args.images, "rows": []}
  run["command"] = command
  runs[label] = run
  if args.mean_analysis:
    rates = {r["image"]: r["rate"] for r in run["rows"] if r["tau"] == 0}
    if not args.flat_head and any(name not in rates for name, _ in images):
      raise SystemExit(f"--mean-analysis needs the tau 0 rows of run {label!r} (the same "
                       "--model, --taus and --num-images as a finished run)")
    run["causality_check"] = causality_check(model, args.flat_head is not None)
    print(json.dumps(run["causality_check"]), flush=True)
    analysis = run.setdefault("mean_analysis", {})
    for name, pixels in images:
      analysis[name] = learned_mean_analysis(model, pixels, args.flat_head is not None,
                                             rates.get(name, 0.0))
      print(name, json.dumps(analysis[name]), flush=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return 0
  done = {(r["image"], r["tau"]) for r in run["rows"]}
  for name, pixels in images:
    if all((name, t) in done for t in args.taus):
      continue
    rows = run_image(model, name, pixels, [t for t in args.taus if (name, t) not in done],
                     args.flat_head is not None, not args.no_verify)
    run["rows"].extend(rows)
    run["means"] = means(run["rows"])
    out.write_text(json.dumps(report, indent=1) + "\n")  # after every image: resumable
  run["means"] = means(run["rows"])
  out.write_text(json.dumps(report, indent=1) + "\n")
  print(json.dumps(run["means"], indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
