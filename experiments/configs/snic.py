"""SNIC-size residual model (5x5 masked conv, 64 filters, 128-wide heads) on the paper backbone."""
from pathlib import Path

from gvae_jax.config import load_config


def get_config():
  config = load_config(str(Path(__file__).with_name("paper.py")))
  config.model.name = "scalable_gained_hyperprior"
  config.model.prior_channels = 64
  config.model.residual.context_channels = 64
  config.model.residual.kernel_size = 5
  config.model.residual.hidden = 128
  config.data.crop_size = 64
  config.train.per_device_batch = 64
  return config
