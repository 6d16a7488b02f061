"""Where and in which order the residual layer codes its values.

Parallel decoding (DLPR): the image, padded to a multiple of 64, is split into
64x64 patches coded independently: the context outside a patch is zero, and
pixels outside the image are not coded and read as zero. Pixel (i, j) of every
patch is decoded at step a*i + j (a = config.model.residual.order; the masked
convolution only has taps at offsets with a*di + dj < 0, which are decoded at
earlier steps). The decoded r_hat lives on the device in a buffer of
per-patch cells with zero borders. Per step:

  1. `residual_cdfs.step_mixture` (one jitted call): gathers the masked-conv taps of that step's
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
  3. `residual_cdfs.scatter` writes the step's values into the buffer.

The value alphabet per channel and its windows (which sizes exist, two
levels from TWO_LEVEL_WINDOW) are fixed here too: they decide how many coder
calls a step makes (gvae_jax.coding.residual_cdfs builds their rows).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

PATCH = 64
CHANNELS = 3
# Windows and step batches come in fixed sizes, the same for every image, so
# the jitted functions compile once per size and are reused across images.
WINDOWS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # 512 covers any range
WINDOW_STEP = 16  # the side information stores W / 16
TWO_LEVEL_WINDOW = 96  # windows of at least this many values are coded in two levels
# Few sizes (each costs compiles of a few functions), dense enough near the
# top that the bulk of a large image's steps waste little: a 768x512 image
# (96 patches, up to 3072 pixels a step) uses 5 of them.
_BUCKET_LADDER = (8, 32, 128, 512, 1024, 2048, 3072, 4096)
_BUCKET_STEP = 2048  # above the ladder


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


def bucket_size(count: int, ladder: tuple[int, ...] | None = None) -> int:
  """The padded batch of a step with `count` pixels: a value of the ladder
  (_BUCKET_LADDER by default), then multiples of _BUCKET_STEP."""
  for size in _BUCKET_LADDER if ladder is None else ladder:
    if size >= count:
      return size
  return -(-count // _BUCKET_STEP) * _BUCKET_STEP


# The exact head's batches (gvae_jax.coding.residual_codec): its integers do not
# depend on the batch, so a finer ladder costs only compiles; it pads a 768x512
# image's steps to 421376 rows instead of 444928 (5 % less work), in 8 sizes, not 5.
# The float path keeps the ladder above, so its compiled shapes stay as they were.
_EXACT_BUCKET_LADDER = (8, 32, 128, 256, 512, 1024, 1536, 2048, 2560, 3072, 4096)


def exact_bucket_size(count: int) -> int:
  """`bucket_size` of the exact head's batches."""
  return bucket_size(count, _EXACT_BUCKET_LADDER)



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

    What `residual_cdfs.step_mixture` gathers (it builds these on the device); made per step,
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

