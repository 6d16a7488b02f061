"""First training run on a fresh clone: minutes on a laptop CPU, no data download.

Trains a small gained hyperprior (N=32, M=48, 2 levels) for 200 steps (about 5 minutes on 2 cores) on
the 16 synthetic images shipped in gvae_jax/samples/train (64x64 crops) and
evaluates on two of them. It only shows that the pipeline works end to end;
for a useful model point it at real photos:

  gvae train --config experiments/configs/quickstart.py --workdir runs/quick \
      --config.data.folder=~/Pictures --config.eval.folder=~/Pictures

or use experiments/configs/small.py (one CPU hour) on a real folder.
"""
from pathlib import Path

from gvae_jax.config import load_config
from gvae_jax.samples import QUICKSTART_IMAGES


def get_config():
  config = load_config(str(Path(__file__).with_name("paper.py")))
  config.model.n = 32
  config.model.m = 48
  config.model.levels = 2
  config.train.lambdas = (0.01, 0.05)
  config.train.per_device_batch = 4
  config.train.num_steps = 200
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 20
  config.train.log_every = 50
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 2
  config.data.folder = str(QUICKSTART_IMAGES)
  config.data.crop_size = 64
  config.data.shuffle_buffer = 16
  config.eval.folder = str(QUICKSTART_IMAGES)
  config.eval.every_steps = 0
  config.eval.max_images = 2
  config.eval.final_max_images = 2
  config.eval.fractional_rates = (0.5,)
  return config
