"""Experiment configuration: the base ConfigDict, loading config files, overrides.

Config files (experiments/configs/*.py) define get_config() and start from
`base_config()`, as in the Flax examples. Any field can be overridden on the
command line with --config.section.key=value (parsed by ml_collections'
config_flags); an unknown key is an error.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import ml_collections

from gvae_jax.errors import UserError

# MSE lambdas on the 0..255 scale (D = 255^2 * MSE on [0, 1]); docs/decoding.md section 2.
PAPER_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800)


class ConfigError(UserError):
  pass


def base_config() -> ml_collections.ConfigDict:
  """The paper-scale defaults every experiment config starts from."""
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.name = "gained_mean_scale_hyperprior"
  config.model.n = 192
  config.model.m = 320
  config.model.levels = len(PAPER_LAMBDAS)
  config.model.gain_parameterization = "abs"  # abs | exp | softplus
  config.model.gain_init = "lambda"  # lambda (sqrt(lambda) spread) | ones
  config.model.interpolation = "exponential"  # exponential | linear
  config.model.quantization = "mixed"  # mixed | noise
  config.model.prior_channels = 0  # residual-prior features u (scalable models)
  # Entropy model of y: "symmetric" (Gaussian conditional) or "asymmetric"
  # (G-VAE's two scales around the mean): gvae_jax/models/hyperprior.py
  config.model.entropy_model = "symmetric"
  # Rate of y in training and estimates: "likelihood" (-log2 of the model's
  # likelihood) or "coded" (what the range coder pays, escapes included).
  config.model.y_rate = "likelihood"
  # Residual layer of scalable_gained_hyperprior (SNIC sizes; DLPR: 7x7, 256).
  config.model.residual = ml_collections.ConfigDict()
  config.model.residual.context_channels = 64
  config.model.residual.kernel_size = 5
  config.model.residual.order = 2  # pixel (i, j) of a patch is decoded at step order*i + j
  config.model.residual.hidden = 128
  config.model.residual.components = 5
  config.model.residual.share_weights = False
  config.model.residual.max_tau = 5
  config.model.residual.bias_correction = True
  # "separate" (a second head from scratch) or "delta" (the lossless head plus
  # a zero-initialised tau-conditioned correction): gvae_jax/models/residual.py
  config.model.residual.correction = "separate"
  # Mixture-mean parameterisation (gvae_jax/models/residual.py): the flat-base
  # head (experiments/configs/flat_residual.py) uses 32.0 and True.
  config.model.residual.mean_scale = 1.0
  config.model.residual.ar_on_errors = False

  config.train = ml_collections.ConfigDict()
  config.train.lambdas = PAPER_LAMBDAS
  config.train.distortion = "mse"  # mse | ms-ssim (lambdas then weight 1 - MS-SSIM)
  config.train.per_device_batch = 8
  config.train.num_steps = 1_000_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.final_learning_rate_factor = 0.1
  config.train.grad_clip = 1.0
  config.train.seed = 0
  config.train.log_every = 100
  config.train.checkpoint_every = 5000
  config.train.keep_checkpoints = 3
  config.train.init_from = ""  # exported model dir to warm-start matching parameters from
  # "bfloat16": the transforms' convolutions compute in bf16 (parameters,
  # entropy models and losses stay float32); training only, codecs are float32.
  config.train.compute_dtype = "float32"

  config.data = ml_collections.ConfigDict()
  config.data.name = "folder"  # 'folder' (any local image folder) or a TFDS name, e.g. 'clic'
  config.data.folder = ""
  config.data.data_dir = ""  # TFDS cache; empty = <workdir>/tfds
  config.data.split = "train"
  config.data.crop_size = 256
  config.data.shuffle_buffer = 1024
  config.data.downscale = 1
  # Multi-process: "elements" (every process walks one seeded stream and keeps
  # its rows of each global batch) or "files" (each reads its own files).
  config.data.process_sharding = "elements"

  config.eval = ml_collections.ConfigDict()
  config.eval.folder = ""  # empty = no evaluation
  config.eval.every_steps = 50_000  # 0 = only after the last step
  config.eval.max_images = 0  # images for the periodic evaluation; 0 = all
  config.eval.final_max_images = 0  # images for the evaluation after the last step
  config.eval.fractional_rates = (0.5, 3.5, 6.5)
  return config


def call_user_file(path: Path, function: str, kind: str, error: type[Exception], *args):
  """Returns function(*args) of the user's Python file `path` (a config or sweep
  file); anything it raises becomes one `error` message, not a traceback."""
  if not path.is_file():
    raise error(f"{kind} file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(f"_gvae_{kind}_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, function):
      raise error(f"{kind} file {path} defines no {function}()")
    return getattr(module, function)(*args)
  except error:
    raise
  except Exception as e:  # a user's file: report, don't trace back
    raise error(f"cannot load {kind} {path}: {type(e).__name__}: {e}") from e


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` and applies --config.key=value overrides."""
  path_str, _, arg = spec.partition(":")
  config = call_user_file(Path(path_str), "get_config", "config", ConfigError,
                          *((arg,) if arg else ()))
  apply_overrides(config, overrides)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies --config.key=value overrides in place, with ml_collections' config_flags.

  The values are parsed by config_flags' own per-type flag parsers (the type
  of the field's current value: int, float, bool, str, tuples), on a private
  absl FlagValues, so absl never sees or owns the rest of the command line.
  Unknown keys and unparsable values are ConfigErrors.
  """
  overrides = list(overrides)
  if not overrides:
    return
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise ConfigError(f"bad override {item!r}: expected --config.section.key=value")
    _check_key(config, item[len("--config."):].partition("=")[0])
  from absl import flags
  from ml_collections import config_flags

  argv = ["gvae", *overrides]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv)
    values(argv)
  except flags.Error as e:
    raise ConfigError(f"bad override: {e}") from None


def set_by_path(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """config.<key> = raw, parsed as apply_overrides parses --config.<key>=raw."""
  apply_overrides(config, [f"--config.{key}={raw}"])


def _check_key(config: ml_collections.ConfigDict, key: str) -> None:
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r}")
    node = node[part]
  if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f"unknown config key {key!r}; known keys here: {', '.join(sorted(node.keys()))}")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, indent=2, default=list)


# Residual keys added after models were exported, with the value their
# absence means (the registry reads old configs with these defaults).
RESIDUAL_KEYS_IMPLIED_WHEN_ABSENT = {"correction": "separate", "mean_scale": 1.0,
                                     "ar_on_errors": False}
# The same for keys of config.model itself.
MODEL_KEYS_IMPLIED_WHEN_ABSENT = {"entropy_model": "symmetric", "y_rate": "likelihood"}


def model_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of what fixes the parameter shapes and numerics of a model."""
  model = config.model.to_dict()
  # Such keys are hashed only when they differ from their implied value, so
  # existing fingerprints stay valid.
  residual = model.get("residual", {})
  for key, implied in RESIDUAL_KEYS_IMPLIED_WHEN_ABSENT.items():
    if residual.get(key, implied) == implied:
      residual.pop(key, None)
  for key, implied in MODEL_KEYS_IMPLIED_WHEN_ABSENT.items():
    if model.get(key, implied) == implied:
      model.pop(key, None)
  relevant = {"model": model, "levels_lambdas": list(config.train.lambdas)}
  blob = json.dumps(relevant, sort_keys=True, default=list).encode()
  return hashlib.sha256(blob).hexdigest()[:16]
