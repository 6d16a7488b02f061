"""Trains usefully on a 2-core CPU in about an hour.

N=64/M=96, 4 levels spanning the paper's lambda range, 128x128 crops, a
higher learning rate with cosine decay over 5000 steps (~0.4-0.8 s a step here).
"""
from pathlib import Path

from gvae_jax.config import load_config


def get_config():
  config = load_config(str(Path(__file__).with_name("paper.py")))
  config.model.n = 64
  config.model.m = 96
  config.model.levels = 4
  config.train.lambdas = (0.0035, 0.0130, 0.0483, 0.1800)
  config.train.per_device_batch = 8
  config.train.num_steps = 5000
  config.train.learning_rate = 5e-4
  config.train.warmup_steps = 200
  config.train.final_learning_rate_factor = 0.05
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.data.crop_size = 128
  config.data.shuffle_buffer = 256
  config.eval.every_steps = 2000
  config.eval.max_images = 4
  config.eval.fractional_rates = (0.5, 1.5, 2.5)
  return config
