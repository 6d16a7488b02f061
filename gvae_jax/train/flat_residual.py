"""Pixel-sampled training of the flat-base residual head (gvae_jax.models.flat_base).

Every layer after the masked convolution is 1x1, so a pixel's likelihood
depends only on its causal taps (and their availability flags): training on
random pixels with their taps gives the gradient of whole-image training
without computing the other pixels, which on this CPU is the difference
between minutes and hours. Per step:

  - `pixels_per_step` pixels uniformly over all training pixels (each image
    weighted by its size); a pixel's place in its 64x64 coding patch is
    drawn uniformly, and a tap counts as available (flag 1, value r) only if
    it lies in the image and in that patch, as in the coder; elsewhere it
    reads 0 with flag 0;
  - the lossless (tau = 0) bits of r = x - 128 under the main head, with the
    true r as context;
  - `tau_pixels` further pixels with tau drawn from 1..max_tau per pixel,
    their quantised r_hat as context and target, under the bias-corrected
    ("delta") head; its inputs and the main head's output are stop-gradient,
    so this term trains only the correction, never the lossless head (the
    same result as training the correction after the lossless head, at a
    quarter of the pixels per step);
  - the end bins are the extreme values an 8-bit pixel can have (r in
    [-128, 127] quantised for tau): no probability is spent outside them.

Loss: bits per sub-pixel (the sum of both terms). Adam with warmup and cosine
decay, gradient clipping. Data: every image under config.data.folder (PNG,
TIFF, JPEG), JPEG-sourced ones shrunk by config.data.jpeg_downscale (Lanczos)
to wash out their block artefacts, held in memory as one uint8 buffer on the
device; sampling happens inside the jitted step.

Resumable: Orbax checkpoints of the train state in <workdir>/checkpoints
every `checkpoint_every_minutes` (and at the end), with the cumulative
training time in <workdir>/progress.json. Every `export_every_minutes` the
head is exported (gvae_jax.coding.flat_head) to config.train.export_dir (the
latest) and to <workdir>/exports/step_<N> (the history, for the training
curve); curve.jsonl has one line per log interval. Run

  python -m gvae_jax.train.flat_residual --config experiments/configs/flat_residual.py \\
      --workdir runs/flat_residual

and re-run the same command to resume (config overrides as for `gvae train`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from gvae_jax import config as config_lib
from gvae_jax.coding import flat_head
from gvae_jax.errors import report_user_errors
from gvae_jax.entropy import logistic_mixture as lm
from gvae_jax.models import build_model
from gvae_jax.models.flat_base import FLAT_BASE_VALUE, PATCH, R_MAX, R_MIN, tap_offsets
from gvae_jax.models.residual import ResidualModel
from gvae_jax.train import checkpoints

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".ppm")
JPEG_SUFFIXES = (".jpg", ".jpeg")


class TrainState(train_state.TrainState):
  pass


# --- Data. ---

def load_training_pixels(folder: str | Path, jpeg_downscale: int) -> tuple[np.ndarray, np.ndarray,
                                                                           np.ndarray, int]:
  """(pixels uint8 [P, 3], starts [I], shapes [I, 2], count of JPEG-sourced images)."""
  from PIL import Image

  files = sorted(p for p in Path(folder).rglob("*")
                 if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
  if not files:
    raise config_lib.ConfigError(f"no training images under {folder}")
  chunks, shapes, jpegs = [], [], 0
  for path in files:
    with Image.open(path) as image:
      image = image.convert("RGB")
      if path.suffix.lower() in JPEG_SUFFIXES and jpeg_downscale > 1:
        jpegs += 1
        image = image.resize((max(image.width // jpeg_downscale, 1),
                              max(image.height // jpeg_downscale, 1)), Image.LANCZOS)
      array = np.asarray(image, np.uint8)
    shapes.append(array.shape[:2])
    chunks.append(array.reshape(-1, 3))
  sizes = np.asarray([c.shape[0] for c in chunks], np.int64)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  return np.concatenate(chunks), starts, np.asarray(shapes, np.int64), jpegs


def sample_pixels(key, data: dict, count: int, offsets: jax.Array, tau: jax.Array,
                  border_flags: bool):
  """(taps [n, T, 3], flags u [n, T or 0], target [n, 3]) of `count` random pixels:
  residuals r_hat for tau [n] (module doc)."""
  k_pixel, k_i, k_j = jax.random.split(key, 3)
  g = jax.random.randint(k_pixel, (count,), 0, data["pixels"].shape[0])
  i = jax.random.randint(k_i, (count,), 0, PATCH)
  j = jax.random.randint(k_j, (count,), 0, PATCH)
  return gather_taps(data, g, i, j, offsets, tau, border_flags)


def gather_taps(data: dict, g: jax.Array, i: jax.Array, j: jax.Array, offsets: jax.Array,
                tau: jax.Array, border_flags: bool):
  """sample_pixels' arrays for given pixels: g [n] indexes into data["pixels"], (i, j)
  [n] their places in their coding patches."""
  count = g.shape[0]
  image = jnp.searchsorted(data["starts"], g, side="right") - 1
  start = data["starts"][image]
  height, width = data["heights"][image], data["widths"][image]
  local = g - start
  y, x = local // width, local % width
  di, dj = offsets[None, :, 0], offsets[None, :, 1]
  ny, nx = y[:, None] + di, x[:, None] + dj
  flags = ((ny >= 0) & (ny < height[:, None]) & (nx >= 0) & (nx < width[:, None])
           & (i[:, None] + di >= 0) & (i[:, None] + di < PATCH)
           & (j[:, None] + dj >= 0) & (j[:, None] + dj < PATCH))
  index = (start[:, None] + jnp.clip(ny, 0, height[:, None] - 1) * width[:, None]
           + jnp.clip(nx, 0, width[:, None] - 1))
  tau3 = tau[:, None, None].astype(jnp.float32)
  taps = lm.quantize_residual(data["pixels"][index].astype(jnp.float32) - FLAT_BASE_VALUE, tau3)
  taps = jnp.where(flags[..., None], taps, 0.0)
  target = lm.quantize_residual(data["pixels"][g].astype(jnp.float32) - FLAT_BASE_VALUE,
                                tau[:, None].astype(jnp.float32))
  u = flags.astype(jnp.float32) if border_flags else jnp.zeros((count, 0), jnp.float32)
  return taps, u, target


def device_data(pixels: np.ndarray, starts: np.ndarray, shapes: np.ndarray) -> dict:
  """The training images as the jitted step reads them."""
  return {"pixels": jnp.asarray(pixels), "starts": jnp.asarray(starts, jnp.int32),
          "heights": jnp.asarray(shapes[:, 0], jnp.int32),
          "widths": jnp.asarray(shapes[:, 1], jnp.int32)}


def _bounds(tau: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The lowest and highest r_hat an 8-bit pixel can give on the flat base, per tau."""
  tau = tau.astype(jnp.float32)
  b = 2 * tau + 1
  return -b * jnp.floor((-R_MIN + tau) / b), b * jnp.floor((R_MAX + tau) / b)


def sample_bits(model: ResidualModel, params, taps, u, target, tau, corrected: bool):
  """Bits [n] of each pixel's three values (sum over R, G, B)."""
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)  # noqa: E731
  features = apply(ResidualModel.context_at_taps, taps)
  if corrected:
    features = jax.lax.stop_gradient(features)
  raw = apply(ResidualModel.mixture_from_features, features[:, None, None, :],
              u[:, None, None, :], tau, corrected)[:, 0, 0, :]
  mixture = lm.split_params(raw, model.components, model.share_weights)
  means = lm.conditional_means(mixture, target)
  low, high = _bounds(tau)
  logp = lm.log_prob(target, mixture, means, tau[:, None].astype(jnp.float32) + 0.5,
                     low[:, None], high[:, None])
  return -jnp.sum(logp, axis=-1) / jnp.log(2.0)


# --- Training. ---

def validate(config: ml_collections.ConfigDict) -> None:
  r = config.model.residual
  if config.model.name != flat_head.MODEL_NAME:
    raise config_lib.ConfigError(f"config.model.name must be {flat_head.MODEL_NAME!r}")
  if r.correction != "delta" and r.bias_correction:
    raise config_lib.ConfigError("the pixel-sampled trainer trains the 'delta' correction only")


def schedule(config) -> optax.Schedule:
  t = config.train
  return optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, t.warmup_steps, max(t.num_steps, t.warmup_steps + 1),
      t.learning_rate * t.final_learning_rate_factor)


def create_state(config, model: ResidualModel, taps: int) -> TrainState:
  k = config.model.residual.kernel_size
  variables = model.init(jax.random.PRNGKey(config.train.seed), jnp.zeros((1, k, k, taps)),
                         jnp.zeros((1, k, k, 3)), jnp.ones((1,), jnp.int32),
                         corrected=bool(config.model.residual.bias_correction))
  tx = optax.chain(optax.clip_by_global_norm(config.train.grad_clip),
                   optax.adam(schedule(config)))
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)


def make_train_step(config, model: ResidualModel):
  t, r = config.train, config.model.residual
  offsets = jnp.asarray(tap_offsets(r.kernel_size, r.order), jnp.int32)
  flags = bool(config.model.flat.border_flags)
  with_tau = bool(r.bias_correction) and t.tau_pixels > 0

  def train_step(state: TrainState, data: dict):
    key = jax.random.fold_in(jax.random.PRNGKey(t.seed + 1), state.step)
    k0, k1, k2 = jax.random.split(key, 3)
    zero = jnp.zeros((t.pixels_per_step,), jnp.int32)
    batch0 = sample_pixels(k0, data, t.pixels_per_step, offsets, zero, flags)
    if with_tau:
      tau = jax.random.randint(k1, (t.tau_pixels,), 1, r.max_tau + 1)
      batch_tau = sample_pixels(k2, data, t.tau_pixels, offsets, tau, flags)

    def loss_fn(params):
      bpsp0 = jnp.mean(sample_bits(model, params, *batch0, zero, False)) / 3.0
      metrics = {"bpsp_tau0": bpsp0}
      loss = bpsp0
      if with_tau:
        bits = sample_bits(model, params, *batch_tau, tau, True) / 3.0
        loss = loss + jnp.mean(bits)
        per_tau = jax.nn.one_hot(tau - 1, r.max_tau)
        metrics["bpsp_tau_sum"] = per_tau.T @ bits
        metrics["tau_count"] = per_tau.sum(0)
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads=grads), metrics

  return jax.jit(train_step, donate_argnums=0)


def _warm_start(state: TrainState, head_dir: str) -> tuple[TrainState, float]:
  """The parameters and step of an exported head: resumes a run whose workdir is gone
  from its committed export. Adam's moments restart; the learning-rate schedule
  resumes at the export's step (its count lives in the optimiser state, so a fresh
  state would otherwise rerun warm-up and the whole cosine from its peak)."""
  head = flat_head.load_flat_head(head_dir)
  params = jax.tree_util.tree_map(jnp.asarray, head.params)
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(state.params):
    raise config_lib.ConfigError(f"train.init_from {head_dir} does not match this model")
  step = int(head.manifest.get("step") or 0)
  logging.warning("warm start from %s (step %d)", head_dir, step)
  seconds = float(head.manifest.get("train_seconds") or 0.0)
  opt_state = optax.tree_utils.tree_set(state.tx.init(params), _schedule_count,
                                        count=jnp.asarray(step, jnp.int32))
  return state.replace(params=params, opt_state=opt_state, step=step), seconds


def _schedule_count(path, _) -> bool:
  """optax.tree_utils filter: the learning-rate schedule's step count (not Adam's)."""
  return getattr(path[-1], "tuple_name", None) == optax.ScaleByScheduleState.__name__


def learning_rate(config, state: TrainState) -> float:
  """The learning rate the next step uses (from the schedule count in the optimiser state)."""
  count = optax.tree_utils.tree_get(state.opt_state, "count", filtering=_schedule_count)
  return float(schedule(config)(count))


def _progress_path(workdir: Path) -> Path:
  return workdir / "progress.json"


def _read_seconds(workdir: Path, step: int) -> float:
  path = _progress_path(workdir)
  if step and path.is_file():
    progress = json.loads(path.read_text())
    if int(progress.get("step", -1)) == step:
      return float(progress["train_seconds"])
  return 0.0


def train(config: ml_collections.ConfigDict, workdir: str | Path,
          stop_after_steps: int | None = None) -> TrainState:
  """Trains (resuming from the newest checkpoint) and exports; module doc."""
  validate(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints.check_compatible(config, workdir)
  t = config.train
  model = build_model(config)
  taps = len(tap_offsets(config.model.residual.kernel_size, config.model.residual.order))
  state = create_state(config, model, taps if config.model.flat.border_flags else 0)
  manager = checkpoints.manager(workdir, config)
  state = checkpoints.restore_latest(manager, state)
  step = int(state.step)
  seconds = _read_seconds(workdir, step)
  if manager.latest_step() is None and t.init_from:
    state, seconds = _warm_start(state, t.init_from)
    step = int(state.step)
  end = t.num_steps if stop_after_steps is None else min(t.num_steps, step + stop_after_steps)

  pixels, starts, shapes, jpegs = load_training_pixels(config.data.folder,
                                                       config.data.jpeg_downscale)
  logging.warning("training data: %d images (%d JPEG-sourced, shrunk %dx), %d pixels",
                  len(starts), jpegs, config.data.jpeg_downscale, pixels.shape[0])
  data = device_data(pixels, starts, shapes)
  train_step = make_train_step(config, model)
  export_dir = Path(t.export_dir) if t.export_dir else None
  last_checkpoint = last_export = time.monotonic()
  interval: list[dict] = []
  tick = time.monotonic()

  def export(now_step: int, bpsp: float | None):
    extra = {"step": now_step, "train_seconds": round(seconds, 1),
             "train_bpsp_tau0": bpsp, "pixels_per_step": int(t.pixels_per_step)}
    params = jax.device_get(state.params)
    flat_head.write_flat_head(config, params, workdir / "exports" / f"step_{now_step:07d}", extra)
    if export_dir is not None:
      flat_head.write_flat_head(config, params, export_dir, extra)

  def checkpoint(now_step: int):
    checkpoints.save(manager, now_step, state)
    manager.wait_until_finished()
    _progress_path(workdir).write_text(json.dumps({"step": now_step,
                                                   "train_seconds": seconds}) + "\n")

  last_bpsp = None
  while step < end:
    state, metrics = train_step(state, data)
    step += 1
    if not interval:  # the first step of a run compiles: not training time
      jax.block_until_ready(metrics)
      tick = time.monotonic()
    interval.append(metrics)
    if step % t.log_every == 0 or step == end:
      interval = jax.device_get(interval)
      now = time.monotonic()
      seconds += now - tick
      tick = now
      row = {"step": step, "train_seconds": round(seconds, 1),
             "bpsp_tau0": float(np.mean([m["bpsp_tau0"] for m in interval])),
             "grad_norm": float(np.mean([m["grad_norm"] for m in interval])),
             "learning_rate": learning_rate(config, state)}
      if "tau_count" in interval[0]:
        sums = np.sum([m["bpsp_tau_sum"] for m in interval], axis=0)
        counts = np.maximum(np.sum([m["tau_count"] for m in interval], axis=0), 1)
        row.update({f"bpsp_tau{k + 1}": float(sums[k] / counts[k]) for k in range(len(sums))})
      last_bpsp = row["bpsp_tau0"]
      with open(workdir / "curve.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
      print(json.dumps(row), flush=True)
      interval = []
      wall = time.monotonic()
      if wall - last_checkpoint >= 60 * t.checkpoint_every_minutes:
        checkpoint(step)
        last_checkpoint = wall
      if wall - last_export >= 60 * t.export_every_minutes:
        export(step, last_bpsp)
        last_export = wall
  checkpoint(step)
  export(step, last_bpsp)
  return state


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gvae_jax.train.flat_residual",
                                   description="Pixel-sampled training of the flat-base head.")
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--stop-after-steps", type=int, default=None)
  args, overrides = parser.parse_known_args(argv)
  return report_user_errors(lambda: train(config_lib.load_config(args.config, overrides),
                                          args.workdir, args.stop_after_steps))


if __name__ == "__main__":
  sys.exit(main())
