"""Training: create_train_state, a data-parallel train_step, and train_and_evaluate.

Layout follows the Flax examples (examples/imagenet). The loss is
R + lambda_s * D with the rate level s drawn per example, so one batch mixes
levels and every gain row is trained at every step.

The step is one `jax.jit` over the global batch on a device mesh (see
gvae_jax/train/parallel.py): batch sharded on 'data', state replicated and
donated. It is written for the global batch, so its result does not depend on
how many processes or devices share that batch (up to float summation order).
"""
from __future__ import annotations

import functools
import itertools
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
from flax.training import train_state

from gvae_jax import config as config_lib
from gvae_jax import metrics
from gvae_jax.errors import UserError
from gvae_jax.models import build_model
from gvae_jax.models.scalable import ScalableHyperprior
from gvae_jax.eval import estimate as evaluate_lib
from gvae_jax.eval import images as images_lib
from gvae_jax.train import checkpoints
from gvae_jax.train import parallel
from gvae_jax.train.summary import SummaryLogger

DISTORTIONS = ("mse", "ms-ssim")
COMPUTE_DTYPES = ("float32", "bfloat16")


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
  if t.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
    raise config_lib.ConfigError(
        f"config.train.compute_dtype is {t.compute_dtype!r}; choose one of {COMPUTE_DTYPES}")
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

  def init(rngs, x, level):
    variables = model.init(rngs, x, level, train=True, **kwargs)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             tx=create_optimizer(config))

  args = ({"params": params_rng, "noise": noise_rng}, x, jnp.zeros((1,), jnp.float32))
  # One program that runs once: XLA's optimisation passes took 33 of the 35 s
  # this function needed for the tiny config (one compile per optimizer leaf
  # and one optimised init program), and buy nothing for a single run.
  init_program = jax.jit(init).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return init_program(*args)


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


def with_compute_dtype(model: flax.linen.Module, compute_dtype: str) -> flax.linen.Module:
  """The model with its transforms computing in `compute_dtype` (same parameters)."""
  if compute_dtype == "float32":
    return model
  if isinstance(model, ScalableHyperprior):
    return model.clone(lossy=model.lossy.clone(compute_dtype=compute_dtype))
  return model.clone(compute_dtype=compute_dtype)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model, levels: int, lambdas: tuple[float, ...], distortion: str):
  """One optimisation step on the global batch; compile with make_train_step."""
  x = batch["image"]
  rng = jax.random.fold_in(rng, state.step)
  level_rng, noise_rng = jax.random.split(rng)
  level = jax.random.randint(level_rng, (x.shape[0],), 0, levels)
  lam = jnp.asarray(lambdas, jnp.float32)

  def loss_fn(params):
    loss, rates, mse = per_example_losses(model, params, x, level, lam, distortion, noise_rng)
    return jnp.mean(loss), (rates, mse)

  (loss, (rates, mse)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)

  # Per-level sums, so the host can average each level exactly over many steps.
  onehot = jax.nn.one_hot(level, levels)
  psnr = -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))
  sums = {"count": onehot.sum(0), "psnr": onehot.T @ psnr, "mse": onehot.T @ mse}
  sums.update({name: onehot.T @ value for name, value in rates.items()})
  step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "per_level": sums}
  return new_state, step_metrics


def make_train_step(config: ml_collections.ConfigDict, model, mesh):
  """train_step jitted over `mesh`: (state, global batch, rng) -> (state, metrics).

  The state's buffers are donated (updated in place on the devices); the
  metrics come back replicated and are only read by the host at logging.
  """
  step = functools.partial(
      train_step, model=with_compute_dtype(model, config.train.get("compute_dtype", "float32")),
      levels=config.model.levels, lambdas=tuple(config.train.lambdas),
      distortion=config.train.distortion)
  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, parallel.batch_sharded(mesh), replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def persistent_cache_is_safe_for_training() -> bool:
  """False on jax < 0.6: there training in a process that reads programs back
  from the persistent compilation cache segfaults, aborts or hangs in the train
  step (measured with jax 0.5.3 on CPU, with and without donated state, even
  when the train step itself is compiled fresh). The CLI turns the cache on
  for training only where this is True."""
  return tuple(int(part) for part in jax.__version__.split(".")[:2]) >= (0, 6)


def _turn_off_unsafe_persistent_cache() -> None:
  """For library callers who enabled the cache themselves on jax < 0.6."""
  if persistent_cache_is_safe_for_training() or not jax.config.jax_compilation_cache_dir:
    return
  from jax._src import compilation_cache  # pinned jax 0.5.x only: reset is not public there
  logging.warning("jax %s: the persistent compilation cache is turned off for this process, "
                  "since training with it crashes on jax < 0.6", jax.__version__)
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()


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
  With several processes (jax.distributed), every process calls this with the
  same config and workdir; process 0 alone logs and evaluates. Returns the
  state as host (numpy) arrays.
  """
  from gvae_jax import data as data_lib  # imports TensorFlow: keep it off the model path

  validate(config)
  _turn_off_unsafe_persistent_cache()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = parallel.is_main_process()
  checkpoints.check_compatible(config, workdir, write=is_main)
  mesh = parallel.make_mesh()

  model = build_model(config)
  rng = jax.random.PRNGKey(config.train.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = create_train_state(init_rng, config, model)
  if config.train.init_from:
    params, copied = checkpoints.warm_start(state.params, config.train.init_from,
                                             config.model.gain_parameterization)
    state = state.replace(params=jax.tree_util.tree_map(jnp.asarray, params),
                          opt_state=state.tx.init(params))
    logging.warning("warm start: %d parameter arrays from %s", copied, config.train.init_from)
  state = parallel.replicate(state, mesh)  # global arrays: one checkpoint from all processes
  step_rng = parallel.replicate(step_rng, mesh)
  parallel.barrier("gvae_initialized")  # Orbax's first barrier is a device collective
  manager = checkpoints.manager(workdir, config)
  state = checkpoints.restore_latest(manager, state)
  start_step = int(parallel.to_host(state.step))
  num_steps = config.train.num_steps
  end_step = num_steps if stop_after_steps is None else min(num_steps, start_step + stop_after_steps)
  if start_step and is_main:  # said on stdout: a re-run must never resume silently
    print(f"{workdir}: already complete at step {start_step} of {num_steps} (raise "
          "--config.train.num_steps to train further)" if start_step >= num_steps else
          f"{workdir}: resuming from the checkpoint at step {start_step} of {num_steps}",
          flush=True)

  data_config = _data_config(config, workdir)
  if jax.process_count() > 1:
    # Process 0 prepares the TFDS files once; the others wait, then read them.
    if is_main:
      data_lib.prepare(data_lib.get_builder(
          data_config.name, folder=data_config.get("folder"),
          data_dir=data_lib.tfds_data_dir(data_config.get("data_dir"))))
    parallel.barrier("gvae_data_prepared")
  dataset = data_lib.create_train_dataset(
      data_config, per_device_batch=config.train.per_device_batch,
      num_local_devices=jax.local_device_count(), seed=config.train.seed, start_step=start_step)
  batches = parallel.prefetch_to_mesh(data_lib.as_numpy_iterator(dataset), mesh)

  # Compiled ahead of the loop, so the processes can meet once all have compiled.
  first = next(batches)
  train_step_fn = make_train_step(config, model, mesh).lower(state, first, step_rng).compile()
  batches = itertools.chain([first], batches)
  parallel.barrier("gvae_compiled")
  logger = SummaryLogger(workdir, enabled=is_main, progress=progress,
                         total=num_steps, initial=start_step)
  history: list[dict[str, Any]] = []
  timer = time.perf_counter()
  for step in range(start_step, end_step):
    # Nothing here waits for the devices except logging (device_get) and checkpoints.
    state, step_metrics = train_step_fn(state, next(batches), step_rng)
    history.append(step_metrics)
    done = step + 1
    if done % config.train.log_every == 0 or done == end_step:
      history = [parallel.to_host(h) for h in history]
      scalars = summarize_step_metrics(history, config.model.levels)
      elapsed = time.perf_counter() - timer
      scalars["steps_per_second"] = len(history) / max(elapsed, 1e-9)
      scalars["learning_rate"] = float(learning_rate_schedule(config)(done))
      logger.write(done, scalars, prefix="train")
      history, timer = [], time.perf_counter()
    logger.advance(done)
    if done % config.train.checkpoint_every == 0 or done == end_step:
      # Every process saves (Orbax writes one checkpoint); they meet first, as
      # the save's first collectives set up gloo with a 30 s deadline on CPU.
      parallel.barrier(f"gvae_save_{done}")
      checkpoints.save(manager, done, state)
    every = config.eval.every_steps
    if config.eval.folder and every and done % every == 0 and done != num_steps:
      if is_main:
        _evaluate(config, model, parallel.to_host(state.params), workdir, done, logger,
                  final=False)
      parallel.barrier(f"gvae_evaluated_{done}")  # the others wait here, not in a collective
  manager.wait_until_finished()
  host_state = parallel.to_host(state)
  if int(host_state.step) >= num_steps and config.eval.folder and is_main:
    _evaluate(config, model, host_state.params, workdir, int(host_state.step), logger, final=True)
  logger.close()
  parallel.barrier("gvae_train_done")  # no process leaves while process 0 still evaluates
  return host_state


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
