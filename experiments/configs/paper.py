"""Paper setting: Minnen 2018 mean-scale backbone (N=192, M=320) with G-VAE gain units.

8 levels with the lambda list of Cui et al. 2021; 256x256 crops, batch 8 per
device. For GPU hosts and TPU slices: pod.py (bf16, scaled batch and learning rate).
Training data: the sibling ../shared/data/train folder, or any image folder
(--config.data.folder=...), or a TFDS dataset (--config.data.name=clic).
"""
from pathlib import Path

from gvae_jax.config import base_config

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def get_config():
  config = base_config()
  config.data.folder = str(SHARED_DATA / "train")
  config.eval.folder = str(SHARED_DATA / "kodak")
  return config
