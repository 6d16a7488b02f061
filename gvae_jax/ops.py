"""Small pure-JAX numerical operations shared by layers and entropy models.

Nothing here imports another gvae_jax module.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def lower_bound(x: jax.Array, bound: float) -> jax.Array:
  """max(x, bound) whose gradient still flows where descent would push x up.

  A plain maximum kills the gradient below the bound, so a parameter that
  falls under it could never recover (Balle et al. 2018; TFC `lower_bound`).
  `bound` is a constant (no gradient).
  """
  return jnp.maximum(x, bound)


def _lower_bound_fwd(x, bound):
  return jnp.maximum(x, bound), (x, bound)


def _lower_bound_bwd(residual, g):
  x, bound = residual
  # Gradient descent moves x by -g: let it through if x is above the bound
  # or the step would raise x.
  pass_through = (x >= bound) | (g < 0)
  return jnp.where(pass_through, g, jnp.zeros_like(g)), None


lower_bound.defvjp(_lower_bound_fwd, _lower_bound_bwd)


def round_st(x: jax.Array) -> jax.Array:
  """Rounding with a straight-through (identity) gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def pad_to_multiple(x: jax.Array, multiple: int) -> tuple[jax.Array, tuple[int, int]]:
  """Edge-pads NHWC images so H and W are multiples of `multiple`.

  Edge (replicate) padding costs fewer bits than zeros at the border.
  Returns the padded batch and the original (H, W) to crop back to.
  """
  h, w = x.shape[-3], x.shape[-2]
  ph, pw = (-h) % multiple, (-w) % multiple
  if ph or pw:
    pad = [(0, 0)] * (x.ndim - 3) + [(0, ph), (0, pw), (0, 0)]
    x = jnp.pad(x, pad, mode="edge")
  return x, (h, w)


def crop(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  return x[..., : size[0], : size[1], :]
