"""The logistic mixture's integer CDF rows in exact integer arithmetic (exact decoding).

Everything here is int64 NumPy on integers, so its results are the same on
every CPU, vector width and library build (docs/decoding.md, "Exact
decoding"). The inputs are the exact head's raw outputs (fixed point with
ACT_BITS fraction bits, gvae_jax.coding.exact_head); the nonlinearities are
tables stored in the converted model (built once by `build_tables`, checked
by `check_tables`), so not even the tables depend on the reader's libm.

Fixed point (f = fraction bits):
  raw outputs, means, edges    f = ACT_BITS (16)
  mixture weights              exp, 2^16 for the largest component
  inverse scales               f = INV_SCALE_BITS (20), log scale in [-7, 8]
  AR coefficients (tanh)       f = COEF_BITS (16)
  sigmoid                      f = SIG_BITS (24), argument in [-20, 20]
Every table is on a 2^-8 grid of its argument and linearly interpolated
(the remaining input bits are the fraction).

Rows follow gvae_jax.coding.residual_cdfs (same windows, escapes, two levels
and row layout) with its float fractions replaced by integer quotients: with
F the mixture's CDF times D = (sum of weights) 2^SIG_BITS,

  coarse   cdf[k] = 2 S k + floor((F_k - F_0) spare_W / D)
  fine     A_f = 2 f + floor((F'_f - F'_0) spare_W / D),
           cdf[f] = 2 f + floor(A_f spare_S / A_S)

Every table is monotone, so F rises with the edge and every row rises
strictly by construction. Bounds (in the comments where they bind):
|edge - mean| < 2^30, inverse scale < 2^31, so the sigmoid argument (2^-36
units) stays below 2^61; F < 2^43, and F spare < 2^59.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

PRECISION = 16
ACT_BITS = 16
INV_SCALE_BITS = 20
COEF_BITS = 16
SIG_BITS = 24
WEIGHT_ONE = 1 << 16  # the largest component's weight

GRID_BITS = 8  # tables are on a 2^-8 grid of their argument
SIG_RANGE = 20  # sigmoid(+-20) is within 2^-28 of 0 / 1
EXP_RANGE = 24  # components more than 24 nats below the largest weigh 0
LOG_SCALE_MIN, LOG_SCALE_MAX = -7, 8  # as logistic_mixture.LOG_SCALE_MIN; the upper end
TANH_RANGE = 8
MEAN_LIMIT = 1 << 29  # |conditional mean| in 2^-16 grey levels (garbage stays in bounds)

TABLES = ("sigmoid", "exp", "inv_scale", "tanh")


def build_tables() -> dict[str, np.ndarray]:
  """The four tables (int64). Built once, at conversion, and stored with the model."""
  g = 1 << GRID_BITS
  z = np.arange(-SIG_RANGE * g, SIG_RANGE * g + 2, dtype=np.float64) / g  # + 1 for interpolation
  sigmoid = np.rint((1 << SIG_BITS) / (1.0 + np.exp(-z)))
  d = np.arange(EXP_RANGE * g + 1, dtype=np.float64) / g
  exp = np.rint(WEIGHT_ONE * np.exp(-d))
  exp[-1] = 0
  log_s = np.arange(LOG_SCALE_MIN * g, LOG_SCALE_MAX * g + 1, dtype=np.float64) / g
  inv_scale = np.rint((1 << INV_SCALE_BITS) * np.exp(-log_s))
  t = np.arange(-TANH_RANGE * g, TANH_RANGE * g + 1, dtype=np.float64) / g
  tanh = np.rint((1 << COEF_BITS) * np.tanh(t))
  return {name: a.astype(np.int64) for name, a in
          zip(TABLES, (sigmoid, exp, inv_scale, tanh))}


def check_tables(tables: dict[str, np.ndarray]) -> None:
  """ValueError unless the tables have the shapes and the monotonicity (and ranges)
  the row construction's guarantees rest on."""
  expected = {name: a.shape for name, a in build_tables().items()}
  for name in TABLES:
    a = tables.get(name)
    if a is None or a.dtype != np.int64 or a.shape != expected[name]:
      raise ValueError(f"exact table {name!r} is missing or has the wrong shape or type")
  s, e, v, t = (tables[name] for name in TABLES)
  if np.any(np.diff(s) < 0) or s[0] < 0 or s[-1] > (1 << SIG_BITS):
    raise ValueError("exact sigmoid table is not a rising table in [0, 2^24]")
  if np.any(np.diff(e) > 0) or e[0] != WEIGHT_ONE or e[-1] != 0:
    raise ValueError("exact exp table is not a falling table from 2^16 to 0")
  if np.any(np.diff(v) > 0) or v[-1] < 1 or v[0] >= (1 << 31):
    raise ValueError("exact inverse-scale table is not a falling table in [1, 2^31)")
  if np.any(np.diff(t) < 0) or np.any(np.abs(t) > (1 << COEF_BITS)):
    raise ValueError("exact tanh table is not a rising table in [-2^16, 2^16]")


def _lookup(table, x, low: int, xp=np):
  """table at x (2^-16 fixed point; the table's grid starts at `low`), linearly
  interpolated, x clipped to the grid. Monotone tables give monotone results."""
  frac = ACT_BITS - GRID_BITS
  u = xp.clip(x - (low << ACT_BITS), 0, (table.size - 1) << frac)
  j = u >> frac
  below = table[j]
  above = table[xp.minimum(j + 1, table.size - 1)]
  return below + (((above - below) * (u & ((1 << frac) - 1))) >> frac)  # step < 2^23


def rshift_round(x: np.ndarray, bits: int) -> np.ndarray:
  """round(x / 2^bits), halves up (exact integer arithmetic)."""
  return (x + (1 << (bits - 1))) >> bits if bits > 0 else x


def mixture(raw, tables: dict, components: int, share_weights: bool, ar_on_errors: bool,
            xp=np):
  """int64 [5, 3, N, K]: (weights, means, inverse scales, coefficient of R,
  coefficient of G) per channel from raw outputs [N, P] (2^-16), the layout of
  residual_cdfs.prepare. Mirrors logistic_mixture.split_params and
  ResidualModel._reparameterise (mean_scale is folded into the weights at
  conversion)."""
  k, c = components, 3
  n = raw.shape[0]
  pos = 0

  def take(m):
    nonlocal pos
    pos += m
    return raw[:, pos - m:pos]

  logits = xp.broadcast_to(take(k)[:, None, :], (n, c, k)) if share_weights else (
      take(c * k).reshape(n, c, k))
  means = take(c * k).reshape(n, c, k)
  log_scales = take(c * k).reshape(n, c, k)
  coef_raw = take(3 * k).reshape(n, 3, k)
  coeffs = _lookup(tables["tanh"], coef_raw, -TANH_RANGE, xp)  # 2^-16
  if ar_on_errors:  # means of G, B on the earlier channels' prediction errors
    m_r, m_g, m_b = means[:, 0], means[:, 1], means[:, 2]
    means = xp.stack([m_r, m_g - rshift_round(coeffs[:, 0] * m_r, COEF_BITS),
                      m_b - rshift_round(coeffs[:, 1] * m_r + coeffs[:, 2] * m_g, COEF_BITS)],
                     axis=1)
  gap = logits.max(axis=-1, keepdims=True) - logits  # >= 0
  weights = _lookup(tables["exp"], gap, 0, xp)
  inv_scales = _lookup(tables["inv_scale"], log_scales, LOG_SCALE_MIN, xp)
  zero = xp.zeros_like(coeffs[:, 0])
  coef_r = xp.stack([zero, coeffs[:, 0], coeffs[:, 1]], axis=1)
  coef_g = xp.stack([zero, zero, coeffs[:, 2]], axis=1)
  parts = (weights, xp.clip(means, -MEAN_LIMIT, MEAN_LIMIT), inv_scales, coef_r, coef_g)
  return xp.stack([xp.moveaxis(xp.asarray(a, xp.int64), 1, 0) for a in parts])


def as_float(mix: np.ndarray) -> np.ndarray:
  """float32 [5, 3, N, K] in residual_cdfs.prepare's units (for the encoder's window
  choice only, which is side information and need not be exact)."""
  w, m, s, cr, cg = (mix[i].astype(np.float64) for i in range(5))
  return np.stack([w / w.sum(-1, keepdims=True), m / (1 << ACT_BITS), s / (1 << INV_SCALE_BITS),
                   cr / (1 << COEF_BITS), cg / (1 << COEF_BITS)]).astype(np.float32)


def _channel(mix, pixel, channel, xp=np):
  """(weights, conditional means (2^-16), inverse scales) [N, K] of one channel;
  pixel [N, 3]: the decoded r_hat (integers) of the channels before it."""
  w, m, s, cr, cg = (mix[i, channel] for i in range(5))
  ar = cr * pixel[:, 0:1].astype(xp.int64) + cg * pixel[:, 1:2].astype(xp.int64)
  m = xp.clip(m + rshift_round(ar, COEF_BITS - ACT_BITS), -MEAN_LIMIT, MEAN_LIMIT)
  return w, m, s


def _sigmoid(z, table, xp=np):
  """sigmoid of z (2^-36 fixed point) from the 2^-8 grid, linearly interpolated (2^-24)."""
  frac = ACT_BITS + INV_SCALE_BITS - GRID_BITS  # 28 bits below the grid
  limit = SIG_RANGE << (ACT_BITS + INV_SCALE_BITS)
  u = xp.clip(z, -limit, limit - 1) + limit
  j, f = u >> frac, u & ((1 << frac) - 1)
  low = table[j]
  return low + (((table[j + 1] - low) * f) >> frac)  # step < 2^15, product < 2^43


def _cdf_at(value, q_low, count, tau, weights, means, inv_scales, table, xp=np):
  """F (times D = sum w 2^24) at the lower edge of value indexes [N, E] of [0, count):
  0 at or below index 0, D at or above count (the end bins take the tails), and D."""
  b = 2 * tau + 1
  edges = (((q_low + value) * b - tau) << ACT_BITS) - (1 << (ACT_BITS - 1))  # [N, E]
  z = (edges[..., None] - means[:, None, :]) * inv_scales[:, None, :]  # < 2^26 * 2^35
  f = xp.sum(weights[:, None, :] * _sigmoid(z, table, xp), axis=-1)
  total = xp.sum(weights, axis=-1, keepdims=True) << SIG_BITS
  return xp.where(value <= 0, 0, xp.where(value >= count, total, f)), total


def _floordiv(a, d, xp=np):
  """floor(a / d) of int64 a and d > 0 with |a / d| < 2^17 (every use here).

  NumPy: integer division, the reference. XLA: x86 has no vector integer division,
  and its scalar one made a fine-row call a third slower, so the quotient is
  estimated in float64 and made exact in integers: a second estimate on the
  remainder, then one step up or down by the sign of the last remainder. Any
  float64 division within 2^-10 of the true quotient (IEEE's, XLA's default, is
  within 2^-52; fast-math reciprocals within 2^-14) leaves the second estimate
  within one, so the result is the integer quotient whatever the rounding."""
  if xp is np:
    return a // d
  df = d.astype(xp.float64)
  q = xp.floor(a.astype(xp.float64) / df).astype(xp.int64)
  q = q + xp.floor((a - q * d).astype(xp.float64) / df).astype(xp.int64)
  r = a - q * d
  return q - (r < 0).astype(xp.int64) + (r >= d).astype(xp.int64)


def _spare(window: int) -> int:
  return (1 << PRECISION) - 2 * window - 1


def _rows(body, xp=np, as_counts: bool = False):
  """int32 CDF rows [N, W + 2] of their body [N, W + 1] (0 first); as_counts: their
  differences instead, float64 [N, W + 1] (exact integers; what a coder that models
  by counts takes, gvae_jax.coding.coder)."""
  top = xp.full((body.shape[0], 1), 1 << PRECISION, xp.int64)
  if not as_counts:
    return xp.concatenate([body, top], axis=1).astype(xp.int32)
  if xp is not np:  # else XLA fuses the body's whole computation into both terms of
    body = jax.lax.optimization_barrier(body)  # the difference: twice the work
  return (xp.concatenate([body[:, 1:], top], axis=1) - body).astype(xp.float64)


def coarse_rows(window: int, group: int, mix, pixel, channel, q_low, count, tau, sigmoid,
                xp=np, as_counts: bool = False):
  """(rows [N, window / group + 2] int32, window starts [N]): residual_cdfs.coarse_cdf
  (as_counts: the rows as `_rows` counts)."""
  weights, means, inv_scales = _channel(mix, pixel, channel, xp)
  b = 2 * tau + 1
  d = xp.sum(weights, axis=-1) * (b << ACT_BITS)
  centre = _floordiv(2 * xp.sum(weights * means, axis=-1) + d, 2 * d, xp) - q_low  # mean / b
  start = xp.clip(centre - window // 2, 0, xp.maximum(count - window, 0))
  n = window // group
  value = start[:, None] + group * xp.arange(n + 1, dtype=xp.int64)[None, :]
  f, total = _cdf_at(value, q_low, count, tau, weights, means, inv_scales, sigmoid, xp)
  g = xp.clip(f - f[:, :1], 0, total)
  body = 2 * group * xp.arange(n + 1, dtype=xp.int64) + _floordiv(g * _spare(window), total, xp)
  return _rows(body, xp, as_counts), start


def fine_rows(window: int, group: int, mix, pixel, channel, q_low, count, tau, start, groups,
              sigmoid, xp=np, as_counts: bool = False):
  """Rows [N, group + 2] int32 of the values of group groups[n] of row n's window
  (as_counts: as `_rows` counts)."""
  weights, means, inv_scales = _channel(mix, pixel, channel, xp)
  f_idx = xp.arange(group + 1, dtype=xp.int64)
  value = (start + group * groups)[:, None] + f_idx[None, :]
  f, total = _cdf_at(value, q_low, count, tau, weights, means, inv_scales, sigmoid, xp)
  g = xp.clip(f - f[:, :1], 0, total)
  summed = 2 * f_idx + _floordiv(g * _spare(window), total, xp)  # summed counts, <= 2^16
  body = 2 * f_idx + _floordiv(summed * _spare(group), summed[:, -1:], xp)
  return _rows(body, xp, as_counts)


# --- The same functions compiled by XLA, in 64-bit integers (exact on every backend). ---

@contextlib.contextmanager
def enable_x64():
  """JAX's scoped 64-bit mode (jax.enable_x64 in newer JAX, jax.experimental.enable_x64
  in older; both profiles' versions checked), on the host CPU: accelerators need not
  have float64 (TPUs do not), and a CPU gives these integers everywhere.

  Inside one already, it does nothing: entering it again costs about 30 us (ad hoc,
  jax 0.12), as much as a compiled call's dispatch, so a loop of many calls enters
  it once around them."""
  if jax.config.jax_enable_x64 and getattr(jax.config.jax_default_device, "platform",
                                           None) == "cpu":
    yield
    return
  if hasattr(jax, "enable_x64"):
    x64 = jax.enable_x64(True)
  else:
    from jax.experimental import enable_x64 as scoped
    x64 = scoped()
  with x64, jax.default_device(jax.devices("cpu")[0]):
    yield


def on_cpu(tree):
  """tree (NumPy arrays) as arrays on the host CPU device, kept at 64 bits: constants
  and intermediates that several compiled calls read stay there instead of being
  copied in again at every call (the integers are the same either way)."""
  with enable_x64():
    return jax.device_put(tree)


# The scalars (channel, q_low, count, tau) go in as one int64 [4] array: one transfer
# a call instead of four (ad hoc: about a quarter of the 0.12 ms dispatch of these small,
# frequent calls).

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _coarse_jit(window, group, as_counts, mix, pixel, scalars, sigmoid):
  return coarse_rows(window, group, mix, pixel, *(scalars[i] for i in range(4)), sigmoid, jnp,
                     as_counts)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fine_jit(window, group, as_counts, mix, pixel, scalars, start, groups, sigmoid):
  return fine_rows(window, group, mix, pixel, *(scalars[i] for i in range(4)), start, groups,
                   sigmoid, jnp, as_counts)


def _scalars(channel, q_low, count, tau) -> np.ndarray:
  return np.array([channel, q_low, count, tau], np.int64)


def coarse_rows_xla(window, group, mix, pixel, channel, q_low, count, tau, sigmoid,
                    as_counts=False):
  """coarse_rows compiled (int64 under enable_x64); the same integers, faster on big steps.
  Inputs are padded by the caller to a few batch sizes (one compile per size); mix and
  sigmoid may be NumPy arrays or `on_cpu` ones (which are not copied again)."""
  with enable_x64():
    rows, start = _coarse_jit(window, group, as_counts, mix, pixel,
                              _scalars(channel, q_low, count, tau), sigmoid)
    return np.asarray(rows), np.asarray(start)


def fine_rows_xla(window, group, mix, pixel, channel, q_low, count, tau, start, groups, sigmoid,
                  as_counts=False):
  with enable_x64():
    rows = _fine_jit(window, group, as_counts, mix, pixel, _scalars(channel, q_low, count, tau),
                     start, groups, sigmoid)
    return np.asarray(rows)

