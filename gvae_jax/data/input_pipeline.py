"""The training input pipeline: TFDS records -> random crops, this process's rows of each batch.

The stream is a pure function of (seed, step): the shuffle is seeded, every
random crop/flip uses stateless ops seeded by (seed, element index) (and the
process, with process_sharding="files"), and resuming at step k skips exactly
k batches of still-encoded images. So the batches of a run started with
`start_step=k` equal batches k, k+1, ... of a run started at 0.

Images whose shorter side is below the crop size (after the optional
downscale) are upscaled, keeping their aspect ratio, until it equals the crop
size; padding would teach the model about artificial borders.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from gvae_jax.data.errors import DataError
from gvae_jax.data.folder_builder import LocalImageFolder, LocalImageFolderConfig

FOLDER_DATASET = "folder"  # config.data.name selecting LocalImageFolder


def tfds_data_dir(cache_dir: str | os.PathLike | None) -> str | None:
  """TFDS data_dir inside a cache dir (None keeps TFDS's default, ~/tensorflow_datasets)."""
  return None if cache_dir is None else os.path.join(os.fspath(cache_dir), "tfds")


def get_builder(name: str, folder: str | os.PathLike | None = None,
                data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
  """The (not yet prepared) builder: a local folder if name == 'folder', else a TFDS dataset."""
  data_dir = None if data_dir is None else os.fspath(data_dir)
  if name == FOLDER_DATASET:
    if not folder:
      raise DataError("dataset 'folder' needs config.data.folder (a folder of PNG/JPEG images)")
    return LocalImageFolder(config=LocalImageFolderConfig.for_folder(folder), data_dir=data_dir)
  # Registered TFDS datasets (e.g. 'clic', 'div2k'); preparing them may download.
  return tfds.builder(name, data_dir=data_dir)


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Prepares the builder's files once; later calls only check that they exist."""
  if isinstance(builder, LocalImageFolder):
    # Statistics would cost a full extra pass over the images for nothing.
    config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    builder.download_and_prepare(download_config=config)
  else:
    builder.download_and_prepare()


PROCESS_SHARDINGS = ("elements", "files")


def _read_encoded_images(builder, split: str, image_key: str,
                         process_files: tuple[int, int] | None) -> tf.data.Dataset:
  """`split` (or, with process_files = (index, count), this process's even
  share of its files, as tfds.split_for_jax_process) as still-encoded image
  bytes in a fixed order."""
  if image_key not in builder.info.features.keys():
    raise DataError(f"dataset {builder.name!r} has no feature {image_key!r}; "
                    f"features: {sorted(builder.info.features.keys())}")
  ds = builder.as_dataset(
      split=(split if process_files is None
             else tfds.even_splits(split, n=process_files[1], drop_remainder=False)[process_files[0]]),
      shuffle_files=False,  # the seeded shuffle below is the only randomness
      decoders={image_key: tfds.decode.SkipDecoding()},  # skipping/resuming stays cheap
  )
  return ds.map(lambda example: example[image_key])


def _resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """Antialiased bilinear resize of a uint8 image, back to uint8."""
  resized = tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _upscale_to_cover(image: tf.Tensor, crop_size: int) -> tf.Tensor:
  """Upscales (keeping aspect) so the shorter side is >= crop_size; else unchanged."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short_side = tf.minimum(height, width)

  def upscale():
    scale = crop_size / tf.cast(short_side, tf.float64)
    new_h = tf.maximum(tf.cast(tf.math.ceil(tf.cast(height, tf.float64) * scale), tf.int32), crop_size)
    new_w = tf.maximum(tf.cast(tf.math.ceil(tf.cast(width, tf.float64) * scale), tf.int32), crop_size)
    return _resize(image, new_h, new_w)

  return tf.cond(short_side < crop_size, upscale, lambda: image)


def _make_preprocess(crop_size: int, downscale: int, seed: int, process_index: int):
  base_seed = tf.constant([seed, process_index], tf.int64)

  def preprocess(index: tf.Tensor, encoded: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    if downscale > 1:
      # Shrinking with antialiasing also washes out JPEG block artefacts.
      shape = tf.shape(image)
      image = _resize(image, tf.maximum(shape[0] // downscale, 1),
                      tf.maximum(shape[1] // downscale, 1))
    image = _upscale_to_cover(image, crop_size)
    element_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(element_seed, 2))
    image = tf.image.stateless_random_crop(image, [crop_size, crop_size, 3], seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return tf.cast(image, tf.float32) / 255.0

  return preprocess


def create_train_dataset(config_data: Any, *, per_device_batch: int, num_local_devices: int,
                         seed: int, start_step: int = 0, process_index: int | None = None,
                         process_count: int | None = None) -> tf.data.Dataset:
  """Endless {'image': float32 [local_batch, crop, crop, 3] in [0, 1]}: this
  process's rows of each global batch (local_batch = per_device_batch x
  num_local_devices; the global batch is local_batch x process_count).

  config_data fields: name ('folder' or a TFDS name), folder, data_dir (cache
  dir; TFDS files go to <data_dir>/tfds), crop_size, shuffle_buffer, downscale
  (1 = none), split; optional image_key (default 'image') and
  process_sharding:
  - "elements" (default): every process walks the same seeded, shuffled
    stream of still-encoded images and decodes and crops only its own rows of
    each global batch. The global batch is then the same for any number of
    processes (a 2-host run reproduces a 1-host run); each host reads every
    file's bytes but decodes only its share.
  - "files": each process reads only its own files (tfds.split_for_jax_process)
    with its own shuffle; least I/O for very large datasets, but the batches
    depend on the process count.
  """
  crop_size = int(config_data.crop_size)
  downscale = int(getattr(config_data, "downscale", 1) or 1)
  if crop_size < 1 or downscale < 1:
    raise DataError(f"crop_size ({crop_size}) and downscale ({downscale}) must be >= 1")
  image_key = getattr(config_data, "image_key", None) or "image"
  split = getattr(config_data, "split", None) or "train"
  sharding = getattr(config_data, "process_sharding", None) or "elements"
  if sharding not in PROCESS_SHARDINGS:
    raise DataError(f"config.data.process_sharding is {sharding!r}; choose one of "
                    f"{PROCESS_SHARDINGS}")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  by_files = sharding == "files"

  builder = get_builder(config_data.name, folder=getattr(config_data, "folder", None),
                        data_dir=tfds_data_dir(getattr(config_data, "data_dir", None)))
  prepare(builder)
  local_batch = per_device_batch * num_local_devices

  ds = _read_encoded_images(builder, split, image_key,
                            (process_index, process_count) if by_files else None)
  ds = ds.repeat().shuffle(int(config_data.shuffle_buffer), seed=seed)
  ds = ds.enumerate()  # element index in the endless shuffled stream: seeds its crop
  if by_files:
    ds = ds.skip(start_step * local_batch)
    crop_seed_process = process_index
  else:
    global_batch = local_batch * process_count
    ds = ds.skip(start_step * global_batch)
    if process_count > 1:  # keep this process's rows of every global batch
      ds = ds.filter(lambda index, _: (index % global_batch) // local_batch == process_index)
    crop_seed_process = 0  # crops depend on the global index only
  ds = ds.map(_make_preprocess(crop_size, downscale, seed, crop_seed_process),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(lambda images: {"image": images})

  options = tf.data.Options()
  options.deterministic = True  # parallel ops keep their input order
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def as_numpy_iterator(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates the dataset as dicts of numpy arrays (ready for jax.device_put)."""
  return iter(tfds.as_numpy(ds))
