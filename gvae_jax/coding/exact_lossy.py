"""The lossy layer's decoder networks in exact integer arithmetic: lossy files that
decode to the same pixels on every platform.

`convert` turns a gained hyperprior's decoder side (the inverse hyper gain,
the hyper synthesis h_s, the inverse gain and the synthesis g_s) into an
ExactLossy; `hyper` gives the means and y table rows from z symbols and
`synthesize` the uint8 image from y symbols, both as integers that do not
depend on the CPU, the vector width, the summation order or the library
build. Encoder and decoder of an exact lossy file call these same functions
(gvae_jax.coding.codec), so only integers decide the decoded bits and pixels.

Arithmetic (activations in 2^-16 fixed point, exact_mixture.ACT_BITS, clipped
to +-2^27, i.e. +-2048.0). exact_lossy.npz version 3 (written today):

  synthesis     the first convolution (latent resolution, the most sensitive
  convolution   to weight precision) as the hyper convolutions below; the
                others int8 weights (per output channel: largest |w| -> 127) on
  convolution   16-bit inputs: x in 2^-b units (b per layer, from a
                calibration: the range is 4x the largest input the float64
                synthesis of a generated image's latents reaches at the
                lowest and highest rate), clipped to +-32639 and split into
                two signed 8-bit digits x = 256 hi + lo; one int8 convolution
                of both digits with int32 sums (|sum| < 128 sum|w| < 2^31,
                exact in any order), recombined in int64, times the
                channel's 24-bit scale multiplier, plus the bias, shifted
  inverse GDN   y_i = x_i sqrt(beta_i + sum_j gamma_ij x_j^2): q = x in 2^-b'
  (synthesis)   units, 16-bit; q^2 rounded to 2^8 units (< 2^22) as two
                11-bit digits, each times G (gamma as integers, column sums
                below 2^13) in a float32 matmul: integers whose every partial
                sum is below 2^24, exact in any order, FMA or kernel; the
                norm in int64 times a 16-bit multiplier, then the integer
                square root (float64 sqrt of an integer below 2^53, one
                +-1 correction in integers: the exact floor whatever the
                sqrt's rounding), times x, shifted
  hyper         float64 convolutions of integer values: W per output channel
  convolution   at the largest power-of-two scale that keeps the channel's
                sum of |W| times 2^27 below 2^53, so every partial sum of
                every product is an integer below 2^53, exact whatever the
                order, vector width, FMA use or kernel (exact_head's rule);
                then round(acc / 2^shift) (arithmetic shift, round half up)
  leaky ReLU    negative x: round(x * LEAK / 2^24), LEAK = round(0.01 * 2^24)
  gains         log2 of every gain row stored in 2^-24 units; a rate s = i + l
                interpolates them in integers (l rounded to 2^-16) and 2^x
                comes from a stored 1025-entry table, linearly interpolated:
                Python integers, identical everywhere
  scale -> row  the count of stored thresholds (log of the y table's index
                bounds in 2^-16 units) below the raw log-scale output: the
                same rule as codec.scale_to_row, on integers

Why int8 and float32 in the synthesis: it runs at 4x to 16x the latent
resolution, where float64 convolutions made exact decoding 2.5x slower than
float (XLA's int8 convolution with int32 sums and its float32 matmul are the
fast CPU kernels; both are exact for these bounds). The 16-bit activations
cost at most about 0.02 dB PSNR against the float synthesis; 8-bit ones cost
0.3 dB and were rejected (experiments/results/README.md, "Exact lossy
decoding"). The hyper synthesis runs at the latent resolution and keeps
float64, as does the synthesis' first convolution since version 3: with
int8 weights it alone cost up to 0.09 dB on the better trained `small_long`
model (kodim23 at s = 3), for under a tenth of the synthesis' work.

Version 2 (still read and decoded) had int8 weights in the first synthesis
convolution too. Version 1 (the first exact_lossy.npz, no `version` member) used the hyper
rule (float64) for the synthesis convolutions too and an inverse GDN with
q in 2^-10 units, q^2 in two 21-bit limbs and two float64 matmuls; it is
still read and decoded bit-exactly, so its files keep decoding with the
model directory that wrote them. `gvae convert-exact` on a version 1 model
converts its float parameters again (a new fingerprint).

The only float steps are in `convert`, and its output is stored
(`exact_lossy.npz` in the model directory, covered by the fingerprint), so a
reader never repeats them. The XLA path (float64, float32 and integers under
exact_mixture.enable_x64) and the NumPy path (`numpy_hyper`,
`numpy_synthesize`: im2col int64 matmuls and threshold counts, an
independent evaluation for tests) give the same integers.

Limits: the hyper synthesis' float64 convolutions run on the CPU (and would
on GPUs, whose float64 convolutions are not Winograd ones; untested here),
not on a TPU, whose float64 is emulated; the float32 matmul is asked for
Precision.HIGHEST (on TPUs and GPUs the default uses bfloat16 / TF32
passes, which would not be exact). The synthesis' prior head
(u of lossy-base residual files) converts as another Int8Conv
(`convert_prior`, stored in exact_residual.npz by
gvae_jax.coding.exact_residual) and runs in the same call as the base image
(`synthesize_with_prior`).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax import gain as gain_lib
from gvae_jax.coding.exact_head import ConversionError
from gvae_jax.entropy import exact_mixture as em

EXACT_LOSSY_FILE = "exact_lossy.npz"
ACT_BITS = em.ACT_BITS  # 16
_ACT_LIMIT_BITS = 27
ACT_LIMIT = 1 << _ACT_LIMIT_BITS
_SUM_BITS = 53
_MAX_SCALE_BITS = 40
LEAK_BITS = 24
LEAK = round(0.01 * (1 << LEAK_BITS))  # flax.linen.leaky_relu's default slope
# Inverse GDN (module doc).
_Q_DROP = 6  # x (2^-16) -> q (2^-10)
_Q_BITS = _ACT_LIMIT_BITS - _Q_DROP  # |q| <= 2^21
_LIMB = 21  # q^2 < 2^42 = two 21-bit limbs
_GAMMA_SUM_BITS = _SUM_BITS - _LIMB  # row sums of G below 2^32
_NORM_DROP = 13  # low bits of G b dropped so the norm stays below 2^61
_MAX_GAMMA_BITS = 40
# Gains.
GAIN_BITS = 24  # gains and log2 gains in 2^-24 units
_GAIN_LIMIT_BITS = 11  # gains below 2^11
_EXP2_TABLE_BITS = 10  # 2^(k / 1024), k = 0..1024, in 2^-30 units
_EXP2_BITS = 30
_FRAC_BITS = 16  # the rate's fractional part, rounded to 2^-16
_SYMBOL_LIMIT = 1 << 10  # |y symbol| and |z symbol| clipped here (garbage stays in bounds)
# Int8 synthesis (version 2).
WEIGHT_LIMIT = 127  # int8 weights in [-127, 127]
DIGIT_LIMIT = 127 * 256 + 127  # 16-bit activations: two signed 8-bit digits hi, lo
_MULTIPLIER_BITS = 24  # a channel's weight scale in [2^23, 2^24) times 2^-shift
_CALIBRATION_HEADROOM = 4  # the 16-bit range spans 4x the calibration image's largest input
_GDN_DROP = 8  # q^2 < 2^30 (2^-2 input_bits units) rounded to 2^8 of them: below 2^22,
_GDN_DIGIT_BITS = 11  # two 11-bit digits for the float32 matmul
_GDN_SUM_LIMIT = (1 << (24 - _GDN_DIGIT_BITS)) - 1  # column sums of G: sums below 2^24
_GDN_MULTIPLIER_BITS = 16  # 1 / (G's scale) in [2^15, 2^16) times 2^-shift
_GDN_ROOT_BITS = 8  # the root in 2^-(input_bits + 8) units: its floor costs no visible bias
_GDN_NORM_LIMIT = 1 << (62 - 2 * _GDN_ROOT_BITS)  # so the shifted norm stays below 2^62
VERSION = 3  # of exact_lossy.npz; 1 (float64 synthesis) and 2 (all-int8 synthesis) are read
_VERSIONS = (1, 2, 3)


@dataclasses.dataclass(frozen=True, eq=False)
class IntConv:
  """A 3x3 convolution (stride 1, SAME) on integers; upsample: then depth-to-space x2."""
  weight: np.ndarray  # float64 [3, 3, in, out], integer values
  bias: np.ndarray  # int64 [out], accumulator units
  shift: np.ndarray  # int64 [out] >= 1
  upsample: bool


@dataclasses.dataclass(frozen=True, eq=False)
class Int8Conv:
  """A 3x3 convolution (stride 1, SAME) with int8 weights on 16-bit activations
  (module doc, synthesis version 2); upsample: then depth-to-space x2."""
  weight: np.ndarray  # int8 [3, 3, in, out]
  input_bits: int  # the input is taken in 2^-input_bits units (from 2^-16), 16-bit signed
  multiplier: np.ndarray  # int64 [out]: the channel's weight scale, 2^-shift units
  bias: np.ndarray  # int64 [out], 2^-(16 + shift) units
  shift: np.ndarray  # int64 [out] >= 1
  upsample: bool


@dataclasses.dataclass(frozen=True, eq=False)
class IntGDN:
  """Inverse GDN on integers (module doc)."""
  gamma: np.ndarray  # float64 [in, out] (j, i), integer values; G_ij = gamma[j, i]
  beta: np.ndarray  # int64 [out], norm units 2^-(exponent)
  exponent: np.ndarray  # int64 [out], even: the norm is N 2^-exponent


@dataclasses.dataclass(frozen=True, eq=False)
class GDN16:
  """Inverse GDN on 16-bit inputs with a float32 matmul of exact integers (module doc,
  synthesis version 2)."""
  gamma: np.ndarray  # int64 [in, out] (j, i) >= 0, column sums <= _GDN_SUM_LIMIT
  input_bits: int  # q = x in 2^-input_bits units, 16-bit signed; the norm in 2^-2 input_bits
  multiplier: np.ndarray  # int64 [out]: 1 / the column's scale, 2^-shift units
  shift: np.ndarray  # int64 [out]
  beta: np.ndarray  # int64 [out], 2^-2 input_bits units


@dataclasses.dataclass(frozen=True, eq=False)
class ExactLossy:
  hyper_layers: tuple[IntConv, ...]  # h_s: leaky ReLU after all but the last
  synthesis_convs: tuple[IntConv | Int8Conv, ...]  # g_s: inverse GDN after all but the last
  synthesis_gdns: tuple[IntGDN | GDN16, ...]
  log2_inverse_hyper_gain: np.ndarray  # int64 [levels, N], 2^-24 units
  log2_inverse_gain: np.ndarray  # int64 [levels, M]
  exp2_table: np.ndarray  # int64 [1025], 2^(k/1024) in 2^-30 units
  thresholds: np.ndarray  # int64 [S - 1]: raw log-scale (2^-16) thresholds of the rows
  m: int
  scales: int  # 1 (symmetric) or 2 (asymmetric: left and right scale)

  @property
  def version(self) -> int:
    """exact_lossy.npz's arithmetic: 1 float64 synthesis, 2 int8 convolutions and
    16-bit inverse GDNs, 3 the same with the first convolution float64 (module doc)."""
    convs = self.synthesis_convs
    if isinstance(convs[0], Int8Conv):
      return 2
    return 3 if isinstance(convs[1], Int8Conv) else 1

  @property
  def rows_per_scale(self) -> int:
    return int(self.thresholds.shape[0]) + 1

  # --- Gains: Python integers. ---

  def inverse_hyper_gain(self, s: float) -> np.ndarray:
    return _gain(self.log2_inverse_hyper_gain, self.exp2_table, s)

  def inverse_gain(self, s: float) -> np.ndarray:
    return _gain(self.log2_inverse_gain, self.exp2_table, s)

  def hyper_arrays(self, s: float):
    return (self.inverse_hyper_gain(s), tuple(_conv_arrays(c) for c in self.hyper_layers),
            self.thresholds)

  def synthesis_arrays(self, s: float):
    return (self.inverse_gain(s), tuple(_conv_arrays(c) for c in self.synthesis_convs),
            tuple(_gdn_arrays(g) for g in self.synthesis_gdns))

  def synthesis_layout(self) -> tuple:
    """The static part of the synthesis: per layer (upsample, the conv's input bits,
    the inverse GDN's input bits), the bits None for version 1 layers."""
    gdn_bits = [g.input_bits if isinstance(g, GDN16) else None for g in self.synthesis_gdns]
    return tuple((c.upsample, c.input_bits if isinstance(c, Int8Conv) else None,
                  gdn_bits[i] if i < len(gdn_bits) else None)
                 for i, c in enumerate(self.synthesis_convs))

  def _static(self):
    return (tuple(c.upsample for c in self.hyper_layers), self.synthesis_layout(), self.m,
            self.scales, self.rows_per_scale)

  # --- The two decoder stages (XLA; the encoder calls `hyper` too). ---

  def hyper(self, z_sym: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """int32 z symbols [1, h, w, N] -> (mean int64 [1, 4h, 4w, M] in 2^-16 units,
    y table row int32 [1, 4h, 4w, M])."""
    up, _, m, scales, rows = self._static()
    with em.enable_x64():
      mean, row = _hyper_jit(self.hyper_arrays(s), jnp.asarray(z_sym), up, m, scales, rows)
      return np.asarray(mean), np.asarray(row)

  def synthesize(self, y_sym: np.ndarray, mean: np.ndarray, s: float) -> np.ndarray:
    """(y symbols, mean) -> uint8 image [1, 16h, 16w, 3] (padded size)."""
    _, up, *_ = self._static()
    with em.enable_x64():
      return np.asarray(_synthesize_jit(self.synthesis_arrays(s), jnp.asarray(y_sym),
                                        jnp.asarray(mean), up))

  def synthesize_with_prior(self, y_sym: np.ndarray, mean: np.ndarray, s: float,
                            prior: Int8Conv) -> tuple[np.ndarray, np.ndarray]:
    """`synthesize` and the residual prior u (int32 [1, 16h, 16w, C] in 2^-16 units)
    of the prior head `prior` (convert_prior) from the same call."""
    _, up, *_ = self._static()
    with em.enable_x64():
      pixels, u = _synthesize_prior_jit(self.synthesis_arrays(s), jnp.asarray(y_sym),
                                        jnp.asarray(mean), up, _conv_arrays(prior),
                                        prior.input_bits)
      return np.asarray(pixels), np.asarray(u)

  # --- The same in NumPy (an independent evaluation, for tests). ---

  def numpy_hyper(self, z_sym, s: float):
    up, _, m, scales, rows = self._static()
    return _hyper(self.hyper_arrays(s), np.asarray(z_sym), up, m, scales, rows, np)

  def numpy_synthesize(self, y_sym, mean, s: float) -> np.ndarray:
    _, up, *_ = self._static()
    return _synthesize(self.synthesis_arrays(s), np.asarray(y_sym), np.asarray(mean), up, np)

  def numpy_synthesize_with_prior(self, y_sym, mean, s: float, prior: Int8Conv):
    _, up, *_ = self._static()
    return _synthesize(self.synthesis_arrays(s), np.asarray(y_sym), np.asarray(mean), up, np,
                       prior=(_conv_arrays(prior), prior.input_bits))


def _gdn_arrays(g: IntGDN | GDN16):
  if isinstance(g, GDN16):
    return g.gamma, g.multiplier, g.shift, g.beta
  return g.gamma, g.beta, g.exponent


def _conv_arrays(c: IntConv | Int8Conv):
  if isinstance(c, Int8Conv):
    return c.weight, c.multiplier, c.bias, c.shift
  return c.weight, c.bias, c.shift


# --- Integer building blocks (xp = numpy, or jax.numpy under enable_x64). ---

def _round_shift(x, shift, xp):
  """round(x / 2^shift), half up, for int64 x and shift >= 1 (array or int)."""
  one = xp.asarray(1, xp.int64)
  return (x + (one << (shift - 1))) >> shift


def _conv(x, weight, xp):
  """3x3 SAME convolution of int64 x [B, H, W, C] with integer-valued float64 weights:
  float64 [B, H, W, out], exact (module doc)."""
  xf = x.astype(xp.float64)
  if xp is np:
    b, h, w, c = xf.shape
    padded = np.pad(xf, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = np.concatenate([padded[:, dy:dy + h, dx:dx + w, :] for dy in range(3)
                           for dx in range(3)], axis=-1)  # taps in HWIO order
    return cols.reshape(-1, 9 * c) @ weight.reshape(9 * c, -1)
  return jax.lax.conv_general_dilated(xf, weight, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _apply_conv(x, arrays, upsample: bool, xp):
  weight, bias, shift = arrays
  acc = _conv(x, weight, xp)
  acc = acc.reshape(x.shape[:3] + (weight.shape[-1],)).astype(xp.int64) + bias
  y = xp.clip(_round_shift(acc, shift, xp), -ACT_LIMIT, ACT_LIMIT)
  return _upsample(y) if upsample else y


def _upsample(y):
  """Depth-to-space x2, as gvae_jax.models.transforms.UpConv."""
  b, h, w, c = y.shape
  f = c // 4
  return y.reshape(b, h, w, 2, 2, f).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, f)


def _conv8(digits, weight, xp):
  """3x3 SAME convolution of int8-range digits [B, H, W, C] with int8 weights: int32
  sums of products below 2^31 in magnitude, exact in any order (module doc)."""
  if xp is np:
    b, h, w, c = digits.shape
    padded = np.pad(digits.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = np.concatenate([padded[:, dy:dy + h, dx:dx + w, :] for dy in range(3)
                           for dx in range(3)], axis=-1)
    out = cols.reshape(-1, 9 * c) @ weight.astype(np.int64).reshape(9 * c, -1)
    return out.reshape(b, h, w, -1)
  return jax.lax.conv_general_dilated(digits.astype(jnp.int8), weight, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      preferred_element_type=jnp.int32)


def _apply_conv8(x, arrays, input_bits: int, upsample: bool, xp):
  """Int8Conv on int64 x in 2^-16 units: x in 2^-input_bits units as two signed
  8-bit digits (x = 256 hi + lo), both convolved in one int8 call, recombined in int64."""
  weight, multiplier, bias, shift = arrays
  v = xp.clip(_round_shift(x, ACT_BITS - input_bits, xp), -DIGIT_LIMIT, DIGIT_LIMIT)
  lo = ((v + 128) & 255) - 128
  hi = (v - lo) >> 8
  b = x.shape[0]
  sums = _conv8(xp.concatenate([hi, lo], axis=0), weight, xp).astype(xp.int64)
  acc = (sums[:b] << 8) + sums[b:]
  y = xp.clip(_round_shift(acc * multiplier + bias, shift, xp), -ACT_LIMIT, ACT_LIMIT)
  y = y.astype(xp.int32)  # |y| <= 2^27: half the memory traffic of int64
  return _upsample(y) if upsample else y


def _leaky_relu(x, xp):
  return xp.where(x >= 0, x, _round_shift(x * LEAK, LEAK_BITS, xp))


def _isqrt(n, xp):
  """floor(sqrt(n)) of int64 n in [0, 2^62]: float64 sqrt, then corrected in integers.
  The float64 root of n (rounded to 53 bits) is within 2^-20 of the true one, so its
  floor is off by at most one: one correction each way gives the exact floor."""
  r = xp.floor(xp.sqrt(n.astype(xp.float64))).astype(xp.int64)
  r = r - (r * r > n).astype(xp.int64)
  return r + ((r + 1) * (r + 1) <= n).astype(xp.int64)


def _inverse_gdn(x, arrays, xp):
  gamma, beta, exponent = arrays
  q = _round_shift(x, _Q_DROP, xp)
  q2 = q * q
  hi, lo = q2 >> _LIMB, q2 & ((1 << _LIMB) - 1)
  b, h, w, c = x.shape

  def matmul(v):
    return (v.reshape(-1, c).astype(xp.float64) @ gamma).astype(xp.int64).reshape(b, h, w, -1)

  norm = (matmul(hi) << (_LIMB - _NORM_DROP)) + (matmul(lo) >> _NORM_DROP) + beta
  r = _isqrt(norm, xp)  # sqrt of the norm in 2^-(exponent / 2) units
  return xp.clip(_round_shift(x * r, exponent // 2, xp), -ACT_LIMIT, ACT_LIMIT)


_GDN_CHUNK = 12288  # pixels per XLA chunk of the inverse GDN (why: _inverse_gdn16)


def _inverse_gdn16(x, arrays, input_bits: int, xp):
  """GDN16 on x in 2^-16 units: q^2 (q = x in 2^-input_bits units, 16-bit, q^2 rounded
  to 2^8 units) as two 11-bit digits, each times G in float32 (integers, every partial
  sum below 2^24: exact in any order), recombined in int64, scaled, the integer square
  root; int32 out.

  Under XLA a large input runs in chunks of _GDN_CHUNK pixels (lax.map): each chunk's
  int64 intermediates then stay in the CPU's caches, 1.4x faster at 384x256x64 than one
  pass through memory. Every pixel's result depends on that pixel alone, so the chunking
  cannot change a bit (the zero pixels padding the last chunk are dropped)."""
  b, h, w, c = x.shape
  pixels = b * h * w
  if xp is np or pixels <= 2 * _GDN_CHUNK:
    return _inverse_gdn16_pixels(x.reshape(pixels, c), arrays, input_bits, xp).reshape(x.shape)
  chunks = -(-pixels // _GDN_CHUNK)
  flat = jnp.pad(x.reshape(pixels, c), ((0, chunks * _GDN_CHUNK - pixels), (0, 0)))
  out = jax.lax.map(lambda v: _inverse_gdn16_pixels(v, arrays, input_bits, jnp),
                    flat.reshape(chunks, _GDN_CHUNK, c))
  return out.reshape(-1, c)[:pixels].reshape(x.shape)


def _inverse_gdn16_pixels(x, arrays, input_bits: int, xp):
  """_inverse_gdn16 on x [pixels, C]."""
  gamma, multiplier, shift, beta = arrays
  q = xp.clip(_round_shift(x, ACT_BITS - input_bits, xp), -DIGIT_LIMIT, DIGIT_LIMIT)
  q2 = _round_shift(q * q, _GDN_DROP, xp).astype(xp.int32)  # < 2^22
  digits = [q2 & ((1 << _GDN_DIGIT_BITS) - 1), q2 >> _GDN_DIGIT_BITS]

  def matmul(d):
    if xp is np:  # the independent evaluation: int64
      return d.astype(np.int64) @ gamma
    # HIGHEST: no reduced-precision passes (TPU bf16, GPU TF32); two calls, not one
    # on stacked digits: the stacking copy costs more than it saves
    return jnp.matmul(d.astype(jnp.float32), gamma.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(jnp.int64)

  total = matmul(digits[0]) + (matmul(digits[1]) << _GDN_DIGIT_BITS)  # < 2^35
  norm = _round_shift(total * multiplier, shift, xp) + beta  # < _GDN_NORM_LIMIT
  # The root in 2^-(input_bits + 8) units: in 2^-input_bits ones its floor would scale
  # every activation down by up to 2^-10 (0.05 dB PSNR after three layers).
  r = _isqrt(norm << (2 * _GDN_ROOT_BITS), xp)
  return xp.clip(_round_shift(x * r, input_bits + _GDN_ROOT_BITS, xp), -ACT_LIMIT,
                 ACT_LIMIT).astype(xp.int32)


def _gained_input(symbols, gain, shift: int, xp):
  """round(symbols * gain / 2^shift) with gain in 2^-24 units, clipped."""
  return xp.clip(_round_shift(symbols * gain, shift, xp), -ACT_LIMIT, ACT_LIMIT)


def _hyper(arrays, z_sym, upsample, m: int, scales: int, rows: int, xp):
  gain, convs, thresholds = arrays
  z = xp.clip(z_sym.astype(xp.int64), -_SYMBOL_LIMIT, _SYMBOL_LIMIT)
  h = _gained_input(z, gain, GAIN_BITS - ACT_BITS, xp)  # 2^-16 units
  for i, (layer, up) in enumerate(zip(convs, upsample)):
    h = _apply_conv(h, layer, up, xp)
    if i < len(convs) - 1:
      h = _leaky_relu(h, xp)
  mean = h[..., :m]
  row = None
  for k in range(scales):
    raw = h[..., (1 + k) * m:(2 + k) * m]
    if xp is np:  # the independent evaluation: count the thresholds below
      r = np.sum((raw[..., None] > thresholds).astype(np.int32), axis=-1)
    else:  # the same count by binary search (from_bytes checks they are sorted): 5x faster
      r = jnp.searchsorted(thresholds, raw, side="left").astype(jnp.int32)
    row = r if row is None else row * rows + r  # asymmetric: left * S + right
  return mean, row.astype(xp.int32)


def _synthesize(arrays, y_sym, mean, layout, xp, record=None, prior=None):
  """layout: synthesis_layout(); record (a dict) collects max |input| of each conv and
  each inverse GDN (lists "conv", "gdn"); prior: (the prior head's arrays, its input
  bits), which also returns u, from the last conv's input."""
  gain, convs, gdns = arrays
  v = xp.clip(y_sym.astype(xp.int64), -_SYMBOL_LIMIT, _SYMBOL_LIMIT)
  y_hat = xp.clip((v << ACT_BITS) + mean, -ACT_LIMIT, ACT_LIMIT)
  h = _gained_input(y_hat, gain, GAIN_BITS, xp)
  u = None
  for i, (layer, (up, input_bits, gdn_bits)) in enumerate(zip(convs, layout)):
    if record is not None:
      record.setdefault("conv", []).append(int(xp.max(xp.abs(h))))
    if prior is not None and i == len(convs) - 1:
      u = _apply_conv8(h, prior[0], prior[1], True, xp)
    if input_bits is None:
      h = _apply_conv(h, layer, up, xp)
    else:
      h = _apply_conv8(h, layer, input_bits, up, xp)
    if i < len(gdns):
      if record is not None:
        record.setdefault("gdn", []).append(int(xp.max(xp.abs(h))))
      if gdn_bits is None:
        h = _inverse_gdn(h, gdns[i], xp)
      else:
        h = _inverse_gdn16(h, gdns[i], gdn_bits, xp)
  # The same rounding as the float codec: round(clip(x, 0, 1) * 255).
  pixels = _round_shift(xp.clip(h, 0, 1 << ACT_BITS) * 255, ACT_BITS, xp)
  return pixels.astype(xp.uint8) if prior is None else (pixels.astype(xp.uint8), u)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _hyper_jit(arrays, z_sym, upsample, m, scales, rows):
  return _hyper(arrays, z_sym, upsample, m, scales, rows, jnp)


@functools.partial(jax.jit, static_argnums=(3,))
def _synthesize_jit(arrays, y_sym, mean, layout):
  return _synthesize(arrays, y_sym, mean, layout, jnp)


@functools.partial(jax.jit, static_argnums=(3, 5))
def _synthesize_prior_jit(arrays, y_sym, mean, layout, prior_arrays, prior_bits):
  return _synthesize(arrays, y_sym, mean, layout, jnp, prior=(prior_arrays, prior_bits))


# --- Gains in Python integers. ---

def _exp2(log2_value: int, table: np.ndarray) -> int:
  """2^(log2_value / 2^24) in 2^-24 units, rounded (Python integers)."""
  e, f = log2_value >> GAIN_BITS, log2_value & ((1 << GAIN_BITS) - 1)
  step = GAIN_BITS - _EXP2_TABLE_BITS
  k, rem = f >> step, f & ((1 << step) - 1)
  lo, hi = int(table[k]), int(table[k + 1])
  mantissa = lo + (((hi - lo) * rem + (1 << (step - 1))) >> step)  # 2^-30 units
  shift = _EXP2_BITS - GAIN_BITS - e
  if shift <= 0:
    return mantissa << -shift
  return (mantissa + (1 << (shift - 1))) >> shift


def _rate_position(s: float, levels: int) -> tuple[int, int, int]:
  """(row i, row j, l) for a rate s = i + l / 2^16 (the fraction rounded)."""
  s = min(max(float(s), 0.0), float(levels - 1))
  i = min(int(math.floor(s)), levels - 1)
  frac = math.floor((s - i) * (1 << _FRAC_BITS) + 0.5)  # exact float ops, then floor
  if frac >= 1 << _FRAC_BITS:
    i, frac = i + 1, 0
  return i, min(i + 1, levels - 1), frac


def _gain(log2_table: np.ndarray, exp2_table: np.ndarray, s: float) -> np.ndarray:
  """Gains [C] (int64, 2^-24 units) at rate s: exponential interpolation of the rows."""
  i, j, frac = _rate_position(s, log2_table.shape[0])
  out = []
  for lo, hi in zip(log2_table[i].tolist(), log2_table[j].tolist()):
    out.append(_exp2(lo + (((hi - lo) * frac) >> _FRAC_BITS), exp2_table))
  return np.asarray(out, np.int64)


# --- Conversion (the only float step). ---

def _quantise_conv(kernel: np.ndarray, bias: np.ndarray, name: str,
                   upsample: bool) -> IntConv:
  kernel = np.asarray(kernel, np.float64)
  bias = np.asarray(bias, np.float64)
  if kernel.shape[:2] != (3, 3):
    raise ConversionError(f"layer {name}: only 3x3 convolutions convert")
  if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
    raise ConversionError(f"layer {name} has non-finite parameters")
  magnitude = np.maximum(np.sum(np.abs(kernel), axis=(0, 1, 2)), 1e-30)
  scale = np.floor(np.log2(2.0 ** (_SUM_BITS - 1 - _ACT_LIMIT_BITS) / magnitude))
  scale = np.minimum(scale, _MAX_SCALE_BITS).astype(np.int64)
  if np.any(scale < 1):
    raise ConversionError(f"layer {name} has weights too large to convert exactly")
  w = np.rint(kernel * np.exp2(scale))
  b = np.rint(bias * np.exp2(scale + ACT_BITS)).astype(np.int64)
  layer = IntConv(w, b, scale, upsample)
  _check_conv(layer, name)
  return layer


def _quantise_conv8(kernel: np.ndarray, bias: np.ndarray, name: str, upsample: bool,
                    input_bits: int) -> Int8Conv:
  """int8 weights per output channel (max |w| -> 127) and the channel's scale as a
  24-bit multiplier: the synthesis' conversion (module doc)."""
  kernel = np.asarray(kernel, np.float64)
  bias = np.asarray(bias, np.float64)
  if kernel.shape[:2] != (3, 3):
    raise ConversionError(f"layer {name}: only 3x3 convolutions convert")
  if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
    raise ConversionError(f"layer {name} has non-finite parameters")
  largest = np.max(np.abs(kernel), axis=(0, 1, 2))
  largest = np.where(largest > 0, largest, 1.0)
  weight = np.rint(kernel * (WEIGHT_LIMIT / largest)).astype(np.int8)
  unit = largest / WEIGHT_LIMIT * 2.0 ** (ACT_BITS - input_bits)  # 2^-16 units per sum unit
  shift = (_MULTIPLIER_BITS - 1) - np.floor(np.log2(unit)).astype(np.int64)
  if np.any(shift < 1):
    raise ConversionError(f"layer {name} has weights too large to convert exactly")
  shift = np.minimum(shift, 62)
  multiplier = np.rint(unit * np.exp2(shift)).astype(np.int64)
  layer = Int8Conv(weight, int(input_bits), multiplier,
                   np.rint(bias * np.exp2(shift + ACT_BITS)).astype(np.int64), shift, upsample)
  _check_conv8(layer, name)
  return layer


def _check_conv8(layer: Int8Conv, name: str) -> None:
  w = layer.weight.astype(np.int64)
  sums = np.sum(np.abs(w), axis=(0, 1, 2))  # the int32 digit sums stay below 128 * sums
  if (layer.weight.dtype != np.int8 or np.any(np.abs(w) > WEIGHT_LIMIT)
      or not 1 <= layer.input_bits < ACT_BITS or np.any(128 * sums >= 2**31)
      or np.any(layer.shift < 1) or np.any(layer.shift > 62) or np.any(layer.multiplier < 0)
      or np.any(layer.multiplier >= 1 << _MULTIPLIER_BITS)
      or np.any(np.abs(layer.bias) >= 2**61)
      or np.any(DIGIT_LIMIT * sums * layer.multiplier.astype(np.float64) >= 2.0**61)):
    raise ConversionError(f"layer {name} would not stay exact")


def convert_prior(model, params, exact: ExactLossy) -> Int8Conv:
  """The synthesis' prior head (u of lossy-base residual files, from the last hidden
  activation, like g_s's last conv) as an Int8Conv at that conv's input bits."""
  if exact.version < 2:
    raise ConversionError("the prior head converts only with a version 2 or 3 synthesis")
  if not model.prior_channels:
    raise ConversionError("the model has no prior head")
  p = params["g_s"]["prior_head"]["conv"]
  return _quantise_conv8(p["kernel"], p["bias"], "g_s.prior_head", True,
                         exact.synthesis_convs[-1].input_bits)


def conv8_members(conv: Int8Conv, prefix: str) -> dict[str, np.ndarray]:
  """An Int8Conv's arrays, as stored (here and in exact_residual.npz)."""
  return {f"{prefix}.weight": conv.weight.astype(np.int64), f"{prefix}.bias": conv.bias,
          f"{prefix}.shift": conv.shift, f"{prefix}.multiplier": conv.multiplier,
          f"{prefix}.input_bits": np.asarray([conv.input_bits], np.int64)}


def conv8_shapes(prefix: str, c_in: int, c_out: int) -> dict[str, tuple[int, ...]]:
  return {f"{prefix}.weight": (3, 3, c_in, c_out), f"{prefix}.bias": (c_out,),
          f"{prefix}.shift": (c_out,), f"{prefix}.multiplier": (c_out,),
          f"{prefix}.input_bits": (1,)}


def conv8_from_members(arrays: dict, prefix: str, upsample: bool, label: str) -> Int8Conv:
  """The checked Int8Conv of conv8_members' arrays (ConversionError)."""
  weight = arrays[f"{prefix}.weight"]
  if np.any(np.abs(weight) > WEIGHT_LIMIT):
    raise ConversionError(f"{label} member {prefix}.weight is not int8")
  layer = Int8Conv(weight.astype(np.int8), int(arrays[f"{prefix}.input_bits"][0]),
                   arrays[f"{prefix}.multiplier"], arrays[f"{prefix}.bias"],
                   arrays[f"{prefix}.shift"], upsample)
  _check_conv8(layer, f"{label} {prefix}")
  return layer


def _check_conv(layer: IntConv, name: str) -> None:
  sums = np.sum(np.abs(layer.weight), axis=(0, 1, 2))
  if (np.any(sums * 2.0 ** _ACT_LIMIT_BITS >= 2.0 ** _SUM_BITS) or np.any(layer.shift < 1)
      or np.any(layer.shift > 62) or np.any(np.abs(layer.bias) >= 2**61)
      or np.any(layer.weight != np.rint(layer.weight))):
    raise ConversionError(f"layer {name} would not stay exact")


def _quantise_gdn(params, name: str, beta_min: float = 1e-6) -> IntGDN:
  from gvae_jax.layers.gdn import _nonneg  # the module's own reparameterisation

  beta = np.asarray(_nonneg(jnp.asarray(params["beta"]), beta_min), np.float64)
  gamma = np.asarray(_nonneg(jnp.asarray(params["gamma"]), 0.0), np.float64)  # [i, j]
  if not (np.all(np.isfinite(beta)) and np.all(np.isfinite(gamma))):
    raise ConversionError(f"layer {name} has non-finite parameters")
  row_sums = np.maximum(gamma.sum(axis=1), 1e-30)
  bits = np.floor(np.log2((2.0 ** _GAMMA_SUM_BITS - 1) / row_sums) - 1e-9)
  bits = np.minimum(bits, _MAX_GAMMA_BITS).astype(np.int64)
  g = np.rint(gamma * np.exp2(bits)[:, None])  # [i, j] in 2^-bits units
  # q^2 is in 2^-20 units, so G q^2 in 2^-(20 + bits); dropping _NORM_DROP bits:
  exponent = 2 * (ACT_BITS - _Q_DROP) + bits - _NORM_DROP
  odd = exponent % 2  # an odd exponent: one more bit dropped from G (even sqrt units)
  g = np.where(odd[:, None] == 1, np.rint(g / 2.0), g)
  exponent = exponent - odd
  beta_int = np.rint(beta * np.exp2(exponent)).astype(np.int64)
  layer = IntGDN(np.ascontiguousarray(g.T), beta_int, exponent.astype(np.int64))
  _check_gdn(layer, name)
  return layer


def _quantise_gdn16(params, name: str, input_bits: int, beta_min: float = 1e-6) -> GDN16:
  """G per output channel at the scale that puts its column sum at _GDN_SUM_LIMIT (the
  float32 matmul's bound), 2^8 / scale as a 16-bit multiplier: version 2's inverse GDN."""
  from gvae_jax.layers.gdn import _nonneg

  beta = np.asarray(_nonneg(jnp.asarray(params["beta"]), beta_min), np.float64)
  gamma = np.asarray(_nonneg(jnp.asarray(params["gamma"]), 0.0), np.float64)  # [i, j]
  if not (np.all(np.isfinite(beta)) and np.all(np.isfinite(gamma))):
    raise ConversionError(f"layer {name} has non-finite parameters")
  n = gamma.shape[1]
  row_sums = np.maximum(gamma.sum(axis=1), 1e-30)
  scale = (_GDN_SUM_LIMIT - n) / row_sums  # rint adds at most n/2 to a sum
  g = np.rint(gamma * scale[:, None]).astype(np.int64)
  inverse = 2.0 ** _GDN_DROP / scale  # the norm's units per G q^2 unit
  shift = (_GDN_MULTIPLIER_BITS - 1) - np.floor(np.log2(inverse)).astype(np.int64)
  multiplier = np.rint(inverse * np.exp2(shift)).astype(np.int64)
  layer = GDN16(np.ascontiguousarray(g.T), int(input_bits), multiplier, shift,
                np.rint(beta * 2.0 ** (2 * input_bits)).astype(np.int64))
  _check_gdn16(layer, name)
  return layer


def _check_gdn16(layer: GDN16, name: str) -> None:
  if (np.any(layer.gamma < 0) or np.any(np.sum(layer.gamma, axis=0) > _GDN_SUM_LIMIT)
      or not 1 <= layer.input_bits < ACT_BITS or np.any(layer.shift < 1)
      or np.any(layer.shift > 62) or np.any(layer.multiplier < 0)
      or np.any(layer.multiplier >= 1 << _GDN_MULTIPLIER_BITS)
      or np.any(layer.beta < 0)
      or np.any(DIGIT_LIMIT**2 * np.sum(layer.gamma, axis=0).astype(np.float64)
                * layer.multiplier * np.exp2(-layer.shift.astype(np.float64)) + layer.beta
                >= _GDN_NORM_LIMIT / 2)):
    raise ConversionError(f"layer {name} would not stay exact")


def _check_gdn(layer: IntGDN, name: str) -> None:
  sums = np.sum(np.abs(layer.gamma), axis=0)
  if (np.any(sums >= 2.0 ** _GAMMA_SUM_BITS) or np.any(layer.beta < 0)
      or np.any(layer.beta >= 2**60) or np.any(layer.exponent % 2 != 0)
      or np.any(layer.exponent < 2) or np.any(layer.exponent > 2 * 62)
      or np.any(layer.gamma != np.rint(layer.gamma)) or np.any(layer.gamma < 0)):
    raise ConversionError(f"layer {name} would not stay exact")


def _log2_gains(table_params, parameterization: str, name: str) -> np.ndarray:
  gains = np.asarray(gain_lib.to_positive(jnp.asarray(table_params["table"]),
                                          parameterization), np.float64)
  if not np.all(np.isfinite(gains)) or np.any(gains >= 2.0 ** _GAIN_LIMIT_BITS):
    raise ConversionError(f"{name} has gains that cannot be converted")
  return np.rint(np.log2(gains) * 2.0 ** GAIN_BITS).astype(np.int64)


def exp2_table() -> np.ndarray:
  k = np.arange((1 << _EXP2_TABLE_BITS) + 1, dtype=np.float64)
  return np.rint(np.exp2(k / (1 << _EXP2_TABLE_BITS)) * 2.0 ** _EXP2_BITS).astype(np.int64)


def convert(model, params, y_index_bounds: np.ndarray) -> ExactLossy:
  """The ExactLossy of a GainedMeanScaleHyperprior (its params) and the exported
  y_index_bounds (module doc). ConversionError if a layer cannot stay exact."""
  if model.interpolation != "exponential":
    raise ConversionError(f"only the exponential gain interpolation converts, not "
                          f"{model.interpolation!r}")
  hs, gs = params["h_s"], params["g_s"]
  hyper_layers = (
      _quantise_conv(hs["deconv_0"]["conv"]["kernel"], hs["deconv_0"]["conv"]["bias"],
                     "h_s.deconv_0", True),
      _quantise_conv(hs["deconv_1"]["conv"]["kernel"], hs["deconv_1"]["conv"]["bias"],
                     "h_s.deconv_1", True),
      _quantise_conv(hs["conv_2"]["kernel"], hs["conv_2"]["bias"], "h_s.conv_2", False))
  kernels = [(gs[f"deconv_{i}"]["conv"]["kernel"], gs[f"deconv_{i}"]["conv"]["bias"])
             for i in range(4)]
  wide_gdns = tuple(_quantise_gdn(gs[f"igdn_{i}"], f"g_s.igdn_{i}") for i in range(3))
  log2_inverse_gain = _log2_gains(params["inverse_gain"], model.gain_parameterization,
                                  "inverse_gain")
  # The 16-bit input range of each conv and inverse GDN, from the wide (version 1)
  # synthesis of a generated image's latents at the lowest and highest rate (module doc).
  wide = tuple(_quantise_conv(k, b, f"g_s.deconv_{i}", True) for i, (k, b) in enumerate(kernels))
  largest = _calibrate(model, params, wide, wide_gdns, log2_inverse_gain)
  conv_bits = [_input_bits(peak) for peak in largest["conv"]]
  gdn_bits = [_input_bits(peak) for peak in largest["gdn"]]
  convs = (wide[0],) + tuple(_quantise_conv8(k, b, f"g_s.deconv_{i}", True, bits)
                             for i, ((k, b), bits) in enumerate(zip(kernels, conv_bits)) if i)
  gdns = tuple(_quantise_gdn16(gs[f"igdn_{i}"], f"g_s.igdn_{i}", bits)
               for i, bits in enumerate(gdn_bits))
  bounds = np.asarray(y_index_bounds, np.float64)
  thresholds = np.floor(np.log(bounds) * 2.0 ** ACT_BITS).astype(np.int64)
  scales = 2 if model.is_asymmetric else 1
  return ExactLossy(
      hyper_layers, convs, gdns,
      _log2_gains(params["inverse_hyper_gain"], model.gain_parameterization,
                  "inverse_hyper_gain"),
      log2_inverse_gain, exp2_table(), thresholds, int(model.m), scales)


def calibration_image(size: int = 192) -> np.ndarray:
  """A generated image in [0, 1] [1, size, size, 3] with what sets activation ranges:
  smooth gradients, hard-edged blocks of saturated colour, fine stripes and noise."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size] / size
  image = 0.5 + 0.4 * np.sin(2 * np.pi * (1.3 * xx + 0.7 * yy))[..., None] * [1.0, 0.7, -0.5]
  for _ in range(12):  # hard edges
    y0, x0 = rng.integers(0, size - 16, 2)
    h, w = rng.integers(8, size // 3, 2)
    image[y0:y0 + h, x0:x0 + w] = rng.choice([0.0, 1.0], 3)
  half = size // 2
  image[:half, :half] += rng.normal(0, 0.25, (half, half, 3))  # noise
  image[half:, half:] = ((xx[half:, half:] * size) % 2 < 1)[..., None] * 1.0  # stripes
  return np.clip(image, 0, 1)[None].astype(np.float32)


def _input_bits(peak: int) -> int:
  """The fraction bits of a 16-bit input whose range is _CALIBRATION_HEADROOM x peak."""
  ratio = max(_CALIBRATION_HEADROOM * peak / 2.0 ** ACT_BITS, 2.0 ** -ACT_BITS)
  return int(min(ACT_BITS - 1, max(1, 15 - math.ceil(math.log2(ratio)))))


def _calibrate(model, params, convs, gdns, log2_inverse_gain) -> dict[str, list[int]]:
  """Largest |input| (2^-16 units) of each synthesis conv and inverse GDN over the
  calibration image at the lowest and highest rate."""
  image = jnp.asarray(calibration_image())
  levels = int(model.levels)
  largest = {"conv": [0] * len(convs), "gdn": [0] * len(gdns)}
  for s in (0.0, float(levels - 1)):
    y, _ = model.apply({"params": params}, image, jnp.full((1,), s, jnp.float32),
                       method=model.analyze)
    y_sym = np.clip(np.rint(np.nan_to_num(np.asarray(y, np.float64))), -_SYMBOL_LIMIT,
                    _SYMBOL_LIMIT).astype(np.int64)
    gain = _gain(log2_inverse_gain, exp2_table(), s)
    arrays = (gain, tuple(_conv_arrays(c) for c in convs), tuple(_gdn_arrays(g) for g in gdns))
    record = {}
    _synthesize(arrays, y_sym, np.zeros_like(y_sym), tuple((True, None, None) for _ in convs),
                np, record)
    largest = {k: [max(a, b) for a, b in zip(v, record[k])] for k, v in largest.items()}
  return largest


# --- exact_lossy.npz: the stored form (owned here; gvae_jax.coding.export loads it). ---

def _members(exact: ExactLossy) -> dict[str, np.ndarray]:
  arrays = {}
  for prefix, convs in (("hyper", exact.hyper_layers), ("synthesis", exact.synthesis_convs)):
    for i, c in enumerate(convs):
      arrays[f"{prefix}.{i}.weight"] = c.weight.astype(np.int64)
      arrays[f"{prefix}.{i}.bias"] = c.bias
      arrays[f"{prefix}.{i}.shift"] = c.shift
      if isinstance(c, Int8Conv):
        arrays[f"{prefix}.{i}.multiplier"] = c.multiplier
        arrays[f"{prefix}.{i}.input_bits"] = np.asarray([c.input_bits], np.int64)
  if exact.version > 1:  # version 1 files have no version member
    arrays["version"] = np.asarray([exact.version], np.int64)
  for i, g in enumerate(exact.synthesis_gdns):
    arrays[f"gdn.{i}.gamma"] = g.gamma.astype(np.int64)
    arrays[f"gdn.{i}.beta"] = g.beta
    if isinstance(g, GDN16):
      arrays[f"gdn.{i}.multiplier"] = g.multiplier
      arrays[f"gdn.{i}.shift"] = g.shift
      arrays[f"gdn.{i}.input_bits"] = np.asarray([g.input_bits], np.int64)
    else:
      arrays[f"gdn.{i}.exponent"] = g.exponent
  arrays["log2_inverse_hyper_gain"] = exact.log2_inverse_hyper_gain
  arrays["log2_inverse_gain"] = exact.log2_inverse_gain
  arrays["exp2_table"] = exact.exp2_table
  arrays["thresholds"] = exact.thresholds
  return arrays


def to_bytes(exact: ExactLossy) -> bytes:
  arrays = _members(exact)
  buffer = io.BytesIO()  # compressed: the int64 weights are small numbers (12 MB -> ~3 MB)
  np.savez_compressed(buffer, **{name: arrays[name] for name in sorted(arrays)})
  return buffer.getvalue()


def expected_shapes(model, scale_rows: int, version: int = VERSION) -> dict[str, tuple[int, ...]]:
  """The members of a model's exact_lossy.npz (of `version`) and their shapes."""
  n, m = int(model.n), int(model.m)
  scales = 2 if model.is_asymmetric else 1
  hyper = [(n, 4 * m), (m, 4 * (m * 3 // 2)), (m * 3 // 2, (1 + scales) * m)]
  synthesis = [(m, 4 * n), (n, 4 * n), (n, 4 * n), (n, 4 * 3)]
  shapes = {}
  for prefix, dims in (("hyper", hyper), ("synthesis", synthesis)):
    for i, (c_in, c_out) in enumerate(dims):
      shapes.update({f"{prefix}.{i}.weight": (3, 3, c_in, c_out), f"{prefix}.{i}.bias": (c_out,),
                     f"{prefix}.{i}.shift": (c_out,)})
      if prefix == "synthesis" and _is_int8(version, i):
        shapes.update({f"{prefix}.{i}.multiplier": (c_out,), f"{prefix}.{i}.input_bits": (1,)})
  if version >= 2:
    shapes["version"] = (1,)
  for i in range(3):
    shapes.update({f"gdn.{i}.gamma": (n, n), f"gdn.{i}.beta": (n,)})
    if version >= 2:
      shapes.update({f"gdn.{i}.multiplier": (n,), f"gdn.{i}.shift": (n,),
                     f"gdn.{i}.input_bits": (1,)})
    else:
      shapes[f"gdn.{i}.exponent"] = (n,)
  levels = int(model.levels)
  shapes.update({"log2_inverse_hyper_gain": (levels, n), "log2_inverse_gain": (levels, m),
                 "exp2_table": ((1 << _EXP2_TABLE_BITS) + 1,),
                 "thresholds": (scale_rows - 1,)})
  return shapes


def from_bytes(data: bytes, model, scale_rows: int) -> ExactLossy:
  """The ExactLossy in exact_lossy.npz bytes, checked against `model` (ConversionError):
  only the expected members, each of its expected shape and int64, are read."""
  try:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      members = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
      version = _read_version(archive) if "version" in members else 1
      shapes = expected_shapes(model, scale_rows, version)
      if members != set(shapes) or len(archive.namelist()) != len(shapes):
        raise ConversionError(f"{EXACT_LOSSY_FILE} does not have the members this model needs")
      for info in archive.infolist():  # before reading: no member larger than its shape
        if info.file_size > 8 * int(np.prod(shapes[info.filename[:-4]])) + 256:
          raise ConversionError(f"{EXACT_LOSSY_FILE} member {info.filename} is too large")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      arrays = {name: npz[name] for name in shapes}
  except ConversionError:
    raise
  except Exception as e:
    raise ConversionError(f"{EXACT_LOSSY_FILE} cannot be read: {type(e).__name__}: "
                          f"{str(e)[:200]}") from e
  for name, shape in shapes.items():
    if arrays[name].shape != shape or arrays[name].dtype != np.int64:
      raise ConversionError(f"{EXACT_LOSSY_FILE} member {name} has the wrong shape or type")

  def conv(prefix, i, upsample):
    if prefix == "synthesis" and _is_int8(version, i):
      weight = arrays[f"{prefix}.{i}.weight"]
      if np.any(np.abs(weight) > WEIGHT_LIMIT):
        raise ConversionError(f"{EXACT_LOSSY_FILE} member {prefix}.{i}.weight is not int8")
      layer8 = Int8Conv(weight.astype(np.int8), int(arrays[f"{prefix}.{i}.input_bits"][0]),
                        arrays[f"{prefix}.{i}.multiplier"], arrays[f"{prefix}.{i}.bias"],
                        arrays[f"{prefix}.{i}.shift"], upsample)
      _check_conv8(layer8, f"{prefix}.{i}")
      return layer8
    layer = IntConv(arrays[f"{prefix}.{i}.weight"].astype(np.float64),
                    arrays[f"{prefix}.{i}.bias"], arrays[f"{prefix}.{i}.shift"], upsample)
    _check_conv(layer, f"{prefix}.{i}")
    return layer

  def gdn(i):
    if version >= 2:
      layer16 = GDN16(arrays[f"gdn.{i}.gamma"], int(arrays[f"gdn.{i}.input_bits"][0]),
                      arrays[f"gdn.{i}.multiplier"], arrays[f"gdn.{i}.shift"],
                      arrays[f"gdn.{i}.beta"])
      _check_gdn16(layer16, f"gdn.{i}")
      return layer16
    layer = IntGDN(arrays[f"gdn.{i}.gamma"].astype(np.float64), arrays[f"gdn.{i}.beta"],
                   arrays[f"gdn.{i}.exponent"])
    _check_gdn(layer, f"gdn.{i}")
    return layer

  table = arrays["exp2_table"]
  for name in ("log2_inverse_hyper_gain", "log2_inverse_gain"):
    if np.any(np.abs(arrays[name]) >= (_GAIN_LIMIT_BITS + 1) << GAIN_BITS):
      raise ConversionError(f"{EXACT_LOSSY_FILE} member {name} is out of range")
  if (table[0] != 1 << _EXP2_BITS or table[-1] != 2 << _EXP2_BITS
      or np.any(np.diff(table) <= 0)):
    raise ConversionError(f"{EXACT_LOSSY_FILE}: exp2_table is not 2^x on [0, 1]")
  if np.any(np.diff(arrays["thresholds"]) <= 0):
    raise ConversionError(f"{EXACT_LOSSY_FILE}: thresholds must ascend")
  return ExactLossy(
      (conv("hyper", 0, True), conv("hyper", 1, True), conv("hyper", 2, False)),
      tuple(conv("synthesis", i, True) for i in range(4)), tuple(gdn(i) for i in range(3)),
      arrays["log2_inverse_hyper_gain"], arrays["log2_inverse_gain"], table,
      arrays["thresholds"], int(model.m), 2 if model.is_asymmetric else 1)


def _is_int8(version: int, layer: int) -> bool:
  """Whether synthesis convolution `layer` has int8 weights in this version."""
  return version == 2 or (version >= 3 and layer >= 1)


def _read_version(archive: zipfile.ZipFile) -> int:
  """The version member of exact_lossy.npz (ConversionError if unknown)."""
  info = archive.getinfo("version.npy")
  if info.file_size > 256:
    raise ConversionError(f"{EXACT_LOSSY_FILE} member version.npy is too large")
  with archive.open(info) as f:
    value = np.load(io.BytesIO(f.read()), allow_pickle=False)
  if value.shape != (1,) or value.dtype != np.int64 or int(value[0]) not in _VERSIONS:
    raise ConversionError(f"{EXACT_LOSSY_FILE} has version {value.ravel()[:1].tolist()}; this "
                          f"gvae-jax reads versions {', '.join(map(str, _VERSIONS))}: a newer "
                          "gvae-jax wrote it")
  return int(value[0])
