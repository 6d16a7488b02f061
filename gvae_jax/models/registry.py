"""Model registry: config name -> constructor, so configs and exports name models."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from gvae_jax import gain as gain_lib
from gvae_jax.config import MODEL_KEYS_IMPLIED_WHEN_ABSENT, RESIDUAL_KEYS_IMPLIED_WHEN_ABSENT
from gvae_jax.models.hyperprior import GainedMeanScaleHyperprior
from gvae_jax.models.residual import ResidualModel
from gvae_jax.models.scalable import ScalableHyperprior

_REGISTRY: dict[str, Callable[[Any], nn.Module]] = {}


def register(name: str):
  def wrap(builder):
    _REGISTRY[name] = builder
    return builder
  return wrap


def available() -> list[str]:
  return sorted(_REGISTRY)


def build_model(config) -> nn.Module:
  """Builds the model named by `config.model.name` from the full experiment config."""
  name = config.model.name
  if name not in _REGISTRY:
    raise KeyError(f"unknown model {name!r}; registered models: {', '.join(available())}")
  return _REGISTRY[name](config)


@register("gained_mean_scale_hyperprior")
def _gained_hyperprior(config, prior_channels: int | None = None) -> GainedMeanScaleHyperprior:
  m = config.model
  lambdas = list(config.train.lambdas)
  if len(lambdas) != m.levels:
    raise ValueError(f"config.train.lambdas has {len(lambdas)} values but "
                     f"config.model.levels is {m.levels}")
  if m.gain_init == "lambda":
    rows = tuple(float(r) for r in gain_lib.lambda_init_rows(lambdas))
  elif m.gain_init == "ones":
    rows = None
  else:
    raise ValueError(f"unknown gain_init {m.gain_init!r}; choose 'lambda' or 'ones'")
  return GainedMeanScaleHyperprior(
      n=m.n, m=m.m, levels=m.levels,
      gain_parameterization=m.gain_parameterization,
      interpolation=m.interpolation,
      gain_init_rows=rows,
      quantization=m.quantization,
      prior_channels=m.get("prior_channels", 0) if prior_channels is None else prior_channels,
      entropy_model=m.get("entropy_model", MODEL_KEYS_IMPLIED_WHEN_ABSENT["entropy_model"]),
      y_rate=m.get("y_rate", MODEL_KEYS_IMPLIED_WHEN_ABSENT["y_rate"]))


def build_residual(config) -> ResidualModel:
  """The ResidualModel of `config.model.residual` (scalable and flat-base models)."""
  r = config.model.residual
  implied = RESIDUAL_KEYS_IMPLIED_WHEN_ABSENT
  return ResidualModel(
      context_channels=r.context_channels, kernel_size=r.kernel_size, order=r.order,
      hidden=r.hidden, components=r.components, share_weights=r.share_weights,
      max_tau=r.max_tau, bias_correction=r.bias_correction,
      correction=r.get("correction", implied["correction"]),
      mean_scale=float(r.get("mean_scale", implied["mean_scale"])),
      ar_on_errors=bool(r.get("ar_on_errors", implied["ar_on_errors"])))


@register("scalable_gained_hyperprior")
def _scalable(config) -> ScalableHyperprior:
  if config.model.prior_channels < 1:
    raise ValueError("scalable_gained_hyperprior needs config.model.prior_channels >= 1")
  return ScalableHyperprior(_gained_hyperprior(config), build_residual(config))


@register("flat_residual")
def _flat_residual(config) -> ResidualModel:
  """The residual head of the flat base (x_base = 128; gvae_jax.models.flat_base)."""
  return build_residual(config)
