"""Gain units vs separately trained fixed-rate models (G-VAE's central claim).

One gained model with 3 levels against 3 single-level models, one per lambda,
each trained for the same number of steps (small_ablation: 600 steps on this
CPU; `--config.train.num_steps=N` sets all four). The fixed-rate points form
the reference curve; the table gives the gained model's BD-rate against it
(the paper reports no loss).
"""
from gvae_jax.sweep import Run, Sweep

CONFIG = "experiments/configs/small_ablation.py"
LAMBDAS = (0.0067, 0.0250, 0.0932)


def get_sweep():
  runs = [Run("gained", CONFIG, {"train.lambdas": LAMBDAS}, rates=(0, 0.5, 1, 1.5, 2))]
  runs += [Run(f"fixed_{lam}", CONFIG, {"model.levels": 1, "train.lambdas": (lam,)},
               rates=(0,), group="fixed") for lam in LAMBDAS]
  return Sweep("gained_vs_fixed", __doc__, runs, reference="fixed")
