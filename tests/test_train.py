"""End-to-end: the tiny config trains on 2 fake CPU devices, checkpoints and resumes.

Multi-process training is in test_multihost.py."""
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gvae_jax.config import load_config
from gvae_jax.models import build_model
from gvae_jax.train import checkpoints, train


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(6):
    h, w = 40 + 4 * i, 44 + 3 * i
    ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 40, h)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / f"img{i}.png")
  return folder


def tiny_config(repo_root, image_folder, **train_overrides):
  config = load_config(str(repo_root / "experiments/configs/tiny.py"))
  config.data.folder = str(image_folder)
  config.eval.folder = ""
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


def test_runs_on_two_devices():
  assert jax.local_device_count() == 2, "conftest sets 2 fake CPU devices"


def _eval_loss(config, params, image_folder):
  model = build_model(config)
  x = jnp.stack([jnp.asarray(np.asarray(Image.open(p))[:32, :32], jnp.float32) / 255.0
                 for p in sorted(Path(image_folder).glob("*.png"))])
  total = 0.0
  for level, lam in enumerate(config.train.lambdas):
    out = model.apply({"params": params}, x, jnp.full((x.shape[0],), float(level)))
    bpp = (out["bits_y"] + out["bits_z"]) / (32 * 32)
    mse = jnp.mean(jnp.square(x - out["x_tilde"]), axis=(1, 2, 3))
    total += float(jnp.mean(bpp + lam * 255**2 * mse))
  return total


def _assert_no_deprecation_from_the_project(caught):
  """No DeprecationWarning attributed to gvae_jax code (JAX, Flax, Optax and
  Orbax attribute theirs to the caller); third-party internals may warn."""
  ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
          if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
          and f"{os.sep}gvae_jax{os.sep}" in w.filename]
  assert not ours, ours


@pytest.mark.isolated
def test_loss_drops_checkpoints_are_written_and_other_models_are_refused(repo_root, image_folder,
                                                                       tmp_path):
  config = tiny_config(repo_root, image_folder, num_steps=20, checkpoint_every=10)
  initial = train.create_train_state(
      jax.random.split(jax.random.PRNGKey(config.train.seed))[0], config, build_model(config))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = train.train_and_evaluate(config, tmp_path, progress=False)
  _assert_no_deprecation_from_the_project(caught)
  assert int(state.step) == 20
  assert _eval_loss(config, state.params, image_folder) < 0.8 * _eval_loss(
      config, initial.params, image_folder)
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [10, 20]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  # The workdir now belongs to this model: another one is refused, naming the difference.
  config.model.n = 16
  with pytest.raises(checkpoints.IncompatibleWorkdirError, match="model.n"):
    train.train_and_evaluate(config, tmp_path, progress=False)


def _assert_same_params(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_cli_reports_bad_input_without_traceback(repo_root, tmp_path):
  def gvae(*args):
    return subprocess.run([sys.executable, "-m", "gvae_jax", *args], capture_output=True,
                          text=True, cwd=repo_root, timeout=300)
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = [
      ("train", "--config", "experiments/configs/tiny.py", "--workdir", str(tmp_path / "w1"),
       f"--config.data.folder={empty}"),
      ("train", "--config", "experiments/configs/tiny.py", "--workdir", str(tmp_path / "w2"),
       "--config.train.no_such_key=1"),
      ("train", "--config", "experiments/configs/missing.py", "--workdir", str(tmp_path / "w3")),
  ]
  for args in cases:
    result = gvae(*args)
    assert result.returncode != 0, args
    assert "Traceback" not in result.stderr, result.stderr
    assert "gvae: error:" in result.stderr


@pytest.mark.slow
@pytest.mark.isolated
def test_stopped_and_killed_runs_resume_to_the_uninterrupted_parameters(repo_root, image_folder,
                                                                       tmp_path):
  # One run, interrupted twice: stopped early in-process, resumed by the CLI and SIGKILLed
  # there, then resumed in-process to the end. It must match an uninterrupted run.
  config = tiny_config(repo_root, image_folder, num_steps=30, checkpoint_every=5)
  straight = train.train_and_evaluate(config, tmp_path / "straight", progress=False)

  workdir = tmp_path / "interrupted"
  first = train.train_and_evaluate(config, workdir, stop_after_steps=10, progress=False)
  assert int(first.step) == 10
  cmd = [sys.executable, "-m", "gvae_jax", "train", "--config", "experiments/configs/tiny.py",
         "--workdir", str(workdir), "--no-progress", f"--config.data.folder={image_folder}",
         "--config.eval.folder=", "--config.train.num_steps=30",
         "--config.train.checkpoint_every=5"]
  proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  ckpt = workdir / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    if any(p.name.isdigit() and int(p.name) >= 20 for p in ckpt.iterdir()):
      break
    time.sleep(0.05)
  killed_midway = proc.poll() is None
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert killed_midway, "the run finished before it could be killed"
  with warnings.catch_warnings(record=True) as caught:  # the restore path
    warnings.simplefilter("always")
    resumed = train.train_and_evaluate(config, workdir, progress=False)
  _assert_no_deprecation_from_the_project(caught)
  assert int(resumed.step) == 30
  params, step = checkpoints.restore_params(workdir)
  assert step == 30
  _assert_same_params(straight.params, resumed.params)
  _assert_same_params(straight.params, params)


@pytest.mark.isolated
def test_training_turns_the_persistent_cache_off_only_where_it_crashes(tmp_path):
  old_jax = tuple(int(x) for x in jax.__version__.split(".")[:2]) < (0, 6)
  assert train.persistent_cache_is_safe_for_training() is not old_jax
  jax.config.update("jax_compilation_cache_dir", str(tmp_path))
  try:
    train._turn_off_unsafe_persistent_cache()
    assert (jax.config.jax_compilation_cache_dir is None) == old_jax
  finally:
    jax.config.update("jax_compilation_cache_dir", None)


def test_warm_start_copies_matching_lossy_parameters(repo_root, tmp_path):
  from gvae_jax.coding.export import export_params
  lossy = load_config(str(repo_root / "experiments/configs/tiny.py"))
  lossy_model = build_model(lossy)
  lossy_state = train.create_train_state(jax.random.PRNGKey(5), lossy, lossy_model)
  export_params(lossy, lossy_state.params, tmp_path / "model")

  scalable = load_config(str(repo_root / "experiments/configs/tiny.py"), [
      "--config.model.name=scalable_gained_hyperprior", "--config.model.prior_channels=4",
      "--config.model.residual.context_channels=4", "--config.model.residual.hidden=8"])
  state = train.create_train_state(jax.random.PRNGKey(6), scalable, build_model(scalable))
  params, copied = checkpoints.warm_start(state.params, tmp_path / "model")
  np.testing.assert_array_equal(params["lossy"]["g_a"]["conv_0"]["kernel"],
                                lossy_state.params["g_a"]["conv_0"]["kernel"])
  # The new synthesis head and the residual model keep their initialisation.
  np.testing.assert_array_equal(params["residual"]["context"]["kernel"],
                                state.params["residual"]["context"]["kernel"])
  assert copied == len(jax.tree_util.tree_leaves(lossy_state.params))
  with pytest.raises(checkpoints.UserError, match="no exported model"):
    checkpoints.warm_start(state.params, tmp_path / "nothing")


def test_warm_start_spreads_a_fixed_rate_models_gains_over_the_levels(repo_root, tmp_path):
  """The fine-tune protocol: gain units added to a trained fixed-rate model
  give, at the level of its lambda, the fixed model's reconstruction."""
  from gvae_jax.coding.export import export_params
  lambdas = ["--config.train.lambdas=(0.0067,0.025,0.0932)", "--config.model.levels=3"]
  fixed_cfg = load_config(str(repo_root / "experiments/configs/tiny.py"), [
      "--config.train.lambdas=(0.025,)", "--config.model.levels=1"])
  fixed_model = build_model(fixed_cfg)
  fixed = train.create_train_state(jax.random.PRNGKey(5), fixed_cfg, fixed_model).params
  # A trained fixed model's gains are not ones: make them arbitrary positive rows.
  fixed = jax.tree_util.tree_map_with_path(
      lambda path, v: (v * (1 + jax.random.uniform(jax.random.PRNGKey(len(path)), v.shape))
                       if path[-1].key == "table" else v), fixed)
  export_params(fixed_cfg, fixed, tmp_path / "fixed")
  gained_cfg = load_config(str(repo_root / "experiments/configs/tiny.py"), lambdas)
  gained_model = build_model(gained_cfg)
  state = train.create_train_state(jax.random.PRNGKey(6), gained_cfg, gained_model)
  params, copied = checkpoints.warm_start(state.params, tmp_path / "fixed")
  assert copied == len(jax.tree_util.tree_leaves(fixed))  # the gain tables too
  tables = [k for k in jax.tree_util.tree_leaves_with_path(params) if k[0][-1].key == "table"]
  assert tables and all(np.shape(v)[0] == 3 for _, v in tables)
  x = jax.random.uniform(jax.random.PRNGKey(2), (1, 32, 32, 3))
  want = fixed_model.apply({"params": fixed}, x, jnp.zeros((1,)))
  got = gained_model.apply({"params": params}, x, jnp.ones((1,)))  # level 1: lambda 0.025
  np.testing.assert_allclose(got["x_tilde"], want["x_tilde"], rtol=2e-3, atol=2e-3)  # row 1.0002, not 1
  np.testing.assert_allclose(got["bits_y"], want["bits_y"], rtol=1e-2)
  # The other levels start apart (their initial gain rows), so their rates differ.
  low = gained_model.apply({"params": params}, x, jnp.zeros((1,)))
  assert float(low["bits_y"][0]) < float(want["bits_y"][0])


def test_bfloat16_option_computes_convolutions_in_bf16_with_float32_outputs(repo_root):
  config = load_config(str(repo_root / "experiments/configs/tiny.py"))
  model = build_model(config)
  params = train.create_train_state(jax.random.PRNGKey(0), config, model).params
  bf16 = train.with_compute_dtype(model, "bfloat16")
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  s = jnp.zeros((2,))
  out32 = model.apply({"params": params}, x, s)
  out16 = bf16.apply({"params": params}, x, s)  # the same float32 parameters
  assert all(value.dtype == jnp.float32 for value in out16.values())
  np.testing.assert_allclose(out16["x_tilde"], out32["x_tilde"], atol=0.05)
  np.testing.assert_allclose(out16["bits_y"] + out16["bits_z"],
                             out32["bits_y"] + out32["bits_z"], rtol=0.1)
  jaxpr = str(jax.make_jaxpr(lambda p: bf16.apply({"params": p}, x, s))(params))
  assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr
  assert "bf16" not in str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x, s))(params))
  config.train.compute_dtype = "float16"
  with pytest.raises(train.config_lib.ConfigError, match="compute_dtype"):
    train.validate(config)
