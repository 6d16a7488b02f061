"""A tiny, deterministic codec model and test images shared by the codec tests.

The model is experiments/configs/tiny.py (N=8, M=12, 2 levels) with
parameters from `model.init` at a fixed seed, then perturbed so that an
untrained network still produces a spread of symbols and scale-table indexes
(random init codes almost everything as 0 at one scale). The golden model in
tests/golden/tiny_model was made by `tiny_params()` (see regenerate.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gvae_jax.config import load_config
from gvae_jax.models import build_model

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "experiments" / "configs" / "tiny.py"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_MODEL = GOLDEN_DIR / "tiny_model"


def tiny_config():
  return load_config(str(TINY_CONFIG))


def tiny_params(config=None, seed: int = 0, latent_gain: float = 8.0):
  """Initialised, then perturbed: wider latents, varied scales (module doc)."""
  config = tiny_config() if config is None else config
  model = build_model(config)
  init = jax.jit(functools.partial(model.init, train=True))  # eager init takes ~20 s
  variables = init({"params": jax.random.PRNGKey(seed), "noise": jax.random.PRNGKey(1)},
                   jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,)))
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda a: (a + rng.normal(0, 0.05, a.shape) * (np.abs(a).mean() + 0.01)).astype(np.float32),
      params)
  # Gains keep G * G' fixed, as training does, but spread y' and z over many symbols.
  params["gain"]["table"] = params["gain"]["table"] * np.float32(latent_gain)
  params["inverse_gain"]["table"] = params["inverse_gain"]["table"] / np.float32(latent_gain)
  params["hyper_gain"]["table"] = params["hyper_gain"]["table"] * np.float32(4)
  params["inverse_hyper_gain"]["table"] = params["inverse_hyper_gain"]["table"] / np.float32(4)
  return params


def make_image(height: int, width: int, seed: int = 0) -> np.ndarray:
  """A deterministic uint8 RGB image with edges, gradients and noise."""
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([(xx * 7 + yy * 2) % 256, (yy * 5) % 256,
                   np.where((xx // 8 + yy // 8) % 2 == 0, 40, 210)], axis=-1)
  noise = np.random.default_rng(seed).integers(-24, 25, (height, width, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, x, s):
  out = model.apply({"params": params}, x, s, train=False)
  x_hat = jnp.round(jnp.clip(out["x_tilde"], 0.0, 1.0) * 255.0).astype(jnp.uint8)
  return x_hat, out["bits_y"] + out["bits_z"]


def model_reconstruction(exported, pixels: np.ndarray, rate: float) -> tuple[np.ndarray, float]:
  """The model's own quantised reconstruction (train=False, clipped, rounded) and bits.

  The image is edge-padded here exactly as the model pads it, so one compiled
  forward serves every size with the same padded shape; the output is the
  model's on the unpadded image.
  """
  height, width = pixels.shape[:2]
  stride = int(exported.model.stride)
  padded = np.pad(pixels, [(0, -height % stride), (0, -width % stride), (0, 0)], mode="edge")
  x = jnp.asarray(padded, jnp.float32)[None] / 255.0
  x_hat, bits = _forward(exported.model, exported.params, x,
                         jnp.full((1,), np.float32(rate)))
  return np.asarray(x_hat[0, :height, :width]), float(bits[0])


def golden_params():
  """The committed golden model's parameters (made by `tiny_params()`), without init."""
  from flax import serialization
  return serialization.msgpack_restore((GOLDEN_MODEL / "params.msgpack").read_bytes())


def other_params(params, seed: int = 1):
  """A different model of the same shape: the parameters slightly perturbed."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: (a * (1 + rng.normal(0, 0.01, a.shape))).astype(np.float32), params)


# --- A tiny scalable (lossy + residual) model for the residual codec tests. ---

SCALABLE_OVERRIDES = (
    "--config.model.name=scalable_gained_hyperprior", "--config.model.prior_channels=4",
    "--config.model.residual.context_channels=8", "--config.model.residual.hidden=8",
    "--config.model.residual.components=3")


def tiny_scalable_config():
  return load_config(str(TINY_CONFIG), list(SCALABLE_OVERRIDES))


def tiny_delta_config():
  """tiny_scalable_config with the "delta" bias correction (the form that converts to
  exact arithmetic, gvae_jax.coding.exact_residual)."""
  return load_config(str(TINY_CONFIG), list(SCALABLE_OVERRIDES)
                     + ["--config.model.residual.correction=delta"])


def tiny_scalable_params(config=None, seed: int = 0):
  """The golden lossy parameters plus a prior head and residual layer drawn at `seed`.

  No jitted init (it takes ~20 s here): the parameter shapes come from
  eval_shape and new weights are Lecun-normal numpy draws. The residual head
  is then made non-degenerate: wide logistic scales (log-scale bias 3.5,
  scale ~33 grey levels, so the untrained model's probabilities stay far
  above 2**-16 over the whole residual range) and means that move with the
  context (their output weights scaled up).
  """
  config = tiny_scalable_config() if config is None else config
  model = build_model(config)
  shapes = jax.eval_shape(
      functools.partial(model.init, train=False, tau=jnp.ones((1,), jnp.int32)),
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,)))["params"]
  lossy = golden_params()
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    keys = [k.key for k in path]
    node = lossy
    for key in keys[1:]:
      node = node.get(key) if isinstance(node, dict) else None
      if node is None:
        break
    if keys[0] == "lossy" and node is not None:
      return np.asarray(node, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    scale = 1.0 / np.sqrt(fan_in) if len(leaf.shape) > 1 else 0.05
    return rng.normal(0.0, scale, leaf.shape).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  params = jax.tree_util.tree_map(np.asarray, params)
  k = int(config.model.residual.components)
  raw = params["residual"]["head_2"]["bias"].shape[0]
  logits = raw - 9 * k  # (3 or 1) * k weights, then means, log-scales, coefficients
  means = slice(logits, logits + 3 * k)
  log_scales = slice(logits + 3 * k, logits + 6 * k)
  for head in ("head_2", "bc_head_2"):
    if head not in params["residual"]:  # the "delta" correction has bc_delta_* instead
      continue
    layer = params["residual"][head]
    bias = layer["shift"]["bias"] if head.startswith("bc") else layer["bias"]
    bias[log_scales] = 3.5
    kernel = layer["conv"]["kernel"] if head.startswith("bc") else layer["kernel"]
    kernel[..., means] *= 8.0
  return params


def golden_coders() -> list:
  """pytest params: every coder with a golden set (tests/golden/<coder>/), skipped
  where its backend is not installed (e.g. TFC outside the tfc profile)."""
  import pytest

  from gvae_jax.coding.coder import CODER_NAMES, CodingError, get_coder
  params = []
  for name, coder_id in sorted(CODER_NAMES.items()):
    if not (GOLDEN_DIR / name / "hashes.json").exists():
      continue
    try:
      get_coder(coder_id)
      marks = ()
    except CodingError:
      marks = pytest.mark.skip(reason=f"the {name} coder is not installed in this profile")
    params.append(pytest.param(name, id=name, marks=marks))
  return params


def exported_here() -> bool:
  """Whether this platform (CPU features, jaxlib) is the one that exported the
  golden models (the tfc profile's golden set records it). Elsewhere export
  may build the factorized z table one count apart in a few entries: it
  evaluates the learned float32 density through XLA (README, Portability);
  files are unaffected, the exported model stores the integers."""
  import json

  from golden.regenerate import hashes_path, platform_signature
  return json.loads(hashes_path("tfc").read_text())["platform"] == platform_signature()


def assert_tables_match(committed, rebuilt) -> None:
  """Exactly where the golden models were exported, else z within one count (above)."""
  import numpy as np
  np.testing.assert_array_equal(committed.y_table.cdf, rebuilt.y_table.cdf)
  np.testing.assert_array_equal(committed.y_table.offsets, rebuilt.y_table.offsets)
  np.testing.assert_array_equal(committed.z_table.offsets, rebuilt.z_table.offsets)
  if exported_here():
    np.testing.assert_array_equal(committed.z_table.cdf, rebuilt.z_table.cdf)
    assert committed.fingerprint == rebuilt.fingerprint
  else:
    difference = np.abs(committed.z_table.cdf.astype(np.int64) - rebuilt.z_table.cdf)
    assert difference.max() <= 1


# --- A tiny flat-base residual head (gvae_jax.models.flat_base). ---

FLAT_CONFIG = REPO / "experiments" / "configs" / "flat_residual.py"
FLAT_OVERRIDES = (
    "--config.model.residual.context_channels=8", "--config.model.residual.hidden=8",
    "--config.model.residual.components=3", "--config.data.folder=")


def tiny_flat_config():
  return load_config(str(FLAT_CONFIG), list(FLAT_OVERRIDES))


def tiny_flat_params(config=None, seed: int = 0):
  """Flat head parameters drawn at `seed` (Lecun-normal numpy draws, as
  tiny_scalable_params), with logistic scales of about 7 grey levels."""
  from gvae_jax.models.flat_base import tap_offsets

  config = tiny_flat_config() if config is None else config
  model = build_model(config)
  r = config.model.residual
  taps, k = len(tap_offsets(r.kernel_size, r.order)), int(r.components)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, r.kernel_size, r.kernel_size, taps)),
                         jnp.zeros((1, r.kernel_size, r.kernel_size, 3)),
                         jnp.ones((1,), jnp.int32), corrected=True))["params"]
  rng = np.random.default_rng(seed)

  def fill(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    scale = 1.0 / np.sqrt(fan_in) if len(leaf.shape) > 1 else 0.05
    return rng.normal(0.0, scale, leaf.shape).astype(np.float32)

  params = jax.tree_util.tree_map(fill, shapes)
  bias = params["head_2"]["bias"]
  start = bias.shape[0] - 9 * k  # 3k weights, then means, log-scales, coefficients
  bias[start + 3 * k:start + 6 * k] = 2.0
  return params


def tiny_flat_model(scalable):
  """`scalable` (an ExportedModel) with the tiny flat head attached, in memory."""
  from gvae_jax.coding import export, flat_head

  return export.attach(scalable, flat_head.build_flat_head(tiny_flat_config(),
                                                              tiny_flat_params()))


# Other CPU kinds and numerics for subprocess decoding tests (tests/test_exact_lossy.py,
# tests/test_exact_residual.py): XLA limited to AVX2 or SSE4.2 with OpenBLAS kernels of
# that generation, 4 host devices, one thread.
OTHER_CPUS = {
    "native": {},
    "avx2": {"OPENBLAS_CORETYPE": "Haswell", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"},
    "sse": {"OPENBLAS_CORETYPE": "Prescott", "OPENBLAS_NUM_THREADS": "1",
            "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX X86_V3 X86_V4",
            "XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"},
    # Other numerics of the same CPU: 4 host devices, XLA's Eigen thread pool off.
    "devices4": {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    "one_thread": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
                                "intra_op_parallelism_threads=1", "OPENBLAS_NUM_THREADS": "1"},
}
