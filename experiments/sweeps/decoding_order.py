"""DLPR decoding-order parameter a: pixel (i, j) of a patch is coded at step a*i + j, so a larger a keeps more context taps but needs more steps (a=2: 190 steps per 64x64 patch).

Each run fine-tunes experiments/configs/small_nearlossless.py (lossy layers
warm-started from experiments/models/small) for a shortened CPU schedule and
is evaluated at tau 0..5 with the base rate chosen per image. For pods, use
experiments/configs/dlpr.py and the full schedule.
"""
from gvae_jax.sweep import Run, Sweep

CONFIG = "experiments/configs/small_nearlossless.py"
STEPS = 400


def get_sweep():
  runs = [Run(f"order_{v}", CONFIG, {"model.residual.order": v, "train.num_steps": STEPS},
              rates=(), taus=(0, 1, 2, 3, 4, 5))
          for v in (1, 2, 3)]
  return Sweep("decoding_order", __doc__, runs, reference=None, max_images=6)
