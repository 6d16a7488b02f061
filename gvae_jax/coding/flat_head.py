"""Exported flat-base residual heads (gvae_jax.models.flat_base).

A flat head directory holds

  params.msgpack  the ResidualModel parameters (sorted keys, as export.py)
  config.json     the experiment config (only `model` matters)
  manifest.json   format, fingerprint, step and training progress
  exact.npz       optional: the head in exact integer form
                  (gvae_jax.coding.exact_head, made by `gvae convert-exact`);
                  with it the head codes files that decode on every platform

It is written by the pixel-sampled trainer (gvae_jax.train.flat_residual)
and attached to a scalable model directory as its `flat_head/` subdirectory
(gvae_jax.coding.export.attach_flat_head), which lets that model code residual files on a flat
base as well as on its lossy layer (gvae_jax.coding.codec). The fingerprint
covers the parameter bytes, the model config and exact.npz's bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import serialization

from gvae_jax import config as config_lib
from gvae_jax import fileio
from gvae_jax.coding import exact_head
from gvae_jax.errors import UserError
from gvae_jax.models import build_model
from gvae_jax.models.flat_base import tap_offsets
from gvae_jax.models.residual import ResidualModel

FLAT_HEAD_FORMAT = "gvae-flat-residual-head"
FLAT_HEAD_FORMAT_VERSION = 1
FLAT_HEAD_DIR = "flat_head"  # inside a scalable model directory
PARAMS_FILE, CONFIG_FILE, MANIFEST_FILE = "params.msgpack", "config.json", "manifest.json"
EXACT_FILE = exact_head.EXACT_FILE
# An exact.npz larger than this is refused before it is read (the shipped head's is 5.4 MB).
MAX_EXACT_BYTES = 256 << 20
MODEL_NAME = "flat_residual"


class FlatHeadError(UserError):
  """A flat head cannot be written or loaded."""


@dataclasses.dataclass(frozen=True, eq=False)
class FlatHead:
  config: ml_collections.ConfigDict
  model: ResidualModel
  params: Any
  fingerprint: bytes  # 16 bytes
  manifest: dict
  exact: exact_head.ExactHead | None = None  # the exact form, if converted

  @property
  def border_flags(self) -> bool:
    """u = tap availability flags (gvae_jax.models.flat_base); else u has no channels."""
    return bool(self.config.model.flat.border_flags)

  def prior_channels(self) -> int:
    r = self.model
    return len(tap_offsets(r.kernel_size, r.order)) if self.border_flags else 0


def _sorted_tree(tree):
  if isinstance(tree, dict):
    return {str(k): _sorted_tree(tree[k]) for k in sorted(tree)}
  return jax.device_get(tree)


def params_to_bytes(params) -> bytes:
  return serialization.msgpack_serialize(_sorted_tree(dict(params)))


def fingerprint_of(params_bytes: bytes, config: ml_collections.ConfigDict,
                   exact_bytes: bytes | None = None) -> bytes:
  digest = hashlib.sha256()
  digest.update(b"gvae-flat-residual-head/1\0")
  digest.update(config_lib.model_fingerprint(config).encode())
  digest.update(hashlib.sha256(params_bytes).digest())
  if exact_bytes is not None:  # (heads without one keep their fingerprint)
    digest.update(b"exact\0" + hashlib.sha256(exact_bytes).digest())
  return digest.digest()[:16]


def _read_limited(path: Path, limit: int) -> bytes:
  with fileio.open_regular_file(path) as f:
    size = os.fstat(f.fileno()).st_size
    if size > limit:
      raise ValueError(f"{path.name} has {size} bytes, more than {limit}")
    return f.read(limit + 1)


def _build(config: ml_collections.ConfigDict) -> ResidualModel:
  if str(config.model.name) != MODEL_NAME:
    raise FlatHeadError(f"a flat head needs model {MODEL_NAME!r}, not {config.model.name!r}")
  return build_model(config)


def write_flat_head(config: ml_collections.ConfigDict, params, out_dir: str | os.PathLike,
                    extra_manifest: dict | None = None, exact: bool = False) -> Path:
  """Writes (or atomically replaces) a flat head directory; returns it. exact: with
  the head's exact form (gvae_jax.coding.exact_head.convert) as exact.npz."""
  model = _build(config)
  out_dir = Path(out_dir)
  params_bytes = params_to_bytes(params)
  exact_bytes = None
  if exact:
    head = build_flat_head(config, params)
    exact_bytes = exact_head.to_bytes(exact_head.convert(head))
    exact_head.from_bytes(exact_bytes, model, head.prior_channels())  # what readers check
  manifest = {"format": FLAT_HEAD_FORMAT, "format_version": FLAT_HEAD_FORMAT_VERSION,
              "fingerprint": fingerprint_of(params_bytes, config, exact_bytes).hex(),
              "model": MODEL_NAME, **(extra_manifest or {})}
  if exact:
    manifest["exact"] = True
  if out_dir.exists() and not (out_dir / MANIFEST_FILE).is_file():
    raise FlatHeadError(f"{out_dir} exists and is not a flat head; not replacing it")
  out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)

  def fill(temp: Path) -> None:
    (temp / PARAMS_FILE).write_bytes(params_bytes)
    (temp / CONFIG_FILE).write_text(config_lib.to_json(config))
    (temp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if exact_bytes is not None:
      (temp / EXACT_FILE).write_bytes(exact_bytes)

  return fileio.write_directory_atomically(out_dir, fill)


def build_flat_head(config: ml_collections.ConfigDict, params, manifest: dict | None = None,
                    exact: bool = False) -> FlatHead:
  """An in-memory FlatHead, its parameters (and with `exact` its exact form) through
  the bytes `write_flat_head` stores."""
  model = _build(config)
  params_bytes = params_to_bytes(params)
  restored = jax.tree_util.tree_map(jnp.asarray, serialization.msgpack_restore(params_bytes))
  head = FlatHead(config, model, restored, fingerprint_of(params_bytes, config),
                  dict(manifest or {}))
  _check_params(head)
  if exact:
    exact_bytes = exact_head.to_bytes(exact_head.convert(head))
    head = dataclasses.replace(
        head, fingerprint=fingerprint_of(params_bytes, config, exact_bytes),
        exact=exact_head.from_bytes(exact_bytes, model, head.prior_channels()))
  return head


def load_flat_head(head_dir: str | os.PathLike) -> FlatHead:
  """Loads and checks a flat head directory (FlatHeadError)."""
  head_dir = Path(head_dir)
  try:
    manifest = json.loads((head_dir / MANIFEST_FILE).read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != FLAT_HEAD_FORMAT:
      raise ValueError("not a flat head manifest")
    if manifest.get("format_version") != FLAT_HEAD_FORMAT_VERSION:
      raise ValueError(f"format version {manifest.get('format_version')} is not supported")
    config = ml_collections.ConfigDict(json.loads((head_dir / CONFIG_FILE).read_text()))
    params_bytes = (head_dir / PARAMS_FILE).read_bytes()
    model = _build(config)
    params = serialization.msgpack_restore(params_bytes)
    exact_bytes = None
    if "exact" in manifest or (head_dir / EXACT_FILE).exists():
      if manifest.get("exact") is not True or not (head_dir / EXACT_FILE).exists():
        raise ValueError(f"{EXACT_FILE} and the manifest's \"exact\" disagree")
      exact_bytes = _read_limited(head_dir / EXACT_FILE, MAX_EXACT_BYTES)
  except FlatHeadError:
    raise
  except Exception as e:  # any damage: one clear message
    raise FlatHeadError(f"{head_dir} is not a valid flat residual head: {type(e).__name__}: "
                        f"{str(e)[:300]}") from e
  fingerprint = fingerprint_of(params_bytes, config, exact_bytes)
  if fingerprint.hex() != manifest.get("fingerprint"):
    raise FlatHeadError(f"{head_dir}: files do not match the manifest's fingerprint")
  head = FlatHead(config, model, jax.tree_util.tree_map(jnp.asarray, params), fingerprint,
                  manifest)
  _check_params(head)
  if exact_bytes is not None:
    try:
      exact = exact_head.from_bytes(exact_bytes, model, head.prior_channels())
    except exact_head.ConversionError as e:
      raise FlatHeadError(f"{head_dir}: {e}") from None
    head = dataclasses.replace(head, exact=exact)
  return head


def _check_params(head: FlatHead) -> None:
  taps = head.prior_channels()
  kernel = head.model.kernel_size
  expected = jax.eval_shape(
      lambda: head.model.init(jax.random.PRNGKey(0), jnp.zeros((1, kernel, kernel, taps)),
                              jnp.zeros((1, kernel, kernel, 3)), jnp.ones((1,), jnp.int32),
                              corrected=head.model.bias_correction))["params"]
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(v.shape)  # noqa: E731
                         for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  if shapes(expected) != shapes(head.params):
    raise FlatHeadError("flat head parameters do not match its config")
