"""The one image lister: which files of a folder every evaluation reads.

`gvae eval`, `gvae estimate`, training-time evaluation and sweeps all list
their images here, so they see the same files of a folder: the suffixes
below (case-insensitive), files only, sorted by name.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gvae_jax import image_io
from gvae_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pnm", ".bmp", ".tif", ".tiff",
                  ".webp", ".gif")


class ImageFolderError(UserError):
  """The image folder is missing, not a folder, or holds no images."""


def list_images(folder: str | os.PathLike, max_images: int = 0) -> list[Path]:
  """Image files (by suffix) of a folder, sorted by name; the first max_images if > 0."""
  folder = Path(folder)
  if not folder.exists():
    raise ImageFolderError(f"image folder not found: {folder}")
  if not folder.is_dir():
    raise ImageFolderError(f"{folder} is not a folder of images")
  files = sorted(p for p in folder.iterdir()
                 if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
  if not files:
    raise ImageFolderError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
  if max_images and max_images > 0:
    files = files[:max_images]
  return files


def load_images(folder: str | os.PathLike, max_images: int = 0) -> list[tuple[str, np.ndarray]]:
  """(file name, uint8 RGB [H, W, 3]) of every listed image; image_io's refusals raise."""
  return [(p.name, image_io.read_image(p)[0]) for p in list_images(folder, max_images)]
