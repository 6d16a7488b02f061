import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gvae_jax.config import load_config
from gvae_jax.models import GainedMeanScaleHyperprior, build_model


@pytest.fixture(scope="module")
def tiny(request):
  config = load_config(str(request.config.rootpath / "experiments/configs/tiny.py"))
  model = build_model(config)
  x = jnp.zeros((1, 64, 64, 3))
  variables = model.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)},
                         x, jnp.zeros((1,)), train=True)
  return model, variables


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 37), (2, 33, 65), (1, 70, 3), (3, 64, 64)])
def test_any_image_size(tiny, shape):
  model, variables = tiny
  b, h, w = shape
  x = jax.random.uniform(jax.random.PRNGKey(2), (b, h, w, 3))
  out = model.apply(variables, x, jnp.zeros((b,)), train=False)
  assert out["x_tilde"].shape == (b, h, w, 3)
  assert out["bits_y"].shape == (b,) and out["bits_z"].shape == (b,)
  assert np.all(np.isfinite(out["bits_y"])) and np.all(np.asarray(out["bits_z"]) > 0)


def test_rate_per_example_mixes_levels(tiny):
  model, variables = tiny
  x = jax.random.uniform(jax.random.PRNGKey(3), (1, 32, 32, 3))
  x2 = jnp.concatenate([x, x])
  mixed = model.apply(variables, x2, jnp.asarray([0.0, 1.0]))
  for i, s in enumerate([0.0, 1.0]):
    single = model.apply(variables, x, jnp.asarray([s]))
    np.testing.assert_allclose(mixed["bits_y"][i], single["bits_y"][0], rtol=1e-5)
    np.testing.assert_allclose(mixed["x_tilde"][i], single["x_tilde"][0], atol=1e-5)


def test_training_mode_needs_noise_and_differs(tiny):
  model, variables = tiny
  x = jax.random.uniform(jax.random.PRNGKey(4), (2, 32, 32, 3))
  a = model.apply(variables, x, jnp.zeros((2,)), train=True, rngs={"noise": jax.random.PRNGKey(0)})
  b = model.apply(variables, x, jnp.zeros((2,)), train=False)
  assert not np.allclose(a["bits_y"], b["bits_y"])


def test_prior_features_have_image_resolution():
  model = GainedMeanScaleHyperprior(n=8, m=8, levels=2, prior_channels=5)
  x = jnp.zeros((1, 20, 30, 3))
  variables = model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)))
  out = model.apply(variables, x, jnp.zeros((1,)))
  assert out["u"].shape == (1, 20, 30, 5)


def test_bad_quantization_is_refused():
  model = GainedMeanScaleHyperprior(n=8, m=8, levels=2, quantization="round")
  with pytest.raises(ValueError, match="quantization"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))
