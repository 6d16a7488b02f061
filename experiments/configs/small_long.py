"""The `small` model trained on: a resumable multi-session CPU run (issue 13).

Same N=64/M=96 gained hyperprior, 4 levels and lambdas as `small`, warm
started from its exported step-5000 weights and trained on with one cosine
schedule over 60000 steps (about 10 hours of this 2-core CPU, spread over
several working sessions). Every training image is shrunk 2x first, which
washes out the JPEG artefacts of the JPEG-sourced folders (and halves the
blur of the upscaled ones).

Resume on a new machine: copy the committed checkpoint into a workdir
(experiments/results/README.md, "small_long") and rerun the same command.
"""
from pathlib import Path

from gvae_jax.config import load_config

_REPO = Path(__file__).resolve().parents[2]


def get_config():
  config = load_config(str(Path(__file__).with_name("small.py")))
  config.train.num_steps = 60_000
  config.train.warmup_steps = 500
  config.train.final_learning_rate_factor = 0.02
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 2
  config.train.init_from = str(_REPO / "experiments" / "models" / "small")
  config.data.downscale = 2
  config.eval.every_steps = 5000
  return config
