"""Tests for gvae_jax.data: the local-folder TFDS builder and the train pipeline."""
import logging
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from gvae_jax.data import (DataError, as_numpy_iterator, create_train_dataset, get_builder,
                           list_image_files, prepare, tfds_data_dir)
from gvae_jax.data.folder_builder import LocalImageFolderConfig, load_example_image

SHARED_TRAIN = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "train"
CROP = 16


def _random_pixels(rng, height, width, channels):
  shape = (height, width) if channels == 1 else (height, width, channels)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _write_image_folder(root: Path) -> None:
  """A few PNG/JPEG images of various modes and sizes, a corrupt file, a subfolder."""
  rng = np.random.default_rng(0)
  (root / "nested" / "deeper").mkdir(parents=True)
  Image.fromarray(_random_pixels(rng, 40, 52, 3)).save(root / "rgb.png")
  Image.fromarray(_random_pixels(rng, 48, 36, 3)).save(root / "photo.jpg", quality=90)
  Image.fromarray(_random_pixels(rng, 10, 13, 3)).save(root / "tiny.JPEG")  # < crop: upscaled
  Image.fromarray(_random_pixels(rng, 30, 30, 1)).save(root / "nested" / "gray.png")
  Image.fromarray(_random_pixels(rng, 33, 41, 4)).save(root / "nested" / "rgba.png")
  Image.fromarray(_random_pixels(rng, 20, 24, 3)).convert("P").save(
      root / "nested" / "deeper" / "palette.png")
  gray16 = rng.integers(0, 65536, (24, 20), dtype=np.uint16)
  Image.fromarray(gray16).save(root / "nested" / "gray16.png")
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  (root / "notes.txt").write_text("not an image; ignored")


NUM_READABLE = 7


def _config(folder, cache_dir, **overrides):
  config = ml_collections.ConfigDict(dict(
      name="folder", folder=str(folder), data_dir=str(cache_dir), crop_size=CROP,
      shuffle_buffer=8, downscale=1, split="train"))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(folder, cache_dir) of an image folder prepared once for the whole module."""
  folder = tmp_path_factory.mktemp("images")
  cache_dir = tmp_path_factory.mktemp("cache")
  _write_image_folder(folder)
  prepare(get_builder("folder", folder=folder, data_dir=tfds_data_dir(cache_dir)))
  return folder, cache_dir


def _take(ds, n):
  iterator = as_numpy_iterator(ds)
  return [next(iterator)["image"] for _ in range(n)]


def test_prepare_reads_every_readable_image_once(prepared):
  folder, cache_dir = prepared
  builder = get_builder("folder", folder=folder, data_dir=tfds_data_dir(cache_dir))
  assert builder.is_prepared()  # same folder -> same config -> nothing to redo
  assert Path(builder.data_dir).is_relative_to(Path(cache_dir) / "tfds")
  assert builder.info.splits["train"].num_examples == NUM_READABLE
  names = {ex["filename"].decode() for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
  assert "nested/deeper/palette.png" in names and "corrupt.png" not in names


def test_unreadable_file_is_skipped_with_a_warning(tmp_path, caplog):
  (tmp_path / "bad.jpg").write_bytes(b"garbage")
  with caplog.at_level(logging.WARNING):
    assert load_example_image(tmp_path / "bad.jpg") is None
  assert "bad.jpg" in caplog.text


def test_conversion_to_8bit_rgb(tmp_path):
  Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(tmp_path / "white16.png")
  white = load_example_image(tmp_path / "white16.png")
  assert white.dtype == np.uint8 and white.shape == (4, 5, 3) and (white == 255).all()
  Image.fromarray(np.zeros((4, 5, 4), np.uint8)).save(tmp_path / "rgba.png")
  assert load_example_image(tmp_path / "rgba.png").shape == (4, 5, 3)
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "rgb.png")
  assert load_example_image(tmp_path / "rgb.png") == str(tmp_path / "rgb.png")  # bytes kept


def test_batches_have_device_shape_dtype_and_range(prepared):
  folder, cache_dir = prepared
  ds = create_train_dataset(_config(folder, cache_dir), per_device_batch=3,
                            num_local_devices=1, seed=0)
  for images in _take(ds, 4):  # 12 > 7 images: crosses an epoch boundary
    assert images.shape == (3, CROP, CROP, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_two_local_devices_and_downscale(prepared):
  folder, cache_dir = prepared
  ds = create_train_dataset(_config(folder, cache_dir, downscale=2), per_device_batch=2,
                            num_local_devices=2, seed=1)
  (images,) = _take(ds, 1)
  assert images.shape == (4, CROP, CROP, 3)  # this process's rows: 2 devices x 2
  assert images.min() >= 0.0 and images.max() <= 1.0


def test_resume_equals_continuing_the_stream(prepared):
  folder, cache_dir = prepared
  config = _config(folder, cache_dir)
  kwargs = dict(per_device_batch=2, num_local_devices=1, seed=7)
  from_start = _take(create_train_dataset(config, start_step=0, **kwargs), 6)
  resumed = _take(create_train_dataset(config, start_step=3, **kwargs), 3)
  for expected, actual in zip(from_start[3:], resumed):
    np.testing.assert_array_equal(actual, expected)
  other_seed = _take(create_train_dataset(config, start_step=0, **{**kwargs, "seed": 8}), 1)
  assert not np.array_equal(other_seed[0], from_start[0])


def test_processes_split_each_global_batch_into_their_rows(prepared):
  """process_sharding="elements": 2 processes x 2 rows are the 4 rows of 1 process."""
  folder, cache_dir = prepared
  config = _config(folder, cache_dir)
  kwargs = dict(per_device_batch=1, num_local_devices=2, seed=3)
  one = _take(create_train_dataset(config, **{**kwargs, "num_local_devices": 4}, start_step=1), 3)
  parts = [_take(create_train_dataset(config, **kwargs, start_step=1, process_index=p,
                                      process_count=2), 3) for p in (0, 1)]
  for step in range(3):
    np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), one[step])


def test_file_sharding_gives_each_process_its_own_files(prepared):
  folder, cache_dir = prepared
  config = _config(folder, cache_dir)
  config.process_sharding = "files"
  kwargs = dict(per_device_batch=2, num_local_devices=1, seed=3, process_count=2)
  first = _take(create_train_dataset(config, process_index=0, **kwargs), 1)[0]
  second = _take(create_train_dataset(config, process_index=1, **kwargs), 1)[0]
  assert first.shape == second.shape == (2, CROP, CROP, 3)
  assert not np.array_equal(first, second)
  config.process_sharding = "hosts"
  with pytest.raises(DataError, match="process_sharding"):
    create_train_dataset(config, process_index=0, **kwargs)


def test_config_name_follows_folder_path_and_content(tmp_path):
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
  name = LocalImageFolderConfig.for_folder(tmp_path).name
  assert name.startswith(tmp_path.name.lower()[:10])
  assert LocalImageFolderConfig.for_folder(tmp_path).name == name  # stable
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.png")
  assert LocalImageFolderConfig.for_folder(tmp_path).name != name  # new content


def test_missing_folder_raises(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(DataError, match="does not exist") as info:
    get_builder("folder", folder=missing, data_dir=tmp_path)
  assert str(missing) in str(info.value)


def test_folder_without_images_raises(tmp_path):
  (tmp_path / "readme.txt").write_text("no images here")
  with pytest.raises(DataError, match="contains no PNG/JPEG file") as info:
    get_builder("folder", folder=tmp_path, data_dir=tmp_path / "cache")
  assert str(tmp_path) in str(info.value)


def test_folder_with_only_corrupt_images_raises(tmp_path):
  folder = tmp_path / "broken"
  folder.mkdir()
  (folder / "a.png").write_bytes(b"not a png")
  (folder / "b.jpg").write_bytes(b"not a jpeg")
  builder = get_builder("folder", folder=folder, data_dir=tmp_path / "tfds")
  with pytest.raises(DataError, match="no readable image") as info:
    prepare(builder)
  assert str(folder) in str(info.value)


def test_folder_name_without_folder_raises():
  with pytest.raises(DataError, match="config.data.folder"):
    get_builder("folder", folder=None)


def test_shared_training_folder_is_listed():
  """Cheap check of the real training folder: lists it, does not prepare it."""
  if not SHARED_TRAIN.is_dir():
    pytest.skip(f"shared training data not found at {SHARED_TRAIN}")
  files = list_image_files(SHARED_TRAIN)
  assert files == sorted(files) and len(files) > 0
  assert {f.suffix.lower() for f in files} <= {".png", ".jpg", ".jpeg"}
  assert len({f.parent for f in files}) > 1  # subfolders are searched
