"""The flat head converted to exact integer arithmetic: files that decode anywhere.

`convert` turns a flat head's float parameters (gvae_jax.coding.flat_head)
into an ExactHead: every layer a matrix of integers W (stored as int64,
used as integer-valued float64), an integer bias and a power-of-two output
shift per output channel, and the nonlinearities as tables
(gvae_jax.entropy.exact_mixture). Its `mixture` runs the masked convolution
at a step's pixels and the 1x1 heads on integers only:

  acc = x @ W + bias   (x, W integers; float64 matmul, exact, see below)
  y   = clip(round(acc / 2^shift), +-ACT_LIMIT), then ReLU where the float head has one

with activations in 2^-16 fixed point (exact_mixture.ACT_BITS). Exactness:
every column's sum of |W| is at most 2^52 / max|x| (2^25 for
activations clipped to 2^27, 2^43 for the first layer's residuals, which are
below 2^9), so every partial sum of every product is an integer below 2^53,
exact in float64 whatever the summation order, the vector width, FMA use or
BLAS kernel; W's scale per column is the largest power of two that keeps
this bound (weights to about 2^-18 of a typical layer's). The input scale 1/32, the mean scale and the tau conditioning of
the "delta" correction (out = (W x + b) * softplus(.) + shift, fixed for each
tau) are folded into W and the bias at conversion. Conversion is the only
float step; its output is stored (`exact.npz` in the flat head directory,
covered by the fingerprint), so the reader never repeats it.

Limits: only heads with no correction or the "delta" one (the shipped form)
convert. The same conversion serves the lossy-base head
(gvae_jax.coding.exact_residual), whose prior u arrives in 2^-16 units.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.entropy import exact_mixture as em
from gvae_jax.entropy import logistic_mixture as lm
from gvae_jax.layers.masked import causal_mask
from gvae_jax.models.residual import RESIDUAL_INPUT_SCALE

_ACT_LIMIT_BITS = 27
ACT_LIMIT = 1 << _ACT_LIMIT_BITS  # |activation| in 2^-16 units (2048.0)
_SUM_BITS = 52  # column sum of |W| times max |x| stays below 2^52
_MAX_SCALE_BITS = 40
_RESIDUAL_BITS = 9  # |r_hat| < 2^9 for 8-bit images at any tau <= 255
EXACT_FILE = "exact.npz"
# Members of exact.npz beyond the layers: the tables.
_TABLE_PREFIX = "table."


class ConversionError(ValueError):
  """A head that cannot be converted (or an exact.npz that is not one)."""


@dataclasses.dataclass(frozen=True, eq=False)
class IntLayer:
  weight: np.ndarray  # float64 [in, out], integer values
  bias: np.ndarray  # int64 [out], in the accumulator's units
  shift: np.ndarray  # int64 [out] >= 1: accumulator -> 2^-16
  relu: bool

  def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return self.weight, self.bias, self.shift

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return _apply(x, *self.arrays(), self.relu, np)


def _apply(x, weight, bias, shift, relu: bool, xp):
  """An IntLayer on integers x [N, in] (NumPy or, under enable_x64, jax.numpy)."""
  acc = (x.astype(xp.float64) @ weight).astype(xp.int64) + bias
  y = xp.clip((acc + (xp.int64(1) << (shift - 1))) >> shift, -ACT_LIMIT, ACT_LIMIT)
  return xp.maximum(y, 0) if relu else y


def _quantise(weight: np.ndarray, bias: np.ndarray, input_bits: int, input_frac: int,
              relu: bool, name: str) -> IntLayer:
  """IntLayer of float64 weight [in, out], bias [out] for inputs below 2^input_bits
  with input_frac fraction bits (module doc)."""
  magnitude = np.maximum(np.sum(np.abs(weight), axis=0), 1e-30)
  if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
    raise ConversionError(f"layer {name} has non-finite parameters")
  scale = np.floor(np.log2(2.0 ** (_SUM_BITS - input_bits) / magnitude))
  scale = np.minimum(scale, _MAX_SCALE_BITS).astype(np.int64)
  shift = scale + input_frac - em.ACT_BITS
  if np.any(shift < 1):
    raise ConversionError(f"layer {name} has weights too large to convert exactly")
  w = np.rint(weight * np.exp2(scale)[None, :])
  if np.any(np.sum(np.abs(w), axis=0) * 2.0 ** input_bits >= 2.0 ** 53):
    raise ConversionError(f"layer {name} would not stay exact")
  b = np.rint(bias * np.exp2(scale + input_frac)).astype(np.int64)
  return IntLayer(w, b, shift, relu)


@dataclasses.dataclass(frozen=True, eq=False)
class ExactHead:
  context: IntLayer  # the masked convolution at a pixel's taps: [taps * 3] -> features
  main: tuple[IntLayer, ...]  # the lossless head's three 1x1 layers
  delta: tuple[tuple[IntLayer, ...], ...]  # per tau 1..max_tau: the correction (or ())
  tables: dict
  components: int
  share_weights: bool
  ar_on_errors: bool
  # u's units: flags (0 / 1) of a flat head are shifted to 2^-16 here; the prior of a
  # lossy-base head (gvae_jax.coding.exact_residual) arrives in 2^-16 units (0).
  prior_shift: int = em.ACT_BITS

  def layers(self, tau_head: int, corrected: bool) -> tuple:
    """The arrays of the layers a step runs: context, main head, and the correction."""
    chosen = [self.context, *self.main] + (list(self.delta[tau_head - 1]) if corrected else [])
    return tuple(layer.arrays() for layer in chosen)

  def mixture(self, context: np.ndarray, u: np.ndarray, tau_head: int,
              corrected: bool) -> np.ndarray:
    """int64 [5, 3, N, K] (exact_mixture.mixture) at N pixels from their causal taps
    context [N, taps * 3] (decoded r_hat) and the prior u [N, prior channels] (flags,
    or 2^-16 units: prior_shift): the NumPy reference of `mixture_xla`."""
    return _mixture(self.layers(tau_head, corrected), self.tables, context, u, corrected,
                    self.components, self.share_weights, self.ar_on_errors, self.prior_shift,
                    np)

  def mixture_xla(self, context: np.ndarray, u: np.ndarray, tau_head: int,
                  corrected: bool, constants=None, to_host: bool = True, u_rows=None):
    """`mixture` compiled by XLA (float64 matmuls and int64 arithmetic under
    enable_x64): the same integers. Pad N to a few sizes (one compile per size).

    constants: `self.constants(tau_head, corrected)`, made once for many calls;
    to_host False: the result stays on the CPU device (for exact_mixture's
    compiled rows, which read it there), an int64 jax.Array; u_rows [N]: u is
    the whole prior (say an `exact_mixture.on_cpu` array, copied in once) and
    the pixels' rows are taken from it inside the call.
    """
    layers, tables = constants or (self.layers(tau_head, corrected), self.tables)
    with em.enable_x64():
      mix = _mixture_jit(layers, tables, context, u, u_rows, corrected, self.components,
                         self.share_weights, self.ar_on_errors, self.prior_shift)
      return np.asarray(mix) if to_host else mix

  def constants(self, tau_head: int, corrected: bool):
    """(layers, tables) of `mixture_xla` on the CPU device (exact_mixture.on_cpu)."""
    return em.on_cpu((self.layers(tau_head, corrected), self.tables))


def _mixture(layers, tables, context, u, corrected, components, share_weights, ar_on_errors,
             prior_shift, xp):
  prior = xp.clip(u.astype(xp.int64) << prior_shift, -ACT_LIMIT, ACT_LIMIT)
  h = xp.concatenate([_apply(context, *layers[0], False, xp), prior], axis=1)
  g = h
  for i in range(3):
    g = _apply(g, *layers[1 + i], i < 2, xp)
  if corrected:
    d = h
    for i in range(3):
      d = _apply(d, *layers[4 + i], i < 2, xp)
    g = g + d
  return em.mixture(g, tables, components, share_weights, ar_on_errors, xp)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _mixture_jit(layers, tables, context, u, u_rows, corrected, components, share_weights,
                 ar_on_errors, prior_shift):
  if u_rows is not None:  # (None traces its own executable)
    u = jnp.take(u, u_rows, axis=0)
  return _mixture(layers, tables, context, u, corrected, components, share_weights,
                  ar_on_errors, prior_shift, jnp)


def _conv(params) -> tuple[np.ndarray, np.ndarray]:
  kernel = np.asarray(params["kernel"], np.float64)
  return kernel.reshape(-1, kernel.shape[-1]), np.asarray(params["bias"], np.float64)


def _softplus(x: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, x)


def convert(head) -> ExactHead:
  """The ExactHead of a FlatHead (gvae_jax.coding.flat_head); module doc."""
  return convert_residual(head.model, head.params)


def convert_residual(model, params, prior_shift: int = em.ACT_BITS) -> ExactHead:
  """The ExactHead of a ResidualModel `model` and its params (a flat head's, or a
  scalable model's lossy-base head with prior_shift 0); module doc."""
  if model.bias_correction and model.correction != "delta":
    raise ConversionError(f"only the 'delta' bias correction converts, not {model.correction!r}")
  k, c = model.components, lm.CHANNELS
  start = k if model.share_weights else c * k
  means = slice(start, start + c * k)

  kernel = np.asarray(params["context"]["kernel"], np.float64)
  mask = causal_mask(model.kernel_size, model.order)
  taps = kernel[mask] * RESIDUAL_INPUT_SCALE  # [T, 3, C]: rows in MaskedConv.taps order
  context = _quantise(taps.reshape(-1, taps.shape[-1]),
                      np.asarray(params["context"]["bias"], np.float64), _RESIDUAL_BITS, 0,
                      False, "context")

  def hidden(weight, bias, relu, name, last=False):
    if last:  # the mean scale (ResidualModel._reparameterise), folded in
      weight, bias = weight.copy(), bias.copy()
      weight[:, means] *= model.mean_scale
      bias[means] *= model.mean_scale
    return _quantise(weight, bias, _ACT_LIMIT_BITS, em.ACT_BITS, relu, name)

  main = tuple(hidden(*_conv(params[f"head_{i}"]), i < 2, f"head_{i}", last=i == 2)
               for i in range(3))
  delta = ()
  if model.bias_correction:
    per_tau = []
    for tau in range(1, model.max_tau + 1):
      layers = []
      for i in range(3):
        p = params[f"bc_delta_{i}"]
        weight, bias = _conv(p["conv"])
        onehot = np.zeros(model.max_tau)
        onehot[tau - 1] = 1.0
        scale = _softplus(onehot @ np.asarray(p["scale"]["kernel"], np.float64)
                          + np.asarray(p["scale"]["bias"], np.float64))
        shift = (onehot @ np.asarray(p["shift"]["kernel"], np.float64)
                 + np.asarray(p["shift"]["bias"], np.float64))
        layers.append(hidden(weight * scale[None, :], bias * scale + shift, i < 2,
                             f"bc_delta_{i} (tau {tau})", last=i == 2))
      per_tau.append(tuple(layers))
    delta = tuple(per_tau)
  return ExactHead(context, main, delta, em.build_tables(), k, bool(model.share_weights),
                   bool(model.ar_on_errors), prior_shift)


# --- exact.npz: the stored form (owned here; gvae_jax.coding.flat_head loads it). ---

def _layers(head: ExactHead) -> dict[str, IntLayer]:
  named = {"context": head.context}
  named.update({f"main.{i}": layer for i, layer in enumerate(head.main)})
  for t, layers in enumerate(head.delta, start=1):
    named.update({f"delta.{t}.{i}": layer for i, layer in enumerate(layers)})
  return named


def members(head: ExactHead) -> dict[str, np.ndarray]:
  """The arrays of exact.npz (also the head's members of exact_residual.npz)."""
  arrays = {}
  for name, layer in _layers(head).items():
    arrays[f"{name}.weight"] = layer.weight.astype(np.int64)
    arrays[f"{name}.bias"] = layer.bias
    arrays[f"{name}.shift"] = layer.shift
  for name, table in head.tables.items():
    arrays[_TABLE_PREFIX + name] = table
  return arrays


def to_bytes(head: ExactHead) -> bytes:
  arrays = members(head)
  buffer = io.BytesIO()
  np.savez(buffer, **{name: arrays[name] for name in sorted(arrays)})
  return buffer.getvalue()


def expected_shapes(model, prior_channels: int) -> dict[str, tuple[int, ...]]:
  """The members of a head's exact.npz and their shapes."""
  taps = int(causal_mask(model.kernel_size, model.order).sum()) * lm.CHANNELS
  inputs = model.context_channels + prior_channels
  out = lm.num_raw_params(model.components, model.share_weights)
  dims = {"context": (taps, model.context_channels)}
  sizes = [(inputs, model.hidden), (model.hidden, model.hidden), (model.hidden, out)]
  dims.update({f"main.{i}": s for i, s in enumerate(sizes)})
  if model.bias_correction:
    for t in range(1, model.max_tau + 1):
      dims.update({f"delta.{t}.{i}": s for i, s in enumerate(sizes)})
  shapes = {}
  for name, (n_in, n_out) in dims.items():
    shapes.update({f"{name}.weight": (n_in, n_out), f"{name}.bias": (n_out,),
                   f"{name}.shift": (n_out,)})
  shapes.update({_TABLE_PREFIX + name: a.shape for name, a in em.build_tables().items()})
  return shapes


def read_npz(data: bytes, shapes: dict[str, tuple[int, ...]], label: str) -> dict:
  """The int64 arrays of npz bytes that must hold exactly the members `shapes` lists,
  each of its shape (ConversionError otherwise); sizes checked before reading."""
  try:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      names = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
      if names != set(shapes) or len(archive.namelist()) != len(shapes):
        raise ConversionError(f"{label} does not have the members this model needs")
      for info in archive.infolist():  # before reading: no member larger than its shape
        if info.file_size > 8 * int(np.prod(shapes[info.filename[:-4]])) + 256:
          raise ConversionError(f"{label} member {info.filename} is too large")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      arrays = {name: npz[name] for name in shapes}
  except ConversionError:
    raise
  except Exception as e:
    raise ConversionError(f"{label} cannot be read: {type(e).__name__}: {str(e)[:200]}") from e
  for name, shape in shapes.items():
    if arrays[name].shape != shape or arrays[name].dtype != np.int64:
      raise ConversionError(f"{label} member {name} has the wrong shape or type")
  return arrays


def from_bytes(data: bytes, model, prior_channels: int) -> ExactHead:
  """The ExactHead stored in exact.npz bytes, checked against the head's model
  (ConversionError): only the expected members, each of its expected shape, are read."""
  return from_arrays(read_npz(data, expected_shapes(model, prior_channels), EXACT_FILE), model)


def from_arrays(arrays: dict, model, prior_shift: int = em.ACT_BITS,
                label: str = EXACT_FILE) -> ExactHead:
  """The ExactHead of read_npz's arrays (ConversionError if they would not stay exact)."""
  tables = {name[len(_TABLE_PREFIX):]: a for name, a in arrays.items()
            if name.startswith(_TABLE_PREFIX)}
  try:
    em.check_tables(tables)
  except ValueError as e:
    raise ConversionError(str(e)) from e

  def layer(name, relu):
    w = arrays[f"{name}.weight"]
    shift = arrays[f"{name}.shift"]
    bits = _RESIDUAL_BITS if name == "context" else _ACT_LIMIT_BITS
    if (np.any(np.sum(np.abs(w.astype(np.float64)), axis=0) * 2.0 ** bits >= 2.0 ** 53)
        or np.any(shift < 1) or np.any(shift > 62)
        or np.any(np.abs(arrays[f"{name}.bias"]) >= 2**61)):
      raise ConversionError(f"{label} layer {name} would not stay exact")
    return IntLayer(w.astype(np.float64), arrays[f"{name}.bias"], shift, relu)

  main = tuple(layer(f"main.{i}", i < 2) for i in range(3))
  delta = tuple(tuple(layer(f"delta.{t}.{i}", i < 2) for i in range(3))
                for t in range(1, model.max_tau + 1)) if model.bias_correction else ()
  return ExactHead(layer("context", False), main, delta, tables, int(model.components),
                   bool(model.share_weights), bool(model.ar_on_errors), prior_shift)
