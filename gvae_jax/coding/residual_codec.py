"""The residual layer of near-lossless (tau >= 1) and lossless (tau = 0) files.

Given the base layer (the lossy codec's decoded image x_base, uint8, and the
prior features u from the same jitted synthesis call, see
gvae_jax.coding.codec), the residual r = x - x_base is quantised for the
error bound tau (docs/decoding.md section 3):

  r_hat = sign(r) * b * floor((|r| + tau) / b),  b = 2 tau + 1,  |r - r_hat| <= tau
  q = r_hat / b  (the coded integers)

and the decoder returns clip(x_base + r_hat, 0, 255), which is within tau of x
(clipping only moves towards the true value, which is in [0, 255]).

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

Parallel decoding (DLPR): the image, padded to a multiple of 64, is split into
64x64 patches coded independently: the context outside a patch is zero, and
pixels outside the image are not coded and read as zero. Pixel (i, j) of every
patch is decoded at step a*i + j (a = config.model.residual.order; the masked
convolution only has taps at offsets with a*di + dj < 0, which are decoded at
earlier steps). The decoded r_hat lives on the device in a buffer of
per-patch cells with zero borders. Per step:

  1. `_network` (one jitted call): gathers the masked-conv taps of that step's
     pixels from the buffer (never a full-image convolution) and runs the
     1x1 heads on those pixels as [N, 1, 1, C] (the corrected head for
     tau >= 1 with bias correction, conditioned on min(tau, max_tau), with
     the true bin size always; the main head at tau 0); it returns the
     mixture in the form the CDFs use (weights, means, inverse scales, the
     channel-autoregression coefficients), which stays on the device;
  2. R, then G (mean conditioned on decoded R), then B: one jitted call
     builds every pixel's coarse integer CDF row and one coder call codes the
     channel's coarse symbols; with two levels, one more jitted call builds
     the fine rows (for the decoded groups) and one more coder call codes
     the fine symbols (coder.encode_with_cdfs: the rows are the symbols of
     the call);
  3. `_scatter` writes the step's values into the buffer.

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
integer running maximum (`_make_rising`). The only float-to-integer step is
a floor of a float32 that encoder and decoder compute with the same jitted
function on the same inputs. Values beyond max get count 2 and never occur.
The cost over the ideal code length is about 2W / 2^16 of the probability of
likely symbols (one level), plus about 2S / 2^16 for the fine level.

Coder calls: one per (step, channel) with at least one coded pixel and a
range wider than one value, and a second one (the fine symbols of the pixels
that did not escape) right after it if the channel's window has two levels;
in step order, R G B within a step. They go through one coder session
(gvae_jax.coding.coder): the TFC backend writes one stream per call, the
constriction backend one stream for the whole layer.

Determinism (docs/decoding.md section 5): the encoder runs the decoder's loop
(`_code_steps`: same jitted functions, same shapes, same order, the same
inputs); only the coder call differs. The encoder's first pass computes each
step's mixture with the decoder's `_network` on a buffer that already holds
every value: a step reads only cells of earlier steps (the causal mask) or
cells that are never written, so these are the numbers the decoder's buffer
holds at that step, and the mixtures are the decoder's, bit for bit; the
second pass reuses them (or, for very large images, recomputes them the same
way). The batch of a step is padded to one of a few bucket sizes (dummy rows
read a cell that is always zero and are never coded): batch sizes and
windows come from fixed ladders shared by all images (WINDOWS, bucket_size),
so each function compiles once per size in use, not per step or image.

Section layout (inside a RESIDUAL .gvae file):
  side information: LEB128 varints: for R, G, B: zigzag(min q), max q - min q,
                    W / 16 (0 for a single-value range); then the byte length
                    of every stream; then every escaped value (its index
                    q - min q), in coding order
  streams:          the streams (range-coder bytes only) back to back
"""
from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.coding import varint
from gvae_jax.coding.coder import CodingError, EntropyCoder
from gvae_jax.coding.container import FormatError
from gvae_jax.entropy import logistic_mixture as lm
from gvae_jax.models.residual import RESIDUAL_INPUT_SCALE, ResidualModel

PATCH = 64
PRECISION = 16
CHANNELS = 3
MAX_TAU = 0xFFFF  # the header stores tau in 16 bits
# Windows and step batches come in fixed sizes, the same for every image, so
# the jitted functions compile once per size and are reused across images.
WINDOWS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # 512 covers any range
WINDOW_STEP = 16  # the side information stores W / 16
TWO_LEVEL_WINDOW = 96  # windows of at least this many values are coded in two levels
ESCAPE_BITS = 12.0  # about what an escape adds (its varint; the escape symbol ~ its mass)
ESCAPE_BUDGET = 0.002  # windows may add this fraction of the estimated bits in escapes
# Few sizes (each costs compiles of a few functions), dense enough near the
# top that the bulk of a large image's steps waste little: a 768x512 image
# (96 patches, up to 3072 pixels a step) uses 5 of them.
_BUCKET_LADDER = (8, 32, 128, 512, 1024, 2048, 3072, 4096)
# The encoder keeps the first pass's mixtures for the second up to this size
# (a 768x512 image takes ~130 MB); beyond it, it computes them again.
_KEEP_MIXTURES_BYTES = 768 << 20


def max_symbol(tau: int) -> int:
  """The largest |q| any 8-bit residual can give: r in [-255, 255]."""
  return (255 + tau) // (2 * tau + 1)


def quantize(r: np.ndarray, tau: int) -> np.ndarray:
  """Integer r_hat (lm.quantize_residual in exact integer arithmetic)."""
  r = np.asarray(r, np.int32)
  b = 2 * tau + 1
  return (np.sign(r) * b * ((np.abs(r) + tau) // b)).astype(np.int32)


def window_size(needed: int) -> int:
  """The smallest of WINDOWS holding `needed` values (`needed` <= 511)."""
  return next(w for w in WINDOWS if w >= needed)


def group_size(window: int) -> int:
  """Values per coarse symbol of a window: 1 (one level) for small windows."""
  if window < TWO_LEVEL_WINDOW:
    return 1
  return 8 if window < 128 else 16


def streams_per_channel(window: int) -> int:
  """Streams a coded channel has per step: 2 with two levels."""
  return 1 if group_size(window) == 1 else 2


def bucket_size(count: int) -> int:
  """The padded batch of a step with `count` pixels: a ladder value, then
  multiples of 2048."""
  for size in _BUCKET_LADDER:
    if size >= count:
      return size
  return -(-count // 2048) * 2048


# --- The order in which pixels are coded. ---

@dataclasses.dataclass(frozen=True)
class Step:
  """The pixels of one decoding step, over all patches."""
  count: int  # coded pixels (in the image)
  image_index: np.ndarray  # [count] flat index y * width + x
  cell_index: np.ndarray  # [count] the pixels' cells in the decoded-residual buffer
  u_index: np.ndarray  # [bucket] rows of the padded prior u ([Hp * Wp, C])
  cells: np.ndarray  # [bucket] int32 cell_index, padding rows: one past the last cell

  @property
  def bucket(self) -> int:
    return self.u_index.shape[0]


@dataclasses.dataclass(frozen=True)
class StepPlan:
  height: int
  width: int
  cells: int  # buffer cells, the last one a dummy that always reads zero
  tap_shift: np.ndarray  # [taps] buffer offset of each context tap from its pixel
  steps: tuple[Step, ...]  # only steps with coded pixels
  pixel_cells: np.ndarray  # [height * width] each pixel's cell, image order

  @property
  def buckets(self) -> tuple[int, ...]:
    return tuple(sorted({s.bucket for s in self.steps}))

  def tap_index(self, step: Step) -> np.ndarray:
    """[bucket, taps] buffer cells of the step's context taps (padding rows: the dummy).

    What `_network` gathers (it builds these on the device); made per step,
    not stored: for a large image all steps' taps would take GBs.
    """
    taps = np.full((step.bucket, self.tap_shift.size), self.cells - 1, np.int64)
    taps[:step.count] = step.cell_index[:, None] + self.tap_shift[None, :]
    return taps

  @functools.cached_property
  def device_steps(self) -> tuple[tuple[jax.Array, jax.Array, jax.Array], ...]:
    """Per step (cells, pixel count, u_index) as device arrays, made once per plan."""
    return tuple((jnp.asarray(s.cells), jnp.int32(s.count), jnp.asarray(s.u_index))
                 for s in self.steps)


@functools.lru_cache(maxsize=16)
def plan_steps(height: int, width: int, order: int, offsets: tuple[tuple[int, int], ...]
               ) -> StepPlan:
  """The step-wise coding order for an image size (module doc).

  The decoded residuals live in a buffer of per-patch cells with a zero
  border of `half` (the kernel radius) on every side, so a tap never leaves
  its patch's cells and reads zero outside the patch.
  """
  half = max([0] + [max(abs(di), abs(dj)) for di, dj in offsets])
  side = PATCH + 2 * half
  patch_rows, patch_cols = -(-height // PATCH), -(-width // PATCH)
  padded_width = patch_cols * PATCH
  dummy = patch_rows * patch_cols * side * side

  yy, xx = np.mgrid[0:height, 0:width]
  yy, xx = yy.ravel(), xx.ravel()
  patch = (yy // PATCH) * patch_cols + xx // PATCH
  i, j = yy % PATCH, xx % PATCH
  step = order * i + j
  cell = patch * side * side + (i + half) * side + (j + half)
  # Within a step: patch by patch, rows in order (any fixed order works).
  by_step = np.lexsort((i, patch, step))
  counts = np.bincount(step, minlength=1)
  ends = np.cumsum(counts)

  tap_shift = np.asarray([di * side + dj for di, dj in offsets], np.int64).reshape(-1)
  steps = []
  for t in np.flatnonzero(counts):
    members = by_step[ends[t] - counts[t]:ends[t]]
    count = len(members)
    bucket = bucket_size(count)
    u_index = np.zeros(bucket, np.int32)
    u_index[:count] = yy[members] * padded_width + xx[members]
    cells = np.full(bucket, dummy + 1, np.int32)
    cells[:count] = cell[members]
    steps.append(Step(count, (yy[members] * width + xx[members]).astype(np.int64),
                      cell[members].astype(np.int64), u_index, cells))
  return StepPlan(height, width, dummy + 1, tap_shift, tuple(steps), cell.astype(np.int64))


# --- The residual model's pieces, as the step-wise loop uses them. ---

@dataclasses.dataclass(frozen=True)
class _Taps:
  offsets: tuple[tuple[int, int], ...]
  weights: jax.Array  # [taps * 3, C]: the masked kernel, rows in (tap, channel) order
  bias: jax.Array  # [C]


_TAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _taps(exported) -> _Taps:
  taps = _TAPS.get(exported)
  if taps is None:
    residual = exported.residual_model
    offsets, weights, bias = residual.apply(
        {"params": exported.residual_params}, method=lambda m: m.context.taps())
    weights = jnp.asarray(weights, jnp.float32)
    taps = _Taps(tuple((int(a), int(b)) for a, b in np.asarray(offsets)),
                 weights.reshape(-1, weights.shape[-1]), jnp.asarray(bias, jnp.float32))
    _TAPS[exported] = taps
  return taps


def head_tau(residual: ResidualModel, tau: int) -> tuple[bool, int]:
  """(use the corrected head, tau it is conditioned on): main head at tau 0."""
  corrected = residual.uses_correction(tau)
  return corrected, (min(tau, residual.max_tau) if corrected else 0)


def _prepare(mixture: dict[str, jax.Array]) -> jax.Array:
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
def _network(residual: ResidualModel, corrected: bool, params, tap_weights, tap_bias, tap_shift,
             buffer, cells, count, u_flat, u_index, tau_head):
  """The mixture (`_prepare`) at one step's pixels.

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
  return _prepare(lm.split_params(raw[:, 0, 0, :], residual.components, residual.share_weights))


@functools.partial(jax.jit, donate_argnums=0)
def _scatter(buffer, cells, values):
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
      _mixture_cdf(edges, weights, means, inv_scales))))


def _mixture_cdf(edges, weights, means, inv_scales):
  """sum_k w_k sigmoid((x - mu_k) / s_k) at edges [..., E]; parameters [..., K].

  With the components as the last axis [..., E, K], reduced at once: on this
  CPU about twice as fast as one fused term per component, and quicker to
  compile.
  """
  terms = weights[..., None, :] * jax.nn.sigmoid(
      inv_scales[..., None, :] * (edges[..., None] - means[..., None, :]))
  return jnp.sum(terms, axis=-1)


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
def _coarse_cdf(window: int, group: int, mixture, pixel, channel, q_low, count, tau):
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
def _fine_cdf(window: int, group: int, mixture, pixel, channel, q_low, count, tau, start,
              groups):
  """(rows [N, group + 2], rows rise strictly): the values of group groups[n] of
  row n's window (starts from `_coarse_cdf`), each in proportion to its
  one-level count (module doc)."""
  weights, means, inv_scales = _channel(mixture, pixel, channel)
  value = (start + group * groups)[:, None] + jnp.arange(group + 1, dtype=jnp.int32)[None, :]
  cdf = _cdf_at(value, q_low, count, tau, weights, means, inv_scales)
  counts = (2 * jnp.arange(group + 1, dtype=jnp.float32)
            + jnp.clip(cdf - cdf[:, :1], 0.0, 1.0) * jnp.float32(_spare(window)))
  return _rows(counts / counts[:, -1:], group, 2, _spare(group))


def _make_rising(rows: np.ndarray) -> np.ndarray:
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


def _log_prob(values, weights, means, inv_scales, half_width, low, high):
  """log P(value) (nats) per value [..., 1] under its mixture [..., K].

  lm.log_prob's numbers (the end bins at `low` / `high` take the tails; bins
  of a component too small to subtract CDFs use its midpoint density times
  the bin width), summed in the linear domain: a third of the exp / log work.
  """
  centred = values - means
  at_top, at_bottom = values >= high, values <= low
  upper = jnp.where(at_top, 1.0, jax.nn.sigmoid(inv_scales * (centred + half_width)))
  lower = jnp.where(at_bottom, 0.0, jax.nn.sigmoid(inv_scales * (centred - half_width)))
  mass = upper - lower
  e = jnp.exp(-jnp.abs(inv_scales * centred))
  density = inv_scales * e / jnp.square(1.0 + e) * (2.0 * half_width)
  mass = jnp.where((mass > lm._TINY_BIN) | at_top | at_bottom, mass, density)
  return jnp.log(jnp.maximum(jnp.sum(weights * mass, axis=-1), 1e-30))


@jax.jit
def _step_stats(mixture, pixel, count, tau, low, high):
  """(bits [3], mixture mass outside each window of WINDOWS [windows, 3]) of a step.

  pixel [N, 3]: the true r_hat. The windows are placed as `_coarse_cdf` places
  them (around the rounded mixture mean), ignoring the range ends (which only
  move them inwards); their masses are estimated from every _STATS_STRIDE-th
  pixel.
  """
  weights, means, inv_scales, coef_r, coef_g = mixture  # [3, N, K]
  means = means + coef_r * pixel[None, :, 0:1] + coef_g * pixel[None, :, 1:2]
  valid = jnp.arange(pixel.shape[0]) < count
  logp = _log_prob(pixel.T[..., None], weights, means, inv_scales,
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
  cdf = _mixture_cdf(jnp.concatenate([lower, lower + windows * b], axis=-1), weights, means,
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


# --- The step-wise loop, shared by the encoder and the decoder. ---

@dataclasses.dataclass
class Profile:
  """Seconds spent in each part of the step-wise coder (filled when passed in).

  With a profile, every JAX result is waited for where it is made, so the
  parts add up (and the total is a little slower than without).
  """
  context: float = 0.0  # writing decoded values into the context buffer (JAX)
  network: float = 0.0  # the context taps and heads at a step's pixels (JAX)
  stats: float = 0.0  # encoder only: bits and escapes per window at each step (JAX)
  cdf: float = 0.0  # integer CDFs (JAX) and their copy to the host
  coder: float = 0.0  # range coder calls
  steps: int = 0
  coder_calls: int = 0
  symbols: int = 0  # values coded (pixels times coded channels)


class _Coding(Protocol):
  """What differs between encoder and decoder in `_code_steps`."""

  def coarse(self, number: int, channel: int, rows: np.ndarray, starts: np.ndarray,
             group: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(coarse symbols [count] (-1: escaped), the escaped values in order) of a
    (step, channel): the encoder codes its values, the decoder decodes them."""

  def fine(self, number: int, channel: int, rows: np.ndarray, starts: np.ndarray,
           groups: np.ndarray, group: int) -> np.ndarray:
    """Fine symbols [m] of the pixels that did not escape (rows [m, group + 2])."""


def _block(value, profile: Profile | None):
  if profile is not None:
    jax.block_until_ready(value)
  return value


def _code_steps(exported, plan: StepPlan, u_flat: jax.Array, tau: int, q_low: np.ndarray,
                q_high: np.ndarray, windows: np.ndarray, coding: _Coding,
                profile: Profile | None = None, mixtures=None) -> np.ndarray:
  """Runs every step; returns the decoded r_hat [H * W, 3] (int32).

  mixtures(number) -> the step's `_network` output (the encoder's, from its
  first pass); None: computed here from the decoded values (the decoder).
  """
  residual = exported.residual_model
  taps = _taps(exported)
  corrected, tau_h = head_tau(residual, tau)
  b = 2 * tau + 1
  counts = (q_high.astype(np.int64) - q_low + 1)
  tau_j, tau_head_j = jnp.int32(tau), jnp.int32(tau_h)
  lows = [jnp.int32(v) for v in q_low]
  sizes = [jnp.int32(v) for v in counts]
  channel_ids = [jnp.int32(c) for c in range(CHANNELS)]
  tap_shift = jnp.asarray(plan.tap_shift, jnp.int32)
  r_hat = np.zeros((plan.height * plan.width, CHANNELS), np.int32)
  if not np.any(counts > 1):  # every value is known from the side information
    r_hat[:] = np.asarray(q_low, np.int32) * b
    return r_hat
  buffer = jnp.zeros((plan.cells, CHANNELS), jnp.float32) if mixtures is None else None
  clock = time.perf_counter
  for number, (step, (cells, count, u_index)) in enumerate(zip(plan.steps, plan.device_steps)):
    tick = clock()
    if mixtures is None:
      mixture = _block(_network(residual, corrected, exported.residual_params, taps.weights,
                                taps.bias, tap_shift, buffer, cells, count, u_flat, u_index,
                                tau_head_j), profile)
    else:
      mixture = mixtures(number)
    if profile is not None:
      profile.network += clock() - tick
    n = step.count
    pixel = np.zeros((step.bucket, CHANNELS), np.float32)  # this step's r_hat so far
    for channel in range(CHANNELS):
      if counts[channel] == 1:  # a single possible value: nothing to code
        pixel[:n, channel] = q_low[channel] * b
        continue
      window = int(windows[channel])
      group = group_size(window)
      args = (mixture, pixel.copy(), channel_ids[channel], lows[channel], sizes[channel], tau_j)
      tick = clock()
      rows, starts_j, rising = _coarse_cdf(window, group, *args)
      rows, starts = np.asarray(rows)[:n], np.asarray(starts_j)[:n]
      if not rising:
        rows = _make_rising(rows)
      if profile is not None:
        profile.cdf += clock() - tick
      tick = clock()
      symbols, escaped = coding.coarse(number, channel, rows, starts, group, window)
      if profile is not None:
        profile.coder += clock() - tick
        profile.coder_calls += 1
        profile.symbols += n
      inside = symbols >= 0
      indexes = starts + group * symbols
      if group > 1:
        groups = np.zeros(step.bucket, np.int32)
        groups[:n] = np.where(inside, symbols, 0)
        tick = clock()
        rows, rising = _fine_cdf(window, group, *args, starts_j, groups)
        rows = np.asarray(rows)[:n][inside]
        if not rising:
          rows = _make_rising(rows)
        if profile is not None:
          profile.cdf += clock() - tick
        tick = clock()
        fine = coding.fine(number, channel, rows, starts[inside], symbols[inside], group)
        if profile is not None:
          profile.coder += clock() - tick
          profile.coder_calls += 1
        indexes[inside] += fine
      indexes[~inside] = escaped
      if np.any(indexes < 0) or np.any(indexes >= counts[channel]):
        raise CodingError(f"residual stream of step {number}, channel {channel} decodes to "
                          "values outside the symbol range; file is corrupt")
      pixel[:n, channel] = (indexes + q_low[channel]) * b
    r_hat[step.image_index] = pixel[:n]
    if buffer is not None:
      tick = clock()
      buffer = _block(_scatter(buffer, cells, pixel), profile)
      if profile is not None:
        profile.context += clock() - tick
    if profile is not None:
      profile.steps += 1
  return r_hat


def _first_pass(exported, plan: StepPlan, u_flat: jax.Array, tau: int, r_hat: np.ndarray,
                profile: Profile | None = None):
  """(bits [3], mass outside each window [windows, 3], mixtures(number)) of the
  encoder: every step's mixture with the decoder's `_network` (module doc)."""
  residual = exported.residual_model
  taps = _taps(exported)
  corrected, tau_h = head_tau(residual, tau)
  flat = r_hat.reshape(-1, CHANNELS)
  buffer = np.zeros((plan.cells, CHANNELS), np.float32)
  buffer[plan.pixel_cells] = flat
  buffer = jnp.asarray(buffer)
  tap_shift = jnp.asarray(plan.tap_shift, jnp.int32)
  tau_j, tau_head_j = jnp.int32(tau), jnp.int32(tau_h)
  low, high = jnp.asarray(flat.min(axis=0), jnp.float32), jnp.asarray(flat.max(axis=0),
                                                                     jnp.float32)
  network = functools.partial(_network, residual, corrected, exported.residual_params,
                              taps.weights, taps.bias, tap_shift, buffer)
  size = sum(step.bucket for step in plan.steps) * 5 * CHANNELS * residual.components * 4
  keep = size <= _KEEP_MIXTURES_BYTES
  kept, stats = [], []
  clock = time.perf_counter
  for step, (cells, count, u_index) in zip(plan.steps, plan.device_steps):
    tick = clock()
    mixture = _block(network(cells, count, u_flat, u_index, tau_head_j), profile)
    if profile is not None:
      profile.network += clock() - tick
    if keep:
      kept.append(mixture)
    pixel = np.zeros((step.bucket, CHANNELS), np.float32)
    pixel[:step.count] = flat[step.image_index]
    tick = clock()
    stats.append(_block(_step_stats(mixture, pixel, count, tau_j, low, high), profile))
    if profile is not None:
      profile.stats += clock() - tick

  def mixtures(number):
    if keep:
      return kept[number]
    cells, count, u_index = plan.device_steps[number]
    return network(cells, count, u_flat, u_index, tau_head_j)

  bits = np.sum([np.asarray(b, np.float64) for b, _ in stats], axis=0)
  outside = np.sum([np.asarray(o, np.float64) for _, o in stats], axis=0)
  return bits, outside, mixtures


# --- Side information. ---

_SIDE_FIELDS = 3  # per channel: min, range, window


def parse_side_info(side: bytes, plan: StepPlan, tau: int, streams_size: int,
                    one_stream: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], np.ndarray]:
  """(q_low, q_high, windows, stream lengths, escaped values), checked (FormatError).

  one_stream: the coder puts every coder call into one stream (EntropyCoder.ONE_STREAM).
  """
  try:
    values = varint.decode(side).tolist()
  except varint.VarintError as e:
    raise FormatError(f"invalid residual side information: {e}") from None
  if len(values) < _SIDE_FIELDS * CHANNELS:
    raise FormatError("invalid residual side information: symbol ranges missing")
  fields = np.asarray(values[:_SIDE_FIELDS * CHANNELS], object).reshape(CHANNELS, _SIDE_FIELDS)
  q_low = varint.unzigzag(fields[:, 0].astype(np.int64))
  q_high = q_low + np.asarray(fields[:, 1], np.int64)
  windows = np.asarray(fields[:, 2], np.int64) * WINDOW_STEP
  limit = max_symbol(tau)
  if np.any(q_low < -limit) or np.any(q_high > limit):
    raise FormatError(f"invalid residual side information: symbol range "
                      f"{q_low.tolist()} .. {q_high.tolist()} exceeds +-{limit} for tau {tau}")
  counts = q_high - q_low + 1
  for count, window in zip(counts, windows):
    valid = (window == 0 if count == 1
             else window in WINDOWS and window <= window_size(int(count)))
    if not valid:
      raise FormatError(f"invalid residual side information: window {window} for a range of "
                        f"{count} values")
  first = _SIDE_FIELDS * CHANNELS
  calls = len(plan.steps) * sum(streams_per_channel(int(w))
                                for count, w in zip(counts, windows) if count > 1)
  expected = min(calls, 1) if one_stream else calls
  lengths = values[first:first + expected]
  if len(lengths) != expected:
    raise FormatError(f"invalid residual side information: {len(lengths)} stream lengths, "
                      f"{expected} streams expected")
  if sum(lengths) != streams_size:
    raise FormatError(f"invalid residual side information: streams of {sum(lengths)} bytes "
                      f"declared, {streams_size} present")
  # Escaped values are indexes into the range; garbage must not overflow int64 later.
  escaped = np.asarray(values[first + expected:], np.int64)
  return q_low.astype(np.int32), q_high.astype(np.int32), windows, lengths, escaped


# --- Encoding and decoding. ---

@dataclasses.dataclass(frozen=True)
class ResidualLayer:
  """The residual layer's integers, for tests and tools."""
  side_info: bytes
  streams: bytes
  r_hat: np.ndarray  # int32 [H, W, 3]
  q_low: np.ndarray  # int32 [3]: per channel min of q = r_hat / (2 tau + 1)
  q_high: np.ndarray  # int32 [3]
  windows: np.ndarray  # int64 [3]: CDF window per channel (0: nothing coded)
  stream_lengths: tuple[int, ...]
  escapes: int  # values coded outside their window
  estimated_bits: np.ndarray | None = None  # encoder: the model's bits per channel


def check_inputs(exported, x_base: np.ndarray, u_padded: jax.Array) -> None:
  if not exported.is_scalable:
    raise ValueError("the residual layer needs a scalable model")
  height, width = x_base.shape[:2]
  expected = (1, -(-height // PATCH) * PATCH, -(-width // PATCH) * PATCH)
  if tuple(u_padded.shape[:3]) != expected:
    raise ValueError(f"u must be the padded prior {expected}, got {u_padded.shape}")


def _plan(exported, height: int, width: int) -> StepPlan:
  return plan_steps(height, width, int(exported.residual_model.order), _taps(exported).offsets)


class _Encoding:
  """`_code_steps`' coder calls of the encoder: codes the known values."""

  def __init__(self, coder: EntropyCoder, plan: StepPlan, values: np.ndarray):
    self.plan, self.values = plan, values  # values: q - min q [H * W, 3]
    self.session = coder.cdf_encoder()
    self.escapes: list[np.ndarray] = []
    self._inside = np.zeros(0, np.int64)

  def coarse(self, number, channel, rows, starts, group, window):
    values = self.values[self.plan.steps[number].image_index, channel]
    relative = values - starts
    inside = (relative >= 0) & (relative < window)
    symbols = np.where(inside, relative // group, -1)  # -1: not in the window, escaped
    self.session.encode(symbols, rows, np.zeros(len(rows), np.int64), PRECISION)
    self.escapes.append(values[~inside])
    self._inside = values[inside]
    return symbols, values[~inside]

  def fine(self, number, channel, rows, starts, groups, group):
    symbols = self._inside - starts - group * groups
    self.session.encode(symbols, rows, np.zeros(len(rows), np.int64), PRECISION)
    return symbols


class _Decoding:
  """`_code_steps`' coder calls of the decoder: decodes them from the streams."""

  def __init__(self, coder: EntropyCoder, streams: bytes, lengths: list[int],
               escaped: np.ndarray):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    self.session = coder.cdf_decoder([streams[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
    self.escaped = escaped
    self.used = 0  # escaped values

  def coarse(self, number, channel, rows, starts, group, window):
    taken = []

    def take(n):
      if self.used + n > len(self.escaped):
        raise CodingError("residual streams need more escaped values than the file holds; "
                          "file is corrupt")
      self.used += n
      taken.append(self.escaped[self.used - n:self.used])
      return np.full(n, -1, np.int64)

    symbols = self.session.decode(rows, np.zeros(len(rows), np.int64), PRECISION, take)
    escaped = np.concatenate(taken) if taken else np.zeros(0, np.int64)
    return symbols.astype(np.int64), escaped

  def fine(self, number, channel, rows, starts, groups, group):
    def refuse(n):
      raise CodingError("a residual stream escapes where it cannot; file is corrupt")

    symbols = self.session.decode(rows, np.zeros(len(rows), np.int64), PRECISION, refuse)
    return symbols.astype(np.int64)


def encode(exported, coder: EntropyCoder, x: np.ndarray, x_base: np.ndarray,
           u_padded: jax.Array, tau: int, profile: Profile | None = None,
           windows: np.ndarray | None = None) -> ResidualLayer:
  """Codes x - x_base within tau. x, x_base uint8 [H, W, 3]; u_padded [1, Hp, Wp, C].

  windows: CDF window per channel (values of WINDOWS); by default from
  the model's mixtures (module doc).
  """
  check_inputs(exported, x_base, u_padded)
  height, width = x_base.shape[:2]
  b = 2 * tau + 1
  r_hat = quantize(x.astype(np.int32) - x_base.astype(np.int32), tau)
  flat = r_hat.reshape(-1, CHANNELS)
  q_low, q_high = (flat.min(axis=0) // b).astype(np.int32), (flat.max(axis=0) // b).astype(np.int32)
  counts = q_high.astype(np.int64) - q_low + 1
  plan = _plan(exported, height, width)
  u_flat = u_padded.reshape(-1, u_padded.shape[-1])
  if np.any(counts > 1):
    bits, outside, mixtures = _first_pass(exported, plan, u_flat, tau, r_hat, profile)
  else:  # nothing to code: every value is known from the side information
    bits, outside, mixtures = np.zeros(CHANNELS), np.zeros((len(WINDOWS), CHANNELS)), None
  if windows is None:
    windows = choose_windows(bits, outside, counts)
  windows = np.where(counts > 1, np.asarray(windows, np.int64), 0)
  for count, window in zip(counts, windows):
    if count > 1 and (window not in WINDOWS or window > window_size(int(count))):
      raise ValueError(f"window {window} must be one of {WINDOWS}, at most "
                       f"{window_size(int(count))} for {count} values")
  coding = _Encoding(coder, plan, flat // b - q_low.astype(np.int64))
  decoded = _code_steps(exported, plan, u_flat, tau, q_low, q_high, windows, coding, profile,
                        mixtures)
  if not np.array_equal(decoded, flat):  # the loop's own bookkeeping
    raise AssertionError("residual encoder lost symbols")
  streams = coding.session.finish()
  lengths = tuple(len(s) for s in streams)
  fields = np.stack([varint.zigzag(q_low), counts - 1, windows // WINDOW_STEP], axis=1)
  escaped = np.concatenate([np.zeros(0, np.int64)] + coding.escapes)
  side = varint.encode(np.concatenate([fields.ravel(), np.asarray(lengths, np.int64), escaped]))
  return ResidualLayer(side, b"".join(streams), r_hat, q_low, q_high, windows, lengths,
                       int(escaped.size), bits)


def decode(exported, coder: EntropyCoder, side: bytes, streams: bytes, x_base: np.ndarray,
           u_padded: jax.Array, tau: int, profile: Profile | None = None
           ) -> tuple[np.ndarray, ResidualLayer]:
  """(x_hat uint8 [H, W, 3], the layer's integers) from the residual sections."""
  check_inputs(exported, x_base, u_padded)
  height, width = x_base.shape[:2]
  plan = _plan(exported, height, width)
  q_low, q_high, windows, lengths, escaped = parse_side_info(side, plan, tau, len(streams),
                                                             coder.ONE_STREAM)
  coding = _Decoding(coder, streams, lengths, escaped)
  u_flat = u_padded.reshape(-1, u_padded.shape[-1])
  r_hat = _code_steps(exported, plan, u_flat, tau, q_low, q_high, windows, coding, profile)
  coding.session.finish()
  if coding.used != len(escaped):
    raise FormatError(f"invalid residual side information: {len(escaped) - coding.used} "
                      "escaped values left over")
  r_hat = r_hat.reshape(height, width, CHANNELS)
  x_hat = np.clip(x_base.astype(np.int32) + r_hat, 0, 255).astype(np.uint8)
  return x_hat, ResidualLayer(side, streams, r_hat, q_low, q_high, windows, tuple(lengths),
                              coding.used)


# --- One pass of the model over the whole image: estimated bits. ---

def _patches(image: jax.Array) -> jax.Array:
  """[Hp, Wp, C] -> [patches, 64, 64, C] in row-major patch order."""
  hp, wp, c = image.shape
  tiles = image.reshape(hp // PATCH, PATCH, wp // PATCH, PATCH, c)
  return tiles.transpose(0, 2, 1, 3, 4).reshape(-1, PATCH, PATCH, c)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_shot_bits(residual: ResidualModel, corrected: bool, params, u_padded, r_hat_padded,
                   valid, tau, tau_head, low, high):
  """The model's bits per channel [3] with the coder's contexts, in one pass."""
  u = _patches(u_padded[0])
  r = _patches(r_hat_padded)
  inside = _patches(valid[..., None])[..., 0]
  taus = jnp.full((1,), tau_head, jnp.int32)
  mixture = residual.apply({"params": params}, u, r, taus, corrected)
  means = lm.conditional_means(mixture, r)
  logp = lm.log_prob(r, mixture, means, tau.astype(jnp.float32) + 0.5, low, high)
  return -jnp.sum(jnp.where(inside[..., None], logp, 0.0), axis=(0, 1, 2)) / jnp.log(2.0)


def estimate_bits(exported, x: np.ndarray, x_base: np.ndarray, u_padded: jax.Array,
                  tau: int) -> np.ndarray:
  """The model's bits for the residual layer, per channel [3] (float).

  -log2 of the float mixture likelihoods of r_hat with the coder's contexts:
  quantised residuals, zero outside each patch and outside the image, the
  same head and tau conditioning, and the same adaptive range (its end bins
  take the tails). One full-image pass (not step-wise), so it differs from
  the coder's float numbers (and from the encoder's `estimated_bits`, which
  come from its step-wise first pass) by rounding only. Excludes side
  information, the windows' escapes and the coder's integer-CDF and
  per-stream overheads.
  """
  check_inputs(exported, x_base, u_padded)
  height, width = x_base.shape[:2]
  hp, wp = u_padded.shape[1:3]
  r_hat = quantize(x.astype(np.int32) - x_base.astype(np.int32), tau)
  flat = r_hat.reshape(-1, CHANNELS)
  padded = np.zeros((hp, wp, CHANNELS), np.float32)
  padded[:height, :width] = r_hat
  valid = np.zeros((hp, wp), bool)
  valid[:height, :width] = True
  corrected, tau_h = head_tau(exported.residual_model, tau)
  bits = _one_shot_bits(exported.residual_model, corrected, exported.residual_params, u_padded,
                        jnp.asarray(padded), jnp.asarray(valid), jnp.int32(tau),
                        jnp.int32(tau_h), jnp.asarray(flat.min(axis=0), jnp.float32),
                        jnp.asarray(flat.max(axis=0), jnp.float32))
  return np.asarray(bits, np.float64)
