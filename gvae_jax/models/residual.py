"""Residual entropy model for near-lossless / lossless coding (SNIC, DLPR).

p(r_hat | u, causal context of r_hat, tau): a masked convolution over the
already decoded residuals, concatenated with the synthesis prior u, goes
through 1x1 layers to discretized-logistic-mixture parameters. A second head
with tau-conditioned 1x1 layers (bias correction) is trained on contexts of
r_hat for tau >= 1, where the decoder sees quantised, not true, residuals.
Two forms (`correction`): "separate", a whole second head trained from
scratch (what small_nearlossless was trained with), and "delta", the lossless
head's output plus a tau-conditioned correction whose last layer starts at
zero, so the corrected head starts exactly at "no correction" and training
only moves it from there.

Every layer after the masked convolution is 1x1, so the step-wise decoder can
run the heads on just the pixels of one step ([N, 1, 1, C] inputs).

Two reparameterisations of the mixture means (options, off by default so the
models trained before them code exactly as before; both only change how the
network's raw outputs map to the same family of mixtures, hence how well
training finds them):
- `mean_scale`: the raw means are multiplied by it (32 matches the 1/32 input
  scale, so a mean of r = 100 grey levels is a raw output of about 3, not 100);
- `ar_on_errors`: the channel autoregression acts on the earlier channels'
  prediction errors, mu_G + alpha (r_R - mu_R) and
  mu_B + beta (r_R - mu_R) + gamma (r_G - mu_G) per component, rather than on
  their values. This is rewritten into the coder's form (means + coefficients
  times values) inside `mixture_from_features`, so every user of the raw
  parameters (training, estimates, the step-wise coder) sees one mixture.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gvae_jax.entropy import logistic_mixture as lm
from gvae_jax.layers import MaskedConv, TauConditionalConv

# Residuals enter the network scaled to roughly unit range.
RESIDUAL_INPUT_SCALE = 1.0 / 32.0


class ResidualModel(nn.Module):
  context_channels: int = 64  # SNIC 64, DLPR 256
  kernel_size: int = 5  # SNIC 5, DLPR 7
  order: int = 2  # decoding-order parameter a (pixel (i, j) decoded at step a*i + j)
  hidden: int = 128
  components: int = 5
  share_weights: bool = False  # DLPR shares mixture weights across R, G, B
  max_tau: int = 5
  bias_correction: bool = True
  correction: str = "separate"  # "separate" | "delta" (module doc)
  mean_scale: float = 1.0  # raw means are multiplied by this (module doc)
  ar_on_errors: bool = False  # channel autoregression on prediction errors (module doc)

  def setup(self):
    self.context = MaskedConv(self.context_channels, self.kernel_size, self.order)
    out = lm.num_raw_params(self.components, self.share_weights)
    self.head = [nn.Conv(self.hidden, (1, 1)), nn.Conv(self.hidden, (1, 1)), nn.Conv(out, (1, 1))]
    if self.correction not in ("separate", "delta"):
      raise ValueError(f"unknown bias correction form {self.correction!r} "
                       "(expected 'separate' or 'delta')")
    if self.bias_correction and self.correction == "separate":
      self.bc_head = [TauConditionalConv(self.hidden, self.max_tau),
                      TauConditionalConv(self.hidden, self.max_tau),
                      TauConditionalConv(out, self.max_tau)]
    elif self.bias_correction:  # another name, so a warm start never fills it from bc_head
      self.bc_delta = [TauConditionalConv(self.hidden, self.max_tau),
                       TauConditionalConv(self.hidden, self.max_tau),
                       TauConditionalConv(out, self.max_tau, zero_init=True)]

  def context_features(self, r_context: jax.Array) -> jax.Array:
    return self.context(r_context * RESIDUAL_INPUT_SCALE)

  def context_at_taps(self, taps: jax.Array) -> jax.Array:
    """The masked convolution's output [N, C] at pixels whose causal taps
    [N, T, 3] (residuals, in `MaskedConv.taps` order) are given: the form the
    pixel-sampled trainer uses (gvae_jax.train.flat_residual)."""
    _, weights, bias = self.context.taps()
    return jnp.einsum("ntc,tcf->nf", taps * RESIDUAL_INPUT_SCALE, weights) + bias

  def _reparameterise(self, raw: jax.Array) -> jax.Array:
    """raw with its means slice mapped to the coder's parameterisation (module doc)."""
    if self.mean_scale == 1.0 and not self.ar_on_errors:
      return raw  # bit-identical to the models trained before these options
    k, c = self.components, lm.CHANNELS
    start = k if self.share_weights else c * k
    lead = raw.shape[:-1]
    means = raw[..., start:start + c * k].reshape(lead + (c, k)) * self.mean_scale
    if self.ar_on_errors:
      coeff_start = start + 2 * c * k
      a = jnp.tanh(raw[..., coeff_start:coeff_start + 3 * k].reshape(lead + (3, k)))
      m_r, m_g, m_b = means[..., 0, :], means[..., 1, :], means[..., 2, :]
      means = jnp.stack([m_r, m_g - a[..., 0, :] * m_r,
                         m_b - a[..., 1, :] * m_r - a[..., 2, :] * m_g], axis=-2)
    return jnp.concatenate([raw[..., :start], means.reshape(lead + (c * k,)),
                            raw[..., start + c * k:]], axis=-1)

  def mixture_from_features(self, features: jax.Array, u: jax.Array, tau: jax.Array,
                            corrected: bool) -> jax.Array:
    """Raw mixture parameters from context features and the prior (any [B, ..., C])."""
    h = jnp.concatenate([features, u], axis=-1)
    if corrected and self.correction == "separate":
      h = nn.relu(self.bc_head[0](h, tau))
      h = nn.relu(self.bc_head[1](h, tau))
      return self._reparameterise(self.bc_head[2](h, tau))
    g = nn.relu(self.head[0](h))
    g = nn.relu(self.head[1](g))
    raw = self.head[2](g)
    if not corrected:
      return self._reparameterise(raw)
    # delta: the tau loss trains the correction only, never the lossless head.
    d = nn.relu(self.bc_delta[0](h, tau))
    d = nn.relu(self.bc_delta[1](d, tau))
    return self._reparameterise(jax.lax.stop_gradient(raw) + self.bc_delta[2](d, tau))

  def __call__(self, u: jax.Array, r_context: jax.Array, tau: jax.Array,
               corrected: bool = False) -> dict[str, jax.Array]:
    """Mixture parameters for every pixel given a full residual context image.

    The corrected head reads the shared context features through a
    stop-gradient: it adapts to quantised contexts without moving the
    layers the lossless path depends on.
    """
    features = self.context_features(r_context)
    if corrected:
      features = jax.lax.stop_gradient(features)
    raw = self.mixture_from_features(features, u, tau, corrected)
    return lm.split_params(raw, self.components, self.share_weights)

  def uses_correction(self, tau: int) -> bool:
    return self.bias_correction and tau >= 1


def residual_bits(params: dict[str, jax.Array], r_hat: jax.Array, tau: jax.Array,
                  low: float = -255.0, high: float = 255.0) -> jax.Array:
  """Bits of r_hat [B, H, W, 3] per example under the mixture (channel AR on r_hat)."""
  tau = jnp.asarray(tau, jnp.float32).reshape((-1, 1, 1, 1))
  means = lm.conditional_means(params, r_hat)
  b = 2 * tau + 1
  # The extreme representable bins of the quantiser grid take the tails.
  low_bin = -b * jnp.floor((255.0 + tau) / b)
  high_bin = b * jnp.floor((255.0 + tau) / b)
  logp = lm.log_prob(r_hat, params, means, tau + 0.5, jnp.maximum(low_bin, low),
                     jnp.minimum(high_bin, high))
  return -jnp.sum(logp, axis=(1, 2, 3)) / jnp.log(2.0)
