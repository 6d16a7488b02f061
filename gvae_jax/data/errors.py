"""Errors raised by the data package (kept apart so every module can import them)."""

from gvae_jax.errors import UserError



class DataError(UserError):
  """A dataset cannot be built or read (missing folder, no readable image, ...)."""
