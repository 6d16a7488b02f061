"""A short `small` schedule for ablations on this CPU (~8 minutes a run).

Same N=64/M=96 transforms and 128x128 crops as `small`, 3 rate levels and
600 steps, no periodic evaluation (sweeps evaluate real files afterwards).
Fixed-rate baselines use `--config.model.levels=1 --config.train.lambdas=L`.
For pods, sweep over experiments/configs/paper.py instead.
"""
from pathlib import Path

from gvae_jax.config import load_config


def get_config():
  config = load_config(str(Path(__file__).with_name("small.py")))
  config.model.levels = 3
  config.train.lambdas = (0.0067, 0.0250, 0.0932)
  config.train.num_steps = 600
  config.train.warmup_steps = 50
  config.train.checkpoint_every = 200
  config.train.log_every = 50
  config.eval.folder = ""
  return config
