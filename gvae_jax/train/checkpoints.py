"""Orbax checkpointing of the train state, and the workdir's config guard."""
from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import orbax.checkpoint as ocp

from gvae_jax import config as config_lib
from gvae_jax import fileio
from gvae_jax.errors import UserError

CONFIG_FILE = "config.json"


class IncompatibleWorkdirError(UserError):
  pass


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
    try:
      saved = ml_collections.ConfigDict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as e:
      raise IncompatibleWorkdirError(f"{path} is not a readable config ({e})") from e
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
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


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


def warm_start(params, model_dir: str | Path):
  """Copies every parameter of an exported model whose path and shape match.

  For fine-tuning: a scalable model can start from a trained lossy model
  (whose tree then sits under 'lossy'), new parts keep their initialisation.
  Returns the new params and the number of arrays copied.
  """
  import flax
  import numpy as np

  path = Path(model_dir) / "params.msgpack"
  if not path.is_file():
    raise UserError(f"--config.train.init_from: no exported model at {model_dir} (no {path.name})")
  source = flax.traverse_util.flatten_dict(flax.serialization.msgpack_restore(path.read_bytes()))
  target = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  copied = 0
  for key, value in target.items():
    for candidate in (key, key[1:]):  # same path, or the path below a wrapper ('lossy', ...)
      found = source.get(candidate)
      if found is not None and np.shape(found) == value.shape:
        target[key] = np.asarray(found, value.dtype)
        copied += 1
        break
  if copied == 0:
    raise UserError(f"--config.train.init_from: no parameter of {model_dir} fits this model")
  return flax.traverse_util.unflatten_dict(target), copied


def restore_params(workdir: Path, step: int | None = None):
  """Parameters of a training workdir's newest (or given) checkpoint, as saved."""
  mngr = ocp.CheckpointManager((Path(workdir) / "checkpoints").absolute(),
                               item_handlers=ocp.StandardCheckpointHandler())
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise UserError(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
  restored = mngr.restore(step, args=ocp.args.StandardRestore(_local_target(mngr, step)))
  return restored["params"], step


def _local_target(mngr: ocp.CheckpointManager, step: int):
  """The checkpoint's tree as arrays on this process's first device.

  A checkpoint written on a mesh records its devices; restoring it anywhere
  else (export on a laptop of a pod's run) needs a target saying where to put
  the arrays.
  """
  import jax

  metadata = mngr.item_metadata(step)
  metadata = getattr(metadata, "tree", metadata)  # orbax >= 0.12 wraps the tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
