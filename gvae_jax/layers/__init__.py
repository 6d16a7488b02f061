"""Neural network layers (pure Flax; imports nothing else from gvae_jax but ops)."""
from gvae_jax.layers.conditional import TauConditionalConv
from gvae_jax.layers.gdn import GDN
from gvae_jax.layers.masked import MaskedConv, causal_mask, decoding_steps, step_of_pixel

__all__ = ["GDN", "MaskedConv", "TauConditionalConv", "causal_mask", "decoding_steps",
           "step_of_pixel"]
