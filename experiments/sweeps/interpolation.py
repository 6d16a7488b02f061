"""Exponential vs linear interpolation between trained gain levels.

Evaluation only: the gain tables are trained at integer levels, and the
interpolation rule is applied when coding, so both rules run on the same
exported model (experiments/models/small) at the same fractional rates.
At integer rates both give identical files.
"""
from gvae_jax.sweep import Run, Sweep

MODEL = "experiments/models/small"
RATES = (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75, 3)


def get_sweep():
  runs = [Run(rule, model=MODEL, eval_overrides={"model.interpolation": rule}, rates=RATES)
          for rule in ("exponential", "linear")]
  return Sweep("interpolation", __doc__, runs, reference="exponential")
