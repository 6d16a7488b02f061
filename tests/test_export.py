"""Exported models: tables, fingerprint, atomic writing, loading and its checks."""
import json
import os

import jax
import numpy as np
import pytest
from scipy.special import ndtri

from codec_helpers import golden_params, other_params, tiny_config
from gvae_jax.coding import export
from gvae_jax.entropy import gaussian
from gvae_jax.errors import UserError


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def params(config):
  return golden_params()  # tiny_params(), without the slow init compile


@pytest.fixture(scope="module")
def exported(tmp_path_factory, config, params):
  out = tmp_path_factory.mktemp("export") / "model"
  return export.export_params(config, params, out, step=42), out


def test_directory_layout_and_manifest(exported, config):
  model, out = exported
  assert sorted(os.listdir(out)) == sorted(export.MODEL_FILES)
  manifest = json.loads((out / export.MANIFEST_FILE).read_text())
  assert manifest["format_version"] == export.EXPORT_FORMAT_VERSION
  assert manifest["fingerprint"] == model.fingerprint.hex() and len(model.fingerprint) == 16
  assert manifest["model"] == config.model.name and manifest["levels"] == 2
  assert manifest["step"] == 42
  # No temporary directories left beside it.
  assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_load_gives_back_the_same_model(exported):
  model, out = exported
  loaded = export.load_model(out)
  assert loaded.fingerprint == model.fingerprint
  for a, b in [(loaded.z_table, model.z_table), (loaded.y_table, model.y_table)]:
    np.testing.assert_array_equal(a.cdf, b.cdf)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.offsets, b.offsets)
  np.testing.assert_array_equal(loaded.y_scales, gaussian.scale_table())
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, model.params)
  assert loaded.config.model.to_dict() == model.config.model.to_dict()


def test_export_is_deterministic(exported, config, params, tmp_path):
  model, out = exported
  again = export.export_params(config, params, tmp_path / "again", step=42)
  assert again.fingerprint == model.fingerprint
  for name in (export.PARAMS_FILE, export.CONFIG_FILE, export.MANIFEST_FILE):
    assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_z_table_covers_the_density_up_to_the_tail_mass(exported):
  model, _ = exported
  table = model.z_table
  assert table.num_rows == model.model.n
  width = int(table.lengths.max())
  grid = (table.offsets[None, :] + np.arange(width)[:, None]).astype(np.float32)  # [width, C]
  lik = np.asarray(model.model.apply({"params": model.params}, grid,
                                     method=lambda m, v: m.z_likelihood(v)), np.float64)
  for channel in range(table.num_rows):
    inside = lik[:table.lengths[channel], channel]
    assert 1 - 1.5 * export.DEFAULT_TAIL_MASS <= inside.sum() <= 1 + 1e-5, channel
    # Each end is at most one integer beyond the tail quantile: not much wider.
    assert inside[0] < 1e-3 and inside[-1] < 1e-3


def test_y_table_rows_follow_the_scale_table(exported):
  model, _ = exported
  scales = gaussian.scale_table().astype(np.float64)
  half = np.ceil(-ndtri(export.DEFAULT_TAIL_MASS / 2) * scales)
  np.testing.assert_array_equal(model.y_table.lengths, 2 * half + 1)
  np.testing.assert_array_equal(model.y_table.offsets, -half)
  assert model.y_table.precision == export.DEFAULT_PRECISION


def test_scales_code_with_the_nearest_table_scale_in_the_log_domain(exported):
  import jax.numpy as jnp
  from gvae_jax.coding.codec import scale_to_row

  model, _ = exported
  table = model.y_scales.astype(np.float64)
  rng = np.random.default_rng(0)
  scales = np.concatenate([np.exp(rng.uniform(np.log(0.05), np.log(400), 5000)),
                           table, model.y_index_bounds]).astype(np.float32)
  rows = np.asarray(scale_to_row(jnp.asarray(scales), jnp.asarray(model.y_index_bounds)))
  distance = np.abs(np.log(scales.astype(np.float64))[:, None] - np.log(table)[None, :])
  best = distance.min(axis=1)
  assert np.all(distance[np.arange(len(scales)), rows] <= best + 1e-6)
  np.testing.assert_array_equal(rows[5000:5000 + len(table)], np.arange(len(table)))


def test_existing_output_needs_force(exported, config, params, tmp_path):
  model, _ = exported
  out = tmp_path / "model"
  export.export_params(config, params, out)
  before = (out / export.PARAMS_FILE).stat().st_mtime_ns
  with pytest.raises(export.ExportError, match="--force"):
    export.export_params(config, params, out)
  assert (out / export.PARAMS_FILE).stat().st_mtime_ns == before
  other = export.export_params(config, other_params(params), out, force=True)
  assert export.load_model(out).fingerprint == other.fingerprint != model.fingerprint
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # swap left nothing behind


def test_force_never_replaces_a_directory_that_is_not_a_model(config, params, tmp_path):
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "thesis.tex").write_text("years of work")
  with pytest.raises(export.ExportError, match="not an exported model"):
    export.export_params(config, params, precious, force=True)
  assert (precious / "thesis.tex").read_text() == "years of work"


def test_a_failed_export_leaves_nothing(config, params, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(np, "savez_compressed", fail)
  with pytest.raises(OSError):
    export.export_params(config, params, tmp_path / "model")
  assert list(tmp_path.iterdir()) == []


def test_load_errors(exported, tmp_path):
  _, out = exported
  with pytest.raises(export.ExportError, match="not found"):
    export.load_model(tmp_path / "missing")
  with pytest.raises(export.ExportError, match="not an exported model"):
    export.load_model(tmp_path)
  # Any modified file breaks the fingerprint or the parse: a clear ExportError.
  for name, change in [(export.PARAMS_FILE, lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:]),
                       (export.TABLES_FILE, lambda b: b[:100]),
                       (export.CONFIG_FILE, lambda b: b.replace(b'"m": 12', b'"m": 13')),
                       (export.MANIFEST_FILE, lambda b: b"{")]:
    copy = tmp_path / f"copy_{name}"
    copy.mkdir()
    for file in export.MODEL_FILES:
      (copy / file).write_bytes((out / file).read_bytes())
    (copy / name).write_bytes(change((out / name).read_bytes()))
    with pytest.raises(export.ExportError):
      export.load_model(copy)


def test_params_of_another_shape_are_refused(config, params, tmp_path):
  wrong = jax.tree_util.tree_map(lambda a: a, params)
  wrong["gain"]["table"] = np.ones((3, 12), np.float32)
  with pytest.raises(export.ExportError, match="do not match"):
    export.export_params(config, wrong, tmp_path / "model")
  assert not (tmp_path / "model").exists()


def test_export_from_a_training_workdir(config, params, tmp_path):
  import orbax.checkpoint as ocp
  from gvae_jax import config as config_lib
  from gvae_jax.train import checkpoints

  workdir = tmp_path / "workdir"
  with pytest.raises(UserError, match="not found"):
    checkpoints.export_workdir(workdir, tmp_path / "out")
  workdir.mkdir()
  with pytest.raises(UserError, match="not a training workdir"):
    checkpoints.export_workdir(workdir, tmp_path / "out")
  (workdir / "config.json").write_text(config_lib.to_json(config))
  with pytest.raises(UserError, match="no checkpoints"):
    checkpoints.export_workdir(workdir, tmp_path / "out")
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  manager.save(7, args=ocp.args.StandardSave({"params": params, "step": 7}))
  manager.wait_until_finished()
  model = checkpoints.export_workdir(workdir, tmp_path / "out")
  assert model.manifest["step"] == 7
  assert export.load_model(tmp_path / "out").fingerprint == model.fingerprint
  assert model.fingerprint == export.build_exported_model(config, params).fingerprint
  with pytest.raises(UserError, match="--force"):
    checkpoints.export_workdir(workdir, tmp_path / "out")
