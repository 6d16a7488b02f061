"""Training: create_train_state, a pmapped train_step, and train_and_evaluate.

Layout follows the Flax examples (examples/imagenet). The loss is
R + lambda_s * D with the rate level s drawn per example, so one batch mixes
levels and every gain row is trained at every step.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import jax_utils
from flax.training import train_state

from gvae_jax import config as config_lib
from gvae_jax import metrics
from gvae_jax.errors import UserError
from gvae_jax.models import build_model
from gvae_jax.models.scalable import ScalableHyperprior
from gvae_jax.eval import estimate as evaluate_lib
from gvae_jax.eval import images as images_lib
from gvae_jax.train import checkpoints
from gvae_jax.train.summary import SummaryLogger

DISTORTIONS = ("mse", "ms-ssim")


class TrainState(train_state.TrainState):
  pass


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what build_model cannot, before anything expensive starts."""
  t = config.train
  if t.distortion not in DISTORTIONS:
    raise config_lib.ConfigError(
        f"config.train.distortion is {t.distortion!r}; choose one of {DISTORTIONS}")
  if len(t.lambdas) != config.model.levels:
    raise config_lib.ConfigError(
        f"config.train.lambdas has {len(t.lambdas)} values but config.model.levels is "
        f"{config.model.levels}")
  if t.distortion == "ms-ssim" and config.data.crop_size < 176:
    raise config_lib.ConfigError(
        "MS-SSIM needs crops of at least 176 pixels (5 scales, 11x11 window); "
        f"config.data.crop_size is {config.data.crop_size}")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  t = config.train
  decay_steps = max(t.num_steps, t.warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if t.warmup_steps else t.learning_rate,
      peak_value=t.learning_rate,
      warmup_steps=t.warmup_steps,
      decay_steps=decay_steps,
      end_value=t.learning_rate * t.final_learning_rate_factor)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.train.grad_clip),
      optax.adam(learning_rate_schedule(config)))


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: flax.linen.Module) -> TrainState:
  size = config.data.crop_size
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  params_rng, noise_rng = jax.random.split(rng)
  # Scalable models need a tau so the bias-correction head is created too.
  kwargs = {"tau": jnp.ones((1,), jnp.int32)} if isinstance(model, ScalableHyperprior) else {}
  variables = jax.jit(functools.partial(model.init, train=True, **kwargs))(
      {"params": params_rng, "noise": noise_rng}, x, jnp.zeros((1,), jnp.float32))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=create_optimizer(config))


def per_example_losses(model, params, x, level, lambdas, distortion, rng):
  """Forward pass and the per-example rates, MSE and loss.

  The rate term is every coded layer's bits per pixel: y and z, plus for
  scalable models the lossless residual and the bias-corrected residual at a
  random tau in 1..max_tau.
  """
  s = level.astype(jnp.float32)
  noise_rng, tau_rng = jax.random.split(rng)
  kwargs = {}
  if isinstance(model, ScalableHyperprior):
    kwargs["tau"] = jax.random.randint(tau_rng, x.shape[:1], 1, model.residual.max_tau + 1)
  out = model.apply({"params": params}, x, s, train=True, rngs={"noise": noise_rng}, **kwargs)
  num_pixels = x.shape[1] * x.shape[2]
  bpp = (out["bits_y"] + out["bits_z"]) / num_pixels
  residual_bits = sum(out[k] for k in ("bits_r", "bits_r_tau") if k in out)
  mse = jnp.mean(jnp.square(x - out["x_tilde"]), axis=(1, 2, 3))
  if distortion == "mse":
    dist = 255.0**2 * mse
  else:
    dist = 1.0 - metrics.ms_ssim(x, out["x_tilde"], max_value=1.0)
  rates = {"bpp": bpp}
  if "bits_r" in out:
    rates["lossless_bpsp"] = (out["bits_y"] + out["bits_z"] + out["bits_r"]) / (3 * num_pixels)
  return bpp + residual_bits / num_pixels + lambdas[level] * dist, rates, mse


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model, levels: int, lambdas: tuple[float, ...], distortion: str):
  """One optimisation step on one device's shard; call through jax.pmap(axis_name='batch')."""
  x = batch["image"]
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index("batch"))
  level_rng, noise_rng = jax.random.split(rng)
  level = jax.random.randint(level_rng, (x.shape[0],), 0, levels)
  lam = jnp.asarray(lambdas, jnp.float32)

  def loss_fn(params):
    loss, rates, mse = per_example_losses(model, params, x, level, lam, distortion, noise_rng)
    return jnp.mean(loss), (rates, mse)

  (loss, (rates, mse)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, "batch")
  new_state = state.apply_gradients(grads=grads)

  # Per-level sums (psum'd), so the host can average each level exactly.
  onehot = jax.nn.one_hot(level, levels)
  psnr = -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))
  sums = {"count": onehot.sum(0), "psnr": onehot.T @ psnr, "mse": onehot.T @ mse}
  sums.update({name: onehot.T @ value for name, value in rates.items()})
  step_metrics = {
      "loss": jax.lax.pmean(loss, "batch"),
      "grad_norm": optax.tree.norm(grads),
      "per_level": jax.lax.psum(sums, "batch"),
  }
  return new_state, step_metrics


def summarize_step_metrics(history: list[dict[str, Any]], levels: int) -> dict[str, float]:
  """Averages device metrics gathered over several steps into scalars for logging."""
  out = {"loss": float(np.mean([h["loss"] for h in history])),
         "grad_norm": float(np.mean([h["grad_norm"] for h in history]))}
  per_level = jax.tree_util.tree_map(lambda *a: np.sum(a, axis=0),
                                     *[h["per_level"] for h in history])
  count = per_level["count"]
  total = max(float(count.sum()), 1.0)
  names = [n for n in per_level if n not in ("count", "mse")]
  for name in names:
    out[name] = float(per_level[name].sum() / total)
  for k in range(levels):
    if count[k] > 0:
      for name in names:
        out[f"level_{k}/{name}"] = float(per_level[name][k] / count[k])
  return out


def _data_config(config: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(config.data.to_dict())
  if not data.data_dir:
    data.data_dir = str(workdir)  # the pipeline keeps its TFDS files in <data_dir>/tfds
  return data


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       stop_after_steps: int | None = None, progress: bool = True) -> TrainState:
  """Trains (resuming from the newest checkpoint in workdir) and evaluates.

  `stop_after_steps` ends this invocation early (as if killed) without
  changing the schedule; a later call resumes from the last checkpoint.
  """
  from gvae_jax import data as data_lib  # imports TensorFlow: keep it off the model path

  validate(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints.check_compatible(config, workdir)
  is_main = jax.process_index() == 0

  model = build_model(config)
  rng = jax.random.PRNGKey(config.train.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = create_train_state(init_rng, config, model)
  if config.train.init_from:
    params, copied = checkpoints.warm_start(state.params, config.train.init_from)
    state = state.replace(params=jax.tree_util.tree_map(jnp.asarray, params),
                          opt_state=state.tx.init(params))
    logging.warning("warm start: %d parameter arrays from %s", copied, config.train.init_from)
  manager = checkpoints.manager(workdir, config)
  state = checkpoints.restore_latest(manager, state)
  start_step = int(state.step)
  num_steps = config.train.num_steps
  end_step = num_steps if stop_after_steps is None else min(num_steps, start_step + stop_after_steps)
  if start_step:
    logging.info("resuming from step %d", start_step)

  devices = jax.local_devices()
  dataset = data_lib.create_train_dataset(
      _data_config(config, workdir), per_device_batch=config.train.per_device_batch,
      num_local_devices=len(devices), seed=config.train.seed, start_step=start_step)
  batches = data_lib.as_numpy_iterator(dataset)

  p_train_step = jax.pmap(
      functools.partial(train_step, model=model, levels=config.model.levels,
                        lambdas=tuple(config.train.lambdas), distortion=config.train.distortion),
      axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,))
  p_state = jax_utils.replicate(state)
  logger = SummaryLogger(workdir, enabled=is_main, progress=progress,
                         total=num_steps, initial=start_step)
  history: list[dict[str, Any]] = []
  step = start_step
  timer = time.perf_counter()
  for step in range(start_step, end_step):
    batch = next(batches)
    p_state, step_metrics = p_train_step(p_state, batch, step_rng)
    history.append(step_metrics)
    done = step + 1
    if done % config.train.log_every == 0 or done == end_step:
      history = [jax.tree_util.tree_map(lambda a: np.asarray(a[0]), h)
                 for h in jax.device_get(history)]
      scalars = summarize_step_metrics(history, config.model.levels)
      elapsed = time.perf_counter() - timer
      scalars["steps_per_second"] = len(history) / max(elapsed, 1e-9)
      scalars["learning_rate"] = float(learning_rate_schedule(config)(done))
      logger.write(done, scalars, prefix="train")
      history, timer = [], time.perf_counter()
    logger.advance(done)
    if done % config.train.checkpoint_every == 0 or done == end_step:
      state = jax_utils.unreplicate(p_state)
      checkpoints.save(manager, done, state)
    every = config.eval.every_steps
    if config.eval.folder and every and done % every == 0 and done != num_steps:
      state = jax_utils.unreplicate(p_state)
      _evaluate(config, model, state.params, workdir, done, logger, final=False)
  manager.wait_until_finished()
  state = jax_utils.unreplicate(p_state)
  if int(state.step) >= num_steps and config.eval.folder and is_main:
    _evaluate(config, model, state.params, workdir, int(state.step), logger, final=True)
  logger.close()
  return state


def _evaluate(config, model, params, workdir: Path, step: int, logger: SummaryLogger,
              final: bool) -> dict:
  max_images = config.eval.final_max_images if final else config.eval.max_images
  images = images_lib.load_images(config.eval.folder, max_images)
  rates = evaluate_lib.default_rates(config.model.levels, config.eval.fractional_rates)
  report = evaluate_lib.estimate_rd(model, params, images, rates)
  report["step"] = step
  report["folder"] = str(config.eval.folder)
  out_dir = workdir / "eval"
  out_dir.mkdir(exist_ok=True)
  name = "final.json" if final else f"step_{step:08d}.json"
  (out_dir / name).write_text(json.dumps(report, indent=2))
  for row in report["rates"]:
    logger.write(step, {k: row.get(k) for k in ("bpp", "psnr", "ms_ssim", "lossless_bpsp")},
                 prefix=f"eval/rate_{row['rate']:.2f}")
  logger.print_table(evaluate_lib.format_table(report))
  return report
