"""CPU-sized scalable model: lossy at any rate, near-lossless for any tau, lossless.

The `small` lossy backbone with 32 prior channels and a SNIC-style residual
model (5x5 masked context, 32 filters, 64-wide 1x1 layers, K=5), bias
correction for tau 1..5. 64x64 crops, as DLPR trains its residual model.
The lossy layers warm-start from the trained `small` model
(experiments/models/small), since training gained models from scratch is
slow; set --config.train.init_from= to train from scratch.
"""
from pathlib import Path

from gvae_jax.config import load_config


def get_config():
  config = load_config(str(Path(__file__).with_name("small.py")))
  config.model.name = "scalable_gained_hyperprior"
  config.model.prior_channels = 32
  config.model.residual.context_channels = 32
  config.model.residual.hidden = 64
  config.data.crop_size = 64
  config.data.downscale = 2  # removes JPEG block artefacts the residual model would learn
  config.train.per_device_batch = 16
  config.train.num_steps = 3000
  config.train.checkpoint_every = 200
  config.train.warmup_steps = 100
  config.train.learning_rate = 2e-4
  config.train.init_from = str(Path(__file__).resolve().parents[1] / "models" / "small")
  return config
