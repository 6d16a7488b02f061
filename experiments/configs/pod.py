"""The paper model on accelerators: `--config experiments/configs/pod.py:TARGET`.

TARGET         devices (hosts x per host)   per-device batch   global batch
gpu8           8 GPUs (1 x 8, 40-80 GB)     8                  64
v5e-16         16 TPU v5e chips (4 x 4)     4                  64
v6e-16         16 TPU v6e chips (4 x 4)     8                  128

The global batch is per_device_batch x the devices JAX sees at run time, so
each target assumes its device count. Relative to the paper setting (batch 8,
lr 1e-4, 1M steps): the learning rate is scaled by sqrt(global / 8) (Adam),
the step count by 8 / global (the same number of training images), and the
warm-up is 2000 steps. The transforms compute in bfloat16 (entropy models,
likelihoods and losses in float32; parameters float32). These settings are
derived, not tuned: nothing here has run on a GPU or TPU.
"""
import math
from pathlib import Path

from gvae_jax.config import ConfigError, load_config

PAPER_BATCH = 8
PAPER_STEPS = 1_000_000
TARGETS = {
    "gpu8": {"devices": 8, "per_device_batch": 8},
    "v5e-16": {"devices": 16, "per_device_batch": 4},
    "v6e-16": {"devices": 16, "per_device_batch": 8},
}


def get_config(target: str = "gpu8"):
  if target not in TARGETS:
    raise ConfigError(f"pod.py: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
  config = load_config(str(Path(__file__).with_name("paper.py")))
  spec = TARGETS[target]
  global_batch = spec["devices"] * spec["per_device_batch"]
  config.train.per_device_batch = spec["per_device_batch"]
  config.train.learning_rate = config.train.learning_rate * math.sqrt(global_batch / PAPER_BATCH)
  config.train.num_steps = PAPER_STEPS * PAPER_BATCH // global_batch
  config.train.warmup_steps = 2000
  config.train.compute_dtype = "bfloat16"
  config.train.log_every = 200
  config.train.checkpoint_every = 5000
  config.eval.every_steps = 20_000
  return config
