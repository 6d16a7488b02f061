import pytest

from gvae_jax import config as config_lib


@pytest.fixture
def small(repo_root):
  return str(repo_root / "experiments/configs/small.py")


def test_every_experiment_config_builds_its_model(repo_root):
  from gvae_jax.models import build_model
  for path in sorted((repo_root / "experiments/configs").glob("*.py")):
    config = config_lib.load_config(str(path))
    assert len(config.train.lambdas) == config.model.levels, path.name
    build_model(config)


def test_overrides_are_typed(small):
  config = config_lib.load_config(small, [
      "--config.train.num_steps=12", "--config.train.learning_rate=1e-3",
      "--config.model.interpolation=linear", "--config.train.lambdas=(0.1,0.2,0.3,0.4)",
      "--config.eval.folder=", "--config.model.residual.bias_correction=false"])
  assert config.train.num_steps == 12 and isinstance(config.train.num_steps, int)
  assert config.train.learning_rate == 1e-3
  assert config.model.interpolation == "linear"
  assert config.train.lambdas == (0.1, 0.2, 0.3, 0.4)
  assert config.eval.folder == ""
  assert config.model.residual.bias_correction is False


@pytest.mark.parametrize("override, message", [
    ("--config.train.nope=1", "unknown config key 'train.nope'"),
    ("--config.nope.x=1", "unknown config key 'nope'"),
    ("--config.train.num_steps=ten", "num_steps=ten"),
    ("--config.model.residual.bias_correction=maybe", "bias_correction=maybe"),
    ("--config.model.residual=1", "unknown config key 'model.residual'"),
    ("config.train.num_steps=1", "bad override"),
])
def test_bad_overrides_are_clear(small, override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load_config(small, [override])


def test_missing_config_file(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="not found"):
    config_lib.load_config(str(tmp_path / "none.py"))


def test_fingerprint_tracks_model_shape_not_training_length(small):
  a = config_lib.load_config(small)
  b = config_lib.load_config(small, ["--config.train.num_steps=5"])
  c = config_lib.load_config(small, ["--config.model.n=32"])
  assert config_lib.model_fingerprint(a) == config_lib.model_fingerprint(b)
  assert config_lib.model_fingerprint(a) != config_lib.model_fingerprint(c)
