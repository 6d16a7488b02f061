"""Seconds-scale config for tests: a tiny network on tiny crops, 2 levels."""
from pathlib import Path

from gvae_jax.config import load_config


def get_config():
  config = load_config(str(Path(__file__).with_name("paper.py")))
  config.model.n = 8
  config.model.m = 12
  config.model.levels = 2
  config.train.lambdas = (0.01, 0.1)
  config.train.per_device_batch = 2
  config.train.num_steps = 6
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 0
  config.train.log_every = 2
  config.train.checkpoint_every = 3
  config.train.keep_checkpoints = 2
  config.data.crop_size = 32
  config.data.shuffle_buffer = 8
  config.eval.every_steps = 0
  config.eval.max_images = 2
  config.eval.final_max_images = 2
  config.eval.fractional_rates = (0.5,)
  return config
