"""Bias correction on vs off at tau 1..5 (evaluation ablation).

The same exported scalable model codes every tau with its tau-conditioned
bias-correction head (on) or with the tau = 0 mixture integrated over the
wide bin (off, SNIC without correction). Lossless (tau 0) is identical.
Both use the same base layer at s = 1 (TAU_RATE; where this model's
estimated lossless rate is lowest), so only the residual coding differs.
"""
from gvae_jax.sweep import Run, Sweep

MODEL = "experiments/models/small_nearlossless"
TAU_RATE = 1.0


def get_sweep():
  runs = [Run(name, model=MODEL, eval_overrides={"model.residual.bias_correction": on},
              rates=(), taus=(1, 2, 3, 4, 5), tau_rate=TAU_RATE)
          for name, on in (("bias_correction_on", True), ("bias_correction_off", False))]
  return Sweep("bias_correction", __doc__, runs, reference="bias_correction_on")
