"""Size of the masked context kernel (SNIC 5x5, DLPR 7x7).

Each run fine-tunes experiments/configs/small_nearlossless.py (lossy layers
warm-started from experiments/models/small) for a shortened CPU schedule and
is evaluated at tau 0..5 with the base rate chosen per image. For pods, use
experiments/configs/dlpr.py and the full schedule.
"""
from gvae_jax.sweep import Run, Sweep

CONFIG = "experiments/configs/small_nearlossless.py"
STEPS = 400


def get_sweep():
  runs = [Run(f"kernel_size_{v}", CONFIG, {"model.residual.kernel_size": v, "train.num_steps": STEPS},
              rates=(), taus=(0, 1, 2, 3, 4, 5))
          for v in (3, 5, 7)]
  return Sweep("kernel_size", __doc__, runs, reference=None, max_images=6)
