"""Entropy models: pure JAX math plus thin Flax wrappers for learned parts."""
from gvae_jax.entropy import asymmetric_gaussian, gaussian
from gvae_jax.entropy.factorized import DeepFactorized

__all__ = ["DeepFactorized", "asymmetric_gaussian", "gaussian"]
