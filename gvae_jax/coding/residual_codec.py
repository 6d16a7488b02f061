"""The residual layer of near-lossless (tau >= 1) and lossless (tau = 0) files.

Given the base layer (the lossy codec's decoded image x_base, uint8, and the
prior features u from the same jitted synthesis call, see
gvae_jax.coding.codec), the residual r = x - x_base is quantised for the
error bound tau (REFERENCE section 4):

  r_hat = sign(r) * b * floor((|r| + tau) / b),  b = 2 tau + 1,  |r - r_hat| <= tau
  q = r_hat / b  (the coded integers)

and the decoder returns clip(x_base + r_hat, 0, 255), which is within tau of x
(clipping only moves towards the true value, which is in [0, 255]).

Adaptive residual interval: per colour channel the actual min and max of q
are side information; the alphabet is [min, max] and its two end bins take the
tails. Bin q integrates the tau = 0 mixture over [q b - tau - 1/2,
q b + tau + 1/2] (grey levels). A channel whose range is a single value costs
nothing beyond the side information.

Windows: a symbol's CDF row covers a window of W consecutive values of
[min, max] (W one of WINDOWS, per channel, chosen by the encoder and sent
as side information), placed around the pixel's mixture mean; values outside
it are coded as the row's escape (whose probability is the mixture mass
outside the window, at least 1 / 2^16) and then stored losslessly
(gvae_jax.coding.coder, explicit CDFs). When W covers [min, max] this is the
plain adaptive interval. The encoder picks W from a one-shot pass of the
model over the image: the smallest W whose expected escapes (ESCAPE_BITS
times the mixture mass outside each pixel's window, summed) cost at most
ESCAPE_BUDGET of the estimated bits; one W for all channels, each capped at
its range. So the CDFs cost O(W), not O(max - min), per symbol: on a
768x512 image at tau = 0 with a 500-value range that is the difference
between ~40 s and a few seconds of CDFs, for ~0.2 % more bits.

Parallel decoding (DLPR): the image, padded to a multiple of 64, is split into
64x64 patches coded independently: the context outside a patch is zero, and
pixels outside the image are not coded and read as zero. Pixel (i, j) of every
patch is decoded at step a*i + j (a = config.model.residual.order; the masked
convolution only has taps at offsets with a*di + dj < 0, which are decoded at
earlier steps). Per step:

  1. context: the masked-conv taps (MaskedConv.taps) are gathered from the
     already decoded r_hat at that step's pixels only (numpy fancy indexing
     on a per-patch buffer with zero borders), never a full-image convolution;
  2. the 1x1 heads run on those pixels as [N, 1, 1, C] (one jitted call;
     the corrected head for tau >= 1 with bias correction, conditioned on
     min(tau, max_tau), with the true bin size always; the main head at tau 0);
  3. R, then G (mean conditioned on decoded R), then B: for each, one jitted
     call builds every pixel's integer CDF row and one coder call codes the
     channel (coder.encode_with_cdfs: the rows are the symbols of the call).

Integer CDFs, built inside JAX by one jitted function shared by encoder and
decoder: with F_k the mixture CDF at the lower edge of the k-th window value
(k = 0 .. W; 0 below the lowest and 1 above the highest value of [min, max],
so those take the tails) and G_k = clip(F_k - F_0, 0, 1), the row is

  cdf[k] = 2k + floor(G_k * (2^16 - 2W - 1))  for k = 0 .. W,   cdf[W + 1] = 2^16

so every value has a count >= 2 and the escape >= 1, the row ends exactly at
2^16, and the escape's count is about the mass outside the window. Two
counts per value (not one) keep the row strictly rising even where float
rounding leaves F a hair non-monotone (it would have to fall by 2^-15). The
range decoder needs rising rows to stay inside its buffers, so the function
also reports whether they rise, and for garbage input (NaN, huge numbers)
that breaks this, both sides apply the same exact integer running maximum
(`_make_rising`). The only float-to-integer step is a floor of a float32
that encoder and decoder compute with the same jitted function on the same
inputs. Window values beyond max get count 2 and never occur. The cost over the ideal code
length is about 2W / 2^16 of the probability of likely symbols.

Streams: one per (step, channel) with at least one coded pixel and a range
wider than one value, in step order, R G B within a step.

Determinism (REFERENCE section 7): the encoder runs exactly the decoder's loop
(`_code_steps`: same jitted functions, same shapes, same order, the same
buffer of decoded values for the contexts); only the coder call differs. The
batch of a step is padded to one of at most four bucket sizes (dummy rows
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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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
ESCAPE_BITS = 12.0  # about what an escape adds (its varint; the escape symbol ~ its mass)
ESCAPE_BUDGET = 0.002  # windows may add this fraction of the estimated bits in escapes
# Few sizes (each costs a compile of two functions, ~0.5 s here), dense enough
# near the top that the bulk of a large image's steps waste little: a 768x512
# image (96 patches, up to 3072 pixels a step) uses 5 of them.
_BUCKET_LADDER = (8, 32, 128, 512, 1024, 2048, 3072, 4096)


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

  @property
  def buckets(self) -> tuple[int, ...]:
    return tuple(sorted({s.bucket for s in self.steps}))

  def tap_index(self, step: Step) -> np.ndarray:
    """[bucket, taps] buffer cells of the step's context taps (padding rows: the dummy).

    Made per step, not stored: for a large image all steps' taps would take GBs.
    """
    taps = np.full((step.bucket, self.tap_shift.size), self.cells - 1, np.int64)
    taps[:step.count] = step.cell_index[:, None] + self.tap_shift[None, :]
    return taps


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
    u_index = np.zeros(bucket_size(count), np.int32)
    u_index[:count] = yy[members] * padded_width + xx[members]
    steps.append(Step(count, (yy[members] * width + xx[members]).astype(np.int64),
                      cell[members].astype(np.int64), u_index))
  return StepPlan(height, width, dummy + 1, tap_shift, tuple(steps))


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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mixture(residual: ResidualModel, corrected: bool, params, tap_weights, tap_bias,
             context, u_flat, u_index, tau_head):
  """Mixture parameters [N, 3, K] at one step's pixels.

  context [N, taps, 3]: decoded r_hat at each tap (zeros where not coded).
  """
  n = context.shape[0]
  flat = context.reshape(n, -1) * RESIDUAL_INPUT_SCALE
  features = flat @ tap_weights + tap_bias  # the masked convolution at these pixels
  u = jnp.take(u_flat, u_index, axis=0)
  tau = jnp.full((n,), tau_head, jnp.int32)
  raw = residual.apply({"params": params}, features[:, None, None, :], u[:, None, None, :], tau,
                       corrected, method=ResidualModel.mixture_from_features)
  return lm.split_params(raw[:, 0, 0, :], residual.components, residual.share_weights)


@functools.partial(jax.jit, static_argnums=0)
def _channel_cdf(window: int, mixture, pixel, channel, q_low, count, tau):
  """(CDF rows [N, window + 2] int32, window starts [N], rows rise strictly) of a channel.

  Values are indexes into [min q, max q] (0 .. count - 1); row n's window is
  starts[n] + 0 .. window - 1, then the escape (module doc). pixel [N, 3]: the
  pixels' decoded r_hat so far (R, G) for the channel autoregression.
  """
  means = lm.conditional_means(mixture, pixel)
  pick = lambda a: jax.lax.dynamic_index_in_dim(a, channel, axis=-2, keepdims=False)
  logits, means, log_scales = pick(mixture["logits"]), pick(means), pick(mixture["log_scales"])
  b = (2 * tau + 1).astype(jnp.float32)
  centre = jnp.sum(jax.nn.softmax(logits, axis=-1) * means, axis=-1) / b - q_low
  centre = jnp.clip(jnp.nan_to_num(centre), -2.0**20, 2.0**20)  # garbage must still index
  start = jnp.round(centre).astype(jnp.int32) - window // 2
  start = jnp.clip(start, 0, jnp.maximum(count - window, 0))
  k = jnp.arange(window + 1, dtype=jnp.int32)
  value = start[:, None] + k[None, :]
  edges = (q_low + value).astype(jnp.float32) * b - tau.astype(jnp.float32) - 0.5
  cdf = lm.mixture_cdf(edges, logits, means, log_scales)
  cdf = jnp.where(value <= 0, 0.0, jnp.where(value >= count, 1.0, jnp.nan_to_num(cdf)))
  spare = jnp.float32(2**PRECISION - 2 * window - 1)
  rows = 2 * k + jnp.floor(jnp.clip(cdf - cdf[:, :1], 0.0, 1.0) * spare).astype(jnp.int32)
  rising = jnp.all(rows[:, 1:] > rows[:, :-1])
  top = jnp.full((rows.shape[0], 1), 2**PRECISION, jnp.int32)
  return jnp.concatenate([rows, top], axis=1), start, rising


def _make_rising(rows: np.ndarray) -> np.ndarray:
  """Rows that rise strictly: cdf[k] = 2k + running max of (cdf[k] - 2k).

  Exact integer numpy. Only needed if the float CDF fell by more than 2^-15
  somewhere, which rounding cannot do (garbage inputs can); the jitted
  function reports whether it is needed, both sides see the same answer.
  """
  k = 2 * np.arange(rows.shape[1] - 1, dtype=np.int32)
  fixed = rows.copy()
  fixed[:, :-1] = np.maximum.accumulate(rows[:, :-1] - k, axis=1) + k
  return fixed


# --- The step-wise loop, shared by the encoder and the decoder. ---

@dataclasses.dataclass
class Profile:
  """Seconds spent in each part of `_code_steps` (filled when passed in)."""
  context: float = 0.0  # gathering taps (numpy)
  network: float = 0.0  # the heads at a step's pixels (JAX)
  cdf: float = 0.0  # integer CDFs (JAX) and their copy to the host
  coder: float = 0.0  # range coder calls
  steps: int = 0
  coder_calls: int = 0
  symbols: int = 0


CoderCall = Callable[[int, int, np.ndarray, np.ndarray], np.ndarray]


def _code_steps(exported, plan: StepPlan, u_flat: jax.Array, tau: int, q_low: np.ndarray,
                q_high: np.ndarray, windows: np.ndarray, code: CoderCall,
                profile: Profile | None = None) -> np.ndarray:
  """Runs every step; returns the decoded r_hat [H * W, 3] (int32).

  code(step number, channel, cdf rows [count, W + 2], window starts [count])
  -> values [count] (indexes into [min q, max q]): the encoder codes its known
  values and returns them, the decoder decodes them from the next stream.
  """
  residual = exported.residual_model
  params = exported.residual_params
  taps = _taps(exported)
  corrected, tau_h = head_tau(residual, tau)
  b = 2 * tau + 1
  counts = (q_high.astype(np.int64) - q_low + 1)
  tau_j, tau_head_j = jnp.int32(tau), jnp.int32(tau_h)
  lows = [jnp.int32(v) for v in q_low]
  sizes = [jnp.int32(v) for v in counts]
  channel_ids = [jnp.int32(c) for c in range(CHANNELS)]

  buffer = np.zeros((plan.cells, CHANNELS), np.float32)  # decoded r_hat, zero borders
  r_hat = np.zeros((plan.height * plan.width, CHANNELS), np.int32)
  clock = time.perf_counter
  for number, step in enumerate(plan.steps):
    start = clock()
    context = buffer[plan.tap_index(step)]
    if profile is not None:
      profile.context += clock() - start
    mixture = None
    pixel = np.zeros((step.bucket, CHANNELS), np.float32)
    for channel in range(CHANNELS):
      if counts[channel] == 1:  # a single possible value: nothing to code
        values = np.full(step.count, q_low[channel] * b, np.int32)
      else:
        if mixture is None:
          tick = clock()
          mixture = _mixture(residual, corrected, params, taps.weights, taps.bias, context,
                             u_flat, step.u_index, tau_head_j)
          if profile is not None:
            jax.block_until_ready(mixture)
            profile.network += clock() - tick
        tick = clock()
        rows, starts, rising = _channel_cdf(int(windows[channel]), mixture, pixel,
                                            channel_ids[channel], lows[channel],
                                            sizes[channel], tau_j)
        rows, starts = np.asarray(rows)[:step.count], np.asarray(starts)[:step.count]
        if not rising:
          rows = _make_rising(rows)
        if profile is not None:
          profile.cdf += clock() - tick
        tick = clock()
        indexes = code(number, channel, rows, starts)
        if profile is not None:
          profile.coder += clock() - tick
          profile.coder_calls += 1
          profile.symbols += step.count
        values = (indexes.astype(np.int32) + q_low[channel]) * b
      pixel[:step.count, channel] = values
      buffer[step.cell_index, channel] = values
      r_hat[step.image_index, channel] = values
    if profile is not None:
      profile.steps += 1
  return r_hat


# --- Side information. ---

def _varints(values) -> bytes:
  out = bytearray()
  for value in values:
    value = int(value)
    while True:
      byte = value & 0x7F
      value >>= 7
      out.append(byte | (0x80 if value else 0))
      if not value:
        break
  return bytes(out)


_MAX_VARINT_BYTES = 5


def _read_varints(data: bytes) -> list[int]:
  """Every varint of `data`, which must end with a complete one (FormatError)."""
  values, value, shift, used = [], 0, 0, 0
  for byte in data:
    value |= (byte & 0x7F) << shift
    shift += 7
    used += 1
    if used > _MAX_VARINT_BYTES:
      raise FormatError("invalid residual side information: malformed number")
    if byte < 0x80:
      values.append(value)
      value, shift, used = 0, 0, 0
  if used:
    raise FormatError("invalid residual side information: truncated number")
  return values


def _zigzag(v: int) -> int:
  return 2 * v if v >= 0 else -2 * v - 1


def _unzigzag(v: int) -> int:
  return v >> 1 if v % 2 == 0 else -((v + 1) >> 1)


_SIDE_FIELDS = 3  # per channel: min, range, window


def parse_side_info(side: bytes, plan: StepPlan, tau: int, streams_size: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], np.ndarray]:
  """(q_low, q_high, windows, stream lengths, escaped values), checked (FormatError)."""
  values = _read_varints(side)
  if len(values) < _SIDE_FIELDS * CHANNELS:
    raise FormatError("invalid residual side information: symbol ranges missing")
  fields = np.asarray(values[:_SIDE_FIELDS * CHANNELS], object).reshape(CHANNELS, _SIDE_FIELDS)
  q_low = np.asarray([_unzigzag(int(v)) for v in fields[:, 0]], np.int64)
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
  expected = len(plan.steps) * int(np.sum(counts > 1))
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


def encode(exported, coder: EntropyCoder, x: np.ndarray, x_base: np.ndarray,
           u_padded: jax.Array, tau: int, profile: Profile | None = None,
           windows: np.ndarray | None = None) -> ResidualLayer:
  """Codes x - x_base within tau. x, x_base uint8 [H, W, 3]; u_padded [1, Hp, Wp, C].

  windows: CDF window per channel (values of WINDOWS); by default from
  the model's one-shot pass (module doc).
  """
  check_inputs(exported, x_base, u_padded)
  height, width = x_base.shape[:2]
  analysis = analyze(exported, x, x_base, u_padded, tau)
  r_hat = analysis.r_hat
  q = (r_hat // (2 * tau + 1)).reshape(-1, CHANNELS)
  q_low, q_high = analysis.q_low, analysis.q_high
  counts = q_high.astype(np.int64) - q_low + 1
  if windows is None:
    windows = analysis.windows
  windows = np.where(counts > 1, np.asarray(windows, np.int64), 0)
  for count, window in zip(counts, windows):
    if count > 1 and (window not in WINDOWS or window > window_size(int(count))):
      raise ValueError(f"window {window} must be one of {WINDOWS}, at most "
                       f"{window_size(int(count))} for {count} values")
  plan = _plan(exported, height, width)
  streams: list[bytes] = []
  escapes: list[np.ndarray] = []

  def code(number, channel, rows, starts):
    values = q[plan.steps[number].image_index, channel] - q_low[channel]
    stream, escaped = coder.encode_with_cdfs(values, rows, starts, PRECISION, validate=False)
    streams.append(stream)
    escapes.append(escaped)
    return values

  u_flat = u_padded.reshape(-1, u_padded.shape[-1])
  decoded = _code_steps(exported, plan, u_flat, tau, q_low, q_high, windows, code, profile)
  if not np.array_equal(decoded, r_hat.reshape(-1, CHANNELS)):  # the loop's own bookkeeping
    raise AssertionError("residual encoder lost symbols")
  lengths = tuple(len(s) for s in streams)
  side = _varints([v for c in range(CHANNELS)
                   for v in (_zigzag(int(q_low[c])), int(counts[c] - 1),
                             int(windows[c]) // WINDOW_STEP)] + list(lengths))
  escaped = np.concatenate([np.zeros(0, np.int64)] + escapes)
  side += _varints(escaped)
  return ResidualLayer(side, b"".join(streams), r_hat, q_low, q_high, windows, lengths,
                       int(escaped.size), analysis.bits)


def decode(exported, coder: EntropyCoder, side: bytes, streams: bytes, x_base: np.ndarray,
           u_padded: jax.Array, tau: int, profile: Profile | None = None
           ) -> tuple[np.ndarray, ResidualLayer]:
  """(x_hat uint8 [H, W, 3], the layer's integers) from the residual sections."""
  check_inputs(exported, x_base, u_padded)
  height, width = x_base.shape[:2]
  plan = _plan(exported, height, width)
  q_low, q_high, windows, lengths, escaped = parse_side_info(side, plan, tau, len(streams))
  counts = q_high.astype(np.int64) - q_low + 1
  starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  next_stream = iter(range(len(lengths)))
  used = 0

  def take_escapes(n):
    nonlocal used
    if used + n > len(escaped):
      raise CodingError("residual streams need more escaped values than the file holds; "
                        "file is corrupt")
    used += n
    return escaped[used - n:used]

  def code(number, channel, rows, window_starts):
    k = next(next_stream)
    values = coder.decode_with_cdfs(streams[starts[k]:starts[k + 1]], rows, window_starts,
                                    PRECISION, take_escapes, validate=False)
    if values.size and (values.min() < 0 or values.max() >= counts[channel]):
      raise CodingError(f"residual stream {k} decodes to values outside the symbol range; "
                        "file is corrupt")
    return values

  u_flat = u_padded.reshape(-1, u_padded.shape[-1])
  r_hat = _code_steps(exported, plan, u_flat, tau, q_low, q_high, windows, code, profile)
  if used != len(escaped):
    raise FormatError(f"invalid residual side information: {len(escaped) - used} escaped "
                      "values left over")
  r_hat = r_hat.reshape(height, width, CHANNELS)
  x_hat = np.clip(x_base.astype(np.int32) + r_hat, 0, 255).astype(np.uint8)
  return x_hat, ResidualLayer(side, streams, r_hat, q_low, q_high, windows, tuple(lengths),
                              used)


# --- One pass of the model over the whole image: estimated bits and windows. ---

def _patches(image: jax.Array) -> jax.Array:
  """[Hp, Wp, C] -> [patches, 64, 64, C] in row-major patch order."""
  hp, wp, c = image.shape
  tiles = image.reshape(hp // PATCH, PATCH, wp // PATCH, PATCH, c)
  return tiles.transpose(0, 2, 1, 3, 4).reshape(-1, PATCH, PATCH, c)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_shot(residual: ResidualModel, corrected: bool, params, u_padded, r_hat_padded, valid,
              tau, tau_head, low, high):
  """(bits per channel [3], mixture mass outside each window of WINDOWS [windows, 3]).

  The windows are placed as `_channel_cdf` places them (around the rounded
  mixture mean), ignoring the range ends (which only move them inwards).
  """
  u = _patches(u_padded[0])
  r = _patches(r_hat_padded)
  inside = _patches(valid[..., None])[..., 0]
  taus = jnp.full((r.shape[0],), tau_head, jnp.int32)
  mixture = residual.apply({"params": params}, u, r, taus, corrected)
  means = lm.conditional_means(mixture, r)
  logp = lm.log_prob(r, mixture, means, tau.astype(jnp.float32) + 0.5, low, high)
  bits = -jnp.sum(jnp.where(inside[..., None], logp, 0.0), axis=(0, 1, 2)) / jnp.log(2.0)
  b = (2 * tau + 1).astype(jnp.float32)
  centre = jnp.round(jnp.sum(jax.nn.softmax(mixture["logits"], axis=-1) * means, axis=-1) / b)
  outside = []
  for window in WINDOWS:
    lower = (centre - window // 2) * b - tau.astype(jnp.float32) - 0.5
    edges = jnp.stack([lower, lower + window * b], axis=-1)  # [..., 3, 2]
    cdf = lm.mixture_cdf(edges, mixture["logits"], means, mixture["log_scales"])
    mass = jnp.nan_to_num(cdf[..., 0] + 1.0 - cdf[..., 1], nan=1.0)
    outside.append(jnp.sum(jnp.where(inside[..., None], mass, 0.0), axis=(0, 1, 2)))
  return bits, jnp.stack(outside)


@dataclasses.dataclass(frozen=True)
class Analysis:
  r_hat: np.ndarray  # int32 [H, W, 3]
  q_low: np.ndarray  # int32 [3]
  q_high: np.ndarray  # int32 [3]
  bits: np.ndarray  # float64 [3]: the model's estimate (estimate_bits)
  windows: np.ndarray  # int64 [3]: the encoder's CDF windows (0: channel not coded)


def analyze(exported, x: np.ndarray, x_base: np.ndarray, u_padded: jax.Array,
            tau: int) -> Analysis:
  """r_hat, its range, the model's estimated bits and the CDF windows for an image."""
  check_inputs(exported, x_base, u_padded)
  height, width = x_base.shape[:2]
  hp, wp = u_padded.shape[1:3]
  b = 2 * tau + 1
  r_hat = quantize(x.astype(np.int32) - x_base.astype(np.int32), tau)
  flat = r_hat.reshape(-1, CHANNELS)
  low, high = flat.min(axis=0), flat.max(axis=0)
  padded = np.zeros((hp, wp, CHANNELS), np.float32)
  padded[:height, :width] = r_hat
  valid = np.zeros((hp, wp), bool)
  valid[:height, :width] = True
  corrected, tau_h = head_tau(exported.residual_model, tau)
  bits, outside = _one_shot(exported.residual_model, corrected, exported.residual_params,
                            u_padded, jnp.asarray(padded), jnp.asarray(valid), jnp.int32(tau),
                            jnp.int32(tau_h), jnp.asarray(low, jnp.float32),
                            jnp.asarray(high, jnp.float32))
  bits, outside = np.asarray(bits, np.float64), np.asarray(outside, np.float64)
  counts = (high - low) // b + 1
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
  return Analysis(r_hat, (low // b).astype(np.int32), (high // b).astype(np.int32), bits,
                  windows)


def estimate_bits(exported, x: np.ndarray, x_base: np.ndarray, u_padded: jax.Array,
                  tau: int) -> np.ndarray:
  """The model's bits for the residual layer, per channel [3] (float).

  -log2 of the float mixture likelihoods of r_hat with the coder's contexts:
  quantised residuals, zero outside each patch and outside the image, the
  same head and tau conditioning, and the same adaptive range (its end bins
  take the tails). One full-image pass (not step-wise), so it differs from
  the coder's float numbers by rounding only. Excludes side information, the
  windows' escapes and the coder's integer-CDF and per-stream overheads.
  """
  return analyze(exported, x, x_base, u_padded, tau).bits
