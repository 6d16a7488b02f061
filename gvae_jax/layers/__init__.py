"""Neural network layers (pure Flax; imports nothing else from gvae_jax but ops)."""
from gvae_jax.layers.gdn import GDN

__all__ = ["GDN"]
