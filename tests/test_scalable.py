"""The scalable (lossy + residual) model: shapes, rates, and what the BC term trains."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gvae_jax.config import load_config
from gvae_jax.models import build_model
from gvae_jax.models.residual import ResidualModel, residual_bits


@pytest.fixture(scope="module")
def scalable(request):
  config = load_config(str(request.config.rootpath / "experiments/configs/tiny.py"), [
      "--config.model.name=scalable_gained_hyperprior", "--config.model.prior_channels=4",
      "--config.model.residual.context_channels=4", "--config.model.residual.hidden=8"])
  model = build_model(config)
  x = jnp.round(jax.random.uniform(jax.random.PRNGKey(0), (2, 20, 24, 3)) * 255) / 255
  variables = model.init({"params": jax.random.PRNGKey(1), "noise": jax.random.PRNGKey(2)},
                         x, jnp.zeros(2), train=True, tau=jnp.asarray([1, 2]))
  return model, variables, x


def test_outputs_and_rates(scalable):
  model, variables, x = scalable
  out = model.apply(variables, x, jnp.asarray([0.0, 1.0]), tau=jnp.asarray([1, 5]))
  for key in ("bits_y", "bits_z", "bits_r", "bits_r_tau"):
    assert out[key].shape == (2,) and np.all(np.isfinite(out[key])) and np.all(out[key] > 0)
  # A uniform code over 511 residual values bounds nothing, but an untrained
  # model still gives a finite, positive rate per subpixel.
  assert out["u"].shape == (2, 20, 24, 4)


def test_bias_correction_term_trains_only_the_correction_head(scalable):
  model, variables, x = scalable

  def bc_bits(params):
    out = model.apply({"params": params}, x, jnp.zeros(2), tau=jnp.asarray([2, 3]))
    return jnp.sum(out["bits_r_tau"])

  grads = jax.grad(bc_bits)(variables["params"])
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    if "bc_head" in name:
      continue
    assert np.all(np.asarray(g) == 0), name
  assert any(np.any(np.asarray(g) != 0) for p, g in flat if "bc_head" in jax.tree_util.keystr(p))


def test_residual_rates_sum_to_one_over_all_images_of_one_pixel():
  """Over every possible 1x1 residual image, probabilities sum to one (tau = 2)."""
  model = ResidualModel(context_channels=2, hidden=4, components=2)
  tau = 2
  b = 2 * tau + 1
  grid = jnp.arange(-b * 3, b * 3 + 1, b, dtype=jnp.float32)  # a small range, edges take tails
  u = jnp.zeros((1, 1, 1, 3))
  variables = model.init(jax.random.PRNGKey(0), u, jnp.zeros((1, 1, 1, 3)), jnp.ones(1, jnp.int32),
                         corrected=True)
  params = model.apply(variables, u, jnp.zeros((1, 1, 1, 3)), jnp.ones(1, jnp.int32) * tau,
                       corrected=True)
  rr, gg, bb = jnp.meshgrid(grid, grid, grid, indexing="ij")
  images = jnp.stack([rr, gg, bb], -1).reshape(-1, 1, 1, 3)
  broadcast = jax.tree_util.tree_map(lambda p: jnp.broadcast_to(p, (images.shape[0],) + p.shape[1:]),
                                     params)
  bits = residual_bits(broadcast, images, jnp.full((images.shape[0],), tau), float(grid[0]),
                       float(grid[-1]))
  np.testing.assert_allclose(float(jnp.sum(2.0 ** -bits)), 1.0, atol=1e-4)


def test_delta_correction_starts_at_no_correction_and_trains_only_itself():
  """correction="delta": at init the corrected head equals the lossless head
  (so bias correction can only start from "off"), and the tau loss moves only
  the delta layers, not the lossless head or the context."""
  model = ResidualModel(context_channels=4, hidden=8, components=2, correction="delta")
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.normal(size=(2, 6, 7, 3)), jnp.float32)
  r_hat = jnp.asarray(rng.integers(-3, 4, (2, 6, 7, 3)) * 3, jnp.float32)
  tau = jnp.asarray([1, 4])
  variables = model.init(jax.random.PRNGKey(0), u, r_hat, tau, corrected=True)
  assert "bc_delta_2" in variables["params"] and "bc_head_2" not in variables["params"]
  on = model.apply(variables, u, r_hat, tau, corrected=True)
  off = model.apply(variables, u, r_hat, jnp.zeros(2, jnp.int32), corrected=False)
  for key in on:
    np.testing.assert_array_equal(on[key], off[key])

  def corrected_bits(params):
    params_on = model.apply({"params": params}, u, r_hat, tau, corrected=True)
    return jnp.sum(residual_bits(params_on, r_hat, tau))

  flat = jax.tree_util.tree_flatten_with_path(jax.grad(corrected_bits)(variables["params"]))[0]
  moved = {jax.tree_util.keystr(p) for p, g in flat if np.any(np.asarray(g) != 0)}
  assert moved and all("bc_delta" in name for name in moved), moved
  assert any("bc_delta_2" in name for name in moved)  # the zero layer does get a gradient


def test_unknown_correction_form_is_refused():
  model = ResidualModel(context_channels=2, hidden=4, components=2, correction="both")
  with pytest.raises(ValueError, match="correction form"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)),
               jnp.ones(1, jnp.int32), corrected=True)
