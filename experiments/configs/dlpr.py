"""DLPR-size residual model (7x7 masked conv, 256 filters, 256-channel prior, shared weights)."""
from pathlib import Path

from gvae_jax.config import load_config


def get_config():
  config = load_config(str(Path(__file__).with_name("paper.py")))
  config.model.name = "scalable_gained_hyperprior"
  config.model.prior_channels = 256
  config.model.residual.context_channels = 256
  config.model.residual.kernel_size = 7
  config.model.residual.hidden = 256
  config.model.residual.share_weights = True
  config.data.crop_size = 64
  config.train.per_device_batch = 64
  config.train.learning_rate = 1e-4
  return config
