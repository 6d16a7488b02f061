"""Training data: TFDS builders and the tf.data input pipeline.

This package (and the coder) are the only places that import TensorFlow. It is
used on the CPU only, so accelerators are hidden from it before anything else
touches TF: otherwise TF would grab GPU/TPU memory that JAX needs.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # 3: also the CUDA-registration ERROR lines

import tensorflow as tf  # noqa: E402


def _hide_accelerators_from_tf() -> None:
  for device_type in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):
      # RuntimeError: TF's runtime was already initialised (devices then stay
      # as they are); ValueError: this TF build does not know the device type.
      pass


_hide_accelerators_from_tf()

from gvae_jax.data.errors import DataError  # noqa: E402
from gvae_jax.data.folder_builder import (  # noqa: E402
    LocalImageFolder, LocalImageFolderConfig, list_image_files)
from gvae_jax.data.input_pipeline import (  # noqa: E402
    as_numpy_iterator, create_train_dataset, get_builder, prepare, tfds_data_dir)

__all__ = [
    "DataError", "LocalImageFolder", "LocalImageFolderConfig", "list_image_files",
    "as_numpy_iterator", "create_train_dataset", "get_builder", "prepare",
    "tfds_data_dir",
]
