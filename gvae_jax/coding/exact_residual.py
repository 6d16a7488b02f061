"""The lossy-base residual layer in exact integer arithmetic (mode EXACT_RESIDUAL).

A near-lossless or lossless file on the lossy base depends on three things
besides the lossy layer: the base image (the exact synthesis,
gvae_jax.coding.exact_lossy), the prior u of the synthesis' prior head, and
the residual head that turns u and the decoded context into mixtures. This
module converts the last two of a scalable model whose lossy layer is
converted already:

- the prior head: an Int8Conv of exact_lossy (int8 weights, the 16-bit input
  as two int8 digits, int32 sums) on the last inverse GDN's output, at the
  input bits of the synthesis' last convolution, which reads the same
  activation; u is its output in 2^-16 units (|u| <= 2^27), computed in the
  same call as the base image (ExactLossy.synthesize_with_prior);
- the head: gvae_jax.coding.exact_head's conversion of the ResidualModel
  (integer-valued float64 matrices, exact in any summation order), with u
  entering the first 1x1 layer in 2^-16 units as its context features do
  (ExactHead.prior_shift = 0; a flat head's 0 / 1 flags are shifted instead).

Stored as `exact_residual.npz` beside exact_lossy.npz (owned here): the prior
head's members ("prior.*") and the head's (exact_head.members). Its hash is
folded into the model's fingerprint together with exact_lossy.npz's
(gvae_jax.coding.export.with_exact_fingerprint), so files of this mode decode
only with these integers; the lossy and flat-base files of the same model
without it carry the fingerprint without it and still decode.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np

from gvae_jax.coding import exact_head, exact_lossy
from gvae_jax.coding.exact_head import ConversionError

EXACT_RESIDUAL_FILE = "exact_residual.npz"
_PRIOR = "prior"
_HEAD = "head."


@dataclasses.dataclass(frozen=True, eq=False)
class ExactResidual:
  prior: exact_lossy.Int8Conv  # g_s's prior head: last hidden activation -> u (2^-16)
  head: exact_head.ExactHead  # the lossy-base residual head, prior_shift 0


def convert(model, params, exact: exact_lossy.ExactLossy) -> ExactResidual:
  """The ExactResidual of a scalable model (a ScalableHyperprior and its params) whose
  lossy layer converted to `exact` (ConversionError if a layer cannot stay exact)."""
  prior = exact_lossy.convert_prior(model.lossy, params["lossy"], exact)
  residual = model.residual
  if residual.bias_correction and residual.correction != "delta":
    raise ConversionError(f"only the 'delta' bias correction converts, not "
                          f"{residual.correction!r}")
  head = exact_head.convert_residual(residual, params["residual"], prior_shift=0)
  return ExactResidual(prior, head)


def _shapes(model) -> dict[str, tuple[int, ...]]:
  n, channels = int(model.lossy.n), int(model.lossy.prior_channels)
  shapes = exact_lossy.conv8_shapes(_PRIOR, n, 4 * channels)
  shapes.update({_HEAD + k: v
                 for k, v in exact_head.expected_shapes(model.residual, channels).items()})
  return shapes


def to_bytes(exact: ExactResidual) -> bytes:
  arrays = exact_lossy.conv8_members(exact.prior, _PRIOR)
  arrays.update({_HEAD + k: v for k, v in exact_head.members(exact.head).items()})
  buffer = io.BytesIO()  # compressed like exact_lossy.npz (small integers in int64)
  np.savez_compressed(buffer, **{name: arrays[name] for name in sorted(arrays)})
  return buffer.getvalue()


def from_bytes(data: bytes, model) -> ExactResidual:
  """The ExactResidual in exact_residual.npz bytes, checked against the scalable `model`
  (ConversionError): only the expected members, each of its shape and int64, are read."""
  arrays = exact_head.read_npz(data, _shapes(model), EXACT_RESIDUAL_FILE)
  prior = exact_lossy.conv8_from_members(arrays, _PRIOR, True, EXACT_RESIDUAL_FILE)
  head = exact_head.from_arrays({k[len(_HEAD):]: v for k, v in arrays.items()
                                 if k.startswith(_HEAD)}, model.residual, prior_shift=0,
                                label=EXACT_RESIDUAL_FILE)
  return ExactResidual(prior, head)
