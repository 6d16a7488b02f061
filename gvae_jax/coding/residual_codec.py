"""The residual layer of near-lossless (tau >= 1) and lossless (tau = 0) files.


Given the base layer (the lossy codec's decoded image x_base, uint8, and the
prior features u from the same jitted synthesis call, see
gvae_jax.coding.codec), the residual r = x - x_base is quantised for the
error bound tau (docs/decoding.md section 3):

  r_hat = sign(r) * b * floor((|r| + tau) / b),  b = 2 tau + 1,  |r - r_hat| <= tau
  q = r_hat / b  (the coded integers)

and the decoder returns clip(x_base + r_hat, 0, 255), which is within tau of x
(clipping only moves towards the true value, which is in [0, 255]).

The layer is coded step by step (gvae_jax.coding.residual_plan: 64x64
patches decoded in parallel, a pixel's step from its position), each step's
integer CDF rows built in JAX (gvae_jax.coding.residual_cdfs: windows around
the mixture mean, escapes, two levels), its values range-coded through one
coder session, and the side information laid out by
gvae_jax.coding.residual_layout. This module runs that loop, the same for
the encoder and the decoder.

Coder calls: one per (step, channel) with at least one coded pixel and a
range wider than one value, and a second one (the fine symbols of the pixels
that did not escape) right after it if the channel's window has two levels;
in step order, R G B within a step. They go through one coder session
(gvae_jax.coding.coder): the TFC backend writes one stream per call, the
constriction backend one stream for the whole layer.

Determinism (docs/decoding.md section 5): the encoder runs the decoder's loop
(`_code_steps`: same jitted functions, same shapes, same order, the same
inputs); only the coder call differs. The encoder's first pass computes each
step's mixture with the decoder's `step_mixture` on a buffer that already holds
every value: a step reads only cells of earlier steps (the causal mask) or
cells that are never written, so these are the numbers the decoder's buffer
holds at that step, and the mixtures are the decoder's, bit for bit; the
second pass reuses them (or, for very large images, recomputes them the same
way). The batch of a step is padded to one of a few bucket sizes (dummy rows
read a cell that is always zero and are never coded): batch sizes and
windows come from fixed ladders shared by all images (WINDOWS, bucket_size),
so each function compiles once per size in use, not per step or image.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.coding.coder import CodingError, EntropyCoder
from gvae_jax.coding.container import FormatError
from gvae_jax.coding.residual_cdfs import (PRECISION, choose_windows, coarse_cdf, context_taps,
                                           fine_cdf, head_tau, make_rising, scatter, step_mixture,
                                           step_stats)
from gvae_jax.coding.residual_layout import parse_side_info, write_side_info
from gvae_jax.coding.residual_plan import (CHANNELS, PATCH, WINDOWS, StepPlan,
                                           exact_bucket_size, group_size, plan_steps, quantize,
                                           window_size)
from gvae_jax.entropy import exact_mixture as em
from gvae_jax.entropy import logistic_mixture as lm
from gvae_jax.models.residual import ResidualModel

# The encoder keeps the first pass's mixtures for the second up to this size
# (a 768x512 image takes ~130 MB); beyond it, it computes them again.
_KEEP_MIXTURES_BYTES = 768 << 20


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

  by_counts: bool  # rows come as counts (coder.MODELS_BY_COUNTS; the exact loop makes them)

  def coarse(self, number: int, channel: int, rows: np.ndarray, starts: np.ndarray,
             group: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(coarse symbols [count] (-1: escaped), the escaped values in order) of a
    (step, channel): the encoder codes its values, the decoder decodes them."""

  def fine(self, number: int, channel: int, rows: np.ndarray, starts: np.ndarray,
           groups: np.ndarray, group: int) -> np.ndarray:
    """Fine symbols [m] of the pixels that did not escape (rows [m, group + 2])."""


class _Timing:
  """Fills a Profile: `run(part, fn, *args)` calls fn, waits for its JAX result
  and adds the seconds to profile.<part>; `count(field, n)` adds n."""

  def __init__(self, profile: Profile):
    self.profile = profile

  def run(self, part: str, fn, *args):
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    setattr(self.profile, part, getattr(self.profile, part) + time.perf_counter() - start)
    return result

  def count(self, field: str, n: int = 1) -> None:
    setattr(self.profile, field, getattr(self.profile, field) + n)


class _NoTiming:
  """Without a profile: calls only, nothing waited for or counted."""

  @staticmethod
  def run(part, fn, *args):
    return fn(*args)

  @staticmethod
  def count(field, n=1):
    pass


def _timing(profile: Profile | None):
  return _NoTiming if profile is None else _Timing(profile)


def _host_rows(rows, n: int, rising, inside=None) -> np.ndarray:
  """The first n CDF rows on the host (those of `inside` only), made rising."""
  rows = np.asarray(rows)[:n]
  if inside is not None:
    rows = rows[inside]
  return rows if rising else make_rising(rows)


def _code_channel(coding: _Coding, timing, number: int, channel: int, n: int, window: int,
                  count: int, coarse_rows, fine_rows) -> np.ndarray:
  """The value indexes [n] of one (step, channel): its coarse rows and symbols, then
  with two levels the fine ones. coarse_rows() -> (host rows [n], window starts [n]);
  fine_rows(groups, inside) -> host rows of the pixels `inside` their window."""
  group = group_size(window)
  rows, starts = coarse_rows()
  symbols, escaped = timing.run("coder", coding.coarse, number, channel, rows, starts, group,
                                window)
  timing.count("coder_calls")
  timing.count("symbols", n)
  inside = symbols >= 0
  indexes = starts + group * symbols
  if group > 1:
    rows = fine_rows(np.where(inside, symbols, 0), inside)
    fine = timing.run("coder", coding.fine, number, channel, rows, starts[inside],
                      symbols[inside], group)
    timing.count("coder_calls")
    indexes[inside] += fine
  indexes[~inside] = escaped
  if np.any(indexes < 0) or np.any(indexes >= count):
    raise CodingError(f"residual stream of step {number}, channel {channel} decodes to "
                      "values outside the symbol range; file is corrupt")
  return indexes


def _code_steps(exported, plan: StepPlan, u_flat: jax.Array, tau: int, q_low: np.ndarray,
                q_high: np.ndarray, windows: np.ndarray, coding: _Coding,
                profile: Profile | None = None, mixtures=None) -> np.ndarray:
  """Runs every step; returns the decoded r_hat [H * W, 3] (int32).

  mixtures(number) -> the step's `step_mixture` output (the encoder's, from its
  first pass); None: computed here from the decoded values (the decoder).
  """
  b = 2 * tau + 1
  counts = (q_high.astype(np.int64) - q_low + 1)
  r_hat = np.zeros((plan.height * plan.width, CHANNELS), np.int32)
  if not np.any(counts > 1):  # every value is known from the side information
    r_hat[:] = np.asarray(q_low, np.int32) * b
    return r_hat
  if getattr(exported, "exact", None) is not None:
    return _code_steps_exact(exported, plan, u_flat, tau, q_low, counts, windows, coding,
                             profile, mixtures)
  residual = exported.residual_model
  taps = context_taps(exported)
  corrected, tau_h = head_tau(residual, tau)
  tau_j, tau_head_j = jnp.int32(tau), jnp.int32(tau_h)
  lows = [jnp.int32(v) for v in q_low]
  sizes = [jnp.int32(v) for v in counts]
  channel_ids = [jnp.int32(c) for c in range(CHANNELS)]
  tap_shift = jnp.asarray(plan.tap_shift, jnp.int32)
  buffer = jnp.zeros((plan.cells, CHANNELS), jnp.float32) if mixtures is None else None
  network = functools.partial(step_mixture, residual, corrected, exported.residual_params,
                              taps.weights, taps.bias, tap_shift)
  timing = _timing(profile)
  for number, (step, (cells, count, u_index)) in enumerate(zip(plan.steps, plan.device_steps)):
    if mixtures is None:
      mixture = timing.run("network", network, buffer, cells, count, u_flat, u_index,
                           tau_head_j)
    else:
      mixture = timing.run("network", mixtures, number)
    n = step.count
    pixel = np.zeros((step.bucket, CHANNELS), np.float32)  # this step's r_hat so far
    for channel in range(CHANNELS):
      if counts[channel] == 1:  # a single possible value: nothing to code
        pixel[:n, channel] = q_low[channel] * b
        continue
      window = int(windows[channel])
      group = group_size(window)
      args = (mixture, pixel.copy(), channel_ids[channel], lows[channel], sizes[channel], tau_j)
      starts_j = None

      def coarse_rows():
        nonlocal starts_j
        rows, starts_j, rising = timing.run("cdf", coarse_cdf, window, group, *args)
        return timing.run("cdf", _host_rows, rows, n, rising), np.asarray(starts_j)[:n]

      def fine_rows(groups, inside):
        padded = np.zeros(step.bucket, np.int32)
        padded[:n] = groups
        rows, rising = timing.run("cdf", fine_cdf, window, group, *args, starts_j, padded)
        return timing.run("cdf", _host_rows, rows, n, rising, inside)

      indexes = _code_channel(coding, timing, number, channel, n, window, int(counts[channel]),
                              coarse_rows, fine_rows)
      pixel[:n, channel] = (indexes + q_low[channel]) * b
    r_hat[step.image_index] = pixel[:n]
    if buffer is not None:
      buffer = timing.run("context", scatter, buffer, cells, pixel)
    timing.count("steps")
  return r_hat


def _take_rows(buffer: np.ndarray, index: np.ndarray) -> np.ndarray:
  """buffer[index] (buffer [cells, C], index [N, T]) as [N, T * C]: each row taken as
  one C-item record (NumPy gathers records two to three times faster than rows)."""
  record = np.dtype((np.void, buffer.dtype.itemsize * buffer.shape[1]))
  taken = np.ascontiguousarray(buffer).view(record).reshape(-1)[index]
  return taken.view(buffer.dtype).reshape(index.shape[0], -1)


def _exact_network(exported, plan: StepPlan, u_host: np.ndarray, tau: int):
  """mixture(step, buffer) of the exact head (gvae_jax.coding.exact_head) at a step's
  pixels, from the decoded values in `buffer` (int32 [cells, 3]): int64
  [5, 3, bucket, K] on the CPU device (bucket: residual_plan.exact_bucket_size), the
  padding rows copies of the first pixel's."""
  exact = exported.exact
  corrected, tau_h = head_tau(exported.residual_model, tau)
  constants = exact.constants(tau_h, corrected)
  u_device = em.on_cpu(u_host)  # copied in once; each step takes its rows in its call

  def mixture(step, buffer):
    bucket = exact_bucket_size(step.count)
    rows = np.concatenate([np.arange(step.count), np.zeros(bucket - step.count, np.int64)])
    cells = step.cell_index[rows]
    context = _take_rows(buffer, cells[:, None] + plan.tap_shift[None, :])  # [bucket, taps * 3]
    # The result stays on the device: only the rows' calls read it, several times each.
    return exact.mixture_xla(context, u_device, tau_h, corrected, constants, to_host=False,
                             u_rows=step.u_index[rows])

  return mixture


def _code_steps_exact(exported, plan: StepPlan, u_flat, tau: int, q_low: np.ndarray,
                      counts: np.ndarray, windows: np.ndarray, coding: _Coding,
                      profile: Profile | None, mixtures) -> np.ndarray:
  """`_code_steps` with the exact head: the same steps, windows, rows and coder
  calls, every number from exact integer arithmetic (gvae_jax.entropy.exact_mixture;
  the rows by its XLA-compiled int64 form, on batches padded to exact_bucket_size
  with copies of the first pixel, so each size compiles once)."""
  sigmoid = em.on_cpu(exported.exact.tables["sigmoid"])
  b = 2 * tau + 1
  r_hat = np.zeros((plan.height * plan.width, CHANNELS), np.int32)
  buffer = np.zeros((plan.cells, CHANNELS), np.int32) if mixtures is None else None
  network = _exact_network(exported, plan, np.asarray(u_flat), tau)
  timing = _timing(profile)
  with em.enable_x64():  # once around the loop's thousands of calls (its doc)
    for number, step in enumerate(plan.steps):
      mixture = timing.run("network", network, step, buffer) if mixtures is None else (
          timing.run("network", mixtures, number))
      n = step.count
      bucket = exact_bucket_size(n)
      pixel = np.zeros((bucket, CHANNELS), np.int64)
      for channel in range(CHANNELS):
        if counts[channel] == 1:
          pixel[:, channel] = q_low[channel] * b
          continue
        window = int(windows[channel])
        group = group_size(window)
        args = (mixture, pixel, channel, int(q_low[channel]), int(counts[channel]), tau)
        starts = None

        def coarse_rows():
          nonlocal starts
          rows, starts = timing.run("cdf", em.coarse_rows_xla, window, group, *args, sigmoid,
                                  coding.by_counts)
          return rows[:n], starts[:n]

        def fine_rows(groups, inside):
          padded = np.zeros(bucket, np.int64)
          padded[:n] = groups
          rows = timing.run("cdf", em.fine_rows_xla, window, group, *args, starts, padded, sigmoid,
                            coding.by_counts)
          return rows[:n][inside]

        indexes = _code_channel(coding, timing, number, channel, n, window, int(counts[channel]),
                                coarse_rows, fine_rows)
        pixel[:n, channel] = (indexes + q_low[channel]) * b
      r_hat[step.image_index] = pixel[:n]
      if buffer is not None:
        buffer[step.cell_index] = pixel[:n]
      timing.count("steps")
  return r_hat


def _first_pass(exported, plan: StepPlan, u_flat: jax.Array, tau: int, r_hat: np.ndarray,
                profile: Profile | None = None):
  """(bits [3], mass outside each window [windows, 3], mixtures(number)) of the
  encoder: every step's mixture with the decoder's `step_mixture` (module doc)."""
  if getattr(exported, "exact", None) is not None:
    return _first_pass_exact(exported, plan, u_flat, tau, r_hat, profile)
  residual = exported.residual_model
  taps = context_taps(exported)
  corrected, tau_h = head_tau(residual, tau)
  flat = r_hat.reshape(-1, CHANNELS)
  buffer = np.zeros((plan.cells, CHANNELS), np.float32)
  buffer[plan.pixel_cells] = flat
  buffer = jnp.asarray(buffer)
  tap_shift = jnp.asarray(plan.tap_shift, jnp.int32)
  tau_j, tau_head_j = jnp.int32(tau), jnp.int32(tau_h)
  low, high = jnp.asarray(flat.min(axis=0), jnp.float32), jnp.asarray(flat.max(axis=0),
                                                                     jnp.float32)
  network = functools.partial(step_mixture, residual, corrected, exported.residual_params,
                              taps.weights, taps.bias, tap_shift, buffer)
  size = sum(step.bucket for step in plan.steps) * 5 * CHANNELS * residual.components * 4
  keep = size <= _KEEP_MIXTURES_BYTES
  kept, stats = [], []
  timing = _timing(profile)
  for step, (cells, count, u_index) in zip(plan.steps, plan.device_steps):
    mixture = timing.run("network", network, cells, count, u_flat, u_index, tau_head_j)
    if keep:
      kept.append(mixture)
    pixel = np.zeros((step.bucket, CHANNELS), np.float32)
    pixel[:step.count] = flat[step.image_index]
    stats.append(timing.run("stats", step_stats, mixture, pixel, count, tau_j, low, high))

  def mixtures(number):
    if keep:
      return kept[number]
    cells, count, u_index = plan.device_steps[number]
    return network(cells, count, u_flat, u_index, tau_head_j)

  bits = np.sum([np.asarray(b, np.float64) for b, _ in stats], axis=0)
  outside = np.sum([np.asarray(o, np.float64) for _, o in stats], axis=0)
  return bits, outside, mixtures



def _first_pass_exact(exported, plan: StepPlan, u_flat, tau: int, r_hat: np.ndarray,
                      profile: Profile | None = None):
  """`_first_pass` of the exact head: its mixtures from the full buffer (the decoder's,
  as in the module doc), their bits and escapes from the float form of the same
  mixtures (they only choose the windows, which the file states)."""
  flat = r_hat.reshape(-1, CHANNELS)
  buffer = np.zeros((plan.cells, CHANNELS), np.int32)
  buffer[plan.pixel_cells] = flat
  network = _exact_network(exported, plan, np.asarray(u_flat), tau)
  tau_j = jnp.int32(tau)
  low, high = (jnp.asarray(v, jnp.float32) for v in (flat.min(axis=0), flat.max(axis=0)))
  size = (sum(exact_bucket_size(step.count) for step in plan.steps) * 5 * CHANNELS
          * exported.residual_model.components * 8)
  keep = size <= _KEEP_MIXTURES_BYTES
  kept, stats = [], []
  timing = _timing(profile)
  for step, (_, count, _) in zip(plan.steps, plan.device_steps):
    mixture = timing.run("network", network, step, buffer)
    if keep:
      kept.append(mixture)
    pixel = np.zeros((exact_bucket_size(step.count), CHANNELS), np.float32)
    pixel[:step.count] = flat[step.image_index]
    stats.append(timing.run("stats", step_stats, em.as_float(np.asarray(mixture)), pixel, count,
                            tau_j, low, high))

  def mixtures(number):
    return kept[number] if keep else network(plan.steps[number], buffer)

  bits = np.sum([np.asarray(b, np.float64) for b, _ in stats], axis=0)
  outside = np.sum([np.asarray(o, np.float64) for _, o in stats], axis=0)
  return bits, outside, mixtures


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
  return plan_steps(height, width, int(exported.residual_model.order), context_taps(exported).offsets)


def _by_counts(exported, coder: EntropyCoder) -> bool:
  """Whether the loop hands the coder counts (the exact loop's rows can come as either)."""
  return getattr(exported, "exact", None) is not None and coder.MODELS_BY_COUNTS


class _Encoding:
  """`_code_steps`' coder calls of the encoder: codes the known values."""

  def __init__(self, coder: EntropyCoder, plan: StepPlan, values: np.ndarray,
               by_counts: bool = False):
    self.plan, self.values = plan, values  # values: q - min q [H * W, 3]
    self.session = coder.cdf_encoder()
    self.by_counts = by_counts
    self._encode = self.session.encode_counts if by_counts else self.session.encode
    self.escapes: list[np.ndarray] = []
    self._inside = np.zeros(0, np.int64)

  def coarse(self, number, channel, rows, starts, group, window):
    values = self.values[self.plan.steps[number].image_index, channel]
    relative = values - starts
    inside = (relative >= 0) & (relative < window)
    symbols = np.where(inside, relative // group, -1)  # -1: not in the window, escaped
    self._encode(symbols, rows, np.zeros(len(rows), np.int64), PRECISION)
    self.escapes.append(values[~inside])
    self._inside = values[inside]
    return symbols, values[~inside]

  def fine(self, number, channel, rows, starts, groups, group):
    symbols = self._inside - starts - group * groups
    self._encode(symbols, rows, np.zeros(len(rows), np.int64), PRECISION)
    return symbols


class _Decoding:
  """`_code_steps`' coder calls of the decoder: decodes them from the streams."""

  def __init__(self, coder: EntropyCoder, streams: bytes, lengths: list[int],
               escaped: np.ndarray, by_counts: bool = False):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    self.session = coder.cdf_decoder([streams[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
    self.by_counts = by_counts
    self._decode = self.session.decode_counts if by_counts else self.session.decode
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

    symbols = self._decode(rows, np.zeros(len(rows), np.int64), PRECISION, take)
    escaped = np.concatenate(taken) if taken else np.zeros(0, np.int64)
    return symbols.astype(np.int64), escaped

  def fine(self, number, channel, rows, starts, groups, group):
    def refuse(n):
      raise CodingError("a residual stream escapes where it cannot; file is corrupt")

    symbols = self._decode(rows, np.zeros(len(rows), np.int64), PRECISION, refuse)
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
  coding = _Encoding(coder, plan, flat // b - q_low.astype(np.int64), _by_counts(exported, coder))
  decoded = _code_steps(exported, plan, u_flat, tau, q_low, q_high, windows, coding, profile,
                        mixtures)
  if not np.array_equal(decoded, flat):  # the loop's own bookkeeping
    raise AssertionError("residual encoder lost symbols")
  streams = coding.session.finish()
  lengths = tuple(len(s) for s in streams)
  escaped = np.concatenate([np.zeros(0, np.int64)] + coding.escapes)
  side = write_side_info(q_low, counts, windows, lengths, escaped)
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
  coding = _Decoding(coder, streams, lengths, escaped, _by_counts(exported, coder))
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

# Patches per call of the one-pass estimate: the patches are independent, so
# chunks bound its activations (160 features a pixel for the flat head) to a
# fixed size whatever the image; one compiled shape for every image.
ESTIMATE_CHUNK_PATCHES = 64


def _patches(image: np.ndarray) -> np.ndarray:
  """[Hp, Wp, C] -> [patches, 64, 64, C] in row-major patch order."""
  hp, wp, c = image.shape
  tiles = image.reshape(hp // PATCH, PATCH, wp // PATCH, PATCH, c)
  return tiles.transpose(0, 2, 1, 3, 4).reshape(-1, PATCH, PATCH, c)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk_bits(residual: ResidualModel, corrected: bool, params, u, r, inside, tau, tau_head,
                low, high):
  """The model's bits per channel [3] of a chunk of patches, with the coder's contexts."""
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
  take the tails). One pass over the patches (not step-wise; in chunks of
  ESTIMATE_CHUNK_PATCHES), so it differs from the coder's float numbers (and
  from the encoder's `estimated_bits`, which come from its step-wise first
  pass) by rounding only. Excludes side information, the windows' escapes
  and the coder's integer-CDF and per-stream overheads.
  """
  check_inputs(exported, x_base, u_padded)
  height, width = x_base.shape[:2]
  hp, wp = u_padded.shape[1:3]
  r_hat = quantize(x.astype(np.int32) - x_base.astype(np.int32), tau)
  flat = r_hat.reshape(-1, CHANNELS)
  padded = np.zeros((hp, wp, CHANNELS), np.float32)
  padded[:height, :width] = r_hat
  valid = np.zeros((hp, wp, 1), bool)
  valid[:height, :width] = True
  u = _patches(np.asarray(u_padded[0]))
  r, inside = _patches(padded), _patches(valid)[..., 0]
  corrected, tau_h = head_tau(exported.residual_model, tau)
  low = jnp.asarray(flat.min(axis=0), jnp.float32)
  high = jnp.asarray(flat.max(axis=0), jnp.float32)
  chunk = ESTIMATE_CHUNK_PATCHES
  bits = np.zeros(CHANNELS, np.float64)
  for start in range(0, len(r), chunk):
    parts = [u[start:start + chunk], r[start:start + chunk], inside[start:start + chunk]]
    missing = chunk - len(parts[1])  # the last chunk: padded with patches outside the image
    if missing:
      parts = [np.concatenate([p, np.zeros((missing,) + p.shape[1:], p.dtype)]) for p in parts]
    bits += np.asarray(_chunk_bits(exported.residual_model, corrected,
                                   exported.residual_params, *map(jnp.asarray, parts),
                                   jnp.int32(tau), jnp.int32(tau_h), low, high), np.float64)
  return bits
