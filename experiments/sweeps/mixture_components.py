"""Number of logistic mixture components K of the residual model.

Each run fine-tunes experiments/configs/small_nearlossless.py (lossy layers
warm-started from experiments/models/small) for a shortened CPU schedule and
is evaluated at tau 0..5 with the base rate chosen per image. For pods, use
experiments/configs/dlpr.py and the full schedule.
"""
from gvae_jax.sweep import Run, Sweep

CONFIG = "experiments/configs/small_nearlossless.py"
STEPS = 400


def get_sweep():
  runs = [Run(f"components_{v}", CONFIG, {"model.residual.components": v, "train.num_steps": STEPS},
              rates=(), taus=(0, 1, 2, 3, 4, 5))
          for v in (1, 3, 5, 10)]
  return Sweep("mixture_components", __doc__, runs, reference=None, max_images=6)
