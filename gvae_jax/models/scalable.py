"""Lossy + residual: one model for lossy, near-lossless (tau >= 1) and lossless (tau = 0).

The gained hyperprior gives x_tilde and prior features u; the residual
r = x - round(clip(x_tilde)) (grey levels) is quantised for tau and coded with
ResidualModel. Training (docs/decoding.md section 3): loss = R_y + R_z + R_r + lambda_s * D
where R_r is the lossless (tau = 0) residual rate with the true residual as
context, plus, when bias correction is on, the rate of r_hat for a sampled
tau >= 1 under the corrected head with r_hat as context. That second term
trains only the correction head (its inputs are stop-gradient), so it cannot
pull the shared layers away from the lossless optimum.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gvae_jax.entropy import logistic_mixture as lm
from gvae_jax.models.hyperprior import GainedMeanScaleHyperprior
from gvae_jax.models.residual import ResidualModel, residual_bits
from gvae_jax.ops import round_st


def base_layer_pixels(x_tilde: jax.Array) -> jax.Array:
  """round(clip(x_tilde)) on the 0..255 scale; straight-through gradient in training."""
  return round_st(jnp.clip(x_tilde * 255.0, 0.0, 255.0))


class ScalableHyperprior(nn.Module):
  lossy: GainedMeanScaleHyperprior
  residual: ResidualModel

  def __call__(self, x: jax.Array, s: jax.Array, train: bool = False,
               tau: jax.Array | None = None) -> dict[str, jax.Array]:
    """x [B, H, W, 3] in [0, 1] (8-bit values / 255); tau [B] ints >= 1 for the corrected head."""
    out = self.lossy(x, s, train=train)
    x_int = jnp.round(x * 255.0)
    base = base_layer_pixels(out["x_tilde"])
    r = x_int - base
    u = out["u"]
    zeros = jnp.zeros(x.shape[:1], jnp.int32)
    params = self.residual(u, r, zeros, corrected=False)
    out["bits_r"] = residual_bits(params, r, zeros)
    if tau is not None and self.residual.bias_correction:
      r_hat = jax.lax.stop_gradient(lm.quantize_residual(r, tau[:, None, None, None]))
      corrected = self.residual(jax.lax.stop_gradient(u), r_hat, tau, corrected=True)
      out["bits_r_tau"] = residual_bits(corrected, r_hat, tau)
    return out
