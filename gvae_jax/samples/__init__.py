"""A sample photo and a small training folder, shipped with the package.

Both are synthetic (made by `synthetic_photo` below, so they carry no
third-party licence): a landscape-like scene with a sky gradient, a sun,
layered fractal ridges with haze, a textured ground, a house with hard
edges, and mild sensor noise, which exercises the codec like a photo does.

  SAMPLE_PHOTO       photo.png, 384x256: the README's first `gvae compress`
  QUICKSTART_IMAGES  train/, 16 images of 160x160: what
                     experiments/configs/quickstart.py trains on, so that a
                     fresh clone can train without any data download

Regenerate them with `python -m gvae_jax.samples` (deterministic).
NumPy and Pillow only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES_DIR = Path(__file__).resolve().parent
SAMPLE_PHOTO = SAMPLES_DIR / "photo.png"
QUICKSTART_IMAGES = SAMPLES_DIR / "train"


def _smooth_noise(rng, height: int, width: int, cells: int) -> np.ndarray:
  """Value noise in [0, 1]: a random grid of `cells` per side, bicubically upsampled."""
  from PIL import Image

  grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
  image = Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC)
  return np.asarray(image, np.float32)


def _fractal(rng, height: int, width: int, octaves: int = 5) -> np.ndarray:
  total = np.zeros((height, width), np.float32)
  amplitude, norm = 1.0, 0.0
  for octave in range(octaves):
    total += amplitude * _smooth_noise(rng, height, width, 2 ** (octave + 1))
    norm += amplitude
    amplitude *= 0.55
  return total / norm


def synthetic_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
  """A deterministic photo-like uint8 RGB image [height, width, 3] (module doc)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  v, u = yy / height, xx / width
  top = np.array([40, 90, 170], np.float32) + rng.normal(0, 15, 3)
  horizon = np.array([190, 205, 220], np.float32) + rng.normal(0, 10, 3)
  image = top + (horizon - top) * (v[..., None] ** 0.8)
  # Sun with a soft glow.
  cy, cx, radius = rng.uniform(0.1, 0.35), rng.uniform(0.15, 0.85), rng.uniform(0.03, 0.07)
  distance = np.hypot((v - cy) * height / width, u - cx)
  glow = np.exp(-(distance / (radius * 3)) ** 2)[..., None]
  image = image + glow * (np.array([255, 240, 200]) - image) * 0.6
  image = np.where((distance < radius)[..., None], np.array([255, 248, 225], np.float32), image)
  # Clouds.
  clouds = np.clip(_fractal(rng, height, width) * 1.8 - 0.95, 0, 1)[..., None] * (v < 0.5)[..., None]
  image = image + clouds * (250 - image) * 0.8
  # Ridges, far (hazy) to near (dark, saturated).
  for layer in range(3):
    line = _fractal(rng, 1, width, 6)[0]
    base = 0.35 + 0.12 * layer + rng.uniform(-0.03, 0.03)
    ridge = base + (line - 0.5) * (0.35 - 0.08 * layer)
    mask = v > ridge[None, :]
    texture = _fractal(rng, height, width, 6)[..., None]
    colour = np.array([60 + 30 * layer, 90 + 25 * layer, 70 - 10 * layer], np.float32)
    colour = colour * (0.7 + 0.6 * texture)
    haze = 0.55 - 0.2 * layer
    colour = colour * (1 - haze) + horizon * haze
    image = np.where(mask[..., None], colour, image)
  # Ground: grass / soil texture with fine detail.
  ground = v > 0.8 + 0.03 * np.sin(u * 9 + seed)
  detail = _fractal(rng, height, width, 7)[..., None]
  soil = np.array([95, 120, 50], np.float32) * (0.6 + 0.8 * detail)
  image = np.where(ground[..., None], soil, image)
  # A house: hard edges, flat colours, a window.
  hx, hw = int(width * rng.uniform(0.1, 0.6)), max(4, int(width * 0.18))
  hy, hh = int(height * 0.66), max(4, int(height * 0.16))
  image[hy:hy + hh, hx:hx + hw] = np.array([180, 80, 60]) + rng.normal(0, 4, 3)
  for row in range(hh // 2):
    image[hy - row, hx + row:hx + hw - row] = np.array([90, 50, 45])
  wy, wx = hy + hh // 4, hx + hw // 3
  image[wy:wy + hh // 3, wx:wx + hw // 4] = np.array([230, 220, 140])
  image = image + rng.normal(0, 2.0, image.shape)  # sensor noise
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def write_samples() -> None:
  from PIL import Image

  Image.fromarray(synthetic_photo(256, 384, seed=2026)).save(SAMPLE_PHOTO, optimize=True)
  QUICKSTART_IMAGES.mkdir(exist_ok=True)
  for index in range(16):
    Image.fromarray(synthetic_photo(160, 160, seed=index)).save(
        QUICKSTART_IMAGES / f"synthetic_{index:02d}.png", optimize=True)
