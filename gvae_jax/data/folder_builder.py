"""A TFDS builder over a local folder of PNG/JPEG images.

The folder is prepared once (images re-encoded only when needed) into TFDS
record files under `data_dir`; every later run just reads those files. The
config name is `<slug>_<hash>`, where the hash covers the folder's absolute path
and its file listing (relative path, size, mtime): a changed folder therefore
gets a fresh preparation instead of silently serving stale data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from gvae_jax.data.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SLUG_MAX_CHARS = 40
_HASH_CHARS = 10
# Exceptions PIL raises for unreadable, truncated or absurdly large files.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
  """Sorted PNG/JPEG files under `folder`, recursively (hidden files skipped).

  Raises DataError if the folder is missing or holds no PNG/JPEG file.
  """
  root = Path(folder).expanduser().absolute()
  if not root.is_dir():
    raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
  files = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    files.extend(Path(dirpath) / name for name in filenames
                 if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise DataError(f"image folder {str(root)!r} contains no PNG/JPEG file "
                    f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
  return sorted(files)  # os.walk order is filesystem-dependent


def _fingerprint(root: Path, files: list[Path]) -> str:
  digest = hashlib.sha1(str(root).encode())
  for path in files:
    stat = path.stat()
    digest.update(f"\0{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
  return digest.hexdigest()[:_HASH_CHARS]


def _slug(root: Path) -> str:
  slug = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_")
  return slug[:_SLUG_MAX_CHARS] or "root"


@dataclasses.dataclass
class LocalImageFolderConfig(tfds.core.BuilderConfig):
  """Config for one folder; build it with `for_folder`."""
  folder: str = ""

  @classmethod
  def for_folder(cls, folder: str | os.PathLike) -> "LocalImageFolderConfig":
    root = Path(folder).expanduser().absolute()
    files = list_image_files(root)
    return cls(
        name=f"{_slug(root)}_{_fingerprint(root, files)}",
        version=LocalImageFolder.VERSION,
        description=f"{len(files)} PNG/JPEG files under {root}",
        folder=str(root),
    )


def _is_8bit_rgb_file(image: Image.Image) -> bool:
  """True if the file's own bytes already decode to 8-bit RGB PNG/JPEG.

  PIL opens 16-bit RGB PNGs as mode 'RGB' too; the tile's raw mode
  ('RGB;16B') tells them apart.
  """
  if image.format not in ("PNG", "JPEG") or image.mode != "RGB":
    return False
  if image.format == "JPEG":
    return True  # PIL reads only 8-bit JPEGs
  raw_modes = [tile.args if isinstance(tile.args, str) else tile.args[0] for tile in image.tile]
  return all(mode == "RGB" for mode in raw_modes)


def to_rgb8(image: Image.Image) -> np.ndarray:
  """Any PIL image -> uint8 [H, W, 3]. Alpha is dropped (fine for training data)."""
  if image.mode.startswith("I"):  # 16/32-bit integer grayscale: 16-bit range
    gray = np.asarray(image, np.float64) / 257.0
    return np.repeat(np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  if image.mode == "F":
    gray = np.clip(np.round(np.asarray(image, np.float64)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(image.convert("RGB"), np.uint8)


def load_example_image(path: Path) -> str | np.ndarray | None:
  """The value to give the Image feature, or None if the file is unreadable.

  8-bit RGB PNG/JPEG files are passed by path, so TFDS copies their bytes and
  nothing is re-encoded; anything else is converted to an 8-bit RGB array.
  """
  try:
    with Image.open(path) as image:
      image.load()  # decode now: truncated/corrupt files fail here, not later in TF
      if _is_8bit_rgb_file(image):
        return str(path)
      return to_rgb8(image)
  except _UNREADABLE as e:
    log.warning("skipping unreadable image %s: %s", path, e)
    return None


class LocalImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """All PNG/JPEG images under a local folder, as one 'train' split.

  Not registered with TFDS: it only makes sense with a folder, via
  `LocalImageFolder(config=LocalImageFolderConfig.for_folder(...), data_dir=...)`.
  """
  # Bump when the generated examples change (e.g. a different conversion), so
  # folders prepared by older code are prepared again.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "filename": tfds.features.Text(),
        }),
        description="PNG/JPEG images from a local folder, converted to 8-bit RGB.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(Path(self.builder_config.folder))}

  def _generate_examples(self, root: Path):
    num_readable = 0
    for path in list_image_files(root):
      image = load_example_image(path)
      if image is None:
        continue
      num_readable += 1
      relative = path.relative_to(root).as_posix()
      yield relative, {"image": image, "filename": relative}
    if num_readable == 0:
      raise DataError(f"image folder {str(root)!r} has no readable image: every "
                      "PNG/JPEG file failed to open (see the warnings above)")
