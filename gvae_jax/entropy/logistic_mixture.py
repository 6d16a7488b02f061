"""Discretized logistic mixture for colour residuals (SNIC / DLPR; docs/decoding.md).

Values are residuals in grey levels. For an error bound tau the quantised
residual r_hat is a multiple of b = 2*tau + 1 and its probability integrates
the tau = 0 mixture over [r_hat - tau - 1/2, r_hat + tau + 1/2]; the lowest
and highest possible bins take the tails. Colour channels are coded R, G, B
with channel-autoregressive means: mu_G += alpha * r_R,
mu_B += beta * r_R + gamma * r_G (tanh coefficients per component).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOG_SCALE_MIN = -7.0
CHANNELS = 3
_TINY_BIN = 1e-5  # below this probability mass, use the midpoint density (no cancellation)


def num_raw_params(components: int, share_weights: bool) -> int:
  """Channels of the network output that parameterise the mixture per pixel."""
  weights = components if share_weights else CHANNELS * components
  return weights + 2 * CHANNELS * components + 3 * components


def split_params(raw: jax.Array, components: int, share_weights: bool) -> dict[str, jax.Array]:
  """raw [..., P] -> logits [..., 3, K], means [..., 3, K], log_scales [..., 3, K], coeffs [..., 3, K]."""
  k, c = components, CHANNELS
  lead = raw.shape[:-1]
  pos = 0

  def take(n):
    nonlocal pos
    out = raw[..., pos:pos + n]
    pos += n
    return out

  if share_weights:
    logits = jnp.broadcast_to(take(k)[..., None, :], lead + (c, k))
  else:
    logits = take(c * k).reshape(lead + (c, k))
  means = take(c * k).reshape(lead + (c, k))
  log_scales = jnp.maximum(take(c * k).reshape(lead + (c, k)), LOG_SCALE_MIN)
  coeffs = jnp.tanh(take(3 * k).reshape(lead + (3, k)))
  return {"logits": logits, "means": means, "log_scales": log_scales, "coeffs": coeffs}


def conditional_means(params: dict[str, jax.Array], context: jax.Array) -> jax.Array:
  """Means after channel autoregression on the pixel's own earlier channels.

  context [..., 3]: the residual values of R and G used for G and B (the
  decoder's decoded values; in training the true or quantised residual).
  """
  m, a = params["means"], params["coeffs"]
  r = context[..., 0:1]
  g = context[..., 1:2]
  mean_r = m[..., 0, :]
  mean_g = m[..., 1, :] + a[..., 0, :] * r
  mean_b = m[..., 2, :] + a[..., 1, :] * r + a[..., 2, :] * g
  return jnp.stack([mean_r, mean_g, mean_b], axis=-2)


def log_prob(values: jax.Array, params: dict[str, jax.Array], means: jax.Array,
             half_width: jax.Array | float, low: jax.Array | float,
             high: jax.Array | float) -> jax.Array:
  """log P(value) per channel: values [..., 3]; bins [v - half_width, v + half_width].

  Bins at `low` / `high` (the smallest / largest possible values) extend to
  -inf / +inf so the probabilities over the range sum to one.
  """
  v = values[..., None]
  # Per-value arguments gain the component axis; scalars broadcast as they are.
  half_width = jnp.expand_dims(jnp.asarray(half_width, v.dtype), -1)
  inv_scale = jnp.exp(-params["log_scales"])
  centred = v - means
  upper = inv_scale * (centred + half_width)
  lower = inv_scale * (centred - half_width)
  at_top = v >= jnp.expand_dims(jnp.asarray(high, v.dtype), -1)
  at_bottom = v <= jnp.expand_dims(jnp.asarray(low, v.dtype), -1)
  cdf_upper = jnp.where(at_top, 1.0, jax.nn.sigmoid(upper))
  cdf_lower = jnp.where(at_bottom, 0.0, jax.nn.sigmoid(lower))
  mass = cdf_upper - cdf_lower
  # Midpoint density times the bin width, for bins too small to subtract CDFs.
  mid = inv_scale * centred
  log_mid = mid - params["log_scales"] - 2.0 * jax.nn.softplus(mid) + jnp.log(2.0 * half_width)
  edge = at_top | at_bottom  # tail bins are never tiny in the sense of the midpoint rule
  log_mass = jnp.where((mass > _TINY_BIN) | edge, jnp.log(jnp.maximum(mass, 1e-30)), log_mid)
  log_weights = jax.nn.log_softmax(params["logits"], axis=-1)
  return jax.nn.logsumexp(log_weights + log_mass, axis=-1)


def mixture_cdf(edges: jax.Array, weights: jax.Array, means: jax.Array,
                inv_scales: jax.Array) -> jax.Array:
  """P(value < edge) = sum_k w_k sigmoid((x - mu_k) / s_k), at edges [..., E].

  One channel's mixture in the form the coder uses: probability weights,
  conditional means and inverse scales [..., K] (softmax, channel
  autoregression and exp(-log_scale) already applied). The components are
  the last axis of [..., E, K] and reduced at once: on a CPU about twice as
  fast as one fused term per component, and quicker to compile. The coder's
  integer CDFs (gvae_jax.coding.residual_cdfs) are built from this; changing
  its arithmetic changes files.
  """
  terms = weights[..., None, :] * jax.nn.sigmoid(
      inv_scales[..., None, :] * (edges[..., None] - means[..., None, :]))
  return jnp.sum(terms, axis=-1)


def log_prob_linear(values, weights, means, inv_scales, half_width, low, high):
  """log P(value) (nats) per value [..., 1] under its mixture [..., K] (coder form).

  `log_prob`'s numbers (the end bins at `low` / `high` take the tails; bins
  of a component too small to subtract CDFs use its midpoint density times
  the bin width), summed in the linear domain: a third of the exp / log
  work. The encoder's window choice uses it.
  """
  centred = values - means
  at_top, at_bottom = values >= high, values <= low
  upper = jnp.where(at_top, 1.0, jax.nn.sigmoid(inv_scales * (centred + half_width)))
  lower = jnp.where(at_bottom, 0.0, jax.nn.sigmoid(inv_scales * (centred - half_width)))
  mass = upper - lower
  e = jnp.exp(-jnp.abs(inv_scales * centred))
  density = inv_scales * e / jnp.square(1.0 + e) * (2.0 * half_width)
  mass = jnp.where((mass > _TINY_BIN) | at_top | at_bottom, mass, density)
  return jnp.log(jnp.maximum(jnp.sum(weights * mass, axis=-1), 1e-30))


def bin_half_width(tau: jax.Array | int) -> jax.Array:
  return jnp.asarray(tau, jnp.float32) + 0.5


def quantize_residual(r: jax.Array, tau: jax.Array | int) -> jax.Array:
  """r_hat = sign(r) * b * floor((|r| + tau) / b), b = 2 tau + 1: |r - r_hat| <= tau."""
  tau = jnp.asarray(tau, r.dtype)
  b = 2 * tau + 1
  return jnp.sign(r) * b * jnp.floor((jnp.abs(r) + tau) / b)
