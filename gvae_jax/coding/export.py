"""Exported models: a trained model frozen with the integer CDF tables that code it.

An exported model directory holds

  params.msgpack  the parameters (flax.serialization msgpack, keys sorted)
  config.json     the experiment config (only `model` matters for decoding)
  tables.npz      the integer CDF tables (gvae_jax.entropy.cdf_tables layout):
                    z_*  one row per channel of the factorized prior of z
                    y_*  one row per entry of the Gaussian scale table
                    y_scales  the float32 scale table (64 log-spaced scales)
                    y_index_bounds  float32 geometric midpoints of adjacent
                      scales: a predicted scale codes with the row whose
                      table scale is nearest in the log domain
  manifest.json   format version, fingerprint, model name, levels, step and
                  the table settings

The tables are built once here, from the trained parameters, and stored as
integers; decoding loads them and never rebuilds them from floats, so encoder
and decoder always code with the same numbers.

- z table: for each channel the tails are found by bisection on the monotone
  logits_cdf, at `tail_mass / 2` on each side; the row codes the integers
  floor(lower) ... ceil(upper) with the interval likelihoods at those integers.
- y table: for each table scale the row codes round(y' - mean) in
  [-h, h], h = ceil(Gaussian quantile of tail_mass / 2 * scale), with the
  interval likelihoods of N(0, scale^2).
- asymmetric models (config model.entropy_model = "asymmetric"): one y row
  per (left scale, right scale) pair of the same 64 table scales, row
  left * 64 + right, coding round(y' - mean) in [-h_left, h_right] (each h as
  above for its own scale) with the asymmetric Gaussian's interval
  likelihoods (gvae_jax.entropy.asymmetric_gaussian). 4096 rows of up to
  1993 symbols: int32 [4096, 1995], 33 MB in memory, built in about 10 s at
  export; coding looks rows up exactly as for the symmetric table. Measured
  on kodim01 at s = 2 (147456 y symbols, one run each on a loaded 2-core
  machine): asymmetric model (566 distinct rows) TFC 51 / 51 ms to
  encode / decode, constriction 63 / 64 ms; symmetric model (30 rows) 11 / 73
  and 26 / 41 ms. A row with equal scales is the symmetric row of that scale
  (tested).
- scale -> row: the nearest table scale in the log domain, i.e. the row is
  the number of bounds below the predicted scale. Taking the smallest table
  scale >= the prediction instead (gaussian.scale_to_index) always codes with
  a wider Gaussian; measured on the 24 Kodak images with the `small` model
  (2000 steps) the table bits then exceed the model's estimate by 2.7 % at
  s = 0 and 2.0 % at s = 1; with the nearest scale by 0.1 % and less.
Out-of-range symbols take the escape of their row (see gvae_jax.coding.coder).

Scalable models (scalable_gained_hyperprior: lossy layer + residual layer)
export the same way: params are {'lossy': ..., 'residual': ...}, the z and y
tables come from the lossy layer (`lossy_part`), and the residual layer
needs no tables (its CDFs are built per pixel while coding, see
gvae_jax.coding.residual_codec); the manifest adds the residual settings.

The fingerprint (16 bytes of a SHA-256) covers the parameter bytes, every
table array and the config's model fingerprint; `.gvae` files carry it, so a
file is never decoded with another model's numbers, and `load_model` checks it
against the files on disk.

Loading is defensive: every file must be a regular file within a size limit
(MAX_FILE_BYTES, checked with stat before it is read), and tables.npz must
hold exactly the members listed in TABLE_MEMBERS (an unknown member is
refused, not loaded: the fingerprint covers every table array that is
loaded, so nothing unfingerprinted is ever read), each within
MAX_TABLE_MEMBER_BYTES uncompressed as the zip directory declares it.
Of config.json only the `model` section matters for decoding, and that is
what the fingerprint covers (config_lib.model_fingerprint).
A scalable model directory may also hold a `flat_head/` subdirectory (a
flat-base residual head, gvae_jax.coding.flat_head; made with
`attach_flat_head` below): the model then codes residual files on a flat
base as well, and its fingerprint is that of the directory without the head
combined with the head's (`with_flat_fingerprint`): its flat-base files
decode only with it. Lossy, lossy-base and stored files need none of the head, so
the model with the head also decodes those of the model it was attached to
(`base_fingerprint`); the other way round is refused. The copied manifest
records the combined fingerprint as `fingerprint_with_flat_head` (checked
on load), so a model can be found by either without loading it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization
from scipy import special

from gvae_jax import config as config_lib
from gvae_jax import fileio
from gvae_jax.coding import container, exact_head, exact_lossy, exact_residual, flat_head
from gvae_jax.entropy import asymmetric_gaussian, coded_rate, gaussian
from gvae_jax.entropy.cdf_tables import CdfTable
from gvae_jax.errors import UserError
from gvae_jax.models import build_model
from gvae_jax.models.scalable import ScalableHyperprior

EXPORT_FORMAT = "gvae-exported-model"
EXPORT_FORMAT_VERSION = 1
PARAMS_FILE = "params.msgpack"
CONFIG_FILE = "config.json"
TABLES_FILE = "tables.npz"
MANIFEST_FILE = "manifest.json"
MODEL_FILES = (PARAMS_FILE, CONFIG_FILE, TABLES_FILE, MANIFEST_FILE)
_TABLE_FIELDS = ("cdf", "lengths", "offsets", "precision")  # CdfTable.to_dict
TABLE_MEMBERS = frozenset([f"{p}{f}" for p in ("z_", "y_") for f in _TABLE_FIELDS]
                          + ["y_scales", "y_index_bounds"])
EXACT_LOSSY_FILE = exact_lossy.EXACT_LOSSY_FILE  # optional: `convert_exact`
EXACT_RESIDUAL_FILE = exact_residual.EXACT_RESIDUAL_FILE  # optional, beside it
MAX_FILE_BYTES = {PARAMS_FILE: 1 << 30, CONFIG_FILE: 1 << 20, TABLES_FILE: 64 << 20,
                  MANIFEST_FILE: 1 << 20, EXACT_LOSSY_FILE: 1 << 30,
                  EXACT_RESIDUAL_FILE: 1 << 30}
MAX_TABLE_MEMBER_BYTES = 64 << 20

# The y rate "coded" (gvae_jax.entropy.coded_rate) models tables built with these.
DEFAULT_TAIL_MASS = coded_rate.TAIL_MASS  # total probability left to the escape, per row
DEFAULT_PRECISION = coded_rate.PRECISION
MAX_Z_SYMBOLS = 4096  # a wider (untrained) channel density is clipped; the rest escapes
_BISECTION_STEPS = 64
_TAIL_BRACKET_LIMIT = 2.0**24


class ExportError(UserError):
  """An export cannot be written or an exported model cannot be loaded."""


@dataclasses.dataclass(frozen=True, eq=False)
class ExportedModel:
  """Everything the codec needs: model, parameters, tables and their fingerprint."""
  config: ml_collections.ConfigDict
  model: Any  # a flax Module from gvae_jax.models
  params: Any  # pytree of jax arrays
  z_table: CdfTable
  y_table: CdfTable
  y_scales: np.ndarray  # float32 [S] ascending: the rows of y_table (S**2 pairs if asymmetric)
  y_index_bounds: np.ndarray  # float32 [S - 1]: scale row = count of bounds < scale
  fingerprint: bytes
  manifest: dict
  flat: Any = None  # gvae_jax.coding.flat_head.FlatHead: residual files on a flat base too
  base_fingerprint: bytes | None = None  # with a flat head: the fingerprint without it
  # gvae_jax.coding.exact_lossy.ExactLossy (`convert_exact`): lossy files in exact arithmetic.
  exact_lossy: Any = None
  # With exact_lossy: the fingerprints of the float model it was converted from
  # (without, and with the flat head), whose files it also decodes.
  float_fingerprint: bytes | None = None
  float_flat_fingerprint: bytes | None = None
  # Earlier exact conversions of this model (convert_exact keeps them): (fingerprint,
  # base fingerprint without the flat head or None, ExactLossy), so the files they
  # wrote keep decoding.
  previous_exact: tuple = ()
  # gvae_jax.coding.exact_residual.ExactResidual: lossy-base residual files in exact
  # arithmetic (mode EXACT_RESIDUAL); needs exact_lossy.
  exact_residual: Any = None

  def for_file(self, fingerprint: bytes, mode) -> "ExportedModel":
    """The model that decodes a file of this fingerprint and mode: this one, or its
    earlier exact conversion whose fingerprint the file carries."""
    if fingerprint == self.fingerprint:
      return self
    for fp, base, exact in self.previous_exact:
      if fingerprint in (fp, base):  # none of them had an exact residual layer
        return dataclasses.replace(self, exact_lossy=exact, exact_residual=None,
                                   fingerprint=fingerprint, previous_exact=())
    return self

  def accepts(self, fingerprint: bytes, mode) -> bool:
    """Whether this model decodes a file of this fingerprint and mode (module doc: a
    model with a flat head also decodes its base's files, which use no flat head; a
    converted model also decodes the files of the float model it came from)."""
    if fingerprint == self.fingerprint:
      return True
    flat = mode in container.FLAT_MODES
    if self.base_fingerprint is not None and fingerprint == self.base_fingerprint and not flat:
      return True
    # An earlier conversion's files (flat-base ones carry its fingerprint with the head).
    if mode != container.Mode.EXACT_RESIDUAL and any(
        fingerprint == fp or (fingerprint == base and not flat)
        for fp, base, _ in self.previous_exact):
      return True
    if mode in container.EXACT_LOSSY_MODES + (container.Mode.EXACT_RESIDUAL,):
      return False
    return ((fingerprint == self.float_fingerprint and not flat)
            or (self.float_flat_fingerprint is not None
                and fingerprint == self.float_flat_fingerprint))

  @property
  def levels(self) -> int:
    return int(self.config.model.levels)

  @property
  def name(self) -> str:
    return str(self.config.model.name)

  @property
  def is_scalable(self) -> bool:
    """True for a lossy + residual model (near-lossless and lossless modes)."""
    return is_scalable(self.model)

  @property
  def lossy_model(self):
    """The gained hyperprior that codes the lossy layer (the model itself if lossy-only)."""
    return lossy_part(self.model, self.params)[0]

  @property
  def lossy_params(self):
    return lossy_part(self.model, self.params)[1]

  @property
  def residual_model(self):
    """The ResidualModel of a scalable model (None for a lossy-only model)."""
    return self.model.residual if self.is_scalable else None

  @property
  def residual_params(self):
    return self.params["residual"] if self.is_scalable else None


def is_scalable(model) -> bool:
  return isinstance(model, ScalableHyperprior)


def lossy_module(model):
  """The module that codes the lossy layer: a scalable model's `lossy`, else the model."""
  return model.lossy if is_scalable(model) else model


def lossy_part(model, params):
  """(lossy module, its params): params['lossy'] for a scalable model."""
  return lossy_module(model), (params["lossy"] if is_scalable(model) else params)


# --- Building the tables. ---

def _logit(p: float) -> float:
  return float(np.log(p) - np.log1p(-p))


def _z_logits_fn(model):
  """jitted (params, x [C]) -> logits_cdf per channel at x [C]."""
  def logits(params, x):
    return model.apply({"params": params}, x[None, :],
                       method=lambda module, v: module.z_density.logits_cdf(v))[0]
  return jax.jit(logits)


def _z_likelihood_fn(model):
  """jitted (params, x [L, C]) -> interval likelihoods [L, C]."""
  def likelihood(params, x):
    return model.apply({"params": params}, x, method=lambda module, v: module.z_likelihood(v))
  return jax.jit(likelihood)


def _bisect(logits, params, target: float, channels: int) -> np.ndarray:
  """Per channel, the x where the monotone logits_cdf crosses `target`."""
  lo = np.full(channels, -1.0, np.float32)
  hi = np.full(channels, 1.0, np.float32)
  # Widen each bracket until it contains the crossing (or hits the limit).
  for _ in range(64):
    low_bad = np.asarray(logits(params, jnp.asarray(lo))) > target
    high_bad = np.asarray(logits(params, jnp.asarray(hi))) < target
    if not (low_bad.any() or high_bad.any()):
      break
    lo = np.where(low_bad, np.maximum(lo * 2, -_TAIL_BRACKET_LIMIT), lo).astype(np.float32)
    hi = np.where(high_bad, np.minimum(hi * 2, _TAIL_BRACKET_LIMIT), hi).astype(np.float32)
  for _ in range(_BISECTION_STEPS):
    mid = ((lo + hi) / 2).astype(np.float32)
    above = np.asarray(logits(params, jnp.asarray(mid))) >= target
    hi = np.where(above, mid, hi)
    lo = np.where(above, lo, mid)
  return (lo + hi) / 2


def build_z_table(model, params, tail_mass: float = DEFAULT_TAIL_MASS,
                  precision: int = DEFAULT_PRECISION) -> CdfTable:
  """One row per channel of the factorized prior (see the module doc)."""
  channels = int(model.n)
  logits = _z_logits_fn(model)
  lower = _bisect(logits, params, _logit(tail_mass / 2), channels)
  upper = _bisect(logits, params, _logit(1 - tail_mass / 2), channels)
  median = _bisect(logits, params, 0.0, channels)
  first = np.floor(lower).astype(np.int64)
  last = np.ceil(upper).astype(np.int64)
  # An untrained or degenerate channel may spread over a huge range: keep the
  # MAX_Z_SYMBOLS integers around its median and let the escape code the rest.
  half = MAX_Z_SYMBOLS // 2
  centre = np.rint(median).astype(np.int64)
  first = np.clip(first, centre - half, centre)
  last = np.clip(last, centre, centre + half - 1)
  lengths = last - first + 1
  width = int(lengths.max())
  x = first[None, :] + np.arange(width)[:, None]  # [width, C]
  pmf = np.asarray(_z_likelihood_fn(model)(params, jnp.asarray(x, jnp.float32)), np.float64).T
  pmf = np.where(np.arange(width)[None, :] < lengths[:, None], np.clip(pmf, 0.0, 1.0), 0.0)
  return CdfTable.from_pmf(pmf, lengths, first, precision)


def build_y_table(scales: np.ndarray, tail_mass: float = DEFAULT_TAIL_MASS,
                  precision: int = DEFAULT_PRECISION) -> CdfTable:
  """One row per table scale: symbols round(y' - mean) in [-h, h] (module doc)."""
  scales = np.asarray(scales, np.float64)
  half = coded_rate.half_widths(scales, tail_mass)
  width = int(2 * half.max() + 1)
  values = np.abs(np.arange(width)[None, :] - half[:, None]).astype(np.float64)
  sigma = scales[:, None]
  # Both terms from the lower tail, as in gaussian.likelihood, for accuracy.
  pmf = special.ndtr((0.5 - values) / sigma) - special.ndtr((-0.5 - values) / sigma)
  lengths = 2 * half + 1
  pmf = np.where(np.arange(width)[None, :] < lengths[:, None], pmf, 0.0)
  return CdfTable.from_pmf(pmf, lengths, -half, precision)


def build_asymmetric_y_table(scales: np.ndarray, tail_mass: float = DEFAULT_TAIL_MASS,
                             precision: int = DEFAULT_PRECISION) -> CdfTable:
  """One row per (left, right) pair of table scales, row = left * len(scales) + right.

  Row (i, j) codes round(y' - mean) in [-h_i, h_j], h as in build_y_table
  (the tail beyond each end has at most tail_mass / 2 of that side's
  half-Gaussian), with the asymmetric Gaussian's interval likelihoods.
  """
  scales = np.asarray(scales, np.float64)
  levels = len(scales)
  half = coded_rate.half_widths(scales, tail_mass)
  left = np.repeat(np.arange(levels), levels)  # row r = left[r] * levels + right[r]
  right = np.tile(np.arange(levels), levels)
  lengths = half[left] + half[right] + 1
  width = int(lengths.max())
  values = (np.arange(width)[None, :] - half[left][:, None]).astype(np.float64)
  pmf = asymmetric_gaussian.likelihood_np(values, scales[left][:, None], scales[right][:, None])
  pmf = np.where(np.arange(width)[None, :] < lengths[:, None], pmf, 0.0)
  return CdfTable.from_pmf(pmf, lengths, -half[left], precision)


def y_table_rows(model, scales: int) -> int:
  """Rows of the y table of a lossy module: scales, or scales**2 for an asymmetric one."""
  return scales * scales if getattr(model, "is_asymmetric", False) else scales


# --- Fingerprint and serialization. ---

def _sorted_tree(tree):
  """Nested dicts with sorted keys and numpy leaves: one byte layout per model."""
  if isinstance(tree, Mapping):
    return {str(k): _sorted_tree(tree[k]) for k in sorted(tree)}
  return np.asarray(tree)


def params_to_bytes(params) -> bytes:
  return serialization.msgpack_serialize(_sorted_tree(params))


def index_bounds(scales: np.ndarray) -> np.ndarray:
  """Geometric midpoints of adjacent scales (float64 sqrt, then float32)."""
  scales = np.asarray(scales, np.float64)
  return np.sqrt(scales[:-1] * scales[1:]).astype(np.float32)


def _table_arrays(z_table: CdfTable, y_table: CdfTable, y_scales: np.ndarray,
                  y_index_bounds: np.ndarray) -> dict:
  arrays = {**z_table.to_dict("z_"), **y_table.to_dict("y_")}
  arrays["y_scales"] = np.asarray(y_scales, np.float32)
  arrays["y_index_bounds"] = np.asarray(y_index_bounds, np.float32)
  return arrays


def compute_fingerprint(params_bytes: bytes, table_arrays: Mapping[str, np.ndarray],
                        config: ml_collections.ConfigDict) -> bytes:
  """16 bytes over the parameters, every table array and the model config."""
  digest = hashlib.sha256()
  digest.update(b"gvae-exported-model/1\0")
  digest.update(config_lib.model_fingerprint(config).encode())
  digest.update(hashlib.sha256(params_bytes).digest())
  for key in sorted(table_arrays):
    array = np.ascontiguousarray(table_arrays[key])
    digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
    digest.update(array.tobytes())
  return container.model_fingerprint(digest.digest())


def check_params(model, params) -> None:
  """Parameter tree and shapes must match what `model` builds (ExportError).

  Also used on the parameters of a training checkpoint before they are used
  with a config (gvae_jax.train.checkpoints).
  """
  stride = int(lossy_module(model).stride)
  # A tau makes a scalable model create its bias-correction head too (as training does).
  kwargs = {"tau": jnp.ones((1,), jnp.int32)} if is_scalable(model) else {}
  expected = jax.eval_shape(
      functools.partial(model.init, train=False, **kwargs), jax.random.PRNGKey(0),
      jnp.zeros((1, stride, stride, 3)), jnp.zeros((1,)))["params"]
  flat_expected = {jax.tree_util.keystr(k): v.shape
                   for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  flat_given = {jax.tree_util.keystr(k): np.shape(v)
                for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if flat_expected != flat_given:
    missing = sorted(set(flat_expected) - set(flat_given))
    extra = sorted(set(flat_given) - set(flat_expected))
    wrong = sorted(k for k in set(flat_expected) & set(flat_given)
                   if flat_expected[k] != flat_given[k])
    raise ExportError(f"parameters do not match the configured model (missing {missing[:3]}, "
                      f"unexpected {extra[:3]}, wrong shape {wrong[:3]})")


def build_exported_model(config: ml_collections.ConfigDict, params, step: int | None = None,
                         tail_mass: float = DEFAULT_TAIL_MASS,
                         precision: int = DEFAULT_PRECISION) -> ExportedModel:
  """Freezes (config, params) into an ExportedModel, building the tables.

  The parameters pass through the same msgpack bytes that `write_model_dir`
  stores, so an in-memory model and its loaded copy are identical.
  """
  model = build_model(config)
  check_params(model, params)
  params_bytes = params_to_bytes(params)
  params = jax.tree_util.tree_map(jnp.asarray, serialization.msgpack_restore(params_bytes))
  y_scales = gaussian.scale_table()
  y_index_bounds = index_bounds(y_scales)
  # The tables code the lossy layer only; a scalable model's residual layer
  # builds its CDFs per pixel while coding (gvae_jax.coding.residual_codec).
  z_table = build_z_table(*lossy_part(model, params), tail_mass, precision)
  asymmetric = lossy_module(model).is_asymmetric
  build_y = build_asymmetric_y_table if asymmetric else build_y_table
  y_table = build_y(y_scales, tail_mass, precision)
  fingerprint = compute_fingerprint(
      params_bytes, _table_arrays(z_table, y_table, y_scales, y_index_bounds), config)
  manifest = {
      "format": EXPORT_FORMAT,
      "format_version": EXPORT_FORMAT_VERSION,
      "fingerprint": fingerprint.hex(),
      "model": str(config.model.name),
      "levels": int(config.model.levels),
      "step": None if step is None else int(step),
      "tail_mass": float(tail_mass),
      "precision": int(precision),
      "z_rows": z_table.num_rows,
      "y_rows": y_table.num_rows,
      "y_scale_to_row": "nearest table scale in the log domain",
  }
  if asymmetric:  # symmetric manifests stay as they were
    manifest["entropy_model"] = "asymmetric"
    manifest["y_scale_to_row"] = (f"left * {len(y_scales)} + right, each the nearest table "
                                  "scale in the log domain")
  if is_scalable(model):  # informational: the residual codec reads the config
    manifest["residual"] = {"order": int(model.residual.order),
                            "kernel_size": int(model.residual.kernel_size),
                            "bias_correction": bool(model.residual.bias_correction),
                            "max_tau": int(model.residual.max_tau)}
  return ExportedModel(config, model, params, z_table, y_table, y_scales, y_index_bounds,
                       fingerprint, manifest)


# --- Writing and reading model directories. ---

def _is_model_dir(path: Path) -> bool:
  return (path / MANIFEST_FILE).is_file()


def write_model_dir(exported: ExportedModel, out_dir: str | os.PathLike,
                    force: bool = False) -> Path:
  """Writes `exported` to out_dir all at once: a failure leaves no half directory.

  Files go to a temporary sibling directory that is renamed into place. An
  existing out_dir is replaced only with force=True, and only if it is an
  exported model (or empty): never an arbitrary directory.
  """
  out_dir = Path(out_dir)
  if out_dir.exists() or out_dir.is_symlink():
    if not force:
      raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.is_dir() or not (_is_model_dir(out_dir) or not any(out_dir.iterdir())):
      raise ExportError(f"{out_dir} exists and is not an exported model directory; "
                        "refusing to replace it even with --force")
  parent = out_dir.absolute().parent
  if not parent.is_dir():
    raise ExportError(f"cannot export to {out_dir}: directory {parent} does not exist")

  def fill(temp_dir: Path) -> None:
    (temp_dir / PARAMS_FILE).write_bytes(params_to_bytes(exported.params))
    (temp_dir / CONFIG_FILE).write_text(config_lib.to_json(exported.config))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **_table_arrays(exported.z_table, exported.y_table,
                                                exported.y_scales, exported.y_index_bounds))
    (temp_dir / TABLES_FILE).write_bytes(buffer.getvalue())
    (temp_dir / MANIFEST_FILE).write_text(json.dumps(exported.manifest, indent=2) + "\n")

  return fileio.write_directory_atomically(out_dir, fill)


def export_params(config: ml_collections.ConfigDict, params, out_dir: str | os.PathLike,
                  step: int | None = None, force: bool = False,
                  tail_mass: float = DEFAULT_TAIL_MASS) -> ExportedModel:
  """Exports in-memory (config, params); what `gvae export` does after restoring a checkpoint."""
  exported = build_exported_model(config, params, step, tail_mass)
  write_model_dir(exported, out_dir, force)
  return exported


def _read_config(path: Path) -> ml_collections.ConfigDict:
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise ExportError(f"cannot read config {path}: {e}") from e


def _check_model_files(model_dir: Path) -> None:
  """Each model file a regular file within MAX_FILE_BYTES, checked before reading it."""
  import stat

  for name in MODEL_FILES:
    path = model_dir / name
    try:
      info = path.stat()
    except FileNotFoundError:
      raise ExportError(f"{model_dir} is not a valid exported model: {name} is missing") from None
    except OSError as e:
      raise ExportError(f"{model_dir}: cannot read {name} ({e.strerror or e})") from e
    if not stat.S_ISREG(info.st_mode):
      raise ExportError(f"{model_dir}: {name} is not a regular file; refusing to read it")
    if info.st_size > MAX_FILE_BYTES[name]:
      raise ExportError(f"{model_dir}: {name} has {info.st_size} bytes, more than the "
                        f"{MAX_FILE_BYTES[name]} an exported model's {name} may have; "
                        "refusing to load it")


def _known_table_members(npz) -> list[str]:
  """The member names to load: exactly TABLE_MEMBERS, each of a bounded size (ValueError)."""
  names = set(npz.files)
  unknown = sorted(names - TABLE_MEMBERS)
  if unknown:
    raise ValueError(f"{TABLES_FILE} has members this version does not know "
                     f"({', '.join(unknown[:5])}); refusing to load unfingerprinted data")
  for info in npz.zip.infolist():
    if info.file_size > MAX_TABLE_MEMBER_BYTES:
      raise ValueError(f"{TABLES_FILE} member {info.filename} declares {info.file_size} "
                       f"bytes, more than {MAX_TABLE_MEMBER_BYTES}")
  return sorted(names)
def with_exact_fingerprint(fingerprint: bytes, exact_bytes: bytes,
                           residual_bytes: bytes | None = None) -> bytes:
  """The fingerprint of a model converted to exact lossy decoding (`convert_exact`),
  with exact_residual.npz's bytes if it has them."""
  if residual_bytes is None:
    digest = hashlib.sha256(b"gvae-exported-model+exact-lossy/1\0" + fingerprint
                            + hashlib.sha256(exact_bytes).digest())
  else:
    digest = hashlib.sha256(b"gvae-exported-model+exact-lossy+residual/1\0" + fingerprint
                            + hashlib.sha256(exact_bytes).digest()
                            + hashlib.sha256(residual_bytes).digest())
  return container.model_fingerprint(digest.digest())


def _read_exact_lossy(model_dir: Path, model, scale_rows: int, name: str = EXACT_LOSSY_FILE):
  """(ExactLossy, its bytes) of model_dir's exact_lossy.npz (or `name`), or (None, None)."""
  import stat

  path = model_dir / name
  if not (path.exists() or path.is_symlink()):
    return None, None
  info = path.stat()
  if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES[EXACT_LOSSY_FILE]:
    raise ExportError(f"{model_dir}: {name} is not a regular file of at most "
                      f"{MAX_FILE_BYTES[EXACT_LOSSY_FILE]} bytes; refusing to read it")
  data = path.read_bytes()
  try:
    return exact_lossy.from_bytes(data, lossy_module(model), scale_rows), data
  except exact_head.ConversionError as e:
    raise ExportError(f"{model_dir}: {e}") from None


def _read_exact_residual(model_dir: Path, model):
  """(ExactResidual, its bytes) of model_dir's exact_residual.npz, or (None, None)."""
  import stat

  path = model_dir / EXACT_RESIDUAL_FILE
  if not (path.exists() or path.is_symlink()):
    return None, None
  if not is_scalable(model):
    raise ExportError(f"{model_dir}: {EXACT_RESIDUAL_FILE} needs a scalable model")
  info = path.stat()
  if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES[EXACT_RESIDUAL_FILE]:
    raise ExportError(f"{model_dir}: {EXACT_RESIDUAL_FILE} is not a regular file of at most "
                      f"{MAX_FILE_BYTES[EXACT_RESIDUAL_FILE]} bytes; refusing to read it")
  data = path.read_bytes()
  try:
    return exact_residual.from_bytes(data, model), data
  except exact_head.ConversionError as e:
    raise ExportError(f"{model_dir}: {e}") from None


def with_flat_fingerprint(fingerprint: bytes, head_fingerprint: bytes) -> bytes:
  """The fingerprint of a scalable model with a flat head attached (module doc)."""
  digest = hashlib.sha256(b"gvae-exported-model+flat-head/1\0" + fingerprint + head_fingerprint)
  return container.model_fingerprint(digest.digest())


def load_model(model_dir: str | os.PathLike) -> ExportedModel:
  """Loads an exported model directory, checking its fingerprint (ExportError)."""
  model_dir = Path(model_dir)
  if not model_dir.exists():
    raise ExportError(f"model directory not found: {model_dir}")
  if not model_dir.is_dir() or not _is_model_dir(model_dir):
    raise ExportError(f"{model_dir} is not an exported model (no {MANIFEST_FILE}); "
                      "make one with `gvae export --workdir DIR --out MODEL_DIR`")
  _check_model_files(model_dir)
  try:
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
      raise ValueError("not a gvae model manifest")
    if manifest.get("format_version") != EXPORT_FORMAT_VERSION:
      raise ExportError(f"{model_dir}: exported model format version "
                        f"{manifest.get('format_version')} is not supported "
                        f"(this build reads {EXPORT_FORMAT_VERSION})")
    config = _read_config(model_dir / CONFIG_FILE)
    params_bytes = (model_dir / PARAMS_FILE).read_bytes()
    with np.load(model_dir / TABLES_FILE, allow_pickle=False) as npz:
      arrays = {key: npz[key] for key in _known_table_members(npz)}
    z_table = CdfTable.from_dict(arrays, "z_")
    y_table = CdfTable.from_dict(arrays, "y_")
    y_scales = np.asarray(arrays["y_scales"])
    model = build_model(config)
    rows = y_table_rows(lossy_module(model), y_scales.size)
    if (y_scales.dtype != np.float32 or y_scales.ndim != 1 or y_table.num_rows != rows
        or np.any(np.diff(y_scales) <= 0)):
      raise ValueError("y_scales must be ascending float32, one per y table row "
                       "(one per pair of scales for an asymmetric model)")
    y_index_bounds = np.asarray(arrays["y_index_bounds"])
    if (y_index_bounds.dtype != np.float32 or y_index_bounds.shape != (y_scales.size - 1,)
        or np.any(y_index_bounds < y_scales[:-1]) or np.any(y_index_bounds > y_scales[1:])):
      raise ValueError("y_index_bounds must be float32, one between each pair of scales")
    channels = int(lossy_module(model).n)
    if z_table.num_rows != channels:
      raise ValueError(f"z table has {z_table.num_rows} rows for {channels} channels")
    params = serialization.msgpack_restore(params_bytes)
  except ExportError:
    raise
  except Exception as e:  # any damage to the files: one clear message
    raise ExportError(f"{model_dir} is not a valid exported model: {type(e).__name__}: "
                      f"{str(e)[:300]}") from e
  check_params(model, params)
  fingerprint = compute_fingerprint(
      params_bytes, _table_arrays(z_table, y_table, y_scales, y_index_bounds), config)
  if fingerprint.hex() != manifest.get("fingerprint"):
    raise ExportError(f"{model_dir}: files do not match the manifest's fingerprint "
                      "(modified or corrupt); export the model again")
  params = jax.tree_util.tree_map(jnp.asarray, params)
  exact, exact_bytes = _read_exact_lossy(model_dir, model, y_scales.size)
  residual, residual_bytes = _read_exact_residual(model_dir, model)
  if residual is not None and (exact is None or exact.version < 2):
    raise ExportError(f"{model_dir}: {EXACT_RESIDUAL_FILE} needs a version 2 "
                      f"{EXACT_LOSSY_FILE}")
  float_fingerprint = None
  if exact is not None:
    float_fingerprint = fingerprint
    fingerprint = with_exact_fingerprint(fingerprint, exact_bytes, residual_bytes)
    if manifest.get("fingerprint_exact") != fingerprint.hex():
      raise ExportError(f"{model_dir}: {EXACT_LOSSY_FILE} does not match the manifest's "
                        "fingerprint_exact (modified or corrupt); convert the model again")
  flat = base_fingerprint = float_flat_fingerprint = None
  if (model_dir / "flat_head").exists():
    if not is_scalable(model):
      raise ExportError(f"{model_dir}: a flat head needs a scalable model")
    try:
      flat = flat_head.load_flat_head(model_dir / flat_head.FLAT_HEAD_DIR)
    except flat_head.FlatHeadError as e:
      raise ExportError(str(e)) from e
    base_fingerprint = fingerprint
    fingerprint = with_flat_fingerprint(base_fingerprint, flat.fingerprint)
    if float_fingerprint is not None:
      float_flat_fingerprint = with_flat_fingerprint(float_fingerprint, flat.fingerprint)
    recorded = manifest.get("fingerprint_with_flat_head")
    if recorded is not None and recorded != fingerprint.hex():
      raise ExportError(f"{model_dir}: the flat head does not match the manifest's "
                        "fingerprint_with_flat_head (modified or corrupt); attach it again")
  previous = _read_previous_exact(model_dir, manifest, model, y_scales.size, float_fingerprint,
                                  flat)
  return ExportedModel(config, model, params, z_table, y_table, y_scales, y_index_bounds,
                       fingerprint, manifest, flat, base_fingerprint, exact,
                       float_fingerprint, float_flat_fingerprint, previous, residual)


# exact_lossy.npz itself: the same integers, converted before exact_residual.npz was added.
_PREVIOUS_EXACT_NAME = re.compile(r"exact_lossy(_v[0-9]{1,3})?\.npz")
_MAX_PREVIOUS_EXACT = 8


def _read_previous_exact(model_dir: Path, manifest: dict, model, scale_rows: int,
                         float_fingerprint: bytes | None, flat) -> tuple:
  """The earlier exact conversions the manifest lists ("previous_exact": file and the
  fingerprint its files carry), each checked against that fingerprint."""
  entries = manifest.get("previous_exact", [])
  if not entries:
    return ()
  if (float_fingerprint is None or not isinstance(entries, list)
      or len(entries) > _MAX_PREVIOUS_EXACT):
    raise ExportError(f"{model_dir}: the manifest's previous_exact is malformed")
  out = []
  for entry in entries:
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not _PREVIOUS_EXACT_NAME.fullmatch(name):
      raise ExportError(f"{model_dir}: the manifest's previous_exact is malformed")
    exact, data = _read_exact_lossy(model_dir, model, scale_rows, name)
    if exact is None:
      raise ExportError(f"{model_dir}: {name} (listed in previous_exact) is missing")
    base = fingerprint = with_exact_fingerprint(float_fingerprint, data)
    if flat is not None:
      fingerprint = with_flat_fingerprint(base, flat.fingerprint)
    else:
      base = None
    if entry.get("fingerprint") != fingerprint.hex():
      raise ExportError(f"{model_dir}: {name} does not match its fingerprint in the "
                        "manifest's previous_exact (modified or corrupt)")
    out.append((fingerprint, base, exact))
  return tuple(out)


# --- Flat heads (gvae_jax.coding.flat_head) attached to a scalable model. ---

def attach(exported: "ExportedModel", head) -> "ExportedModel":
  """`exported` (a scalable ExportedModel) with `head` as its flat head, in memory."""
  if not exported.is_scalable:
    raise flat_head.FlatHeadError("a flat head needs a scalable model")
  if exported.flat is not None:
    raise flat_head.FlatHeadError("the model already has a flat head")
  float_flat = (None if exported.float_fingerprint is None
                else with_flat_fingerprint(exported.float_fingerprint, head.fingerprint))
  return dataclasses.replace(
      exported, flat=head, base_fingerprint=exported.fingerprint,
      fingerprint=with_flat_fingerprint(exported.fingerprint, head.fingerprint),
      float_flat_fingerprint=float_flat)


def detach(exported: "ExportedModel") -> "ExportedModel":
  """`exported` without its flat head (as the model it was attached to), in memory."""
  if exported.flat is None:
    return exported
  return dataclasses.replace(exported, flat=None, fingerprint=exported.base_fingerprint,
                             base_fingerprint=None, float_flat_fingerprint=None,
                             previous_exact=tuple((base, None, exact) for _, base, exact
                                                  in exported.previous_exact))


# --- Exact lossy decoding (gvae_jax.coding.exact_lossy). ---

def to_exact(exported: ExportedModel) -> tuple[ExportedModel, bytes]:
  """`exported` (without a flat head) converted to exact lossy decoding, in memory, and
  the exact_lossy.npz bytes (ExportError if it cannot be converted)."""
  if exported.exact_lossy is not None:
    raise ExportError(f"{exported.name} is already converted to exact lossy decoding")
  if exported.flat is not None:
    raise ExportError("convert the model without its flat head (detach), then attach it")
  try:
    exact = exact_lossy.convert(exported.lossy_model, exported.lossy_params,
                                exported.y_index_bounds)
  except exact_head.ConversionError as e:
    raise ExportError(f"{exported.name} cannot be converted: {e}") from None
  data = exact_lossy.to_bytes(exact)
  # What the reader gets: the stored integers, read back (one code path).
  exact = exact_lossy.from_bytes(data, exported.lossy_model, exported.y_scales.size)
  residual, residual_data = _exact_residual_of(exported, exact)
  return dataclasses.replace(
      exported, exact_lossy=exact, exact_residual=residual,
      fingerprint=with_exact_fingerprint(exported.fingerprint, data, residual_data),
      float_fingerprint=exported.fingerprint), data, residual_data


def _exact_residual_of(exported: ExportedModel, exact) -> tuple:
  """(ExactResidual, exact_residual.npz bytes) of a scalable model whose lossy layer
  converted to `exact`, or (None, None): lossy-only, or a head that does not convert
  (its lossy-base files stay float; e.g. the 'separate' bias correction)."""
  if not exported.is_scalable:
    return None, None
  try:
    residual = exact_residual.convert(exported.model, exported.params, exact)
  except exact_head.ConversionError:
    return None, None
  data = exact_residual.to_bytes(residual)
  return exact_residual.from_bytes(data, exported.model), data


_EXACT_MANIFEST_KEYS = ("fingerprint_exact", "exact_lossy", "exact_residual",
                        "source_fingerprint_with_flat_head", "previous_exact")


def to_float(exported: ExportedModel) -> ExportedModel:
  """A converted model as the float model it came from (without its flat head), in
  memory: e.g. to compare the two, or to write the float model with write_model_dir."""
  exported = detach(exported)
  if exported.exact_lossy is None:
    return exported
  manifest = {k: v for k, v in exported.manifest.items()
              if k not in _EXACT_MANIFEST_KEYS + ("fingerprint_with_flat_head",)}
  return dataclasses.replace(exported, exact_lossy=None, exact_residual=None,
                             fingerprint=exported.float_fingerprint, float_fingerprint=None,
                             manifest=manifest, previous_exact=())


def convert_exact(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  force: bool = False) -> Path:
  """Copies exported model `model_dir` to `out_dir` converted to exact arithmetic: its
  lossy layer's decoder networks (exact_lossy.npz) and, if it has a float flat head,
  that head (gvae_jax.coding.exact_head). The conversion is exact post-training
  quantisation, no training; its cost is measured in experiments/results/README.md."""
  model_dir, out_dir = Path(model_dir), Path(out_dir)
  source = load_model(model_dir)
  if (source.exact_lossy is not None and source.exact_lossy.version >= exact_lossy.VERSION
      and (source.exact_residual is not None or not source.is_scalable)):
    raise ExportError(f"{model_dir} is already converted to exact arithmetic")
  # A model converted by an older version is converted again from its float parameters;
  # the old exact_lossy.npz is kept (previous_exact), so its files keep decoding.
  if model_dir.resolve() == out_dir.resolve():
    raise ExportError("convert to a new directory (--out must differ from --model)")
  if out_dir.exists() or out_dir.is_symlink():
    if not force:
      raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.is_dir() or not (_is_model_dir(out_dir) or not any(out_dir.iterdir())):
      raise ExportError(f"{out_dir} exists and is not an exported model directory; "
                        "refusing to replace it even with --force")
  if not out_dir.absolute().parent.is_dir():
    raise ExportError(f"cannot write {out_dir}: its directory does not exist")
  float_source = to_float(source)
  converted, data, residual_data = to_exact(float_source)

  def fill(temp_dir: Path) -> None:
    for name in (PARAMS_FILE, CONFIG_FILE, TABLES_FILE):
      shutil.copy2(model_dir / name, temp_dir / name)
    (temp_dir / EXACT_LOSSY_FILE).write_bytes(data)
    if residual_data is not None:
      (temp_dir / EXACT_RESIDUAL_FILE).write_bytes(residual_data)
    manifest = dict(float_source.manifest)
    previous = list(source.manifest.get("previous_exact", []))
    for entry in previous:
      shutil.copy2(model_dir / entry["file"], temp_dir / entry["file"])
    if source.exact_lossy is not None:  # the older conversion: its files keep decoding
      name = f"exact_lossy_v{source.exact_lossy.version}.npz"
      if (model_dir / EXACT_LOSSY_FILE).read_bytes() == data:
        name = EXACT_LOSSY_FILE  # the same integers: only exact_residual.npz is new
      elif any(entry["file"] == name for entry in previous):
        raise ExportError(f"{model_dir}: its {EXACT_LOSSY_FILE} differs from the one this "
                          f"gvae-jax converts and {name} is taken; convert the float model")
      else:
        shutil.copy2(model_dir / EXACT_LOSSY_FILE, temp_dir / name)
      previous.append({"file": name, "fingerprint": source.fingerprint.hex()})
    if previous:
      manifest["previous_exact"] = previous
    manifest["fingerprint_exact"] = converted.fingerprint.hex()
    manifest["exact_lossy"] = "gvae_jax.coding.exact_lossy (format mode EXACT_LOSSY)"
    if residual_data is not None:
      manifest["exact_residual"] = ("gvae_jax.coding.exact_residual (format mode "
                                    "EXACT_RESIDUAL)")
    if source.flat is not None:
      head = source.flat
      head_dir = temp_dir / flat_head.FLAT_HEAD_DIR
      if head.exact is None:
        kept = {k: v for k, v in head.manifest.items()
                if k not in ("format", "format_version", "fingerprint", "model", "exact")}
        flat_head.write_flat_head(head.config, head.params, head_dir, kept, exact=True)
      else:
        shutil.copytree(model_dir / flat_head.FLAT_HEAD_DIR, head_dir)
      head_manifest = json.loads((head_dir / flat_head.MANIFEST_FILE).read_text())
      manifest["source_fingerprint_with_flat_head"] = (
          source.float_flat_fingerprint or source.fingerprint).hex()
      manifest["fingerprint_with_flat_head"] = with_flat_fingerprint(
          converted.fingerprint, bytes.fromhex(head_manifest["fingerprint"])).hex()
    (temp_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

  try:
    return fileio.write_directory_atomically(out_dir, fill)
  except exact_head.ConversionError as e:
    raise ExportError(f"{model_dir}'s flat head cannot be converted: {e}") from None


def attach_flat_head(model_dir: str | os.PathLike, head_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, force: bool = False,
                     exact: bool = False) -> Path:
  """Copies scalable model `model_dir` to `out_dir` with `head_dir` as its flat head;
  exact: converted to exact integer arithmetic (gvae_jax.coding.exact_head), so its
  files decode alike on every platform."""
  model_dir, out_dir = Path(model_dir), Path(out_dir)
  base = load_model(model_dir)  # checks it
  if base.flat is not None:
    raise flat_head.FlatHeadError(f"{model_dir} already has a flat head")
  if not base.is_scalable:
    raise flat_head.FlatHeadError(f"{model_dir} is lossy-only: a flat head needs a "
                                  "scalable model")
  head = flat_head.load_flat_head(head_dir)  # checks it
  if out_dir.exists():
    if not force:
      raise flat_head.FlatHeadError(f"{out_dir} already exists; pass --force to replace it")
    if not (out_dir / MANIFEST_FILE).is_file():
      raise flat_head.FlatHeadError(f"{out_dir} exists and is not an exported model; "
                                    "not replacing it")
  if not out_dir.absolute().parent.is_dir():
    raise flat_head.FlatHeadError(f"cannot write {out_dir}: its directory does not exist")

  def fill(temp_dir: Path) -> None:
    for name in MODEL_FILES:
      shutil.copy2(model_dir / name, temp_dir / name)
    if base.exact_lossy is not None:
      shutil.copy2(model_dir / EXACT_LOSSY_FILE, temp_dir / EXACT_LOSSY_FILE)
    if base.exact_residual is not None:
      shutil.copy2(model_dir / EXACT_RESIDUAL_FILE, temp_dir / EXACT_RESIDUAL_FILE)
    for entry in base.manifest.get("previous_exact", []):
      shutil.copy2(model_dir / entry["file"], temp_dir / entry["file"])
    if exact and head.exact is None:
      kept = {k: v for k, v in head.manifest.items()
              if k not in ("format", "format_version", "fingerprint", "model", "exact")}
      flat_head.write_flat_head(head.config, head.params, temp_dir / flat_head.FLAT_HEAD_DIR,
                                kept, exact=True)
    else:
      shutil.copytree(head_dir, temp_dir / flat_head.FLAT_HEAD_DIR)
    # The head's fingerprint as written (the converted one's for --exact); load_model checks it.
    head_manifest = temp_dir / flat_head.FLAT_HEAD_DIR / flat_head.MANIFEST_FILE
    head_fingerprint = bytes.fromhex(json.loads(head_manifest.read_text())["fingerprint"])
    manifest = json.loads((temp_dir / MANIFEST_FILE).read_text())
    manifest["fingerprint_with_flat_head"] = with_flat_fingerprint(
        base.fingerprint, head_fingerprint).hex()
    (temp_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

  try:
    return fileio.write_directory_atomically(out_dir, fill)
  except exact_head.ConversionError as e:
    raise flat_head.FlatHeadError(f"{head_dir} cannot be converted: {e}") from None
