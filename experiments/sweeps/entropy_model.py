"""Symmetric vs asymmetric Gaussian entropy model of y (G-VAE's second contribution).

Two gained models on experiments/configs/small_ablation.py, identical except
for `model.entropy_model`: the Gaussian conditional N(mu, sigma^2) (the
reference) and the asymmetric Gaussian with separate scales left and right of
the mean (gvae_jax/entropy/asymmetric_gaussian.py). Same seed, data, steps
and lambdas (`--config.train.num_steps=N` sets both); evaluated on real files
at every trained level and the midpoints. The table gives the asymmetric
model's BD-rate against the symmetric one.
"""
from gvae_jax.sweep import Run, Sweep

CONFIG = "experiments/configs/small_ablation.py"
RATES = (0, 0.5, 1, 1.5, 2)


def get_sweep():
  runs = [Run(name, CONFIG, {"model.entropy_model": name}, rates=RATES)
          for name in ("symmetric", "asymmetric")]
  return Sweep("entropy_model", __doc__, runs, reference="symmetric")
