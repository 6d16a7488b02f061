"""The residual layer's integer CDF rows, built in JAX, and the encoder's window choice.

Adaptive residual interval: per colour channel the actual min and max of q
are side information; the alphabet is [min, max] and its two end bins take the
tails. Bin q integrates the tau = 0 mixture over [q b - tau - 1/2,
q b + tau + 1/2] (grey levels). A channel whose range is a single value costs
nothing beyond the side information.

Windows: a symbol is coded within a window of W consecutive values of
[min, max] (W one of WINDOWS, per channel, chosen by the encoder and sent
as side information), placed around the pixel's mixture mean; values outside
it are coded as the window's escape (whose probability is the mixture mass
outside the window, at least 1 / 2^16) and then stored losslessly in the
side information. When W covers [min, max] this is the plain adaptive
interval. The encoder picks W from the model's mixtures at every pixel (its
first pass, below): the smallest W whose expected escapes (ESCAPE_BITS times
the mixture mass outside each pixel's window, summed) cost at most
ESCAPE_BUDGET of the estimated bits; one W for all channels, each capped at
its range.

Two levels: a window of W >= TWO_LEVEL_WINDOW values is split into W / S
groups of S consecutive values (S = group_size(W), about sqrt(W)). The
coarse symbol is the group (or the escape), coded with the mixture mass of
each group; then, for the pixels that did not escape, the fine symbol is the
value within its group, coded with the mixture restricted to that group. The
product of the two is the one-level probability (the integer counts are
built to match, below), but a pixel's CDFs cost W / S + S + 2 mixture-CDF
evaluations instead of W + 1: 26 instead of 129 at W = 128. Building CDF rows was most
of the decoding time; a second level costs one more jitted call and coder
call per (step, channel), which is worth it from W = 96 (measured on a
768x512 image), so smaller windows are coded in one level (S = 1: the
coarse symbol is the value). Both levels code indexes (offsets 0): the
coarse symbol k in 0 .. W / S - 1 (the group [start + k S, start + (k + 1) S)
of the pixel's window start), or W / S for the escape; the fine symbol the
value's place in its group.

Integer CDFs, built inside JAX by jitted functions shared by encoder and
decoder. One level first: with F_k the mixture CDF at the lower edge of the
k-th window value (k = 0 .. W; 0 below the lowest and 1 above the highest
value of [min, max], so those take the tails) and G_k = clip(F_k - F_0, 0, 1),
a row of the W values plus the escape is

  cdf[k] = 2k + floor(G_k * (2^16 - 2W - 1))  for k = 0 .. W,   cdf[W + 1] = 2^16

so every value has a count >= 2 and the escape >= 1, the row ends exactly at
2^16, and the escape's count is about the mass outside the window. Two
levels keep these counts: a coarse row has the n = W / S group edges,

  cdf[k] = 2Sk + floor(G_kS * (2^16 - 2W - 1))  for k = 0 .. n,   cdf[n + 1] = 2^16

(a group's count is its values' one-level counts summed), and the fine row of
a decoded group, with A_f = 2f + G'_f (2^16 - 2W - 1) the one-level counts
summed up to its f-th value (G'_f = clip(F'_f - F'_0, 0, 1) over the group's
edges) and H_f = A_f / A_S, is

  cdf[f] = 2f + floor(H_f * (2^16 - 2S - 1))  for f = 0 .. S,   cdf[S + 1] = 2^16

(its escape never occurs). So a value costs what one level would charge, up
to rounding: in particular a value far in the tails pays the minimum count
once, not once per level, and a group whose float mass is 0 is uniform. In
every row the first entry is set to 0, not computed (G_0 = F_0 - F_0, but
XLA may evaluate the two F_0 in different fused loops, which need not round
alike). The per-value step (2, or 2S per group) keeps a row strictly rising
even where float rounding leaves F a hair non-monotone (it would have to
fall by 2^-15). The range decoder needs rising rows to stay inside its
buffers, so the functions also report whether they rise, and for garbage
input (NaN, huge numbers) that breaks this, both sides apply the same exact
integer running maximum (`make_rising`). The only float-to-integer step is
a floor of a float32 that encoder and decoder compute with the same jitted
function on the same inputs. Values beyond max get count 2 and never occur.
The cost over the ideal code length is about 2W / 2^16 of the probability of
likely symbols (one level), plus about 2S / 2^16 for the fine level.

The mixture at a step's pixels comes from `step_mixture` (the masked
convolution's taps gathered from the decoded-residual buffer, then the 1x1
heads); its CDF is gvae_jax.entropy.logistic_mixture.mixture_cdf.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.coding.residual_plan import CHANNELS, WINDOWS, window_size
from gvae_jax.entropy import logistic_mixture as lm
from gvae_jax.models.residual import RESIDUAL_INPUT_SCALE, ResidualModel

PRECISION = 16
ESCAPE_BITS = 12.0  # about what an escape adds (its varint; the escape symbol ~ its mass)
ESCAPE_BUDGET = 0.002  # windows may add this fraction of the estimated bits in escapes


@dataclasses.dataclass(frozen=True)
class Taps:
  offsets: tuple[tuple[int, int], ...]
  weights: jax.Array  # [taps * 3, C]: the masked kernel, rows in (tap, channel) order
  bias: jax.Array  # [C]


_TAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def context_taps(exported) -> Taps:
  taps = _TAPS.get(exported)
  if taps is None:
    residual = exported.residual_model
    offsets, weights, bias = residual.apply(
        {"params": exported.residual_params}, method=lambda m: m.context.taps())
    weights = jnp.asarray(weights, jnp.float32)
    taps = Taps(tuple((int(a), int(b)) for a, b in np.asarray(offsets)),
                 weights.reshape(-1, weights.shape[-1]), jnp.asarray(bias, jnp.float32))
    _TAPS[exported] = taps
  return taps


def head_tau(residual: ResidualModel, tau: int) -> tuple[bool, int]:
  """(use the corrected head, tau it is conditioned on): main head at tau 0."""
  corrected = residual.uses_correction(tau)
  return corrected, (min(tau, residual.max_tau) if corrected else 0)


def prepare(mixture: dict[str, jax.Array]) -> jax.Array:
  """The mixture as the CDFs use it: [5, 3, N, K] = (weights, means, inverse
  scales, coefficient of R, coefficient of G) per channel, so that channel
  c's conditional means are means + coef_R * r_R + coef_G * r_G."""
  coeffs = mixture["coeffs"]
  zero = jnp.zeros_like(coeffs[..., 0, :])
  coef_r = jnp.stack([zero, coeffs[..., 0, :], coeffs[..., 1, :]], axis=-2)
  coef_g = jnp.stack([zero, zero, coeffs[..., 2, :]], axis=-2)
  parts = [jax.nn.softmax(mixture["logits"], axis=-1), mixture["means"],
           jnp.exp(-mixture["log_scales"]), coef_r, coef_g]
  return jnp.stack([jnp.moveaxis(a, -2, 0) for a in parts])


@functools.partial(jax.jit, static_argnums=(0, 1))
def step_mixture(residual: ResidualModel, corrected: bool, params, tap_weights, tap_bias, tap_shift,
             buffer, cells, count, u_flat, u_index, tau_head):
  """The mixture (`prepare`) at one step's pixels.

  buffer [cells, 3]: decoded r_hat (zero where not decoded); the context taps
  of row n < count are cells[n] + tap_shift, the padding rows read the last
  cell (always zero).
  """
  n = cells.shape[0]
  index = jnp.where(jnp.arange(n)[:, None] < count, cells[:, None] + tap_shift[None, :],
                    buffer.shape[0] - 1)
  context = jnp.take(buffer, index, axis=0)  # [n, taps, 3]
  flat = context.reshape(n, -1) * RESIDUAL_INPUT_SCALE
  features = flat @ tap_weights + tap_bias  # the masked convolution at these pixels
  u = jnp.take(u_flat, u_index, axis=0)
  # One tau for all pixels: the tau-conditioned scales are computed once, not per pixel.
  tau = jnp.full((1,), tau_head, jnp.int32)
  raw = residual.apply({"params": params}, features[:, None, None, :], u[:, None, None, :], tau,
                       corrected, method=ResidualModel.mixture_from_features)
  return prepare(lm.split_params(raw[:, 0, 0, :], residual.components, residual.share_weights))


@functools.partial(jax.jit, donate_argnums=0)
def scatter(buffer, cells, values):
  """buffer with the step's values [bucket, 3] written to its cells (padding dropped)."""
  return buffer.at[cells].set(values.astype(buffer.dtype), mode="drop")


def _channel(mixture, pixel, channel):
  """(weights, conditional means, inverse scales) [N, K] of one channel."""
  weights, means, inv_scales, coef_r, coef_g = (
      jax.lax.dynamic_index_in_dim(mixture, channel, axis=1, keepdims=False))
  means = means + coef_r * pixel[:, 0:1] + coef_g * pixel[:, 1:2]
  return weights, means, inv_scales


def _cdf_at(value, q_low, count, tau, weights, means, inv_scales):
  """The mixture CDF at the lower edge of each value index [N, E] of [0, count)
  (0 at or below index 0, 1 at or above `count`: the end bins take the tails)."""
  b = (2 * tau + 1).astype(jnp.float32)
  edges = (q_low + value).astype(jnp.float32) * b - (tau.astype(jnp.float32) + 0.5)
  return jnp.where(value <= 0, 0.0, jnp.where(value >= count, 1.0, jnp.nan_to_num(
      lm.mixture_cdf(edges, weights, means, inv_scales))))


def _rows(fraction, n: int, step: int, spare: int):
  """(rows [N, n + 2] int32, whether all rise strictly): cdf[k] = step k +
  floor(fraction[k] spare) for k = 0 .. n, then 2^16 (module doc).

  fraction[0] is F_0 - F_0 (or 0 / A), but XLA may compute the two F_0 in
  different fused loops, which need not round alike: it is set to 0, not
  computed.
  """
  k = jnp.arange(n + 1, dtype=jnp.int32)
  fraction = jnp.where(k == 0, 0.0, jnp.clip(fraction, 0.0, 1.0))
  body = step * k + jnp.floor(fraction * jnp.float32(spare)).astype(jnp.int32)
  rising = jnp.min(body[:, 1:] - body[:, :-1]) > 0  # (a min is cheaper than an all here)
  top = jnp.full((body.shape[0], 1), 2**PRECISION, jnp.int32)
  return jnp.concatenate([body, top], axis=1), rising


def _spare(window: int) -> int:
  """What the values' masses share of a one-level row of `window` values."""
  return 2**PRECISION - 2 * window - 1


@functools.partial(jax.jit, static_argnums=(0, 1))
def coarse_cdf(window: int, group: int, mixture, pixel, channel, q_low, count, tau):
  """(rows [N, window / group + 2], window starts [N], rows rise strictly) of a channel.

  Values are indexes into [min q, max q] (0 .. count - 1); row n's window is
  starts[n] + 0 .. window - 1 in groups of `group`, then the escape (module
  doc). pixel [N, 3]: the pixels' decoded r_hat so far (R, G) for the channel
  autoregression.
  """
  weights, means, inv_scales = _channel(mixture, pixel, channel)
  b = (2 * tau + 1).astype(jnp.float32)
  centre = jnp.sum(weights * means, axis=-1) / b - q_low
  centre = jnp.clip(jnp.nan_to_num(centre), -2.0**20, 2.0**20)  # garbage must still index
  start = jnp.round(centre).astype(jnp.int32) - window // 2
  start = jnp.clip(start, 0, jnp.maximum(count - window, 0))
  n = window // group
  value = start[:, None] + group * jnp.arange(n + 1, dtype=jnp.int32)[None, :]
  cdf = _cdf_at(value, q_low, count, tau, weights, means, inv_scales)
  rows, rising = _rows(cdf - cdf[:, :1], n, 2 * group, _spare(window))
  return rows, start, rising


@functools.partial(jax.jit, static_argnums=(0, 1))
def fine_cdf(window: int, group: int, mixture, pixel, channel, q_low, count, tau, start,
              groups):
  """(rows [N, group + 2], rows rise strictly): the values of group groups[n] of
  row n's window (starts from `coarse_cdf`), each in proportion to its
  one-level count (module doc)."""
  weights, means, inv_scales = _channel(mixture, pixel, channel)
  value = (start + group * groups)[:, None] + jnp.arange(group + 1, dtype=jnp.int32)[None, :]
  cdf = _cdf_at(value, q_low, count, tau, weights, means, inv_scales)
  counts = (2 * jnp.arange(group + 1, dtype=jnp.float32)
            + jnp.clip(cdf - cdf[:, :1], 0.0, 1.0) * jnp.float32(_spare(window)))
  return _rows(counts / counts[:, -1:], group, 2, _spare(group))


def make_rising(rows: np.ndarray) -> np.ndarray:
  """Rows that rise strictly: cdf[k] = 2k + running max of (cdf[k] - 2k).

  Exact integer numpy. Only needed if the float CDF fell by more than 2^-15
  somewhere, which rounding cannot do (garbage inputs can); the jitted
  functions report whether it is needed, both sides see the same answer.
  """
  k = 2 * np.arange(rows.shape[1] - 1, dtype=np.int32)
  fixed = rows.copy()
  fixed[:, :-1] = np.maximum.accumulate(rows[:, :-1] - k, axis=1) + k
  return fixed


# --- The encoder's first pass: estimated bits and escapes per window. ---

_STATS_STRIDE = 4


@jax.jit
def step_stats(mixture, pixel, count, tau, low, high):
  """(bits [3], mixture mass outside each window of WINDOWS [windows, 3]) of a step.

  pixel [N, 3]: the true r_hat. The windows are placed as `coarse_cdf` places
  them (around the rounded mixture mean), ignoring the range ends (which only
  move them inwards); their masses are estimated from every _STATS_STRIDE-th
  pixel.
  """
  weights, means, inv_scales, coef_r, coef_g = mixture  # [3, N, K]
  means = means + coef_r * pixel[None, :, 0:1] + coef_g * pixel[None, :, 1:2]
  valid = jnp.arange(pixel.shape[0]) < count
  logp = lm.log_prob_linear(pixel.T[..., None], weights, means, inv_scales,
                   tau.astype(jnp.float32) + 0.5, low[:, None, None], high[:, None, None])
  bits = -jnp.sum(jnp.where(valid, logp, 0.0), axis=1) / jnp.log(2.0)
  # The escapes only choose the window: every _STATS_STRIDE-th pixel is enough.
  s = _STATS_STRIDE
  weights, means, inv_scales = (a[:, ::s] for a in (weights, means, inv_scales))
  b = (2 * tau + 1).astype(jnp.float32)
  centre = jnp.round(jnp.sum(weights * means, axis=-1) / b)  # [3, N / s]
  windows = jnp.asarray(WINDOWS, jnp.float32)
  lower = ((centre[..., None] - jnp.asarray([w // 2 for w in WINDOWS], jnp.float32)) * b
           - tau.astype(jnp.float32) - 0.5)  # [3, N / s, windows]
  cdf = lm.mixture_cdf(jnp.concatenate([lower, lower + windows * b], axis=-1), weights, means,
                     inv_scales)
  mass = jnp.nan_to_num(cdf[..., :len(WINDOWS)] + 1.0 - cdf[..., len(WINDOWS):], nan=1.0)
  outside = s * jnp.sum(jnp.where(valid[::s, None], mass, 0.0), axis=1)  # [3, windows]
  return bits, outside.T


def choose_windows(bits: np.ndarray, outside: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """The encoder's CDF window per channel (0: not coded) from the model's
  bits [3] and mass outside each window [windows, 3] (module doc)."""
  coded = counts > 1
  windows = np.zeros(CHANNELS, np.int64)
  if coded.any():
    # One window for all channels (each capped at its own range): fewer
    # compiled shapes, and the channels' spreads are alike anyway.
    budget = ESCAPE_BUDGET * max(float(np.sum(bits[coded])), 1.0)
    cost = ESCAPE_BITS * np.nan_to_num(outside[:, coded], nan=np.inf).sum(axis=1)
    affordable = [w for w, c in zip(WINDOWS, cost) if c <= budget]
    window = affordable[0] if affordable else WINDOWS[-1]
    for c in np.flatnonzero(coded):
      windows[c] = min(window, window_size(int(counts[c])))
  return windows

