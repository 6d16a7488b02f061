"""Gain units vs fixed-rate models under a fair protocol (issue 13).

The plain `gained_vs_fixed` sweep gives every model the same number of steps,
so each of the gained model's three levels sees a third of the examples a
fixed model sees. Here the comparisons are:

- matched compute: one gained model trained for 3 x STEPS steps against three
  fixed-rate models of STEPS steps each (the same total number of steps);
- the fine-tune protocol of other implementations: gain units added to the
  trained fixed-rate model of the middle lambda (its single gain row spread
  over the three levels, see checkpoints.warm_start) and the whole model
  trained STEPS more steps on all three lambdas (2 x STEPS in total, counting
  the fixed model it starts from).

The fixed-rate points are the reference curve. Every run trains on the same
data with the same seed; `--config.data.folder=...` and
`--config.data.downscale=2` (clean data) go on the command line. Do not pass
`--config.train.num_steps`: the runs set their own.
"""
from gvae_jax.sweep import Run, Sweep

CONFIG = "experiments/configs/small_ablation.py"
LAMBDAS = (0.0067, 0.0250, 0.0932)  # geometric mean 0.025: the fine-tune starts from that one
STEPS = 2000
RATES = (0, 0.5, 1, 1.5, 2)


def _fixed(lam: float) -> Run:
  return Run(f"fixed_{lam}", CONFIG,
             {"model.levels": 1, "train.lambdas": (lam,), "train.num_steps": STEPS},
             rates=(0,), group="fixed")


def get_sweep():
  # Listed in the order the local engine should start them (two jobs: the long
  # matched-compute run beside the fixed runs; the fine-tune right after its base).
  runs = [Run("gained_matched_compute", CONFIG,
              {"train.lambdas": LAMBDAS, "train.num_steps": 3 * STEPS}, rates=RATES),
          _fixed(LAMBDAS[1]),
          Run("gained_finetuned", CONFIG, {"train.lambdas": LAMBDAS, "train.num_steps": STEPS},
              init_from=f"fixed_{LAMBDAS[1]}", rates=RATES),
          _fixed(LAMBDAS[0]), _fixed(LAMBDAS[2])]
  return Sweep("gained_vs_fixed_fair", __doc__, runs, reference="fixed")
