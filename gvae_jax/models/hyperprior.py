"""The gained mean-scale hyperprior: one model, a continuous range of rates.

x -> g_a -> y;  y' = y * g(s);  z = h_a(y') * hg(s);  z_hat = Q(z)
-> h_s(z_hat * hg'(s)) = (mu, sigma);  y_hat = Q(y' - mu) + mu
-> x_tilde = g_s(y_hat * g'(s))

Entropy model of y' (config `entropy_model`):
- "symmetric" (default): the Gaussian conditional N(mu, sigma^2).
- "asymmetric" (G-VAE): h_s predicts (mu, sigma_left, sigma_right), the two
  scales of the asymmetric Gaussian (gvae_jax.entropy.asymmetric_gaussian).

Rate of y (config `y_rate`), in training and in the estimates:
- "likelihood" (default): -log2 of the model's bin likelihood, unbounded.
- "coded": what the range coder pays for the symbol under the exported
  tables, in-range floor and escapes included (gvae_jax.entropy.coded_rate).

Quantisation in training (config `quantization`):
- "mixed" (default, Minnen & Singh 2020): additive uniform noise for the rate
  terms, straight-through rounding (around mu for y) for what the synthesis
  and hyper synthesis see, so the decoder trains on what it gets at test time.
- "noise": additive uniform noise everywhere (Balle 2018).
At evaluation (`train=False`) everything is rounded, exactly as when coding.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gvae_jax import gain as gain_lib
from gvae_jax.entropy import DeepFactorized, asymmetric_gaussian, coded_rate, gaussian
from gvae_jax.models.transforms import Analysis, HyperAnalysis, HyperSynthesis, Synthesis
from gvae_jax.ops import crop, lower_bound, pad_to_multiple, round_st

QUANTIZATIONS = ("mixed", "noise")
ENTROPY_MODELS = ("symmetric", "asymmetric")
Y_RATES = ("likelihood", "coded")
LIKELIHOOD_BOUND = 1e-9  # floor of the z likelihoods (factorized model)


class GainedMeanScaleHyperprior(nn.Module):
  n: int = 128
  m: int = 192
  levels: int = 8
  gain_parameterization: str = "abs"
  interpolation: str = "exponential"
  gain_init_rows: Sequence[float] | None = None
  quantization: str = "mixed"
  prior_channels: int = 0  # residual-prior features u from the synthesis (0 = none)
  entropy_model: str = "symmetric"  # or "asymmetric" (module doc)
  y_rate: str = "likelihood"  # or "coded" (module doc)
  # Compute dtype of the transforms' convolutions (training option; None =
  # float32). The gains, entropy models and likelihoods are always float32.
  compute_dtype: str | None = None

  # Total downsampling of the hyper latent: g_a halves 4 times, h_a twice.
  stride: int = 64

  def setup(self):
    if self.quantization not in QUANTIZATIONS:
      raise ValueError(f"unknown quantization {self.quantization!r}; choose one of {QUANTIZATIONS}")
    if self.entropy_model not in ENTROPY_MODELS:
      raise ValueError(f"unknown entropy_model {self.entropy_model!r}; "
                       f"choose one of {ENTROPY_MODELS}")
    if self.y_rate not in Y_RATES:
      raise ValueError(f"unknown y_rate {self.y_rate!r}; choose one of {Y_RATES}")
    dtype = None if self.compute_dtype in (None, "float32") else jnp.dtype(self.compute_dtype)
    self.g_a = Analysis(self.n, self.m, dtype=dtype)
    self.g_s = Synthesis(self.n, prior_channels=self.prior_channels, dtype=dtype)
    self.h_a = HyperAnalysis(self.n, dtype=dtype)
    self.h_s = HyperSynthesis(self.m, scales=2 if self.is_asymmetric else 1, dtype=dtype)

    def table(channels, init_rows):
      return gain_lib.GainTable(self.levels, channels, init_rows,
                                self.gain_parameterization, self.interpolation)

    # Only the latent gain gets the lambda-shaped initial spread; its inverse
    # starts at the reciprocal so G_s * G'_s = 1 at every level.
    rows = self.gain_init_rows
    inverse_rows = None if rows is None else [1.0 / r for r in rows]
    self.gain = table(self.m, rows)
    self.inverse_gain = table(self.m, inverse_rows)
    self.hyper_gain = table(self.n, None)
    self.inverse_hyper_gain = table(self.n, None)
    self.z_density = DeepFactorized(self.n)

  # --- The pieces the codec calls; encoder and decoder share each one. ---

  def analyze(self, x: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Padded image in [0, 1] -> (gained latent y', gained hyper latent z)."""
    y = self.g_a(x) * self.gain(s)
    z = self.h_a(y) * self.hyper_gain(s)
    return y, z

  @property
  def is_asymmetric(self) -> bool:
    return self.entropy_model == "asymmetric"

  def hyper_synthesize(self, z_hat: jax.Array, s: jax.Array):
    """Quantised z -> (mean, scale) of the Gaussian conditional for y'.

    Asymmetric model: (mean, (left scale, right scale)).
    """
    mean, *raw_scales = self.h_s(z_hat * self.inverse_hyper_gain(s))
    scales = tuple(lower_bound(jnp.exp(raw), gaussian.SCALE_MIN) for raw in raw_scales)
    return mean, (scales if self.is_asymmetric else scales[0])

  def y_log_likelihood(self, values: jax.Array, scale) -> jax.Array:
    """Natural-log bin likelihoods of v = y' - mean under `scale` as hyper_synthesize returns it.

    In the log domain with no floor: a floored linear likelihood has a zero
    gradient beyond ~13 scales, so nothing corrects an overconfident scale
    (measured: asymmetric files 9 % below such estimates; results README).
    """
    if self.is_asymmetric:
      return asymmetric_gaussian.log_likelihood(values, *scale)
    return gaussian.log_likelihood(values, scale)

  def y_bits(self, values: jax.Array, scale) -> jax.Array:
    """Bits of each v = y' - mean under `scale`, by the configured `y_rate`."""
    if self.y_rate == "coded":
      if self.is_asymmetric:
        return coded_rate.asymmetric_bits(values, *scale)
      return coded_rate.symmetric_bits(values, scale)
    return -self.y_log_likelihood(values, scale) / jnp.log(2.0)

  def synthesize(self, y_hat: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Quantised y' -> (reconstruction in ~[0, 1], residual-prior features or None)."""
    return self.g_s(y_hat * self.inverse_gain(s))

  def z_likelihood(self, z: jax.Array) -> jax.Array:
    return self.z_density(z)

  # --- Training / estimation forward pass. ---

  def __call__(self, x: jax.Array, s: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """x: [B, H, W, 3] in [0, 1]; s: [B] continuous rate levels in [0, levels-1].

    Returns the reconstruction (cropped to H, W, unclipped), the bits of y
    and z per example, and u (the residual prior) when configured.
    """
    s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x.shape[:1])
    x_padded, size = pad_to_multiple(x, self.stride)
    y, z = self.analyze(x_padded, s)

    if train:
      noise_z = jax.random.uniform(self.make_rng("noise"), z.shape, minval=-0.5, maxval=0.5)
      z_rate_input = z + noise_z
      z_hat = round_st(z) if self.quantization == "mixed" else z_rate_input
    else:
      z_hat = jnp.round(z)
      z_rate_input = z_hat
    z_lik = lower_bound(self.z_likelihood(z_rate_input), LIKELIHOOD_BOUND)

    mean, scale = self.hyper_synthesize(z_hat, s)
    if train:
      noise_y = jax.random.uniform(self.make_rng("noise"), y.shape, minval=-0.5, maxval=0.5)
      y_rate_input = y + noise_y
      y_hat = round_st(y - mean) + mean if self.quantization == "mixed" else y_rate_input
    else:
      y_hat = jnp.round(y - mean) + mean
      y_rate_input = y_hat
    y_bits = self.y_bits(y_rate_input - mean, scale)

    x_tilde, u = self.synthesize(y_hat, s)
    bits = lambda lik: -jnp.sum(jnp.log2(lik), axis=(1, 2, 3))
    out = {
        "x_tilde": crop(x_tilde, size),
        "bits_y": jnp.sum(y_bits, axis=(1, 2, 3)),
        "bits_z": bits(z_lik),
    }
    if u is not None:
      out["u"] = crop(u, size)
    return out
