"""Flat-base residual head, trained on randomly sampled pixels (issue 17).

Near-lossless and lossless coding with x_base = 128 (no lossy layer in the
file; gvae_jax.models.flat_base): a 7x7 causal context (decoding order a = 2,
160 features), tap availability flags instead of an indistinguishable zero
context at patch and image borders, two 1x1 layers of 224, K = 5 logistic
components with means on a x32 scale and channel autoregression on
prediction errors, and the "delta" tau correction (tau 1..5) trained on a
quarter as many pixels per step, beside the lossless head. 4096 pixels per
step from every image of the training folder, JPEG-sourced ones shrunk 2x.
Trained with gvae_jax.train.flat_residual (its doc: resuming, exports).
"""
from pathlib import Path

import ml_collections

from gvae_jax.config import base_config

_REPO = Path(__file__).resolve().parents[2]


def get_config():
  config = base_config()
  config.model.name = "flat_residual"
  r = config.model.residual
  r.context_channels = 160
  r.kernel_size = 7
  r.order = 2
  r.hidden = 224
  r.components = 5
  r.max_tau = 5
  r.bias_correction = True
  r.correction = "delta"
  r.mean_scale = 32.0
  r.ar_on_errors = True
  config.model.flat = ml_collections.ConfigDict()
  config.model.flat.border_flags = True  # u = availability of each tap (flat_base doc)

  t = config.train
  t.num_steps = 60_000
  t.pixels_per_step = 4096
  t.tau_pixels = 1024
  t.learning_rate = 1e-3
  t.warmup_steps = 500
  t.final_learning_rate_factor = 0.01
  t.grad_clip = 1.0
  t.log_every = 100
  t.keep_checkpoints = 2
  t.checkpoint_every_minutes = 5.0
  t.export_every_minutes = 10.0
  t.export_dir = str(_REPO / "experiments" / "models" / "flat_residual")

  config.data.folder = "../shared/data/train"  # as paper.py: relative to the main checkout
  config.data.jpeg_downscale = 2
  return config
