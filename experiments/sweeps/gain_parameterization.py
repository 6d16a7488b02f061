"""How the gain tables are kept positive: |g|, exp(g) or softplus(g)."""
from gvae_jax.sweep import Run, Sweep

CONFIG = "experiments/configs/small_ablation.py"


def get_sweep():
  runs = [Run(f"gain_{p}", CONFIG, {"model.gain_parameterization": p},
              rates=(0, 0.5, 1, 1.5, 2)) for p in ("abs", "exp", "softplus")]
  return Sweep("gain_parameterization", __doc__, runs, reference="gain_abs")
