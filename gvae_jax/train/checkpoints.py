"""The training workdir format: its config guard, Orbax checkpoints, and reading them back.

A workdir holds

  config.json    the experiment config of the first run (gvae_jax.config.to_json)
  checkpoints/   Orbax CheckpointManager steps of the train state
                 ({"params", "opt_state", "step", ...}; restore_params reads
                 only "params")
  eval/          training-time evaluations (gvae_jax.eval.estimate reports)

Everything that reads a workdir goes through this module: training (resume),
`gvae estimate --workdir` (load_workdir) and `gvae export` (export_workdir).
An exported model is read only through gvae_jax.coding.export.load_model,
with its fingerprint check (warm_start).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gvae_jax import config as config_lib
from gvae_jax import fileio
from gvae_jax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"


class IncompatibleWorkdirError(UserError):
  pass


def _load_config_json(path: Path) -> ml_collections.ConfigDict:
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
    raise IncompatibleWorkdirError(f"{path} is not a readable config ({e})") from e


def check_compatible(config: ml_collections.ConfigDict, workdir: Path, *,
                     write: bool = True) -> None:
  """Refuses a workdir whose checkpoints belong to a different model.

  The first run writes config.json; a later run must agree on everything that
  fixes parameter shapes (the model section and the level lambdas). Other
  settings (steps, logging, data) may change between runs. With several
  processes only process 0 writes (`write`), atomically, so another process
  never reads a half-written file.
  """
  path = workdir / CONFIG_FILE
  if path.exists():
    saved = _load_config_json(path)
    if config_lib.model_fingerprint(saved) != config_lib.model_fingerprint(config):
      diffs = _model_differences(saved, config)
      raise IncompatibleWorkdirError(
          f"workdir {workdir} holds checkpoints of a different model configuration "
          f"({'; '.join(diffs)}). Use a new --workdir, or the config it was trained with.")
  if write:
    fileio.atomic_write_bytes(path, config_lib.to_json(config).encode(), overwrite=True)


def _model_differences(saved, config) -> list[str]:
  diffs = []
  old, new = saved.model.to_dict(), config.model.to_dict()
  for key in sorted(set(old) | set(new)):
    if old.get(key) != new.get(key):
      diffs.append(f"model.{key}: {old.get(key)!r} in the workdir, {new.get(key)!r} now")
  if list(saved.train.lambdas) != list(config.train.lambdas):
    diffs.append(f"train.lambdas: {list(saved.train.lambdas)} vs {list(config.train.lambdas)}")
  return diffs


def manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints, create=True)
  return ocp.CheckpointManager((workdir / CHECKPOINTS_DIR).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state))


def restore_latest(mngr: ocp.CheckpointManager, state):
  """The newest checkpoint restored into `state`'s structure, or `state` if none."""
  step = mngr.latest_step()
  if step is None:
    return state
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(state))
  except (ValueError, KeyError, TypeError) as e:
    raise IncompatibleWorkdirError(
        f"cannot restore checkpoint {step} from {mngr.directory}: it does not match this "
        f"model ({type(e).__name__}: {str(e)[:300]})") from e


def warm_start(params, model_dir: str | Path, gain_parameterization: str | None = None):
  """Copies every parameter of an exported model whose path and shape match.

  For fine-tuning: a scalable model can start from a trained lossy model
  (whose tree then sits under 'lossy'), new parts keep their initialisation.
  A fixed-rate model's single gain row fills every level of a gained
  model's table (`_expand_gain_table`; gain_parameterization: this model's,
  default the source's). The model is read with export.load_model
  (fingerprint checked). Returns
  the new params and the number of arrays copied.
  """
  import flax

  from gvae_jax.coding import export

  if not (Path(model_dir) / export.MANIFEST_FILE).is_file():
    raise UserError(f"--config.train.init_from: no exported model at {model_dir} "
                    f"(no {export.MANIFEST_FILE})")
  try:
    exported = export.load_model(model_dir)
  except export.ExportError as e:
    raise UserError(f"--config.train.init_from: {e}") from e
  source = flax.traverse_util.flatten_dict(flax.core.unfreeze(exported.params))
  target = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  source_parameterization = exported.config.model.get("gain_parameterization", "abs")
  copied = 0
  for key, value in target.items():
    for candidate in (key, key[1:]):  # same path, or the path below a wrapper ('lossy', ...)
      found = source.get(candidate)
      if found is None:
        continue
      if np.shape(found) == value.shape:
        target[key] = np.asarray(found, value.dtype)
      elif _is_single_level_gain(key, found, value):
        target[key] = _expand_gain_table(np.asarray(found), np.asarray(value),
                                         source_parameterization,
                                         gain_parameterization or source_parameterization)
      else:
        continue
      copied += 1
      break
  if copied == 0:
    raise UserError(f"--config.train.init_from: no parameter of {model_dir} fits this model")
  return flax.traverse_util.unflatten_dict(target), copied


def _is_single_level_gain(key: tuple, source, target) -> bool:
  return (key[-1] == "table" and np.ndim(source) == 2 and np.shape(source)[0] == 1
          and np.ndim(target) == 2 and np.shape(source)[1] == np.shape(target)[1])


def _expand_gain_table(source: np.ndarray, init: np.ndarray, source_parameterization: str,
                       parameterization: str):
  """A fixed-rate model's one gain row spread over a gained model's levels.

  The fine-tune protocol (gain units added to a trained fixed-rate model):
  level i starts at the trained row times the level's own initial gain
  (gain.lambda_init_rows: 1 at the geometric-mean lambda), so the level whose
  lambda the fixed model was trained for reproduces it exactly when that
  lambda is the geometric mean.
  """
  from gvae_jax import gain

  trained = np.asarray(gain.to_positive(source, source_parameterization), np.float64)
  rows = np.asarray(gain.to_positive(init, parameterization), np.float64)
  return gain.from_positive(trained * rows, parameterization).astype(init.dtype)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config.json of a training workdir (UserError if it is not one)."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise UserError(f"training workdir not found: {workdir}")
  path = workdir / CONFIG_FILE
  if not path.is_file():
    raise UserError(f"{workdir} is not a training workdir (no {CONFIG_FILE})")
  return _load_config_json(path)


def restore_params(workdir: Path, step: int | None = None):
  """Parameters of a training workdir's newest (or given) checkpoint, as saved.

  UserError if there is none; errors of a damaged checkpoint are one line too.
  """
  directory = (Path(workdir) / CHECKPOINTS_DIR).absolute()
  if not directory.is_dir():  # Orbax would create it and find nothing
    raise UserError(f"no checkpoints in {workdir} (no {CHECKPOINTS_DIR}/ directory)")
  # Orbax warns that restoring without a target tree is unsafe across device
  # topologies; we only read the arrays, so keep the user's terminal clean.
  absl_logger = logging.getLogger("absl")
  previous_level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    mngr = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {directory}")
    restored = mngr.restore(step, args=ocp.args.StandardRestore(_local_target(mngr, step)))
    return restored["params"], step
  except UserError:
    raise
  except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"cannot restore checkpoint {step if step is not None else '(newest)'} "
                    f"from {workdir}: {type(e).__name__}: {str(e)[:300]}") from e
  finally:
    absl_logger.setLevel(previous_level)


def _local_target(mngr: ocp.CheckpointManager, step: int):
  """The checkpoint's tree as arrays on this process's first device.

  A checkpoint written on a mesh records its devices; restoring it anywhere
  else (export on a laptop of a pod's run) needs a target saying where to put
  the arrays.
  """
  import jax

  metadata = mngr.item_metadata(step)
  metadata = getattr(metadata, "tree", metadata)  # orbax >= 0.12 wraps the tree
  if metadata is None:
    raise FileNotFoundError(f"checkpoint {step} has no readable metadata")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


def load_workdir(workdir: str | os.PathLike, overrides: Sequence[str] = ()):
  """(config with overrides, model, params, step) of a workdir's newest checkpoint.

  Every problem is a UserError: an unknown model name or a config the
  registry cannot build, and parameters that do not fit the (overridden)
  config.
  """
  from gvae_jax.coding import export
  from gvae_jax.models import build_model

  config = read_config(workdir)
  config_lib.apply_overrides(config, overrides)
  try:
    model = build_model(config)
  except (KeyError, ValueError, AttributeError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise UserError(f"{Path(workdir) / CONFIG_FILE}: cannot build the model: {message}") from e
  params, step = restore_params(Path(workdir))
  try:
    export.check_params(model, params)
  except export.ExportError as e:
    raise UserError(f"checkpoint {step} of {workdir}: {e}") from e
  return config, model, params, step


def export_workdir(workdir: str | os.PathLike, out_dir: str | os.PathLike,
                   step: int | None = None, force: bool = False):
  """Exports a training workdir's newest (or given) checkpoint to out_dir (`gvae export`)."""
  from gvae_jax.coding import export

  workdir = Path(workdir)
  config = read_config(workdir)
  if not (workdir / CHECKPOINTS_DIR).is_dir():
    raise UserError(f"no checkpoints in {workdir} (no {CHECKPOINTS_DIR}/ directory)")
  if Path(out_dir).exists() and not force:  # fail before the slow restore
    raise export.ExportError(f"{out_dir} already exists; pass --force to replace it")
  params, step = restore_params(workdir, step)
  return export.export_params(config, params, out_dir, step, force)
