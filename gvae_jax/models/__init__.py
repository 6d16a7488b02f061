"""Compression models and their registry."""
from gvae_jax.models.hyperprior import GainedMeanScaleHyperprior
from gvae_jax.models.registry import available, build_model, register

__all__ = ["GainedMeanScaleHyperprior", "available", "build_model", "register"]
