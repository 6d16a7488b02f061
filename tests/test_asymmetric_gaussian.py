"""The asymmetric Gaussian entropy model: its math, its integer tables, its codec."""
import numpy as np
import pytest
from scipy import special

import jax
import jax.numpy as jnp

from codec_helpers import golden_params, make_image, tiny_config
from gvae_jax.coding import codec, container, export
from gvae_jax.coding import coder as coder_lib
from gvae_jax.config import load_config, model_fingerprint
from gvae_jax.entropy import asymmetric_gaussian as ag
from gvae_jax.entropy import gaussian

SCALES = gaussian.scale_table()
LEVELS = len(SCALES)


# --- The density. ---

def test_equal_scales_give_the_gaussian_conditional():
  values = jnp.asarray(np.linspace(-60, 60, 2401), jnp.float32)
  for scale in (0.11, 0.7, 3.0, 40.0, 256.0):
    asym = np.asarray(ag.likelihood(values, scale, scale), np.float64)
    sym = np.asarray(gaussian.likelihood(values, scale), np.float64)
    np.testing.assert_allclose(asym, sym, rtol=2e-5, atol=1e-7)
    # float64 numpy (what the tables are built from) against the Gaussian bin mass.
    v = np.abs(np.asarray(values, np.float64))
    exact = special.ndtr((0.5 - v) / scale) - special.ndtr((-0.5 - v) / scale)
    np.testing.assert_allclose(ag.likelihood_np(values, scale, scale), exact, rtol=1e-12,
                               atol=1e-300)


def test_sums_to_one_over_the_integers_for_random_parameters():
  rng = np.random.default_rng(0)
  k = np.arange(-6000, 6001, dtype=np.float64)
  for _ in range(50):
    left, right = np.exp(rng.uniform(np.log(0.11), np.log(256.0), 2))
    mean = rng.uniform(-0.5, 0.5)
    p = ag.likelihood_np(k - mean, left, right)
    assert np.all(p >= 0)
    assert abs(p.sum() - 1.0) < 1e-12, (left, right, mean, p.sum())
    # float32 JAX, as training uses it.
    p32 = np.asarray(ag.likelihood(jnp.asarray(k - mean, jnp.float32), left, right), np.float64)
    assert abs(p32.sum() - 1.0) < 1e-4, (left, right, mean, p32.sum())


def test_each_side_follows_its_own_scale():
  # Left of the mean only the left scale matters, right of it only the right
  # one, up to the weights 2 s / (s_left + s_right).
  v = np.arange(1, 40, dtype=np.float64)
  a, b = 0.8, 9.0
  right = ag.likelihood_np(v, a, b)
  left = ag.likelihood_np(-v, a, b)
  np.testing.assert_allclose(right, 2 * b / (a + b) * (special.ndtr(-(v - 0.5) / b)
                                                        - special.ndtr(-(v + 0.5) / b)))
  np.testing.assert_allclose(left, 2 * a / (a + b) * (special.ndtr((-v + 0.5) / a)
                                                       - special.ndtr((-v - 0.5) / a)),
                             rtol=1e-12, atol=1e-300)
  # The bin at the mean straddles both halves.
  centre = ag.likelihood_np(0.0, a, b)
  expected = 2 * a / (a + b) * (0.5 - special.ndtr(-0.5 / a)) + \
      2 * b / (a + b) * (0.5 - special.ndtr(-0.5 / b))
  assert centre == pytest.approx(expected, rel=1e-14)


def test_tails_keep_their_relative_accuracy_in_float32():
  # Upper tail (right of the mean) and lower tail: float32 JAX against float64,
  # where a 1 - CDF form would give 0 or garbage long before.
  v = np.arange(4, 13, dtype=np.float64)
  for a, b in ((1.0, 1.0), (0.5, 2.0), (2.0, 0.5)):
    for sign in (1, -1):
      exact = ag.likelihood_np(sign * v, a, b)
      got = np.asarray(ag.likelihood(jnp.asarray(sign * v, jnp.float32), a, b), np.float64)
      representable = exact > 1e-30  # float32 normals end at 1.2e-38
      assert representable.sum() >= 3
      np.testing.assert_allclose(got[representable], exact[representable], rtol=1e-3)


def _log_half_gaussian_mass(lo, hi):
  """float64 reference: log(Phi(hi) - Phi(lo)), mirrored to the lower tail."""
  if lo + hi > 0:
    lo, hi = -hi, -lo
  log_hi = special.log_ndtr(hi)
  return log_hi + np.log(-np.expm1(special.log_ndtr(lo) - log_hi))


def test_log_likelihood_is_finite_and_accurate_far_into_the_tails():
  # Bins hundreds of scales out, where float32 ndtr is 0: the log mass must
  # match float64 and keep a gradient that widens the scale (issue 15: the
  # floored likelihood's zero gradient left overconfident scales).
  rng = np.random.default_rng(1)
  for _ in range(40):
    a, b = np.exp(rng.uniform(np.log(0.11), np.log(256.0), 2))
    v = rng.uniform(-300, 300, 64)
    got = np.asarray(ag.log_likelihood(jnp.asarray(v, jnp.float32), a, b), np.float64)
    v32 = np.asarray(jnp.asarray(v, jnp.float32), np.float64)
    expected = []
    for x in v32:
      if x + 0.5 <= 0:
        expected.append(np.log(2 * a / (a + b)) + _log_half_gaussian_mass((x - .5) / a, (x + .5) / a))
      elif x - 0.5 >= 0:
        expected.append(np.log(2 * b / (a + b)) + _log_half_gaussian_mass((x - .5) / b, (x + .5) / b))
      else:
        expected.append(np.log(ag.likelihood_np(x, a, b)))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
  grad_scale = jax.vmap(jax.grad(lambda v, a, b: -ag.log_likelihood(v, a, b), argnums=(1, 2)))
  v = jnp.asarray([-40.0, -6.0, 6.0, 40.0, 300.0], jnp.float32)
  g_left, g_right = grad_scale(v, jnp.full_like(v, 0.2), jnp.full_like(v, 0.2))
  # A value far left of the mean: widening the left scale lowers its bits.
  assert np.all(np.isfinite(g_left)) and np.all(np.isfinite(g_right))
  assert np.all(np.asarray(g_left)[:2] < -10) and np.all(np.asarray(g_right)[2:] < -10)


def test_log_likelihood_with_equal_scales_is_the_gaussian_one():
  values = jnp.asarray(np.linspace(-200, 200, 4001), jnp.float32)
  for scale in (0.11, 0.7, 3.0, 40.0, 256.0):
    asym = np.asarray(ag.log_likelihood(values, scale, scale), np.float64)
    sym = np.asarray(gaussian.log_likelihood(values, scale), np.float64)
    np.testing.assert_allclose(asym, sym, rtol=1e-5, atol=1e-5)
    # Where the linear likelihood is representable, the log is its log.
    lin = np.asarray(gaussian.likelihood(values, scale), np.float64)
    ok = lin > 1e-30
    np.testing.assert_allclose(sym[ok], np.log(lin[ok]), rtol=1e-4, atol=1e-5)


def test_gaussian_log_likelihood_matches_float64_and_keeps_its_gradient():
  v = np.linspace(-400, 400, 1601)
  for scale in (0.11, 1.3, 256.0):
    got = np.asarray(gaussian.log_likelihood(jnp.asarray(v, jnp.float32), scale), np.float64)
    expected = [_log_half_gaussian_mass((x - .5) / scale, (x + .5) / scale) for x in v]
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
  grad = jax.vmap(jax.grad(lambda v, s: -gaussian.log_likelihood(v, s), argnums=(0, 1)))
  vv = jnp.asarray(np.linspace(-500, 500, 2001), jnp.float32)
  g_value, g_scale = grad(vv, jnp.full_like(vv, 0.11))
  assert np.all(np.isfinite(g_value)) and np.all(np.isfinite(g_scale))
  # Beyond a few scales, more scale means fewer bits (the floored form gave 0 here).
  assert np.all(np.asarray(g_scale)[np.abs(np.asarray(vv)) > 2] < 0)


# --- The integer tables. ---

@pytest.fixture(scope="module")
def pair_table():
  return export.build_asymmetric_y_table(SCALES)


@pytest.fixture(scope="module")
def symmetric_table():
  return export.build_y_table(SCALES)


def test_equal_scale_rows_are_the_symmetric_rows(pair_table, symmetric_table):
  diagonal = np.arange(LEVELS) * (LEVELS + 1)
  np.testing.assert_array_equal(pair_table.cdf[diagonal], symmetric_table.cdf)
  np.testing.assert_array_equal(pair_table.lengths[diagonal], symmetric_table.lengths)
  np.testing.assert_array_equal(pair_table.offsets[diagonal], symmetric_table.offsets)
  # So the bits are the same too, escapes included.
  rng = np.random.default_rng(1)
  rows = rng.integers(0, LEVELS, 5000)
  symbols = np.round(rng.normal(0, SCALES[rows] * 1.5)).astype(np.int32)
  assert pair_table.bits(symbols, rows * (LEVELS + 1)) == symmetric_table.bits(symbols, rows)


def test_pair_table_layout(pair_table):
  assert pair_table.num_rows == LEVELS * LEVELS and pair_table.precision == 16
  half = np.ceil(-special.ndtri(export.DEFAULT_TAIL_MASS / 2) * SCALES.astype(np.float64))
  left, right = np.divmod(np.arange(LEVELS * LEVELS), LEVELS)
  np.testing.assert_array_equal(pair_table.offsets, -half[left])
  np.testing.assert_array_equal(pair_table.lengths, half[left] + half[right] + 1)


def test_table_bits_are_close_to_the_ideal_code_length(pair_table):
  # Samples of the asymmetric Gaussian coded with their pair's row cost about
  # -log2 of their likelihood (quantised tables lose well under 1 %).
  rng = np.random.default_rng(2)
  n = 20000
  li, ri = rng.integers(0, 40, n), rng.integers(0, 40, n)  # scales up to ~20
  a, b = SCALES[li].astype(np.float64), SCALES[ri].astype(np.float64)
  side_left = rng.uniform(size=n) < a / (a + b)
  magnitude = np.abs(rng.normal(size=n))
  v = np.where(side_left, -magnitude * a, magnitude * b)
  symbols = np.round(v).astype(np.int32)
  ideal = -np.sum(np.log2(ag.likelihood_np(symbols, a, b)))
  table = pair_table.bits(symbols, np.asarray(ag.pair_rows(li, ri, LEVELS)))
  assert table == pytest.approx(ideal, rel=0.01)


def _available_coders():
  coders = []
  for coder_id in coder_lib.coder_ids():
    try:  # a backend this installation lacks raises on first use
      coder = coder_lib.get_coder(coder_id)
      coder.encode(np.zeros(1, np.int32), np.zeros(1, np.int32),
                   export.build_y_table(SCALES[:2]))
    except (coder_lib.CodingError, ImportError):
      continue
    coders.append(coder)
  return coders


def test_pair_table_round_trips_bit_exactly_on_random_symbols(pair_table):
  coders = _available_coders()
  if not coders:
    pytest.skip("no entropy coder backend installed")
  rng = np.random.default_rng(3)
  n = 30000
  rows = rng.integers(0, pair_table.num_rows, n).astype(np.int32)
  left, right = np.divmod(rows, LEVELS)
  a, b = SCALES[left], SCALES[right]
  v = np.where(rng.uniform(size=n) < 0.5, -np.abs(rng.normal(size=n)) * a,
               np.abs(rng.normal(size=n)) * b)
  symbols = np.round(v).astype(np.int32)
  symbols[::997] = rng.integers(-100000, 100000, symbols[::997].size)  # escapes
  for coder in coders:
    data = coder.encode(symbols, rows, pair_table)
    np.testing.assert_array_equal(coder.decode(data, rows, pair_table), symbols)
    assert 8 * len(data) >= pair_table.bits(symbols, rows)


# --- The model and the codec. ---

ASYMMETRIC = ("--config.model.entropy_model=asymmetric",)


def asymmetric_params(params, right_shift: float):
  """Golden tiny params with h_s extended to (mean, left, right) outputs.

  The right scale's weights are the left one's, its bias shifted by
  `right_shift` (log scale): 0 gives equal scales.
  """
  params = {k: v for k, v in params.items()}
  conv = dict(params["h_s"]["conv_2"])
  m = conv["bias"].shape[0] // 2
  kernel, bias = np.asarray(conv["kernel"]), np.asarray(conv["bias"])
  conv["kernel"] = np.concatenate([kernel, kernel[..., m:]], axis=-1)
  conv["bias"] = np.concatenate([bias, bias[m:] + np.float32(right_shift)]).astype(np.float32)
  params["h_s"] = {**params["h_s"], "conv_2": conv}
  return params


@pytest.fixture(scope="module")
def symmetric_model(tmp_path_factory):
  out = tmp_path_factory.mktemp("model") / "sym"
  export.export_params(tiny_config(), golden_params(), out)
  return export.load_model(out)


@pytest.fixture(scope="module")
def equal_scales_model(tmp_path_factory):
  config = load_config(str(tiny_config_path()), list(ASYMMETRIC))
  out = tmp_path_factory.mktemp("model") / "asym_equal"
  export.export_params(config, asymmetric_params(golden_params(), 0.0), out)
  return export.load_model(out)


@pytest.fixture(scope="module")
def asymmetric_model(tmp_path_factory):
  config = load_config(str(tiny_config_path()), list(ASYMMETRIC))
  params = asymmetric_params(golden_params(), 0.0)
  rng = np.random.default_rng(4)  # left and right scales that differ per element
  conv = params["h_s"]["conv_2"]
  m = conv["bias"].shape[0] // 3
  conv["kernel"][..., 2 * m:] *= np.float32(1.5)
  conv["bias"][2 * m:] += rng.normal(0, 1.0, m).astype(np.float32)
  out = tmp_path_factory.mktemp("model") / "asym"
  export.export_params(config, params, out)
  return export.load_model(out)


def tiny_config_path():
  from codec_helpers import TINY_CONFIG
  return TINY_CONFIG


def test_default_config_is_symmetric_and_its_fingerprint_unchanged():
  config = tiny_config()
  assert config.model.entropy_model == "symmetric"
  without_key = tiny_config()
  del without_key.model["entropy_model"]  # configs written before the option existed
  assert model_fingerprint(config) == model_fingerprint(without_key)
  asymmetric = load_config(str(tiny_config_path()), list(ASYMMETRIC))
  assert model_fingerprint(asymmetric) != model_fingerprint(config)


def test_equal_scales_code_the_same_bits_as_the_symmetric_model(symmetric_model,
                                                               equal_scales_model):
  assert equal_scales_model.fingerprint != symmetric_model.fingerprint
  assert equal_scales_model.manifest["entropy_model"] == "asymmetric"
  assert "entropy_model" not in symmetric_model.manifest
  pixels = make_image(70, 90, seed=5)
  for rate in (0.0, 0.5, 1.0):
    sym = codec.encode(symmetric_model, pixels, rate)
    asym = codec.encode(equal_scales_model, pixels, rate)
    np.testing.assert_array_equal(asym.y_symbols, sym.y_symbols)
    np.testing.assert_array_equal(asym.y_indexes, sym.y_indexes * (LEVELS + 1))
    # The same y and z streams, byte for byte: only the header's fingerprint differs.
    assert [bytes(x) for x in container.unpack(asym.data)[1]] == \
        [bytes(x) for x in container.unpack(sym.data)[1]]
    # The model's estimate agrees too.
    s = jnp.full((1,), np.float32(rate))
    x = jnp.asarray(np.pad(pixels, [(0, 58), (0, 38), (0, 0)], mode="edge"),
                    jnp.float32)[None] / 255.0
    out_sym = symmetric_model.model.apply({"params": symmetric_model.params}, x, s)
    out_asym = equal_scales_model.model.apply({"params": equal_scales_model.params}, x, s)
    assert float(out_asym["bits_y"][0]) == pytest.approx(float(out_sym["bits_y"][0]), rel=1e-5)


def test_asymmetric_round_trip_is_bit_exact(asymmetric_model):
  # Guard: left and right rows really differ for many elements.
  encoded = codec.encode(asymmetric_model, make_image(128, 128, 3), 1.0)
  left, right = np.divmod(encoded.y_indexes, LEVELS)
  assert np.mean(left != right) > 0.5 and len(np.unique(encoded.y_indexes)) >= 20
  for height, width, rate in ((1, 1, 0.0), (65, 3, 0.37), (50, 100, 1.0), (128, 70, 0.5)):
    pixels = make_image(height, width, seed=height + width)
    encoded = codec.encode(asymmetric_model, pixels, rate)
    decoded = codec.decode(asymmetric_model, encoded.data)
    np.testing.assert_array_equal(decoded.y_indexes, encoded.y_indexes)
    np.testing.assert_array_equal(decoded.y_symbols, encoded.y_symbols)
    np.testing.assert_array_equal(decoded.pixels, codec.reconstruct(asymmetric_model, encoded))


def test_real_vs_estimate_report(asymmetric_model, equal_scales_model, symmetric_model):
  from gvae_jax.eval import report

  images = [("a", make_image(64, 96, 6))]
  result = report.real_vs_estimate(asymmetric_model, images, [0.0, 1.0])
  for row in result["images"]:
    assert row["estimate_bits"] > 0 and row["table_bits_y"] > 0
    # The tiny untrained model escapes many values (bytes outside the tables).
    assert 8 * (row["z_bytes"] + row["y_bytes"]) >= row["table_bits_y"] + row["table_bits_z"] - 32
    # The coded estimate prices those escapes as the coder does: on this tiny
    # image (~2.7 kbit) the payload is within 5 % of it (the coder's flush
    # bytes are most of the gap), closer than the likelihood estimate.
    payload = 8 * (row["z_bytes"] + row["y_bytes"])
    assert abs(payload / row["coded_bits"] - 1) < 0.05, (payload, row["coded_bits"])
    assert abs(payload / row["coded_bits"] - 1) < abs(payload / row["estimate_bits"] - 1), (
        payload, row["coded_bits"], row["estimate_bits"])
  # With equal scales, every figure but the fingerprint is the symmetric model's.
  equal = report.real_vs_estimate(equal_scales_model, images, [0.5])["images"][0]
  sym = report.real_vs_estimate(symmetric_model, images, [0.5])["images"][0]
  for key in ("file_bytes", "y_bytes", "z_bytes", "table_bits_y", "table_bits_y_ceil"):
    assert equal[key] == sym[key], key
  assert equal["estimate_bits_y"] == pytest.approx(sym["estimate_bits_y"], rel=1e-5)


def test_a_damaged_pair_table_is_refused(asymmetric_model, tmp_path):
  # A symmetric-sized y table with an asymmetric config must not load.
  out = tmp_path / "bad"
  export.write_model_dir(asymmetric_model, out)
  import io
  with np.load(out / export.TABLES_FILE) as npz:
    arrays = {k: npz[k] for k in npz.files}
  arrays.update(export.build_y_table(SCALES).to_dict("y_"))
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  (out / export.TABLES_FILE).write_bytes(buffer.getvalue())
  with pytest.raises(export.ExportError, match="one per pair of scales"):
    export.load_model(out)


def test_scalable_asymmetric_model_codes_lossy_and_near_lossless(tmp_path):
  from codec_helpers import SCALABLE_OVERRIDES, tiny_scalable_params

  config = load_config(str(tiny_config_path()), list(SCALABLE_OVERRIDES) + list(ASYMMETRIC))
  params = tiny_scalable_params()
  params["lossy"] = asymmetric_params(params["lossy"], 0.7)
  model = export.export_params(config, params, tmp_path / "scalable_asym")
  model = export.load_model(tmp_path / "scalable_asym")
  assert model.is_scalable and model.y_table.num_rows == LEVELS * LEVELS
  pixels = make_image(20, 28, seed=8)
  for tau in (None, 2):
    encoded = codec.encode(model, pixels, 0.5, tau)
    decoded = codec.decode(model, encoded.data)
    np.testing.assert_array_equal(decoded.pixels, codec.reconstruct(model, encoded))
    if tau is not None:
      assert np.abs(decoded.pixels.astype(np.int32) - pixels).max() <= tau
