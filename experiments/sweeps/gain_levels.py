"""Number of trained gain levels over the same lambda range (0.0067 .. 0.0932).

Fewer levels leave more of the range to interpolation; more levels split the
training steps between more rows. The 3-level run is the reference.
"""
import numpy as np

from gvae_jax.sweep import Run, Sweep

CONFIG = "experiments/configs/small_ablation.py"


def lambdas(n):
  return tuple(float(f"{v:.5g}") for v in np.geomspace(0.0067, 0.0932, n))


def get_sweep():
  runs = [Run(f"levels_{n}", CONFIG, {"model.levels": n, "train.lambdas": lambdas(n)},
              rates=tuple(np.linspace(0, n - 1, 2 * n - 1).round(3)))
          for n in (2, 3, 4, 6)]
  return Sweep("gain_levels", __doc__, runs, reference="levels_3")
