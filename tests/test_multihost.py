"""Multi-process data-parallel training through jax.distributed, on local CPU processes.

Every run is the real `gvae train` CLI in fresh processes, each with its own
number of fake CPU devices (fixed when JAX starts), talking to a coordinator
on localhost:
- 2 processes x 2 devices and 1 process x 4 devices (same seed, same global
  batch of 8) reach the same parameters;
- a 2-process run whose second process is SIGKILLed mid-run (the first is then
  killed too, as a cluster scheduler would) resumes from the one checkpoint
  both processes wrote and ends with the parameters of the uninterrupted run;
- logging and evaluation happen once (process 0).
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from gvae_jax.train import checkpoints

NUM_STEPS = 12

# Verified on the default profile (jax 0.12): both parts pass. On the tfc
# profile's jax 0.5.3 the equivalence part passed, but in the SIGKILL part
# process 1 exited before its first checkpoint (gloo's CPU collectives of that
# version); not resolved, so not claimed there.
pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in jax.__version__.split(".")[:2]) < (0, 6),
    reason="multi-process training is verified on jax >= 0.6 (the default profile) only")
TIMEOUT = 1500  # seconds per launch; a loaded 2-core machine compiles slowly


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """One XLA cache for every launch: the later runs reuse the compiled programs
  ($GVAE_COMPILATION_CACHE if set, as for the CLI)."""
  location = os.environ.get("GVAE_COMPILATION_CACHE", "")
  if location.strip().lower() not in ("", "off", "0", "none"):
    return Path(location)
  return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(10):
    h, w = 36 + 4 * i, 40 + 3 * i
    ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 40, h)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / f"img{i}.png")
  return folder


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_command(workdir, image_folder, *extra):
  return [sys.executable, "-m", "gvae_jax", "train", "--config", "experiments/configs/tiny.py",
          "--workdir", str(workdir), "--no-progress", f"--config.data.folder={image_folder}",
          f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=2",
          "--config.train.log_every=4", *extra]


def _launch(repo_root, workdir, image_folder, processes: int, devices: int, *extra,
            cache=None):
  """Starts the run's processes; returns [(Popen, log path)]."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if cache is not None:
    env["GVAE_COMPILATION_CACHE"] = str(cache)
  env.pop("GVAE_TESTS_ISOLATED_CHILD", None)
  workdir.mkdir(parents=True, exist_ok=True)
  port = _free_port()
  procs = []
  for index in range(processes):
    distributed = ([] if processes == 1 else
                   ["--coordinator-address", f"localhost:{port}",
                    "--num-processes", str(processes), "--process-id", str(index)])
    log = workdir.parent / f"{workdir.name}.process{index}.log"
    with open(log, "ab") as out:
      proc = subprocess.Popen(_train_command(workdir, image_folder, *extra, *distributed),
                              cwd=repo_root, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    procs.append((proc, log))
  return procs


def _wait(procs):
  deadline = time.time() + TIMEOUT
  for proc, log in procs:
    try:
      proc.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for other, _ in procs:
        other.kill()
      pytest.fail(f"timed out; log:\n{log.read_text(errors='replace')[-3000:]}")
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]


def _params(workdir):
  params, step = checkpoints.restore_params(workdir)
  assert step == NUM_STEPS
  return params


def _assert_close(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def _logged_steps(log: str) -> list[int]:
  """Steps of the training lines a process printed ("step 4: loss ...")."""
  return [int(m) for m in re.findall(r"^step (\d+): loss", log, flags=re.M)]


def _committed_steps(workdir) -> list[int]:
  ckpt = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_sigkill(repo_root, image_folder, tmp_path,
                                                          compilation_cache):
  # The two reference runs go side by side.
  two = _launch(repo_root, tmp_path / "two", image_folder, 2, 2,
                f"--config.eval.folder={image_folder}", cache=compilation_cache)
  one = _launch(repo_root, tmp_path / "one", image_folder, 1, 4, "--config.eval.folder=",
                cache=compilation_cache)
  _wait(two + one)
  two_params = _params(tmp_path / "two")
  _assert_close(_params(tmp_path / "one"), two_params)
  assert (tmp_path / "two" / "eval" / "final.json").is_file()
  assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
  logs = [log.read_text(errors="replace") for _, log in two]
  assert _logged_steps(logs[0])[-1] == NUM_STEPS and _logged_steps(logs[1]) == []

  # Kill process 1 as soon as a checkpoint is committed; process 0 then
  # cannot finish alone and is killed too (a scheduler restarts the job).
  workdir = tmp_path / "killed"
  procs = _launch(repo_root, workdir, image_folder, 2, 2, "--config.eval.folder=",
                  cache=compilation_cache)
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and procs[1][0].poll() is None and not _committed_steps(workdir):
    time.sleep(0.02)
  killed_midway = procs[1][0].poll() is None
  procs[1][0].send_signal(signal.SIGKILL)
  time.sleep(1.0)
  procs[0][0].send_signal(signal.SIGKILL)
  for proc, _ in procs:
    proc.wait()
  assert killed_midway, "the run finished before it could be killed"
  steps = _committed_steps(workdir)
  assert steps and steps[-1] < NUM_STEPS, steps

  _wait(_launch(repo_root, workdir, image_folder, 2, 2, "--config.eval.folder=",
                cache=compilation_cache))
  resumed_log = (tmp_path / "killed.process0.log").read_text(errors="replace")
  assert _logged_steps(resumed_log)[-1] == NUM_STEPS
  _assert_close(_params(workdir), two_params)
