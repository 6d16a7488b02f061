"""Model registry: config name -> constructor, so configs and exports name models."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from gvae_jax import gain as gain_lib
from gvae_jax.models.hyperprior import GainedMeanScaleHyperprior

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
def _gained_hyperprior(config) -> GainedMeanScaleHyperprior:
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
      prior_channels=m.get("prior_channels", 0))
